"""The teacher (frozen | ema, columns | distillation term, bf16, saved in checkpoints), imputation_source and
impute_modalities (`calmrl_hf/training/teacher.py`, `calibration.py`), each against a reference computed another
way: the model's weights as the run started, an EMA of the recorded optimizer steps, explicit CLIP loops, the
imputer's public `impute`."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from launching import torchrun
from tiny_models import MIXED_MASK, tiny_batch
from training_fixtures import FULL, MIXED_PATTERNS, MODALITIES, collate, make_dataset, training_config

from calmrl_hf import CalMRLModel
from calmrl_hf.alignment import OBJECTIVES, distillation_loss
from calmrl_hf.data.collator import model_inputs
from calmrl_hf.training import CalMRLTrainingArguments, build_accelerator, train
from calmrl_hf.training.calibration import Calibration, check_teacher_supported, resolve_impute_modalities
from calmrl_hf.training.checkpoints import CheckpointError, file_sha256
from calmrl_hf.training.teacher import TEACHER_FILE, Teacher


SUBTITLE = MODALITIES.index("subtitle")


def small_args(tmp_path, **overrides) -> CalMRLTrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3,
                  logging_steps=1, imputer_min_rows=8, seed=3)
    values.update(overrides)
    return CalMRLTrainingArguments(**values)


def clone_state(module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


@pytest.fixture
def calibrations(monkeypatch):
    """Every `Calibration` a run starts, with `start_state`: the model's state when its teacher was built."""
    started = []
    original = Calibration.start

    def start(self, model):
        self.start_state = clone_state(model)
        original(self, model)
        started.append(self)

    monkeypatch.setattr(Calibration, "start", start)
    return started


@pytest.fixture
def forwards(monkeypatch):
    """What each training step passed to the model (`prepare`'s extra arguments) and got from it (`loss`'s
    outputs), in step order."""
    seen = {"inputs": [], "extra": [], "outputs": []}
    prepare, loss = Calibration.prepare, Calibration.loss

    def recording_prepare(self, model, batch):
        inputs, extra, teacher_view = prepare(self, model, batch)
        seen["inputs"].append({k: v.clone() for k, v in inputs.items()})
        seen["extra"].append({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in extra.items()})
        return inputs, extra, teacher_view

    def recording_loss(self, model, outputs, teacher_view):
        seen["outputs"].append(SimpleNamespace(embeddings=outputs.embeddings.detach().clone(),
                                               modality_mask=outputs.modality_mask.clone(),
                                               imputed_embeddings=outputs.imputed_embeddings.detach().clone(),
                                               aligned_mask=outputs.aligned_mask.clone()))
        return loss(self, model, outputs, teacher_view)

    monkeypatch.setattr(Calibration, "prepare", recording_prepare)
    monkeypatch.setattr(Calibration, "loss", recording_loss)
    return seen


def with_mask_column(dataset):
    """A CalMRL dataset's `modality_mask` column (observed flags in MODALITIES order) on a fixture dataset."""
    return dataset.add_column("modality_mask", [[row[name] is not None for name in MODALITIES] for row in dataset])


