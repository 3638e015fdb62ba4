"""`CalMRLTrainingArguments`: everything the training loop needs besides the model and the data."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..configuration_calmrl import NumberRange, check_bool, check_number, coerce_number
from ..sharing.hub import DEFAULT_HUB_RETRIES, DEFAULT_HUB_TIMEOUT, HUB_STRATEGIES
from ..validation import unknown_name_message


class _KnownNames(type):
    """Refuse a keyword that is no field, naming the closest one (and for a transformers `TrainingArguments` name
    this class does not have, e.g. `optim`, what to give instead), instead of dataclasses' bare TypeError."""

    def __call__(cls, *args, **kwargs):
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(unknown_arguments_message(cls, unknown))
        return super().__call__(*args, **kwargs)


# transformers' TrainingArguments names of concepts this class has under another name, or leaves to the launcher
TRAINER_EQUIVALENTS = {
    "evaluation_strategy": "give eval_strategy (transformers 5's name)",
    "logging_strategy": "give logging_steps (log every N optimizer steps)",
    "per_gpu_train_batch_size": "give per_device_train_batch_size",
    "deepspeed": "launch with `accelerate launch --use_deepspeed` or an accelerate config (docs/distributed.md)",
    "fsdp": "launch with `accelerate launch --use_fsdp` or an accelerate config (docs/distributed.md)",
    "optim": "AdamW is the optimizer; its betas and epsilon are adam_beta1, adam_beta2, adam_epsilon",
    "load_best_model_at_end": "not supported: every evaluation is in TrainOutput.eval_history, and checkpoints "
                              "(save_steps / save_strategy) keep the steps to choose from",
    "save_safetensors": "checkpoints and models are always safetensors",
    "dataloader_drop_last": "train batches are always whole (drop_last); evaluation keeps every row",
    "data_seed": "seed also seeds the train loader's shuffling",
}


def unknown_arguments_message(cls, unknown: list[str]) -> str:
    """"Unknown training arguments 'x' (did you mean 'y'?); known ones are [...]." plus Trainer's equivalents."""
    message = unknown_name_message("training arguments", unknown, [f.name for f in fields(cls)])
    equivalents = [f"{name}: {TRAINER_EQUIVALENTS[name]}" for name in unknown if name in TRAINER_EQUIVALENTS]
    return message + (f" Trainer's names: {'; '.join(equivalents)}." if equivalents else "")


# the schedules of transformers' `get_scheduler` the loop can step (once per optimizer step, without a metric)
LR_SCHEDULER_TYPES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                      "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
STRATEGIES = ("no", "steps", "epoch")  # Trainer's IntervalStrategy
DEFAULT_MAX_STEPS = 100  # when neither max_steps nor num_train_epochs is given


