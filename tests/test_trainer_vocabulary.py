"""transformers Trainer's argument names in `CalMRLTrainingArguments`: each one a user's code would pass does what it
does in Trainer (epochs, strategies, schedules, warm-up, tracker folder), and a Trainer name the class lacks is
refused with the closest one it has."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from training_fixtures import FULL, MIXED_PATTERNS, collate, make_dataset, training_config

from calmrl_hf import CalMRLModel
from calmrl_hf.training import CalMRLTrainingArguments, build_optimizer, check_resumed_run, train
from calmrl_hf.training.checkpoints import load_state_file


def arguments(tmp_path, **overrides) -> CalMRLTrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, learning_rate=1e-3,
                  logging_steps=1, imputer_min_rows=8, seed=3)
    values.update(overrides)
    return CalMRLTrainingArguments(**values)


def test_trainer_vocabulary_is_understood_or_refused_with_the_supported_name(tmp_path):
    """bf16 / fp16, a warmup_steps ratio, AdamW's betas and epsilon and gradient_checkpointing do what they do in
    transformers' Trainer; a Trainer name this class does not have is refused with what to give instead."""
    import transformers

    trainer_names = {"num_train_epochs", "eval_strategy", "save_strategy", "lr_scheduler_kwargs", "torch_compile",
                     "torch_compile_backend", "torch_compile_mode", "dataloader_num_workers", "max_steps"}
    assert trainer_names <= set(CalMRLTrainingArguments.__dataclass_fields__) & set(
        transformers.TrainingArguments.__dataclass_fields__)
    assert CalMRLTrainingArguments(bf16=True).mixed_precision == "bf16"
    with pytest.raises(ValueError, match=r"fp16=True but mixed_precision='bf16'"):
        CalMRLTrainingArguments(fp16=True, mixed_precision="bf16")
    assert CalMRLTrainingArguments(max_steps=50, warmup_steps=0.1).warmup_steps == 5  # a ratio: ceil, as Trainer
    assert CalMRLTrainingArguments(max_steps=50, warmup_ratio=0.1).warmup_steps == 5  # transformers 4's name
    assert CalMRLTrainingArguments(warmup_steps=3.0).warmup_steps == 3
    for name, hint in (("optim", "AdamW is the optimizer"), ("logging_strategy", "did you mean 'logging_steps'"),
                       ("evaluation_strategy", "give eval_strategy"), ("num_train_epoch", "'num_train_epochs'"),
                       ("learning_rat", "did you mean 'learning_rate'")):
        with pytest.raises(TypeError, match=rf"Unknown training arguments '{name}'.*{hint}"):
            CalMRLTrainingArguments(**{name: 1})
    with pytest.raises(ValueError, match=r"'optim'.*AdamW is the optimizer"):  # a recipe's section too
        CalMRLTrainingArguments.from_dict({"optim": "adamw_torch"})
    args = CalMRLTrainingArguments(adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6)
    optimizer, _ = build_optimizer(CalMRLModel(training_config()), args, 1)
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.95) and optimizer.param_groups[0]["eps"] == 1e-6
    # checkpointing recomputes the towers' activations: the same training, less memory
    results = {}
    for flag in (True, False):
        torch.manual_seed(0)
        model = CalMRLModel(training_config())
        args = CalMRLTrainingArguments(output_dir=str(tmp_path / str(flag)), max_steps=2, per_device_train_batch_size=8,
                                       gradient_checkpointing=flag, imputer_min_rows=8)
        results[flag] = train(model, make_dataset(32, MIXED_PATTERNS), args, collate_fn=collate).losses
        assert all(tower.is_gradient_checkpointing == flag for tower in model.encoders.values())
    assert results[True] == pytest.approx(results[False], rel=1e-5)


def test_contradicting_or_unsupported_trainer_settings_are_refused():
    refusals = [
        (dict(save_strategy="steps"), ValueError, "save_strategy='steps' needs save_steps"),
        (dict(eval_strategy="epoch", eval_steps=5), ValueError, "eval_steps goes with eval_strategy='steps'"),
        (dict(save_strategy="no", save_steps=5), ValueError, "save_steps goes with save_strategy='steps'"),
        (dict(save_strategy="best"), ValueError, "keeping the best checkpoint is not supported"),
        (dict(lr_scheduler_type="cosin"), ValueError, "Did you mean 'cosine'"),
        (dict(lr_scheduler_type="reduce_lr_on_plateau"), ValueError, "steps on a metric"),
        (dict(warmup_ratio=0.1, warmup_steps=3), ValueError, "give one of them"),
        (dict(warmup_ratio=1.5), ValueError, "warmup_ratio"),
        (dict(num_train_epochs=0), ValueError, "num_train_epochs"),
        (dict(lr_scheduler_kwargs="min_lr_rate=0.1"), TypeError, "a dict of the schedule's keyword arguments"),
    ]
    for values, error, message in refusals:
        with pytest.raises(error, match=message):
            CalMRLTrainingArguments(**values)
    # Trainer's defaults where ours leave a setting out: "steps" evaluates every logging_steps, -1 is "not set"
    args = CalMRLTrainingArguments(eval_strategy="steps", logging_steps=7)
    assert (args.eval_strategy, args.eval_steps) == ("steps", 7)
    assert (args.save_strategy, args.saves_checkpoints) == ("no", False)
    assert CalMRLTrainingArguments(save_steps=4).save_strategy == "steps"
    assert CalMRLTrainingArguments(max_steps=-1, num_train_epochs=2).max_steps is None
    assert CalMRLTrainingArguments().max_steps == 100 and CalMRLTrainingArguments(max_steps=7,
                                                                                  num_train_epochs=2).max_steps == 7
    assert CalMRLTrainingArguments(torch_compile_mode="reduce-overhead").torch_compile  # as Trainer: mode turns it on


