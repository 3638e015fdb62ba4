"""Host round trips: every read of a device tensor's values on the host (`.item()`, `bool(t)`, `nonzero`, a boolean
index, `.tolist()`, ...) waits for the device and copies back, a synchronisation on a GPU. A training step makes at
most two: the door's (the batch's value checks and its modality mask) and the imputer step's (the towers' outputs
finite, the statistics finite, which modalities the M-step updates). `HostReads` counts them on CPU.
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from training_fixtures import FULL, MIXED_PATTERNS, collate, make_dataset, training_config

from calmrl_hf import CalMRLModel
from calmrl_hf.alignment import _local_symmetric_cross_entropy, _masked, _pair_infonce, pairwise_infonce_loss
from calmrl_hf.host_mask import HostMask, host_mask_known, rows_where
from calmrl_hf.imputer import _posterior_by_pattern
from calmrl_hf.training import CalMRLTrainingArguments, ImputerUpdater, build_accelerator, train
import calmrl_hf.training.loop as loop


aten = torch.ops.aten
# operations whose result is a host value, or whose output size is one: each waits for the device
_READING_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.equal, aten.is_nonzero, aten._unique,
                aten._unique2, aten.unique_dim, aten.unique_consecutive, aten._linalg_check_errors, aten.bincount,
                aten.allclose}
_INDEXING_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}  # a bool index calls nonzero
_HOST_COPIES = ("tolist", "numpy", "__array__")  # read a CPU tensor's memory with no dispatch at all
_TORCH = str(Path(torch.__file__).parent)


class HostReads(TorchDispatchMode):
    """Counts the reads of tensor values on the host made inside it, each with where it came from: "package" (the
    innermost frame outside torch is calmrl_hf's), "tower" (transformers', inside a tower), "loader" (accelerate's
    seedable sampler drawing each epoch's order from its CPU generator: host memory on any machine) or "other".

    `host_tensors()` lists tensors that live on the host on any device (the optimizer's step counters), whose
    reads are not device reads. On CPU a dispatch mode cannot tell a host tensor from a device one otherwise.
    """

    def __init__(self, host_tensors=lambda: ()):
        super().__init__()
        self.host_tensors = host_tensors
        self.reads: list[tuple[str, str, str]] = []  # (operation, origin, file:line)

    def _record(self, operation: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2]
                  if not f.filename.startswith(_TORCH) and f.filename != __file__]
        where = frames[-1] if frames else None
        path = where.filename if where else ""
        origin = ("package" if "calmrl_hf" in path else "tower" if "/transformers/" in path
                  else "loader" if "/accelerate/data_loader.py" in path else "other")
        self.reads.append((operation, origin, f"{Path(path).name}:{where.lineno if where else '?'}"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _READING_OPS:
            if not (packet is aten._local_scalar_dense and any(args[0] is t for t in self.host_tensors())):
                self._record(packet.__name__)
        elif packet is aten.repeat_interleave and kwargs.get("output_size") is None and len(args) < 3:
            self._record("repeat_interleave")
        elif packet in _INDEXING_OPS and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                             for i in (args[1] or [])):
            self._record(f"{packet.__name__} with a bool index")
        return func(*args, **kwargs)

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in _HOST_COPIES}
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, self._counting(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _counting(self, name, method):
        def read(tensor, *args, **kwargs):
            self._record(name)
            return method(tensor, *args, **kwargs)
        return read

    def count(self, origin: str | None = None) -> int:
        return sum(1 for _, o, _ in self.reads if origin in (None, o))

    def summary(self) -> str:
        return "; ".join(f"{n} x {op} [{origin}] at {where}"
                         for (op, origin, where), n in collections.Counter(self.reads).items())


def assert_step_reads(reads: HostReads, limit: int = 2) -> None:
    """At most `limit` reads of the package's own, none from elsewhere but the towers' attention-mask check
    (transformers reads `attention_mask.all()` in every BERT-like tower forward given one: not the package's)."""
    assert reads.count("package") <= limit and reads.count("other") == 0, reads.summary()
    assert all(where.startswith("masking_utils.py") for _, origin, where in reads.reads if origin == "tower"), \
        reads.summary()


# ---------------------------------------------------------------------------------------------- the counter
def test_the_counter_catches_each_kind_of_read_and_nothing_else():
    x, mask = torch.randn(6, 3), torch.tensor([True, False, True, True, False, True])
    reads = {"bool": lambda: bool(x.sum() > 0), "item": lambda: x[0, 0].item(), "nonzero": lambda: mask.nonzero(),
             "bool index": lambda: x[mask], "bool index put": lambda: x.clone().__setitem__(mask, 0.0),
             "unique": lambda: torch.unique(x.round()), "tolist": lambda: mask.tolist(),
             "numpy": lambda: mask.numpy(), "cholesky's check": lambda: torch.linalg.cholesky(torch.eye(3)),
             "repeat_interleave": lambda: torch.repeat_interleave(torch.tensor([1, 2]))}
    for name, read in reads.items():
        with HostReads() as counted:
            read()
        assert counted.count("other") == 1, (name, counted.summary())
    with HostReads() as counted:  # the sync-free forms used instead
        rows = rows_where(mask, 4)
        x[rows], torch.where(mask[:, None], x, 0.0), torch.linalg.cholesky_ex(torch.eye(3))
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
    assert counted.count() == 0, counted.summary()
    assert torch.equal(rows, mask.nonzero().flatten())


# ---------------------------------------------------------------------------------------------- the training step
def step_reads(tmp_path, model: CalMRLModel, **overrides) -> list[HostReads]:
    """The reads of each `train_step` of a short real `train()` run (3 steps, mixed masks, warm-started imputer
    unless `imputer_warm_start=False`)."""
    values = dict(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=16, learning_rate=1e-3,
                  logging_steps=1, imputer_min_rows=8, seed=3, max_grad_norm=1.0, imputer_warm_start=True)
    values.update(overrides)
    counted, original = [], loop.train_step

    def counting_step(accelerator, model, optimizer, *args, **kwargs):
        steps = lambda: [state["step"] for state in optimizer.optimizer.state.values() if "step" in state]  # noqa
        with HostReads(steps) as reads:
            loss = original(accelerator, model, optimizer, *args, **kwargs)
        counted.append(reads)
        return loss

    loop.train_step = counting_step
    try:
        train(model, make_dataset(48, MIXED_PATTERNS), CalMRLTrainingArguments(**values), collate_fn=collate,
              warm_start_dataset=make_dataset(32, [FULL], seed=2) if values["imputer_warm_start"] else None)
    finally:
        loop.train_step = original
    return counted


@pytest.mark.parametrize("model_overrides, args", [
    ({}, {}),  # the default: PPCA fitted by the warm start, its statistics and M-step every step, observed columns
    ({}, {"imputation_source": "student", "impute_modalities": "all"}),  # and PPCA imputations in the objective
    ({"imputer_method": "none"}, {"imputer_warm_start": False}),  # imputer off
], ids=["ppca", "ppca-imputing", "no-imputer"])
def test_a_training_step_reads_the_device_at_most_twice(tmp_path, model_overrides, args):
    torch.manual_seed(0)
    model = CalMRLModel(training_config(**model_overrides))
    counted = step_reads(tmp_path, model, **args)
    assert len(counted) == 3
    for reads in counted:  # forward, backward, clipping, optimizer step, imputer statistics and M-step
        assert_step_reads(reads)
    assert model.config.imputer_method == "none" or model.imputer.fitted_modalities.all()


def test_the_step_limit_catches_a_planted_read(tmp_path, monkeypatch):
    """The same run with one `bool(tensor.any())` planted in the alignment loss: one read more, and the limit fails."""
    planted = CalMRLModel._alignment_loss

    def alignment_loss_with_a_read(self, embeddings, aligned_mask, host=None):
        bool(aligned_mask.any())
        return planted(self, embeddings, aligned_mask, host)

    torch.manual_seed(0)
    clean = step_reads(tmp_path / "clean", CalMRLModel(training_config()), max_steps=2)
    monkeypatch.setattr(CalMRLModel, "_alignment_loss", alignment_loss_with_a_read)
    torch.manual_seed(0)
    counted = step_reads(tmp_path / "planted", CalMRLModel(training_config()), max_steps=2)
    for before, after in zip(clean, counted):
        assert after.count("package") == before.count("package") + 1 == 3, after.summary()
        with pytest.raises(AssertionError, match="_local_scalar_dense"):
            assert_step_reads(after)


# ---------------------------------------------------------------------------------------------- public entry points
@pytest.fixture(scope="module")
def fitted():
    """A tiny model with its imputer fitted on every modality, and a batch with mixed masks (no attention masks:
    the towers then read nothing either)."""
    torch.manual_seed(0)
    model = CalMRLModel(training_config())
    batch = collate([make_dataset(16, MIXED_PATTERNS, seed=5)[i] for i in range(16)])
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "text_attention_mask", "subtitle_attention_mask")}
    with torch.no_grad():
        full = collate([make_dataset(32, [FULL], seed=2)[i] for i in range(32)])
        z, all_observed = model.embed_modalities(**{k: v for k, v in full.items() if k != "labels"})
    model.imputer.fit(z, all_observed, max_iter=5)
    return model, inputs


def test_each_entry_point_reads_once_at_its_door_and_once_after_the_towers(fitted):
    model, inputs = fitted
    embeddings, mask = model.embed_modalities(**inputs)
    embeddings = embeddings.detach()
    calls = {"forward": (2, lambda: model(**inputs, return_loss=True).loss.backward()),
             "embed_modalities": (2, lambda: model.embed_modalities(**inputs)),
             "encode": (2, lambda: model.encode(**inputs)),
             "impute_missing": (1, lambda: model.impute_missing(embeddings, mask)),
             "encode_embeddings": (1, lambda: model.encode_embeddings(embeddings, mask)),
             "alignment_loss": (1, lambda: model.alignment_loss(embeddings, mask))}
    for name, (expected, call) in calls.items():
        with HostReads() as reads:
            call()
        assert reads.count() == expected, (name, reads.summary())


# --------------------------------------------------------------------------------------------- as boolean indexing
def random_mask(rows: int, k: int, seed: int) -> torch.Tensor:
    mask = torch.rand(rows, k, generator=torch.Generator().manual_seed(seed)) > 0.5
    mask[torch.arange(rows), torch.randint(k, (rows,), generator=torch.Generator().manual_seed(seed + 1))] = True
    return mask


def test_host_mask_indices_and_patterns_are_those_of_the_device_mask():
    for seed in range(5):
        mask = random_mask(37, 4, seed)
        host = HostMask.read(mask)
        for column in range(4):
            assert torch.equal(host.rows(column), mask[:, column].nonzero().flatten())
        some = host & HostMask.constant([True, False, True, True], mask.device)
        assert torch.equal(some.device, mask & torch.tensor([True, False, True, True]))
        rows = some.any_per_row()
        assert torch.equal(some.select_rows(rows).device, some.device[some.device.any(dim=1)])
        assert np.array_equal(some.select_rows(rows).values, some.device[some.device.any(dim=1)].numpy())
        codes = (mask.long() * 2 ** torch.arange(4)).sum(dim=1)
        present, counts = torch.unique(codes, return_counts=True)
        assert host.pattern_counts() == list(zip(present.tolist(), counts.tolist()))
        assert host.with_column(2, False).values[:, 2].sum() == 0 and host.all == bool(mask.all())


@pytest.mark.parametrize("rows, patterns", [(40, None), (9, 1), (0, None)])
def test_the_e_step_on_host_patterns_equals_the_torch_unique_one(rows, patterns):
    generator = torch.Generator().manual_seed(rows)
    k, d, q = 4, 8, 3
    z = torch.randn(rows, k, d, generator=generator)
    mask = random_mask(rows, k, 7) if patterns is None else torch.tensor([[True, False, True, True]] * rows)
    weight, mean = torch.randn(k, d, q, generator=generator), torch.randn(k, d, generator=generator)
    noise_var = torch.rand(k, generator=generator) + 0.1
    on_device = _posterior_by_pattern(z, mask, weight, mean, noise_var)
    on_host = _posterior_by_pattern(z, mask, weight, mean, noise_var, HostMask.read(mask))
    for field in ("mean", "pattern_index", "pattern_masks", "pattern_cov", "pattern_logdet_precision",
                  "precision_times_mean", "observed"):
        assert torch.equal(getattr(on_host, field), getattr(on_device, field)), field


def test_forward_rows_and_imputations_equal_boolean_indexing(fitted):
    model, inputs = fitted
    with torch.no_grad():
        out = model(**inputs)
    mask, embeddings = out.modality_mask, out.embeddings
    scale = out.logit_scale.exp()
    text, vision = model.config.modality_index("text"), model.config.modality_index("vision")
    expected = scale * embeddings[mask[:, text], text] @ embeddings[mask[:, vision], vision].T
    assert torch.equal(out.logits_per_text_vision, expected)
    # the imputation of every fitted missing slot of a row with a fitted observed one: the public imputer on the
    # boolean-selected rows (its torch.unique path), renormalised
    imputer = model.imputer
    conditioning = mask & imputer.fitted_modalities
    rows = conditioning.any(dim=1)
    reference = torch.zeros_like(embeddings)
    reference[rows] = F.normalize(imputer.impute(embeddings[rows], conditioning[rows]), dim=-1)
    missing = ~mask & rows[:, None]
    assert missing.any() and torch.equal(out.imputed_embeddings[missing], reference[missing])
    assert torch.equal(out.imputed_embeddings[mask], embeddings[mask])
    # impute_modalities as host bools or as a tensor: the same columns
    some = (True, False, True, False)
    with torch.no_grad():
        by_flags = model(**inputs, impute_modalities=some).imputed_embeddings
        by_tensor = model(**inputs, impute_modalities=torch.tensor(some)).imputed_embeddings
    assert torch.equal(by_flags, by_tensor)


def test_objectives_select_the_rows_boolean_indexing_selects():
    """Pairwise InfoNCE given the mask's host copy: each pair's loss on the rows observing both, selected by a
    boolean index (the reference), through the same loss function."""
    generator = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(20, 3, 8, generator=generator), dim=-1)
    mask = random_mask(20, 3, 11)
    columns = _masked(embeddings, mask)
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = []
    for a, b in pairs:
        local = columns[mask[:, a] & mask[:, b]][:, [a, b]]
        if local.shape[0] >= 2:
            expected.append(_local_symmetric_cross_entropy(local[:, 0] @ local[:, 1].T / 0.07,
                                                           local[:, 1] @ local[:, 0].T / 0.07, 0, 1, 0.0))
    with HostReads() as reads:
        loss = _pair_infonce(columns, HostMask.read(mask), pairs, 0.07)
    assert reads.count() == 1  # the mask read back once, by `HostMask.read`; the rows then read nothing
    assert torch.equal(loss, torch.stack(expected).mean())
    assert torch.equal(pairwise_infonce_loss(embeddings, mask, temperature=0.07), loss)