@dataclass
class CalMRLTrainingArguments(metaclass=_KnownNames):
    """Arguments of `calmrl_hf.training.train`.

    Where a field means what a field of transformers' `TrainingArguments` means, it has the same name (`output_dir`,
    `seed`, `max_steps`, `num_train_epochs`, `per_device_train_batch_size`, `per_device_eval_batch_size`,
    `gradient_accumulation_steps`, `learning_rate`, `weight_decay`, `lr_scheduler_type`, `lr_scheduler_kwargs`,
    `warmup_steps`, `max_grad_norm`, `logging_steps`, `eval_strategy`, `eval_steps`, `save_strategy`, `save_steps`,
    `save_total_limit`, `dataloader_num_workers`, `dataloader_prefetch_factor`, `dataloader_persistent_workers`,
    `dataloader_pin_memory`, `use_cpu`, `report_to`, `push_to_hub`, `hub_model_id`, `hub_strategy`, `bf16`, `fp16`,
    `gradient_checkpointing`, `torch_compile`, `torch_compile_backend`, `torch_compile_mode`, `adam_beta1`,
    `adam_beta2`, `adam_epsilon`, `hub_token`, `hub_private_repo`; `warmup_steps` a float in (0, 1) is a ratio of
    max_steps, as transformers 5 reads it; transformers 4's `warmup_ratio` and `logging_dir` are taken too). A
    Trainer name this class lacks is refused with the closest name it has (`TRAINER_EQUIVALENTS`). These differ
    from Trainer's:

    - `max_steps`, `num_train_epochs`: as Trainer, `max_steps` (optimizer steps) wins when given; else
      `num_train_epochs` (a float) gives max_steps = ceil(num_train_epochs x ceil(batches per epoch and process /
      gradient_accumulation_steps)) when `train` has built the loader; a train dataset without a length (streaming)
      cannot count epochs: an error, give max_steps. Neither given: 100 steps (Trainer's default is 3 epochs).
      Trainer's "not set" max_steps=-1 reads as None.
    - `eval_strategy`, `save_strategy`: "no" | "steps" (every `eval_steps` / `save_steps`) | "epoch" (at the end of
      each epoch, the last one too where max_steps ends it early). None (the default) reads the steps: "steps"
      when `eval_steps` / `save_steps` is set, else "no" (Trainer's defaults evaluate never and save every 500
      steps; ours save never unless asked). "steps" without eval_steps evaluates every `logging_steps` (Trainer's
      default); without save_steps it is an error; a steps value with another strategy is one too.
    - `warmup_ratio`: transformers 4's name (5 reads a float `warmup_steps` instead), folded into `warmup_steps`.
    - `logging_dir`: transformers 4's name (5 removed it): where the trackers of `report_to` write (accelerate's
      `ProjectConfiguration.logging_dir`); None: output_dir.
    - `torch_compile`: compiles the towers and the objective (`compiling.compile_model`), not the whole model:
      the model's forward holds host syncs (mask checks) that would break the graph. `torch_compile_backend` /
      `torch_compile_mode` set turn it on, as in Trainer.
    - `train_batch_size`: the global batch (per device x processes x accumulation) to check, when given; Trainer's
      is a read-only property without accumulation.
    - `mixed_precision`: accelerate's `"no"` / `"bf16"` / `"fp16"`, an alternative to Trainer's `bf16` / `fp16`
      flags; None (the default) takes the launcher's (`accelerate launch --mixed_precision`, `accelerate config`),
      "no" without.
    - `gradient_accumulation_steps`: None (the default) takes the launcher's (DeepSpeed's config), 1 without; a value
      set here wins over the launcher's. `train` records the values the run used.
    - `resume_from_checkpoint`: also takes `"latest"` (the newest complete checkpoint in `output_dir/checkpoints`).
    - `allow_resume_changes`: ours. A resumed run refuses to continue when the run it resumes differed (model
      config, these arguments, dataset, number of processes); listed names (`"learning_rate"`,
      `"model.imputer_method"`, `"dataset"`, `"world_size"`, or `"*"`) may differ, and changed learning rate and
      weight decay are applied from the resumed step on.
    - `matching_learning_rate`, `matching_warmup_steps`: ours, the matching head's own learning rate and warm-up
      (a head trained from scratch next to pretrained towers wants a larger rate than they do).
    - `teacher`, `teacher_ema_decay`, `teacher_weight`, `teacher_form`, `teacher_dtype`: ours, a copy of the model
      whose detached embeddings enter the objective (`teacher.py`): `"frozen"` (the model as the run starts) or
      `"ema"` (an exponential moving average of the model's weights), added as `loss = alignment + teacher_weight x
      teacher term`; the term is the objective on the row's columns plus the teacher's embeddings of its observed
      modalities (`teacher_form="columns"`) or an InfoNCE between each student embedding and the teacher's of the
      same row and modality (`"distillation"`).
    - `imputation_source`: ours, where the objective's imputed columns come from. `"none"` (the default, chosen by
      validation on the benchmarks): the objective sees the observed columns only, while the imputer keeps fitting
      (for `encode` and the pipelines); `"student"` (the paper's calibration): imputed from the row's own
      embeddings, with gradient, which the towers learn to agree with; `"teacher"`: the teacher's PPCA posterior
      from its detached embeddings of the row, targets the towers cannot move.
    - `impute_modalities`: ours, which modalities get imputed columns when something imputes them: `"trained"`
      (the default: those the train data observes whose towers train), `"all"` (the paper's: every modality the
      imputer is fitted on), or a list of names.
    - `imputer_*`, `freeze_modalities`, `freeze_projections`, `eval_pairs`, `hub_endpoint`: ours (CalMRL's bi-step,
      frozen towers, evaluation directions, a Hub API endpoint other than huggingface.co).
    - `hub_timeout`, `hub_retries`: ours. Every Hub request of a push may go `hub_timeout` seconds without progress
      (huggingface_hub's own client waits forever), and a timeout, network error or HTTP 408 / 429 / 5xx is retried
      `hub_retries` times; a checkpoint push that still fails is a warning, and training goes on.
    - `hub_token` is never written anywhere: not in `training_args.json`, the checkpoint manifest, tracker configs,
      model cards, nor the arguments' repr.
    """

    output_dir: str = "outputs/calmrl"
    seed: int = 42
    max_steps: int | None = None  # optimizer steps; None: from num_train_epochs, else 100
    num_train_epochs: float | None = None  # epochs, when max_steps is not given (a float: part of the last one)
    per_device_train_batch_size: int = 32
    train_batch_size: int | None = None  # global; if set, must equal per_device * processes * accumulation
    per_device_eval_batch_size: int = 64
    gradient_accumulation_steps: int | None = None  # None: the launcher's (accelerate config / DeepSpeed), else 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    lr_scheduler_type: str = "cosine"  # a schedule of transformers' get_scheduler (LR_SCHEDULER_TYPES)
    lr_scheduler_kwargs: dict[str, Any] | None = None  # its own settings, e.g. {"min_lr_rate": 0.1}
    warmup_steps: int | float = 0  # steps; a float in (0, 1) is a ratio of max_steps (as transformers 5's Trainer)
    warmup_ratio: float | None = None  # transformers 4's name for a warmup_steps ratio (recorded as warmup_steps)
    adam_beta1: float = 0.9  # AdamW's betas and epsilon, Trainer's names
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    matching_learning_rate: float | None = None  # the matching head's (fusion encoder's); None: learning_rate
    matching_warmup_steps: int | None = None  # the matching head's warm-up; None: warmup_steps
    max_grad_norm: float | None = 1.0
    mixed_precision: str | None = None  # "no" | "bf16" | "fp16"; None: the launcher's (accelerate launch / config)
    bf16: bool = False  # Trainer's switches: mixed_precision="bf16" / "fp16"
    fp16: bool = False
    gradient_checkpointing: bool = False  # recompute the towers' activations in backward (less memory, more time)
    torch_compile: bool = False  # torch.compile the towers and the objective (`compiling.compile_model`)
    torch_compile_backend: str | None = None  # torch.compile's backend (None: "inductor"); set, turns compiling on
    torch_compile_mode: str | None = None  # torch.compile's mode, e.g. "max-autotune"; set, turns compiling on
    use_cpu: bool = False  # force CPU processes (torchrun on CPU: gloo all-reduce)
    logging_steps: int = 10
    logging_dir: str | None = None  # the trackers' folder (None: output_dir)
    eval_strategy: str | None = None  # "no" | "steps" | "epoch"; None: "steps" if eval_steps is set, else "no"
    eval_steps: int | None = None
    save_strategy: str | None = None  # "no" | "steps" | "epoch"; None: "steps" if save_steps is set, else "no"
    save_steps: int | None = None
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest" in output_dir/checkpoints
    allow_resume_changes: Sequence[str] = ()  # manifest fields a resumed run may change, e.g. ["learning_rate"]
    imputer_statistics: str = "ema"  # "ema" | "epoch" | "frozen" (no M-step in training: warm start or loaded only)
    imputer_ema_decay: float = 0.95
    imputer_min_rows: int | None = None  # rows a modality needs before its first M-step; default 2 (q + 1)
    imputer_warm_start: bool = False  # full EM on the embeddings of `warm_start_dataset` before training
    imputer_warm_start_max_iter: int = 50
    teacher: str = "none"  # "none" | "frozen" (the model as the run starts) | "ema" (a moving average of its weights)
    teacher_ema_decay: float = 0.99  # teacher <- decay * teacher + (1 - decay) * model, after every optimizer step
    teacher_weight: float = 1.0  # loss = alignment + teacher_weight * teacher term
    teacher_form: str = "columns"  # "columns" | "distillation"
    teacher_dtype: str | None = None  # None: the model's; "bfloat16": a half-size teacher (its imputer stays float32)
    imputation_source: str = "none"  # "none" (observed columns only) | "student" (the paper's) | "teacher"
    impute_modalities: str | Sequence[str] = "trained"  # "trained" | "all" (the paper's) | a list of modalities
    freeze_modalities: Sequence[str] = ()  # towers to keep frozen (e.g. a pretrained text tower)
    freeze_projections: Sequence[str] = ()  # projection heads to keep frozen
    report_to: str | list[str] | None = None  # trackers, e.g. "tensorboard" ("none" or None: no tracker)
    disable_tqdm: bool = False  # Trainer's name: no progress at all, neither the bar nor the lines off a terminal
    dataloader_num_workers: int = 0
    dataloader_prefetch_factor: int | None = None  # batches each worker loads ahead (None: torch's 2)
    dataloader_persistent_workers: bool = False  # keep the workers between epochs
    dataloader_pin_memory: bool = True  # page-locked batches; applied only when training on a GPU
    push_to_hub: bool = False  # upload the final model to `hub_model_id`
    hub_model_id: str | None = None  # repo id
    hub_strategy: str = "end"  # "end" | "every_save" (the model at each checkpoint) | "checkpoint" (+ last-checkpoint/)
    hub_endpoint: str | None = None
    hub_token: str | None = field(default=None, repr=False)  # never recorded, logged nor shown (`recorded_arguments`)
    hub_private_repo: bool = False
    hub_timeout: float = DEFAULT_HUB_TIMEOUT  # seconds each Hub request may go without progress
    hub_retries: int = DEFAULT_HUB_RETRIES  # retries of a Hub call after a timeout / network error / HTTP 5xx
    eval_pairs: Sequence[Sequence[str]] | None = None  # e.g. [["text", "vision"], ["vision", "text"]]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CalMRLTrainingArguments":
        """From a recipe section: unknown names are an error (with a suggestion), numbers given as strings (YAML
        reads "1e-3" as one) are converted."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(unknown_arguments_message(cls, unknown))
        return cls(**values)  # the constructor converts numbers given as strings (`_convert`)

    def __repr__(self) -> str:  # the fields but `hub_token`, a token inside another value (an endpoint) masked
        from ..sharing.hub import redact

        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return redact(f"{type(self).__name__}({shown})", self.hub_token)

    def __post_init__(self):
        if self.mixed_precision is False:  # YAML reads `mixed_precision: no` as false
            self.mixed_precision = "no"
        if self.report_to == "none" or self.report_to == ["none"]:
            self.report_to = None
        if self.max_steps in (-1, "-1"):  # Trainer's "not set": from num_train_epochs
            self.max_steps = None
        self._convert()
        self._translate_trainer_names()
        self._resolve_strategies()
        self._validate()

    @property
    def saves_checkpoints(self) -> bool:
        """Whether the run writes checkpoints (`save_strategy` "steps" or "epoch")."""
        return self.save_strategy != "no"

    def _translate_trainer_names(self) -> None:
        """Trainer's `bf16` / `fp16` as `mixed_precision`; max_steps / num_train_epochs; a `warmup_steps` ratio (or
        `warmup_ratio`) as steps once max_steps is known; a compile backend or mode turns `torch_compile` on."""
        if self.bf16 and self.fp16:
            raise ValueError("bf16=True and fp16=True: choose one mixed precision.")
        wanted = "bf16" if self.bf16 else "fp16" if self.fp16 else None
        if wanted is not None:
            if self.mixed_precision not in (None, wanted):
                raise ValueError(f"{wanted}=True but mixed_precision={self.mixed_precision!r}: give one of them.")
            self.mixed_precision = wanted
        if self.max_steps is None and self.num_train_epochs is None:
            self.max_steps = DEFAULT_MAX_STEPS
        if self.warmup_ratio is not None:  # folded into warmup_steps: recorded (and resumed) as that
            if self.warmup_steps:
                raise ValueError(f"warmup_ratio={self.warmup_ratio} and warmup_steps={self.warmup_steps}: give one "
                                 f"of them (a float warmup_steps in (0, 1) is a ratio too).")
            self.warmup_steps, self.warmup_ratio = self.warmup_ratio, None
        if 0 < self.warmup_steps < 1:  # a ratio: ceil(ratio * max_steps), as Trainer rounds it
            if self.max_steps is not None:  # else kept until `train` counts the epochs' steps
                self.warmup_steps = math.ceil(self.warmup_steps * self.max_steps)
        elif self.warmup_steps != int(self.warmup_steps):
            raise ValueError(f"warmup_steps = {self.warmup_steps}: a number of steps, or a ratio in (0, 1).")
        else:
            self.warmup_steps = int(self.warmup_steps)
        if self.torch_compile_backend is not None or self.torch_compile_mode is not None:
            self.torch_compile = True

    def _resolve_strategies(self) -> None:
        """`eval_strategy` / `save_strategy` and their steps made consistent: None reads the steps, "steps" without
        eval_steps evaluates every logging_steps (Trainer's default); a contradiction is an error."""
        for kind, steps_name in (("eval", "eval_steps"), ("save", "save_steps")):
            name = f"{kind}_strategy"
            strategy, steps = getattr(self, name), getattr(self, steps_name)
            if strategy is None:
                strategy = "steps" if steps is not None else "no"
            if strategy not in STRATEGIES:
                best = " (keeping the best checkpoint is not supported)" if strategy == "best" else ""
                raise ValueError(f"{name} = {strategy!r}; expected one of {list(STRATEGIES)}{best}.")
            if strategy == "steps" and steps is None:
                if kind == "save":
                    raise ValueError("save_strategy='steps' needs save_steps (a checkpoint every N optimizer steps).")
                steps = self.logging_steps
            if strategy != "steps" and steps is not None:
                raise ValueError(f"{name}={strategy!r} with {steps_name}={steps}: {steps_name} goes with "
                                 f"{name}='steps'; give one of them.")
            setattr(self, name, str(strategy))  # Trainer's IntervalStrategy enum is a str
            setattr(self, steps_name, steps)

    def _convert(self) -> None:
        """Numbers as their field's type (from strings too: YAML reads 1e-3 as one), each within its range
        (`TRAINING_NUMBERS`); switches booleans; lists of modality names lists (a string is one name)."""
        if not isinstance(self.push_to_hub, bool):
            raise ValueError(f"push_to_hub must be True or False, got {self.push_to_hub!r}; the repo id goes in "
                             f"hub_model_id.")
        for name, spec in TRAINING_NUMBERS.items():
            value = coerce_number(name, getattr(self, name), spec)
            check_number(name, value, spec)
            setattr(self, name, value)
        for name in TRAINING_SWITCHES:
            setattr(self, name, check_bool(name, getattr(self, name)))
        for name in ("freeze_modalities", "freeze_projections", "allow_resume_changes"):
            setattr(self, name, _names(name, getattr(self, name)))
        if self.eval_pairs is not None:
            self.eval_pairs = _pairs(self.eval_pairs)

    def _validate(self) -> None:
        if self.lr_scheduler_type not in LR_SCHEDULER_TYPES:
            why = (" (it steps on a metric; the loop steps the schedule every optimizer step)"
                   if self.lr_scheduler_type in ("reduce_lr_on_plateau", "greedy") else "")
            close = difflib.get_close_matches(str(self.lr_scheduler_type), LR_SCHEDULER_TYPES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close and not why else ""
            raise ValueError(f"lr_scheduler_type = {self.lr_scheduler_type!r} is not supported{why}; expected one of "
                             f"{list(LR_SCHEDULER_TYPES)}.{hint}")
        if self.lr_scheduler_kwargs is not None and (not isinstance(self.lr_scheduler_kwargs, dict) or not all(
                isinstance(key, str) for key in self.lr_scheduler_kwargs)):
            raise TypeError(f"lr_scheduler_kwargs must be a dict of the schedule's keyword arguments, e.g. "
                            f"{{'min_lr_rate': 0.1}}, got {self.lr_scheduler_kwargs!r}.")
        if self.imputer_statistics not in ("ema", "epoch", "frozen"):
            raise ValueError(f"imputer_statistics = {self.imputer_statistics!r}; expected 'ema', 'epoch' or 'frozen'.")
        self._validate_teacher()
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision = {self.mixed_precision!r}; expected 'no', 'bf16', 'fp16' or None (the "
                             f"launcher's).")
        if self.hub_strategy not in HUB_STRATEGIES:
            raise ValueError(f"hub_strategy = {self.hub_strategy!r}; expected one of {HUB_STRATEGIES}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub=True needs hub_model_id (the repo id to upload to).")

    def _validate_teacher(self) -> None:
        choices = {"teacher": ("none", "frozen", "ema"), "teacher_form": ("columns", "distillation"),
                   "teacher_dtype": (None, "float32", "bfloat16"), "imputation_source": ("none", "student", "teacher")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} = {getattr(self, name)!r}; expected one of {list(allowed)}.")
        if self.teacher == "ema" and self.teacher_dtype == "bfloat16":
            raise ValueError("teacher='ema' with teacher_dtype='bfloat16': a bfloat16 average rounds away the small "
                             "updates (1 - decay) x (model - teacher) it is made of, and stops following the model. "
                             "Use a float32 EMA teacher, or a bfloat16 frozen one.")
        if self.imputation_source == "teacher" and self.teacher == "none":
            raise ValueError("imputation_source='teacher' needs a teacher: set teacher='frozen' or 'ema'.")
        if isinstance(self.impute_modalities, str):
            if self.impute_modalities not in ("trained", "all"):
                raise ValueError(f"impute_modalities = {self.impute_modalities!r}; expected 'trained', 'all' or a "
                                 f"list of modality names.")
        else:
            self.impute_modalities = list(self.impute_modalities)


def _ints(words: str, low: int, optional: bool = False, high: int | None = None) -> NumberRange:
    return NumberRange(int, words, low=low, optional=optional, high=high, high_inclusive=True)


def _floats(words: str, low: float, low_inclusive: bool, optional: bool = False,
            high: float | None = None) -> NumberRange:
    return NumberRange(float, words, low=low, low_inclusive=low_inclusive, optional=optional, high=high)


# What each numeric argument accepts. None means "never" / "the default" only where the field's comment says so;
# 0 is no synonym of None (save_steps=0 would checkpoint never, save_total_limit=0 keep all, imputer_min_rows=0
# take the default), and a negative count or rate is always a mistake (save_steps=-1 checkpointed every step,
# max_grad_norm=-1 reversed the update).
TRAINING_NUMBERS = {
    "seed": _ints("in [0, 2**32 - 1]", 0, high=2**32 - 1),  # numpy's seed range
    "max_steps": _ints(">= 1, or None (from num_train_epochs)", 1, optional=True),
    "num_train_epochs": _floats("> 0 or None", 0, False, optional=True),
    "per_device_train_batch_size": _ints(">= 1", 1),
    "train_batch_size": _ints(">= 1 or None", 1, optional=True),
    "per_device_eval_batch_size": _ints(">= 1", 1),
    "gradient_accumulation_steps": _ints(">= 1 or None", 1, optional=True),
    "learning_rate": _floats(">= 0", 0, True),  # 0: the weights stay (a run that only fits the imputer)
    "weight_decay": _floats(">= 0", 0, True),
    "warmup_steps": _floats(">= 0 (steps; a float in (0, 1): a ratio of max_steps)", 0, True),
    "warmup_ratio": _floats("in [0, 1) or None", 0, True, optional=True, high=1),
    "adam_beta1": _floats("in [0, 1)", 0, True, high=1),
    "adam_beta2": _floats("in [0, 1)", 0, True, high=1),
    "adam_epsilon": _floats("> 0", 0, False),
    "matching_learning_rate": _floats("> 0 or None", 0, False, optional=True),
    "matching_warmup_steps": _ints(">= 0 or None", 0, optional=True),
    "max_grad_norm": _floats("> 0 or None (no clipping)", 0, False, optional=True),
    "logging_steps": _ints(">= 1", 1),
    "eval_steps": _ints(">= 1 or None (never)", 1, optional=True),
    "save_steps": _ints(">= 1 or None (never)", 1, optional=True),
    "save_total_limit": _ints(">= 1 or None (keep all)", 1, optional=True),
    "imputer_ema_decay": _floats("in [0, 1)", 0, True, high=1),
    "imputer_min_rows": _ints(">= 1 or None (the default)", 1, optional=True),
    "imputer_warm_start_max_iter": _ints(">= 1", 1),
    "teacher_ema_decay": _floats("in [0, 1)", 0, True, high=1),
    "teacher_weight": _floats(">= 0", 0, True),
    "dataloader_num_workers": _ints(">= 0", 0),
    "dataloader_prefetch_factor": _ints(">= 1 or None (torch's 2)", 1, optional=True),
    "hub_timeout": _floats("a number of seconds > 0", 0, False),
    "hub_retries": _ints("an integer >= 0", 0),
}
# Switches: True or False only (a quoted "false" is a string, which would count as True).
TRAINING_SWITCHES = ("use_cpu", "imputer_warm_start", "dataloader_persistent_workers", "dataloader_pin_memory",
                     "hub_private_repo", "bf16", "fp16", "gradient_checkpointing", "torch_compile", "disable_tqdm")


def _names(field_name: str, value: Any) -> list[str]:
    """A list of names (modalities, or fields for allow_resume_changes); a single string is one name (not its
    letters)."""
    if isinstance(value, str):
        return [value]
    if value is None:
        return []
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{field_name} must be a name or a list of names, got {value!r}.")
    return list(value)


def _pairs(value: Any) -> list[list[str]]:
    """eval_pairs as [[query, gallery], ...]: each pair two modality names."""
    example = "e.g. [['text', 'vision'], ['vision', 'text']]"
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"eval_pairs must be a list of [query, gallery] pairs of modality names ({example}), got "
                        f"{value!r}.")
    pairs = []
    for pair in value:
        if isinstance(pair, str) or not isinstance(pair, (list, tuple)) or len(pair) != 2 \
                or not all(isinstance(name, str) for name in pair):
            raise ValueError(f"eval_pairs must be a list of [query, gallery] pairs of modality names ({example}); "
                             f"{pair!r} is not one (in {value!r}).")
        pairs.append(list(pair))
    return pairs


# Arguments never written anywhere (files, tracker configs, cards, logs): credentials.
SECRET_ARGUMENTS = frozenset({"hub_token"})


def recorded_arguments(args: CalMRLTrainingArguments) -> dict[str, Any]:
    """The training arguments as written to `training_args.json`, the model card and the trackers' config: all
    but `SECRET_ARGUMENTS` (and any field whose name says token), with a token that found its way into another
    value (e.g. an endpoint `https://user:hf_...@host`) masked."""
    from ..sharing.hub import redact

    recorded = {}
    for name, value in asdict(args).items():
        if name in SECRET_ARGUMENTS or "token" in name.lower():
            continue
        if isinstance(value, str):
            value = redact(value, args.hub_token)
        recorded[name] = value
    return recorded


__all__ = ["CalMRLTrainingArguments", "SECRET_ARGUMENTS", "recorded_arguments"]