def fitted_model(**overrides) -> CalMRLModel:
    """A seeded tiny model whose imputer is fitted on every modality (random unit embeddings)."""
    torch.manual_seed(0)
    model = CalMRLModel(training_config(**overrides))
    z = F.normalize(torch.randn(64, 4, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    model.imputer.fit(z, torch.ones(64, 4, dtype=torch.bool), max_iter=3)
    assert model.imputer.fitted_modalities.all()
    return model


def train_teacher_run(tmp_path, warm_start=True, **overrides):
    """A seeded model trained 4 steps on mixed missingness (imputer warm-started on full rows); returns it."""
    torch.manual_seed(0)
    model = CalMRLModel(training_config())
    args = small_args(tmp_path, imputer_warm_start=warm_start, **overrides)
    train(model, make_dataset(32, MIXED_PATTERNS), args, collate_fn=collate,
          warm_start_dataset=make_dataset(32, [FULL], seed=2) if warm_start else None)
    return model


# ---------------------------------------------------------------------------- 1. frozen
def test_a_frozen_teacher_keeps_the_weights_the_run_started_with(tmp_path, calibrations):
    torch.manual_seed(0)
    initial = clone_state(CalMRLModel(training_config()))  # the same seeded model, before training
    model = train_teacher_run(tmp_path, teacher="frozen")
    (calibration,) = calibrations
    teacher = calibration.teacher.model
    assert teacher is not model and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    # bit for bit the model as the run started, after the warm start (which fitted the imputer only)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, calibration.start_state[name]), name
    for name, parameter in teacher.named_parameters():
        assert torch.equal(parameter, initial[name]), name
    assert teacher.imputer.fitted_modalities.all() and not torch.equal(teacher.imputer.weight,
                                                                       initial["imputer.weight"])
    # while the student trained: every tower and projection moved, and its imputer ran M-steps
    trained = model.state_dict()
    for name in ("projections.vision.weight", "projections.audio.weight", "projections.text.weight",
                 "encoders.vision.layers.0.attention.q_proj.weight", "encoders.text.embeddings.LayerNorm.weight"):
        assert not torch.equal(trained[name], initial[name]), name
    assert not torch.equal(trained["imputer.weight"], teacher.imputer.weight)


# ---------------------------------------------------------------------------- 2. EMA
def test_an_ema_teacher_averages_the_parameters_of_each_optimizer_step(tmp_path, calibrations, monkeypatch):
    torch.manual_seed(0)
    model = CalMRLModel(training_config())
    parameters = dict(model.named_parameters())
    steps = []  # the student's parameters after each optimizer step (not each micro-batch)
    handle = register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs: steps.append({n: p.detach().clone() for n, p in parameters.items()}))
    updates = []
    update = Calibration.update
    monkeypatch.setattr(Calibration, "update", lambda self, m: (updates.append(1), update(self, m)))
    decay = 0.6
    try:
        train(model, make_dataset(64, MIXED_PATTERNS), small_args(tmp_path, teacher="ema", teacher_ema_decay=decay,
                                                                  gradient_accumulation_steps=2),
              collate_fn=collate)
    finally:
        handle.remove()
    assert len(steps) == 4 and len(updates) == 4
    (calibration,) = calibrations
    teacher = calibration.teacher.model
    # t_0 = theta_0; t_n = decay * t_{n-1} + (1 - decay) * theta_n
    reference = {name: calibration.start_state[name].clone() for name in parameters}
    for theta in steps:
        reference = {name: decay * reference[name] + (1 - decay) * theta[name] for name in reference}
    for name, parameter in teacher.named_parameters():
        torch.testing.assert_close(parameter, reference[name], rtol=1e-6, atol=1e-7, msg=name)
    final = steps[-1]["projections.text.weight"]
    assert not torch.allclose(teacher.projections.text.weight, final, atol=1e-6)  # an average, not the student ...
    assert not torch.allclose(teacher.projections.text.weight, calibration.start_state["projections.text.weight"],
                              atol=1e-6)  # ... nor the start
    # the buffers (the imputer) are the run start's fit; the student's imputer ran M-steps
    for name, buffer in teacher.imputer.named_buffers():
        assert torch.equal(buffer, calibration.start_state[f"imputer.{name}"]), name
    assert not torch.equal(model.imputer.weight, teacher.imputer.weight)


def test_an_ema_teacher_with_decay_zero_is_the_student(tmp_path, calibrations):
    model = train_teacher_run(tmp_path, warm_start=False, teacher="ema", teacher_ema_decay=0.0, max_steps=2)
    teacher = calibrations[0].teacher.model
    for name, parameter in model.named_parameters():
        assert torch.equal(teacher.get_parameter(name), parameter), name


def test_teacher_update_against_a_sequence_of_parameter_sets():
    """`Teacher.update` alone (float64, so the reference is exact to rounding), and a frozen one never moves."""
    torch.manual_seed(0)
    student = CalMRLModel(training_config()).double()
    ema, frozen = Teacher(student, "ema", 0.9), Teacher(student, "frozen", 0.9)
    reference = {name: p.detach().clone() for name, p in student.named_parameters()}
    start = dict(reference)
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        with torch.no_grad():
            for name, parameter in student.named_parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        ema.update(student)
        frozen.update(student)
        reference = {name: 0.9 * reference[name] + 0.1 * p.detach() for name, p in student.named_parameters()}
    for name, parameter in ema.model.named_parameters():
        torch.testing.assert_close(parameter, reference[name], rtol=1e-12, atol=1e-12, msg=name)
        assert torch.equal(frozen.model.get_parameter(name), start[name]), name
    with pytest.raises(ValueError, match="teacher = 'x'"):
        Teacher(student, "x", 0.9)


# ---------------------------------------------------------------------------- 3. no gradient through the teacher
def _calibration(tmp_path, model, **overrides):
    args = small_args(tmp_path, teacher="frozen", impute_modalities="all", **overrides)
    calibration = Calibration(model, args, None, build_accelerator(args))
    calibration.start(model)
    with torch.no_grad():  # the student moves away from its teacher
        for projection in model.projections.values():
            projection.weight.add_(0.05 * torch.randn_like(projection.weight))
    return calibration


def _grads(loss, parameters):
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, parameters)]


