import json
import os
from pathlib import Path

import pytest
import torch

from launching import torchrun
from training_fixtures import FULL, MIXED_PATTERNS, collate, make_dataset, run_until, training_config

from calmrl_hf import CalMRLModel
from calmrl_hf.training import ImputerUpdater, CalMRLTrainingArguments, build_accelerator, train, validate_setup




def small_args(tmp_path, **overrides) -> CalMRLTrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3,
                  logging_steps=1, imputer_min_rows=8, seed=3)
    values.update(overrides)
    return CalMRLTrainingArguments(**values)


def test_imputer_step_sums_statistics_and_runs_the_m_step(tmp_path):
    """One imputer step on a batch == statistics of that batch then the closed-form M-step."""
    torch.manual_seed(0)
    model = CalMRLModel(training_config())
    args = small_args(tmp_path, imputer_ema_decay=0.5)
    updater = ImputerUpdater(model, build_accelerator(args), args)
    z = torch.nn.functional.normalize(torch.randn(32, 4, 16), dim=-1)
    mask = torch.rand(32, 4) > 0.3
    mask[:, 2] = True
    reference = CalMRLModel(training_config()).imputer
    reference.load_state_dict(model.imputer.state_dict())
    expected_stats = reference.sufficient_statistics(z, mask)
    updater(z, mask)
    reference.m_step(expected_stats)
    for name, buffer in reference.state_dict().items():
        torch.testing.assert_close(model.imputer.state_dict()[name], buffer)
    # the accumulator is an exponential moving average: S <- decay * S + S_batch
    second = model.imputer.sufficient_statistics(z[:16], mask[:16])
    updater(z[:16], mask[:16])
    torch.testing.assert_close(updater.statistics.to_flat(), (expected_stats.scale(0.5) + second).to_flat())


def test_warm_start_statistics_stay_as_a_prior(tmp_path):
    torch.manual_seed(0)
    model = CalMRLModel(training_config())
    args = small_args(tmp_path, imputer_ema_decay=0.5)
    updater = ImputerUpdater(model, build_accelerator(args), args)
    full = torch.nn.functional.normalize(torch.randn(64, 4, 16), dim=-1)
    prior = model.imputer.sufficient_statistics(full, torch.ones(64, 4, dtype=torch.bool))
    updater.seed(prior, window_rows=16.0)
    torch.testing.assert_close(updater.prior_statistics.count, torch.full((4,), 16.0, dtype=torch.float64))
    partial_mask = torch.tensor([[True, False, True, False]] * 32)
    for _ in range(3):  # partial batches decay, the prior stays
        updater(full[:32], partial_mask)
    torch.testing.assert_close(updater.prior_statistics.to_flat(), prior.scale(0.25).to_flat())
    assert updater.statistics.count[1] == 0 and model.imputer.fitted_modalities[1]  # audio fitted from the prior


def test_frozen_imputer_keeps_its_warm_start_fit(tmp_path):
    """imputer_statistics='frozen': the warm start fits the imputer, training never runs an M-step afterwards."""
    torch.manual_seed(0)
    model = CalMRLModel(training_config())
    args = small_args(tmp_path, max_steps=5, per_device_train_batch_size=16, imputer_warm_start=True,
                      imputer_statistics="frozen")
    warm = make_dataset(64, [FULL], seed=2)
    train(model, make_dataset(64, MIXED_PATTERNS), args, collate_fn=collate, warm_start_dataset=warm)
    after = {k: v.clone() for k, v in model.imputer.state_dict().items()}
    # the same warm start followed by one step that changes nothing (learning rate 0) gives the same imputer
    torch.manual_seed(0)
    reference = CalMRLModel(training_config())
    train(reference, make_dataset(64, MIXED_PATTERNS), small_args(tmp_path / "ref", max_steps=1,
          per_device_train_batch_size=16, imputer_warm_start=True, imputer_statistics="frozen", learning_rate=0.0),
          collate_fn=collate, warm_start_dataset=warm)
    for key, value in reference.imputer.state_dict().items():
        torch.testing.assert_close(after[key], value)
    assert model.imputer.fitted_modalities.all()
    with pytest.raises(ValueError, match="'ema', 'epoch' or 'frozen'"):
        small_args(tmp_path, imputer_statistics="online")


