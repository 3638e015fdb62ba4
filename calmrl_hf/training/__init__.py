"""Training: the loop (`train`), its arguments, the imputer step, checkpoints and resume, launching and sharding.

Nothing here is copied into checkpoints: the model side (`calmrl_hf/*.py`) never imports this package.
"""

from .arguments import CalMRLTrainingArguments
from .launch import build_accelerator, refuse_unsupported_engine_settings, resolve_launch_settings
from .loop import (ImputerUpdater, TrainOutput, build_dataloaders, build_optimizer, check_resumed_run, embed_dataset,
                   evaluate, keep_imputer_float32, latest_checkpoint, load_checkpoint, prepare_run, train,
                   validate_setup)


__all__ = ["CalMRLTrainingArguments", "ImputerUpdater", "TrainOutput", "build_accelerator",
           "build_dataloaders", "build_optimizer", "check_resumed_run", "embed_dataset", "evaluate",
           "keep_imputer_float32", "latest_checkpoint", "load_checkpoint", "prepare_run",
           "refuse_unsupported_engine_settings", "resolve_launch_settings", "train", "validate_setup"]