# ---------------------------------------------------------------------------------------------- the imputer step
def test_the_imputer_step_updates_the_ready_modalities_as_the_public_m_step_does(tmp_path):
    """Subtitle has too few rows for its first M-step: the step updates the others, exactly as `m_step` with the
    same statistics and `modalities=ready` does, and reads the device once."""
    torch.manual_seed(0)
    model = CalMRLModel(training_config())
    args = CalMRLTrainingArguments(output_dir=str(tmp_path), imputer_min_rows=10, imputer_ema_decay=0.5)
    updater = ImputerUpdater(model, build_accelerator(args), args)
    reference = CalMRLModel(training_config()).imputer
    reference.load_state_dict(model.imputer.state_dict())
    z = F.normalize(torch.randn(24, 4, 16, generator=torch.Generator().manual_seed(3)), dim=-1)
    mask = random_mask(24, 4, 5)
    mask[:, 3] = False
    mask[:4, 3] = True  # 4 subtitle rows < 10
    host = HostMask.read(mask)
    with HostReads() as reads, host_mask_known(host):
        updater(z, mask)
    assert reads.count() == 1, reads.summary()
    stats = reference.sufficient_statistics(z, mask)
    reference.m_step(stats, modalities=stats.count >= 10)
    for name, buffer in reference.state_dict().items():
        assert torch.equal(model.imputer.state_dict()[name], buffer), name
    assert model.imputer.fitted_on_host().values.tolist() == [True, True, True, False]


