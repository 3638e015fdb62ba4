"""The two-stage training recipe behind `calmrl train` and `recipes/train_vast.py` (`run`), its report (`report`)
and its packaged configs (`configs/`)."""