def test_training_reduces_the_loss_and_saves_a_loadable_model(tmp_path):
    torch.manual_seed(0)
    model = CalMRLModel(training_config())
    args = small_args(tmp_path, max_steps=30, per_device_train_batch_size=16, eval_steps=15, save_steps=15,
                      imputer_warm_start=True)
    data = make_dataset(128, MIXED_PATTERNS)
    result = train(model, data, args, collate_fn=collate, eval_dataset=make_dataset(32, [FULL], seed=1),
                   warm_start_dataset=make_dataset(64, [FULL], seed=2))
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first, result.losses
    assert model.imputer.fitted_modalities.all()
    assert "text->vision/R@1" in result.metrics and "vision->audio/class_R@1" in result.metrics
    saved = json.loads((Path(args.output_dir) / "train_results.json").read_text())
    assert saved["global_step"] == 30
    loaded = CalMRLModel.from_pretrained(args.output_dir)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert sorted(p.name for p in (Path(args.output_dir) / "checkpoints").iterdir()) == ["step_15", "step_30"]


def test_frozen_towers_stay_fixed_functions(tmp_path):
    """With dropout on (the towers' defaults), a frozen tower runs in eval mode during training: its outputs for
    a batch are what the untrained tower gives, while the trainable towers train."""
    torch.manual_seed(0)
    model = CalMRLModel(training_config(dropout=True))
    assert model.config.encoder_configs["text"].hidden_dropout_prob > 0
    text_tower = model.encoders[model.config.encoder_owner("text")]
    modes = {"text": [], "vision": []}
    text_tower.register_forward_pre_hook(lambda module, _: modes["text"].append(module.training))
    model.encoders[model.config.encoder_owner("vision")].register_forward_pre_hook(
        lambda module, _: modes["vision"].append(module.training))
    before = {key: value.clone() for key, value in text_tower.state_dict().items()}
    train(model, make_dataset(32, [FULL]), small_args(tmp_path, freeze_modalities=["text"]), collate_fn=collate)
    assert modes["text"] and not any(modes["text"]) and all(modes["vision"])
    assert all(torch.equal(before[key], value) for key, value in text_tower.state_dict().items())


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    """With dropout on: the RNG states come back exactly, and nothing draws from them between restore and step."""
    data = make_dataset(96, MIXED_PATTERNS)

    def run(output_dir, stop_after=None, resume=None):
        args = small_args(tmp_path, output_dir=str(output_dir), max_steps=8, save_steps=3,
                          resume_from_checkpoint=resume, save_total_limit=None)
        return run_until(data, args, stop_after)

    uninterrupted = run(tmp_path / "a")
    assert run(tmp_path / "b", stop_after=3) is None
    assert (tmp_path / "b" / "checkpoints" / "step_3").exists()
    resumed = run(tmp_path / "b", resume="latest")
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def _torchrun(nproc: int, out: Path, batch: int, mode: str = "full"):
    torchrun("dist_train_worker.py", str(out), str(batch), mode, nproc=nproc, timeout=300)
    return torch.load(out)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """Same global batches: 1 process x 16 rows == 2 processes x 8 rows (statistics all-reduced, u gathered)."""
    single = _torchrun(1, tmp_path / "one.pt", 16)
    double = _torchrun(2, tmp_path / "two.pt", 8)
    assert single["processes"] == 1 and double["processes"] == 2
    for name, buffer in single["buffers"].items():
        torch.testing.assert_close(double["buffers"][name], buffer, rtol=1e-9, atol=1e-9, msg=name)
    torch.testing.assert_close(torch.tensor(double["losses"]), torch.tensor(single["losses"]), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_two_processes_resume_exactly(tmp_path):
    """With dropout: two processes resumed from their first checkpoint end as two uninterrupted ones (each
    process's RNG states saved and restored, every collective entered by both)."""
    double = _torchrun(2, tmp_path / "two.pt", 8, mode="dropout")  # also leaves its step-2 checkpoint in run_resumed
    checkpoint = tmp_path / "run_resumed" / "checkpoints" / "step_2"
    assert {"rng_state_0.safetensors", "rng_state_1.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    resumed = _torchrun(2, tmp_path / "resumed.pt", 8, mode="resume")
    for name, buffer in double["buffers"].items():
        assert torch.equal(resumed["buffers"][name], buffer), name
    assert resumed["losses"] == double["losses"][2:]


def test_bad_setups_fail_before_training(tmp_path):
    model = CalMRLModel(training_config(modalities=["vision", "text"], shared_encoders={},
                                        encoder_configs={"vision": training_config().get_encoder_config("vision"),
                                                         "text": training_config().get_encoder_config("text")}))
    data = make_dataset(32, [FULL])
    with pytest.raises(ValueError, match=r"modalities \['audio', 'subtitle'\] that the model lacks"):
        validate_setup(model, {"train": data}, small_args(tmp_path), num_processes=1)
    full_model = CalMRLModel(training_config())
    with pytest.raises(ValueError, match="not divisible by processes"):
        validate_setup(full_model, {"train": data}, small_args(tmp_path, train_batch_size=10,
                                                               gradient_accumulation_steps=4), num_processes=1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        validate_setup(full_model, {"train": make_dataset(4, [FULL])}, small_args(tmp_path), num_processes=1)
    with pytest.raises(ValueError, match="Unknown training arguments 'learning_rat' \\(did you mean 'learning_rate'"):
        CalMRLTrainingArguments.from_dict({"learning_rat": 2})
    with pytest.raises(ValueError, match="freeze_modalities"):
        validate_setup(full_model, {"train": data}, small_args(tmp_path, freeze_modalities=["smell"]), 1)
    # train() itself refuses before touching the model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="that the model lacks"):
        train(model, data, small_args(tmp_path), collate_fn=collate)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_arguments_take_trainer_names():
    """Fields that mean what a transformers Trainer field means have its name; a repo id goes in hub_model_id."""
    import transformers

    ours = {f for f in CalMRLTrainingArguments.__dataclass_fields__}
    shared = {"use_cpu", "report_to", "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo", "bf16", "fp16",
              "warmup_steps", "adam_beta1", "adam_beta2", "adam_epsilon", "gradient_checkpointing"}
    assert shared <= ours & set(transformers.TrainingArguments.__dataclass_fields__)
    with pytest.raises(ValueError, match="needs hub_model_id"):
        CalMRLTrainingArguments(push_to_hub=True)
    with pytest.raises(ValueError, match="push_to_hub must be True or False, got 'team/run'; the repo id goes in "
                                         "hub_model_id"):
        CalMRLTrainingArguments.from_dict({"push_to_hub": "team/run"})


def test_training_pushes_the_final_model_to_the_hub(tmp_path):
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    from fake_hub import FakeHub

    torch.manual_seed(0)
    model = CalMRLModel(training_config())
    with FakeHub() as hub:
        args = small_args(tmp_path, max_steps=2, save_steps=1, push_to_hub=True, hub_model_id="team/calmrl-run",
                          hub_token="hf_fake", hub_endpoint=hub.endpoint)
        train(model, make_dataset(32, MIXED_PATTERNS), args, collate_fn=collate)
    assert len(hub.commits) == 1
    files = hub.commits[0]["files"]
    assert {"model.safetensors", "train_results.json", "training_args.json", "README.md"} <= set(files)
    assert b"hf_fake" not in files["training_args.json"]
    assert not any(path.startswith("checkpoints/") for path in files)


def test_accumulation_bf16_epoch_statistics_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    torch.manual_seed(0)
    model = CalMRLModel(training_config())
    args = small_args(tmp_path, max_steps=3, gradient_accumulation_steps=2, mixed_precision="bf16",
                      imputer_statistics="epoch", report_to="tensorboard", logging_steps=1)
    result = train(model, make_dataset(64, MIXED_PATTERNS), args, collate_fn=collate)
    assert result.global_step == 3 and len(result.losses) == 3
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert model.imputer.fitted_modalities.all()
    assert list(Path(args.output_dir).rglob("events.out.tfevents*")), "no tensorboard event file"


def test_epoch_statistics_restart_each_epoch(tmp_path):
    model = CalMRLModel(training_config())
    args = small_args(tmp_path, imputer_statistics="epoch")
    updater = ImputerUpdater(model, build_accelerator(args), args)
    z = torch.nn.functional.normalize(torch.randn(16, 4, 16), dim=-1)
    mask = torch.ones(16, 4, dtype=torch.bool)
    updater(z, mask)
    updater(z, mask)
    assert updater.statistics.count.tolist() == [32.0] * 4  # summed within the epoch
    updater.start_epoch()
    assert updater.statistics.count.tolist() == [0.0] * 4


def test_streaming_dataset_trains_and_resumes_exactly(tmp_path):
    """An IterableDataset (unknown length) trains across epochs and a resumed run matches an uninterrupted one."""

    def streamed():
        return make_dataset(40, MIXED_PATTERNS).to_iterable_dataset(num_shards=4).shuffle(seed=5, buffer_size=8)

    def run(output_dir, stop_after=None, resume=None):
        torch.manual_seed(0)
        model = CalMRLModel(training_config(dropout=True))
        args = small_args(tmp_path, output_dir=str(output_dir), max_steps=7, save_steps=3, save_total_limit=None,
                          resume_from_checkpoint=resume)  # 40 rows / 8 = 5 batches an epoch: 7 steps cross one

        def stop(step):
            if stop_after is not None and step >= stop_after:
                raise KeyboardInterrupt

        try:
            result = train(model, streamed(), args, collate_fn=collate, on_checkpoint=stop)
        except KeyboardInterrupt:
            return None, None
        return model, result

    uninterrupted, result = run(tmp_path / "a")
    assert result.global_step == 7 and len(result.losses) == 7
    assert run(tmp_path / "b", stop_after=6)[0] is None  # killed in the second epoch
    resumed, _ = run(tmp_path / "b", resume="latest")
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_dataloader_worker_settings_reach_the_train_loader(tmp_path):
    from calmrl_hf.training import build_dataloaders

    dataset = make_dataset(8, [FULL])
    args = CalMRLTrainingArguments(output_dir=str(tmp_path), dataloader_num_workers=1, dataloader_prefetch_factor=3,
                                   dataloader_persistent_workers=True)
    train_loader, _, _ = build_dataloaders(dataset, None, None, collate, 4, args, on_gpu=False)
    assert (train_loader.num_workers, train_loader.prefetch_factor, train_loader.persistent_workers) == (1, 3, True)
    assert not train_loader.pin_memory  # pinned pages only help a copy to a GPU
    assert build_dataloaders(dataset, None, None, collate, 4, args, on_gpu=True)[0].pin_memory
    # without workers torch refuses prefetch_factor / persistent_workers: they are left out
    plain = CalMRLTrainingArguments(output_dir=str(tmp_path), dataloader_prefetch_factor=3,
                                    dataloader_persistent_workers=True)
    loader = build_dataloaders(dataset, None, None, collate, 4, plain)[0]
    assert loader.num_workers == 0 and not loader.persistent_workers and len(list(loader)) == 2


def test_an_engine_that_casts_buffers_gives_the_imputer_back_its_float32_state():
    """A DeepSpeed bf16 engine that casts every buffer (`buffer.data = buffer.data.to(bf16)`, past the imputer's
    `_apply`; run in test_deepspeed): after prepare the imputer gets its exact float32 buffers back."""
    from calmrl_hf.training import keep_imputer_float32

    model = CalMRLModel(training_config())
    with torch.no_grad():
        model.imputer.mean.normal_(generator=torch.Generator().manual_seed(0))
    saved = {name: buffer.clone() for name, buffer in model.imputer.state_dict().items()}
    model.to(torch.bfloat16)  # the towers' parameters (the imputer's `_apply` keeps its buffers float32) ...
    for buffer in model.buffers():  # ... and the buffers, as DeepSpeed's `_cast_module_mixed_precision` casts them
        buffer.data = buffer.data.to(torch.bfloat16)
    assert model.imputer.mean.dtype == torch.bfloat16
    keep_imputer_float32(model, saved)
    for name, buffer in model.imputer.state_dict().items():
        assert buffer.dtype == saved[name].dtype and torch.equal(buffer, saved[name]), name
    assert model.encoders["text"].dtype == torch.bfloat16  # the towers stay as the engine made them


def test_recipe_numbers_given_as_strings_become_numbers_also_in_optional_fields():
    """YAML reads 1e-3 (no dot) as a string: from_dict converts it, for fields defaulting to None too."""
    args = CalMRLTrainingArguments.from_dict({"learning_rate": "2e-5", "matching_learning_rate": "1e-3",
                                              "matching_warmup_steps": "10", "eval_steps": "5"})
    assert (args.learning_rate, args.matching_learning_rate, args.matching_warmup_steps, args.eval_steps) == \
        (2e-5, 1e-3, 10, 5)
    assert isinstance(args.matching_warmup_steps, int)
    with pytest.raises(ValueError, match="matching_learning_rate must be a number"):
        CalMRLTrainingArguments.from_dict({"matching_learning_rate": "fast"})


def test_engine_settings_that_cannot_run_are_refused_before_training():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from calmrl_hf.training import refuse_unsupported_engine_settings

    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True, num_processes=2)
    refuse_unsupported_engine_settings(CalMRLTrainingArguments(save_steps=10), fsdp)  # FSDP2: head, checkpoints
    deepspeed = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2)
    with pytest.raises(ValueError, match="not supported under DeepSpeed"):
        refuse_unsupported_engine_settings(CalMRLTrainingArguments(save_steps=10), deepspeed)
    refuse_unsupported_engine_settings(CalMRLTrainingArguments(), deepspeed)


def test_an_fsdp_checkpoint_is_refused_by_a_ddp_run_whatever_changes_are_allowed(tmp_path):
    """FSDP checkpoints hold the optimizer state by parameter name, DDP ones by position: resuming across them is
    refused, even with allow_resume_changes=["*"] (it would load a state the optimizer cannot take)."""
    from calmrl_hf.training.checkpoints import CheckpointError
    from calmrl_hf.training import check_resumed_run

    ddp_run = {"world_size": 2, "training": {}}
    fsdp_run = {**ddp_run, "optimizer_state_layout": "by parameter name (FSDP)"}
    anything = CalMRLTrainingArguments(allow_resume_changes=["*"])
    for saved, current in ((fsdp_run, ddp_run), (ddp_run, fsdp_run)):
        with pytest.raises(CheckpointError, match="resume a DDP checkpoint with DDP and an FSDP one with FSDP"):
            check_resumed_run({"run": saved, "position": {"global_step": 1}}, current, anything, str(tmp_path))
    check_resumed_run({"run": fsdp_run, "position": {"global_step": 1}}, fsdp_run, CalMRLTrainingArguments(),
                      str(tmp_path))


def test_evaluations_during_training_are_returned_and_change_nothing(tmp_path):
    """`eval_steps` evaluations come back in `TrainOutput.eval_history`; the last one, at the last step, equals the
    final evaluation; and a run that evaluates ends with the same weights as one that does not."""
    runs = {}
    for name, eval_steps in (("evaluating", 2), ("silent", None)):
        torch.manual_seed(0)
        model = CalMRLModel(training_config(dropout=True))
        args = CalMRLTrainingArguments(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=8,
                                       eval_steps=eval_steps, imputer_min_rows=8, seed=5)
        runs[name] = (model, train(model, make_dataset(32, MIXED_PATTERNS), args, collate_fn=collate,
                                   eval_dataset=make_dataset(16, [FULL], seed=3)))
    history = runs["evaluating"][1].eval_history
    assert [step for step, _ in history] == [2, 4] and history[-1][1] == runs["evaluating"][1].metrics
    assert runs["silent"][1].eval_history == []
    for (name, value), other in zip(runs["evaluating"][0].state_dict().items(), runs["silent"][0].state_dict().values()):
        assert torch.equal(value, other), name