def _assert_same_grads(first, second):
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["columns", "distillation"])
def test_no_gradient_reaches_the_student_through_the_teacher_term(tmp_path, form):
    model = fitted_model()
    calibration = _calibration(tmp_path, model, teacher_form=form, imputation_source="teacher")
    parameters = [p for p in model.parameters() if p.requires_grad]
    inputs, extra, (teacher_embeddings, teacher_mask) = calibration.prepare(model, tiny_batch(MIXED_MASK))
    assert not teacher_embeddings.requires_grad and not extra["imputations"].requires_grad
    outputs = model(**inputs, return_loss=True, **extra)
    real = calibration.loss(model, outputs, (teacher_embeddings, teacher_mask))
    constant = calibration.loss(model, outputs, (teacher_embeddings.clone(), teacher_mask.clone()))
    assert not torch.equal(real, outputs.loss)  # the term is there (weight 1)
    _assert_same_grads(_grads(real, parameters), _grads(constant, parameters))
    # teacher embeddings that did carry the student's graph (its own embeddings) enter detached
    own = outputs.embeddings
    _assert_same_grads(_grads(calibration.loss(model, outputs, (own, outputs.modality_mask)), parameters),
                       _grads(calibration.loss(model, outputs, (own.detach().clone(), outputs.modality_mask)),
                              parameters))
    if form == "columns":  # which is a real constraint: the same columns with the graph give another gradient
        columns = torch.cat([outputs.imputed_embeddings, own], dim=1)
        mask = torch.cat([outputs.aligned_mask, outputs.modality_mask], dim=1)
        leaky = outputs.loss + OBJECTIVES["pmrl"].loss(columns, mask, model.config, model.temperature)
        assert any(not torch.allclose(a, b) for a, b in zip(
            _grads(leaky, parameters), _grads(calibration.loss(model, outputs, (own.detach(), mask[:, 4:])),
                                              parameters)))
    real.backward()
    assert all(p.grad is None for p in calibration.teacher.model.parameters())


def test_imputations_enter_detached_and_only_in_the_allowed_missing_slots():
    model = fitted_model()
    parameters = [p for p in model.parameters() if p.requires_grad]
    inputs = tiny_batch(MIXED_MASK)
    own = model(**inputs, return_loss=True)  # the student's imputation of its own rows, with gradient
    assert own.imputed_embeddings.requires_grad
    given = model(**inputs, return_loss=True, imputations=own.imputed_embeddings)
    constant = model(**inputs, return_loss=True, imputations=own.imputed_embeddings.detach().clone())
    torch.testing.assert_close(given.loss, own.loss)  # the same values in the same slots ...
    _assert_same_grads(_grads(given.loss, parameters), _grads(constant.loss, parameters))
    assert any(not torch.allclose(a, b) for a, b in zip(_grads(own.loss, parameters),  # ... without their gradient
                                                          _grads(constant.loss, parameters)))

    # normalize(X) in the missing slots of the allowed modalities, observed embeddings elsewhere, zeros otherwise
    imputations = 3 * torch.randn(MIXED_MASK.shape[0], 4, 16, generator=torch.Generator().manual_seed(2))
    allowed = torch.tensor([True, False, True, True])  # not audio
    with torch.no_grad():
        out = model(**inputs, imputations=imputations, impute_modalities=allowed)
    mask = MIXED_MASK
    for b in range(mask.shape[0]):
        for m in range(4):
            if mask[b, m]:
                expected, aligned = out.embeddings[b, m], True
            elif allowed[m]:
                expected, aligned = F.normalize(imputations[b, m], dim=-1), True
            else:
                expected, aligned = torch.zeros(16), False
            torch.testing.assert_close(out.imputed_embeddings[b, m], expected, msg=f"row {b}, modality {m}")
            assert bool(out.aligned_mask[b, m]) == aligned, (b, m)
    assert (~mask[:, 1]).any() and (~mask[:, 0]).any()  # both kinds of missing slot are in the batch


