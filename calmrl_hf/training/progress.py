"""Training progress a person can read wherever the output goes: a tqdm bar on a terminal, and where stderr is a
file or a pipe (a log, CI) one log line per logging step instead of a wall of bar redraws."""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm


logger = logging.getLogger(__name__)


def on_terminal() -> bool:
    """Whether stderr, where tqdm draws, is a terminal."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class LoggedProgress:
    """The part of tqdm's interface the training loop uses (`update`, `set_postfix`, `close`), written as log lines:
    each `set_postfix` (the loop calls it every `logging_steps`) logs the step, the postfix values, the elapsed time
    and an estimate of the time left."""

    def __init__(self, total: int, initial: int = 0, desc: str = "training"):
        self.total, self.n, self.desc = total, initial, desc
        self._initial, self._start = initial, time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values) -> None:
        elapsed = time.perf_counter() - self._start
        done = self.n - self._initial
        left = elapsed / done * (self.total - self.n) if done else float("nan")
        shown = ", ".join(f"{key} {value}" for key, value in values.items())
        logger.info("%s: step %d/%d (%.0f%%), %s, %.0f s elapsed, about %.0f s left", self.desc, self.n, self.total,
                    100 * self.n / max(self.total, 1), shown, elapsed, left)

    def close(self) -> None:
        logger.info("%s: %d steps in %.1f s", self.desc, self.n - self._initial, time.perf_counter() - self._start)


def step_progress(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal, a `LoggedProgress` elsewhere; a disabled tqdm (silent) when not `enabled` (the
    processes other than the main one)."""
    if enabled and not on_terminal():
        return LoggedProgress(total, initial, desc)
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc)


__all__ = ["LoggedProgress", "on_terminal", "step_progress"]