def test_non_finite_tower_outputs_are_refused_before_the_imputer_step_keeps_anything(tmp_path, fitted):
    """The towers' output check waits for the imputer step's read, and is read before the step changes its
    statistics or the imputer."""
    model, inputs = fitted
    args = CalMRLTrainingArguments(output_dir=str(tmp_path), imputer_min_rows=2)
    updater = ImputerUpdater(model, build_accelerator(args), args)
    imputer_before = {k: v.clone() for k, v in model.imputer.state_dict().items()}
    statistics_before = updater.statistics.to_flat().clone()
    weight = model.projections["audio"].weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.fill_(float("inf"))
        with pytest.raises(ValueError, match="The audio tower gave non-finite embeddings"):
            model(**inputs, imputer_update_fn=updater)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert torch.equal(updater.statistics.to_flat(), statistics_before)
    for name, buffer in model.imputer.state_dict().items():
        assert torch.equal(buffer, imputer_before[name]), name


# ---------------------------------------------------------------------------------------------- the loop around it
def loop_reads(tmp_path, steps: int) -> HostReads:
    """The device reads of `run_epochs` over a run of `steps` steps that logs only at its last step, with no
    evaluation and no checkpoint: the steps, the loss bookkeeping, the progress, the epoch boundaries. The batches'
    collation is host work on host tensors (a DataLoader's), so the reads are counted outside it."""
    counted, run_epochs, train_step = HostReads(), loop.run_epochs, loop.train_step

    def counting_epochs(accelerator, args, model, optimizer, *rest, **kwargs):
        counted.host_tensors = lambda: [state["step"] for state in optimizer.optimizer.state.values()
                                        if "step" in state]
        with counted:
            return run_epochs(accelerator, args, model, optimizer, *rest, **kwargs)

    torch.manual_seed(0)
    values = dict(output_dir=str(tmp_path / f"run{steps}"), max_steps=steps, logging_steps=steps,
                  per_device_train_batch_size=16, learning_rate=1e-3, imputer_min_rows=8, seed=3, max_grad_norm=1.0,
                  imputer_warm_start=True)
    loop.run_epochs = counting_epochs
    try:
        train(CalMRLModel(training_config()), make_dataset(48, MIXED_PATTERNS), CalMRLTrainingArguments(**values),
              collate_fn=_outside(counted, collate), warm_start_dataset=make_dataset(32, [FULL], seed=2))
    finally:
        loop.run_epochs, loop.train_step = run_epochs, train_step
    return counted