# ---------------------------------------------------------------------------- 4. imputation_source="teacher"
def test_teacher_imputations_are_the_teachers_ppca_posterior(tmp_path, calibrations, forwards):
    train_teacher_run(tmp_path, teacher="frozen", imputation_source="teacher", impute_modalities="all")
    (calibration,) = calibrations
    reference = CalMRLModel(training_config())  # the frozen teacher, rebuilt from the run start's state
    reference.load_state_dict(calibration.start_state)
    reference.eval()
    assert len(forwards["extra"]) == 4
    for inputs, extra, outputs in zip(forwards["inputs"], forwards["extra"], forwards["outputs"]):
        with torch.no_grad():
            embeddings, mask = reference.embed_modalities(**inputs)
            expected = F.normalize(reference.imputer.impute(embeddings, mask), dim=-1)  # the public impute
        missing = ~mask
        assert missing.any()
        torch.testing.assert_close(extra["imputations"][missing], expected[missing])
        # the forward put them in every missing slot (all fitted, every row observes one)
        imputed = outputs.aligned_mask & ~outputs.modality_mask
        assert torch.equal(imputed, missing)
        torch.testing.assert_close(outputs.imputed_embeddings[missing], expected[missing])


def test_teacher_imputations_need_a_teacher_imputer_fitted_at_the_start(tmp_path):
    """Without a fit at the run start the teacher's imputer never imputes (it is not updated), and the slots the
    student's imputer fits during the run would get zero columns: refused with the remedy."""
    with pytest.raises(ValueError, match=r"has not fitted \['vision', 'audio', 'text', 'subtitle'\].*"
                                         r"imputer_warm_start=True"):
        train_teacher_run(tmp_path, warm_start=False, teacher="ema", imputation_source="teacher")


# ---------------------------------------------------------------------------- 5. impute_modalities
NO_SUBTITLE = [(True, False, True, False), (False, True, True, False), (True, True, False, False)]


def test_impute_modalities_resolves_trained_all_and_lists(tmp_path):
    model = CalMRLModel(training_config())
    data = with_mask_column(make_dataset(12, NO_SUBTITLE))

    def resolve(**overrides):
        return resolve_impute_modalities(model, small_args(tmp_path, **overrides), data)

    # the data never observes subtitle; freezing text freezes its shared tower, so subtitle's too
    assert resolve(freeze_modalities=["text"]) == ["vision", "audio"]
    assert resolve() == ["vision", "audio", "text"]
    assert resolve(impute_modalities="all") is None
    assert resolve(impute_modalities=["audio", "vision"]) == ["audio", "vision"]
    with pytest.raises(ValueError, match=r"impute_modalities names unknown modalities \['smell'\]"):
        resolve(impute_modalities=["smell"])
    # without a modality_mask column, or streamed, the observed modalities are unknown: every unfrozen one
    args = small_args(tmp_path, freeze_modalities=["audio"])
    assert resolve_impute_modalities(model, args, make_dataset(12, NO_SUBTITLE)) == ["vision", "text", "subtitle"]
    streamed = data.to_iterable_dataset(num_shards=2)
    assert resolve_impute_modalities(model, args, streamed) == ["vision", "text", "subtitle"]


