"""The recipe's command-line options (`calmrl train`, `recipes/train_vast.py`): kept apart from the recipe itself so
that `calmrl train --help` and argument errors answer without importing torch, transformers or the training loop."""

from __future__ import annotations

import argparse
from pathlib import Path


DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "mini_vast.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="recipe YAML (default: %(default)s)")
    parser.add_argument("--output_dir", help="override the config's output_dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key, e.g. stage2.max_steps=50 (YAML value)")
    parser.add_argument("--resume", action="store_true", help="resume each stage from its latest checkpoint")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="upload the final model to this Hub repo")
    parser.add_argument("--cpu", action="store_true", help="CPU processes even where GPUs exist (torchrun + gloo)")
    return parser