def _outside(counted: HostReads, collate_fn):
    """`collate_fn` run with the counter paused (a DataLoader worker would run it in another process)."""
    def collate_outside(examples):
        if not hasattr(counted, "_saved"):  # the counter has not started (the warm start's loader)
            return collate_fn(examples)
        saved = {name: getattr(torch.Tensor, name) for name in _HOST_COPIES}
        for name, method in counted._saved.items():
            setattr(torch.Tensor, name, method)
        try:
            with torch.utils._python_dispatch._disable_current_modes():
                return collate_fn(examples)
        finally:
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)
    return collate_outside


def test_the_loop_adds_no_read_per_step(tmp_path):
    """Three more steps (one more epoch) cost at most the steps' own two reads each: the loss of a step that does not
    log stays on the device (the run's losses are read once at the end), nothing else reads per step."""
    short, long = loop_reads(tmp_path, 3), loop_reads(tmp_path, 6)
    assert long.count("package") - short.count("package") <= 2 * 3, long.summary()
    assert long.count("other") == short.count("other") == 0, long.summary()
    # the run's end: its last step's logged loss and the losses of all its steps, one read each
    assert [where for _, origin, where in long.reads if origin == "package" and where.startswith("loop.py")] == \
        [where for _, origin, where in short.reads if origin == "package" and where.startswith("loop.py")]