@pytest.mark.parametrize("choice, frozen, expected", [
    ("trained", ["text"], ["vision", "audio"]),  # subtitle never observed, text's tower (subtitle's too) frozen
    ("trained", [], ["vision", "audio", "text"]),  # subtitle never observed
    ("all", ["text"], list(MODALITIES)),  # the paper's: every fitted modality
])
def test_trained_modalities_leave_unobserved_and_frozen_ones_unimputed(tmp_path, forwards, choice, frozen, expected):
    """The imputer is fitted on every modality (warm start on full rows) and the train data (with its
    modality_mask column) never observes subtitle: the forwards impute the missing slots of `expected` only."""
    torch.manual_seed(0)
    model = CalMRLModel(training_config())
    args = small_args(tmp_path, max_steps=2, freeze_modalities=frozen, impute_modalities=choice,
                      imputation_source="student", imputer_warm_start=True)
    train(model, with_mask_column(make_dataset(32, NO_SUBTITLE)), args, collate_fn=collate,
          warm_start_dataset=make_dataset(32, [FULL], seed=2))
    assert model.imputer.fitted_modalities.all()
    imputed = torch.cat([out.aligned_mask & ~out.modality_mask for out in forwards["outputs"]])
    missing = torch.cat([~out.modality_mask for out in forwards["outputs"]])
    assert missing[:, SUBTITLE].all() and missing[:, :3].any(dim=0).all()  # every kind of missing slot
    allowed = torch.tensor([name in expected for name in MODALITIES])
    assert torch.equal(imputed, missing & allowed)


# ---------------------------------------------------------------------------- 6. checkpoints
TEACHER_RUN = dict(teacher="ema", teacher_ema_decay=0.5, teacher_form="distillation", imputation_source="teacher")


def checkpointed_run(output_dir, stop_after=None, resume=None):
    """6 steps of a seeded model with dropout in its towers, an EMA teacher (its imputations, distillation term),
    the imputer warm-started, a checkpoint every 2 steps; with `stop_after`, killed right after the first
    checkpoint at or past that step (returns None), else returns the trained model."""
    torch.manual_seed(0)
    model = CalMRLModel(training_config(dropout=True))
    args = small_args(output_dir, output_dir=str(output_dir), max_steps=6, save_steps=2, save_total_limit=None,
                      resume_from_checkpoint=resume, imputer_warm_start=True, **TEACHER_RUN)

    def stop(step):
        if stop_after is not None and step >= stop_after:
            raise KeyboardInterrupt

    try:
        train(model, make_dataset(32, MIXED_PATTERNS), args, collate_fn=collate, on_checkpoint=stop,
              warm_start_dataset=make_dataset(32, [FULL], seed=2))
    except KeyboardInterrupt:
        return None
    return model


def test_teacher_is_checkpointed_and_resumed_exactly(tmp_path, calibrations):
    """With dropout in the towers: model AND teacher of a run resumed from a mid-run checkpoint are bit-equal to
    the uninterrupted run's; the teacher file is listed with its checksum and holds the teacher of its step."""
    uninterrupted = clone_state(checkpointed_run(tmp_path / "a"))
    teacher = clone_state(calibrations[-1].teacher.model)
    checkpoint = tmp_path / "a" / "checkpoints" / "step_6"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["files"][TEACHER_FILE] == file_sha256(checkpoint / TEACHER_FILE)
    saved = load_file(str(checkpoint / TEACHER_FILE))
    assert saved.keys() == teacher.keys() and all(torch.equal(saved[k], v) for k, v in teacher.items())
    assert not torch.equal(teacher["projections.text.weight"], uninterrupted["projections.text.weight"])

    assert checkpointed_run(tmp_path / "b", stop_after=4) is None  # in the second epoch (4 batches an epoch)
    resumed = checkpointed_run(tmp_path / "b", resume="latest")
    for key, value in uninterrupted.items():
        assert torch.equal(resumed.state_dict()[key], value), key
    for key, value in calibrations[-1].teacher.model.state_dict().items():
        assert torch.equal(value, teacher[key]), key


def test_a_damaged_teacher_file_is_refused(tmp_path):
    assert checkpointed_run(tmp_path, stop_after=2) is None
    path = tmp_path / "checkpoints" / "step_2" / TEACHER_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one bit pattern of the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"teacher\.safetensors is damaged: its SHA-256 differs"):
        checkpointed_run(tmp_path, resume="latest")


