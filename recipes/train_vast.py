"""CalMRL training with the paper's protocol: stage 1 on a full-modality set, stage 2 on missing-modality data.

    accelerate launch recipes/train_vast.py                                  # built-in offline default
    accelerate launch recipes/train_vast.py --config recipes/configs/vast.yaml
    python recipes/train_vast.py --set stage2.max_steps=500 --set model.config.imputer_method=none

The recipe itself lives in `calmrl_hf.recipe.run`; this script is `calmrl train` (errors are one line, exit status 2).
Its configs are in `recipes/configs/`.
"""

import sys

from calmrl_hf.cli import main


if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
