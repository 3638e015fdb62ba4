"""Training: the loop (`train`), its arguments, the imputer step, checkpoints and resume, launching and sharding.

Nothing here is copied into checkpoints: the model side (`calmrl_hf/*.py`) never imports this package.
"""

from .arguments import CalMRLTrainingArguments
from .evaluation import embed_dataset, evaluate
from .imputer_step import ImputerUpdater
from .launch import build_accelerator, refuse_unsupported_engine_settings, resolve_launch_settings
from .loop import TrainOutput, TrainPosition, train
from .resume import RunCheckpoints, check_resumed_run, latest_checkpoint
from .setup import build_dataloaders, build_optimizer, keep_imputer_float32, prepare_training, validate_setup


__all__ = ["CalMRLTrainingArguments", "ImputerUpdater", "RunCheckpoints", "TrainOutput", "TrainPosition",
           "build_accelerator", "build_dataloaders", "build_optimizer", "check_resumed_run", "embed_dataset",
           "evaluate", "keep_imputer_float32", "latest_checkpoint", "prepare_training",
           "refuse_unsupported_engine_settings", "resolve_launch_settings", "train", "validate_setup"]