# ---------------------------------------------------------------------------- 7. bf16 teacher
def test_a_bfloat16_teacher_keeps_a_float32_imputer_and_embeds_as_a_float32_one(tmp_path, calibrations):
    model = train_teacher_run(tmp_path, max_steps=3, teacher="frozen", teacher_dtype="bfloat16",
                              imputation_source="teacher")
    (calibration,) = calibrations
    teacher = calibration.teacher
    assert {p.dtype for p in teacher.model.parameters()} == {torch.bfloat16}
    for name, buffer in teacher.model.imputer.named_buffers():  # float32, exactly the start's fit
        assert buffer.dtype == torch.float32 and torch.equal(buffer, calibration.start_state[f"imputer.{name}"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    start = CalMRLModel(training_config())
    start.load_state_dict(calibration.start_state)
    full = Teacher(start, "frozen", 0.0)
    batch = collate([make_dataset(16, MIXED_PATTERNS, seed=4)[i] for i in range(16)])
    half, mask = teacher.embed(model_inputs(batch), torch.float32)
    reference, reference_mask = full.embed(model_inputs(batch), torch.float32)
    assert half.dtype == torch.float32 and torch.equal(mask, reference_mask)
    cosine = (half * reference)[mask].sum(-1)
    assert cosine.min() > 0.99, cosine.min()
    assert not torch.equal(half, reference)  # it did run in bfloat16


# ---------------------------------------------------------------------------- 8. distillation_loss
def _clip_reference(student, teacher, mask, temperature):
    """Mean over the modalities with >= 2 observed rows of (CE(student rows vs teacher rows) + CE(teacher rows vs
    student rows)) / 2, written as explicit loops over rows."""
    losses = []
    for m in range(mask.shape[1]):
        rows = [b for b in range(mask.shape[0]) if mask[b, m]]
        if len(rows) < 2:
            continue
        total = 0.0
        for position, i in enumerate(rows):
            for queries, keys in ((student, teacher), (teacher, student)):
                logits = torch.stack([queries[i, m] @ keys[j, m] / temperature for j in rows])
                total = total - (logits[position] - torch.logsumexp(logits, dim=0))
        losses.append(total / (2 * len(rows)))
    return sum(losses) / len(losses)


def test_distillation_loss_matches_explicit_clip_loops():
    generator = torch.Generator().manual_seed(0)
    student = F.normalize(torch.randn(7, 4, 8, generator=generator, dtype=torch.float64), dim=-1).requires_grad_()
    teacher = F.normalize(torch.randn(7, 4, 8, generator=generator, dtype=torch.float64), dim=-1).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 0], [0, 0, 1, 0], [1, 1, 0, 0],
                         [0, 1, 1, 0]], dtype=torch.bool)  # modality 3: one row (skipped)
    loss = distillation_loss(student, teacher, mask, temperature=0.1)
    reference = _clip_reference(student, teacher.detach(), mask, 0.1)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    grad, = torch.autograd.grad(loss, student, retain_graph=True)
    reference_grad, = torch.autograd.grad(reference, student)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-10, atol=1e-12)
    loss.backward()
    assert teacher.grad is None  # the teacher's side is detached
    # unobserved slots are never read; without a mask every row observes every modality
    poisoned = teacher.detach().clone()
    poisoned[~mask] = float("nan")
    torch.testing.assert_close(distillation_loss(student, poisoned, mask, temperature=0.1), reference)
    full = torch.ones(7, 4, dtype=torch.bool)
    torch.testing.assert_close(distillation_loss(student, teacher, temperature=0.1),
                               _clip_reference(student, teacher.detach(), full, 0.1))
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(student, teacher[..., :4], mask)


# ---------------------------------------------------------------------------- 9. validation
@pytest.mark.parametrize("field, values", [
    ("teacher", dict(teacher="x")),
    ("teacher_ema_decay", dict(teacher="ema", teacher_ema_decay=1.0)),
    ("teacher_ema_decay", dict(teacher_ema_decay=-0.1)),
    ("teacher_weight", dict(teacher_weight=-1)),
    ("teacher_weight", dict(teacher_weight=math.nan)),
    ("teacher_form", dict(teacher_form="x")),
    ("teacher_dtype", dict(teacher_dtype="float16")),
    ("teacher_dtype='bfloat16'", dict(teacher="ema", teacher_dtype="bfloat16")),  # rounds its updates away
    ("imputation_source", dict(imputation_source="x")),
    ("imputation_source", dict(imputation_source="teacher", teacher="none")),
    ("impute_modalities", dict(impute_modalities="some")),
])
def test_bad_teacher_arguments_name_the_field(field, values):
    with pytest.raises(ValueError, match=field):
        CalMRLTrainingArguments(**values)