def test_num_train_epochs_counts_optimizer_steps_as_trainer_does(tmp_path):
    """1.5 epochs of 40 rows in batches of 8 with accumulation 2: ceil(1.5 x ceil(5 / 2)) optimizer steps, the
    warm-up ratio taken of that length; given max_steps wins; a streaming dataset is refused."""
    torch.manual_seed(0)
    model = CalMRLModel(training_config())
    args = arguments(tmp_path, num_train_epochs=1.5, gradient_accumulation_steps=2, warmup_ratio=0.4)
    result = train(model, make_dataset(40, MIXED_PATTERNS), args, collate_fn=collate)
    expected = math.ceil(1.5 * math.ceil((40 // 8) / 2))
    assert expected == 5 and result.global_step == expected and len(result.losses) == expected
    recorded = json.loads(Path(args.output_dir, "training_args.json").read_text())
    assert (recorded["max_steps"], recorded["warmup_steps"], recorded["num_train_epochs"]) == (5, 2, 1.5)
    args = arguments(tmp_path, output_dir=str(tmp_path / "steps"), num_train_epochs=1.5, max_steps=2)
    assert train(CalMRLModel(training_config()), make_dataset(40, MIXED_PATTERNS), args,
                 collate_fn=collate).global_step == 2
    streaming = make_dataset(40, MIXED_PATTERNS).to_iterable_dataset()
    with pytest.raises(ValueError, match="needs a train dataset whose length is known.*give max_steps"):
        train(CalMRLModel(training_config()), streaming, arguments(tmp_path, output_dir=str(tmp_path / "stream"),
                                                                   num_train_epochs=1), collate_fn=collate)


def test_epoch_strategies_evaluate_and_save_at_each_epoch_end_and_resume_exactly(tmp_path):
    """eval_strategy / save_strategy "epoch": 2.5 epochs of 4 steps evaluate and checkpoint at steps 4, 8 and 10
    (the last, partial epoch's end), a checkpoint at an epoch's end starts the next epoch, and a run resumed from
    it ends with the uninterrupted run's weights; eval_strategy "no" never evaluates during training."""
    data, held_out = make_dataset(32, MIXED_PATTERNS), make_dataset(16, [FULL], seed=3)

    def run(name, stop_after=None, resume=None, **overrides):
        values = dict(num_train_epochs=2.5, eval_strategy="epoch", save_strategy="epoch", save_total_limit=None,
                      resume_from_checkpoint=resume, lr_scheduler_type="linear", warmup_steps=2)
        args = arguments(tmp_path, output_dir=str(tmp_path / name), **{**values, **overrides})
        torch.manual_seed(0)
        model = CalMRLModel(training_config(dropout=True))

        def stop(step):
            if stop_after is not None and step >= stop_after:
                raise KeyboardInterrupt

        try:
            return model, train(model, data, args, collate_fn=collate, eval_dataset=held_out, on_checkpoint=stop)
        except KeyboardInterrupt:
            return None, None

    uninterrupted, result = run("a")
    assert result.global_step == 10 and [step for step, _ in result.eval_history] == [4, 8, 10]
    checkpoints = tmp_path / "a" / "checkpoints"
    assert sorted(int(path.name.split("_")[1]) for path in checkpoints.glob("step_*")) == [4, 8, 10]
    position = json.loads((checkpoints / "step_4" / "manifest.json").read_text())["position"]
    assert position == {"global_step": 4, "epoch": 1, "batches_in_epoch": 0}
    # the linear schedule the checkpoint holds: lr_t = lr x (10 - t) / (10 - 2) past the 2 warm-up steps
    schedule = load_state_file(checkpoints / "step_8" / "scheduler.safetensors")
    assert schedule["_last_lr"][0] == pytest.approx(1e-3 * (10 - 8) / (10 - 2), rel=1e-6)
    assert run("b", stop_after=4)[0] is None
    resumed, resumed_result = run("b", resume="latest")
    assert [step for step, _ in resumed_result.eval_history] == [8, 10]
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    _, quiet = run("c", eval_strategy="no", save_strategy="no")
    assert quiet.eval_history == [] and quiet.metrics and not (tmp_path / "c" / "checkpoints").exists()


def schedule_factors(lr_scheduler_type: str, total: int, warmup: int, **kwargs) -> list[float]:
    """The learning rates of `build_optimizer`'s schedule at steps 0..total - 1, divided by the base rate."""
    args = CalMRLTrainingArguments(max_steps=total, warmup_steps=warmup, learning_rate=1.0,
                                   lr_scheduler_type=lr_scheduler_type, **kwargs)
    optimizer, scheduler = build_optimizer(CalMRLModel(training_config()), args, 1)
    factors = []
    for _ in range(total):
        factors.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return factors


def test_lr_scheduler_types_follow_their_formulas():
    """Each schedule's learning rate at step t, against its formula (warm-up t / w, then the decay of progress
    p = (t - w) / (T - w)); the default (cosine) is transformers' own schedule, bit for bit."""
    total, warmup = 12, 3

    def warm(t, after):
        return t / warmup if t < warmup else after((t - warmup) / (total - warmup))

    formulas = {
        "linear": lambda t: warm(t, lambda p: 1 - p),
        "cosine": lambda t: warm(t, lambda p: 0.5 * (1 + math.cos(math.pi * p))),
        "constant": lambda t: 1.0,
        "constant_with_warmup": lambda t: warm(t, lambda p: 1.0),
        "polynomial": lambda t: warm(t, lambda p: (1 - 1e-7) * (1 - p) + 1e-7),  # power 1 down to lr_end 1e-7
    }
    for name, formula in formulas.items():
        assert schedule_factors(name, total, warmup) == pytest.approx([formula(t) for t in range(total)],
                                                                      abs=1e-7), name
    with_floor = schedule_factors("cosine_with_min_lr", total, warmup, lr_scheduler_kwargs={"min_lr_rate": 0.1})
    expected = [warm(t, lambda p: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))) for t in range(total)]
    assert with_floor == pytest.approx(expected, abs=1e-7)
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    cosine = get_cosine_schedule_with_warmup(reference, warmup, total)
    transformers_rates = []
    for _ in range(total):
        transformers_rates.append(cosine.get_last_lr()[0])
        reference.step()
        cosine.step()
    assert schedule_factors("cosine", total, warmup) == transformers_rates  # the default schedule, unchanged


def test_schedule_settings_counted_in_steps_follow_the_processes():
    """accelerate steps a prepared schedule once per process per optimizer step: with 2 processes the schedule
    (warm-up, length and the step counts among lr_scheduler_kwargs) is twice as long, the same at each step."""
    args = CalMRLTrainingArguments(max_steps=10, warmup_steps=2, learning_rate=1.0,
                                   lr_scheduler_type="warmup_stable_decay", lr_scheduler_kwargs={"num_decay_steps": 4})
    model = CalMRLModel(training_config())
    rates = {}
    for processes in (1, 2):
        optimizer, scheduler = build_optimizer(model, args, processes)
        rates[processes] = []
        for _ in range(10):
            rates[processes].append(scheduler.get_last_lr()[0])
            for _ in range(processes):
                optimizer.step()
                scheduler.step()
    assert rates[1] == rates[2] and rates[1][1] == 0.5 and rates[1][5] == 1.0 and rates[1][9] < rates[1][7] < 1.0


def test_logging_dir_takes_the_tracker_logs(tmp_path):
    pytest.importorskip("tensorboard")
    torch.manual_seed(0)
    args = arguments(tmp_path, max_steps=2, report_to="tensorboard", logging_dir=str(tmp_path / "logs"))
    train(CalMRLModel(training_config()), make_dataset(32, MIXED_PATTERNS), args, collate_fn=collate)
    assert list((tmp_path / "logs").rglob("events.out.tfevents*")), "no tensorboard event file in logging_dir"
    assert not list(Path(args.output_dir).rglob("events.out.tfevents*"))


def test_a_checkpoint_from_before_an_argument_existed_resumes_with_its_default():
    """A checkpoint manifest written before `lr_scheduler_kwargs` existed resumes when this run leaves it at its
    default (the old run had that default too), and is refused when this run sets it."""
    current = {"model": {}, "training": {"learning_rate": 1e-3, "lr_scheduler_kwargs": None}, "world_size": 1}
    saved = {"run": {"model": {}, "training": {"learning_rate": 1e-3}, "world_size": 1}, "position": {"global_step": 2}}
    check_resumed_run(saved, current, CalMRLTrainingArguments(max_steps=10), "step_2")
    changed = {**current, "training": {**current["training"], "lr_scheduler_kwargs": {"min_lr_rate": 0.1}}}
    with pytest.raises(ValueError, match="lr_scheduler_kwargs.min_lr_rate: checkpoint '<absent>', now 0.1"):
        check_resumed_run(saved, changed, CalMRLTrainingArguments(max_steps=10), "step_2")