def test_teacher_arguments_from_a_recipe():
    args = CalMRLTrainingArguments.from_dict({"teacher": "ema", "teacher_ema_decay": "0.999", "teacher_weight": "2",
                                              "impute_modalities": ("vision", "audio")})
    assert (args.teacher_ema_decay, args.teacher_weight, args.impute_modalities) == (0.999, 2.0, ["vision", "audio"])


def test_unsupported_teacher_settings_are_refused_before_training():
    model = SimpleNamespace(config=training_config())
    plain = SimpleNamespace(distributed_type=DistributedType.NO)
    for engine in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ValueError, match=f"teacher='ema' is not supported under {engine.value}.*Train with DDP"):
            check_teacher_supported(model, CalMRLTrainingArguments(teacher="ema"),
                                    SimpleNamespace(distributed_type=engine))
        check_teacher_supported(model, CalMRLTrainingArguments(), SimpleNamespace(distributed_type=engine))
    triangle = SimpleNamespace(config=training_config(alignment_objective="triangle", imputer_method="none",
                                                      triangle_modalities=["text", "vision", "audio"]))
    with pytest.raises(ValueError, match="TRIANGLE.*teacher_form='distillation'"):
        check_teacher_supported(triangle, CalMRLTrainingArguments(teacher="frozen"), plain)
    check_teacher_supported(triangle, CalMRLTrainingArguments(teacher="frozen", teacher_form="distillation"), plain)
    mean = SimpleNamespace(config=training_config(imputer_method="mean"))
    with pytest.raises(ValueError, match="imputer_method is 'mean'"):
        check_teacher_supported(mean, CalMRLTrainingArguments(teacher="ema", imputation_source="teacher"), plain)
    check_teacher_supported(mean, CalMRLTrainingArguments(teacher="ema"), plain)


# ---------------------------------------------------------------------------- 10. two processes
@pytest.mark.slow
def test_two_processes_keep_identical_teachers(tmp_path):
    """2 CPU processes (gloo), EMA teacher with its imputations and distillation term (gathered negatives): the
    teacher ends identical on both, and moved from where it started."""
    torchrun("dist_teacher_worker.py", str(tmp_path), nproc=2, timeout=300)
    reports = [json.loads((tmp_path / f"process_{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["processes"] for r in reports] == [2, 2]
    assert reports[0]["teacher"] == reports[1]["teacher"]
    assert reports[0]["model"] == reports[1]["model"]
    assert reports[0]["teacher_at_start"] == reports[1]["teacher_at_start"] != reports[0]["teacher"]
    assert reports[0]["imputations"] > 0


def test_by_default_the_objective_sees_observed_columns_only_and_the_imputer_keeps_fitting(tmp_path, forwards):
    """imputation_source="none" (the default): no imputed column in any training forward, the same trajectory as a
    model without an imputer, and the imputer still runs its M-steps (for `encode`)."""
    torch.manual_seed(0)
    model = CalMRLModel(training_config())
    reference = CalMRLModel(training_config(imputer_method="none"))
    reference.load_state_dict(model.state_dict())
    start = model.imputer.weight.clone()
    train(model, make_dataset(32, MIXED_PATTERNS), small_args(tmp_path / "default", max_steps=3), collate_fn=collate)
    assert all(torch.equal(out.aligned_mask, out.modality_mask) for out in forwards["outputs"])
    assert model.imputer.fitted_modalities.all() and not torch.equal(model.imputer.weight, start)
    train(reference, make_dataset(32, MIXED_PATTERNS), small_args(tmp_path / "none", max_steps=3), collate_fn=collate)
    for (name, value), other in zip(model.encoders.state_dict().items(), reference.encoders.state_dict().values()):
        assert torch.equal(value, other), name
