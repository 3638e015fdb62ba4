"""Training progress a person sees wherever the output goes, with no logging set up: a tqdm bar on a terminal, also
under `accelerate launch`; elsewhere (a pipe, a file, a notebook) one line per logging step written to stderr.

`accelerate launch` with one process (its simple launcher) starts the script with stderr a pipe: the launcher reads
it and copies each chunk at once to its own stderr, keeping the tail for its error report. The script's stderr is
then no terminal though every byte lands on one, so `sys.stderr.isatty()` alone gives log lines where a bar
belongs. `terminal_size` also recognises that pipe (`terminal_behind_launcher`).

    with step_progress(max_steps, initial=0, desc="training out", enabled=accelerator.is_local_main_process) as p:
        p.update(1)
        p.log(loss=0.25, dropped=3)   # every logging step: the bar's postfix, or one line on stderr
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from tqdm import tqdm


# accelerate's simple launcher sets this in every script it starts (and torchrun, its multi-process launcher, hands
# the processes the terminal itself)
LAUNCHER_VARIABLE = "ACCELERATE_USE_CPU"


def terminal_behind_launcher(fd: int) -> os.terminal_size | None:
    """The size of the terminal that `accelerate launch` copies the pipe `fd` (this process's stderr) to, or None:
    `fd` is a pipe whose other end the parent process (the launcher) holds, and the parent's stderr is a terminal.
    Linux (/proc) only; elsewhere None."""
    if LAUNCHER_VARIABLE not in os.environ:
        return None
    try:
        ours = os.readlink(f"/proc/self/fd/{fd}")  # "pipe:[inode]"
        parent = f"/proc/{os.getppid()}/fd"
        if not ours.startswith("pipe:") or ours not in {_link(f"{parent}/{entry}") for entry in os.listdir(parent)}:
            return None
        # the parent's stderr opened anew: a terminal opens without becoming ours (O_NOCTTY), a pipe without
        # waiting for a reader (O_NONBLOCK)
        parent_stderr = os.open(f"{parent}/2", os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return os.get_terminal_size(parent_stderr) if os.isatty(parent_stderr) else None
    except OSError:
        return None
    finally:
        os.close(parent_stderr)


def _link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:  # closed since the directory was listed
        return None


def terminal_size() -> os.terminal_size | None:
    """The size of the terminal stderr (where tqdm draws) reaches, directly or through `accelerate launch`'s pipe
    (80 columns, 24 lines where the terminal does not say); None where it reaches none (a file, a pipe, a
    notebook)."""
    stream = sys.stderr
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a file (io.UnsupportedOperation)
        fd = None
    if getattr(stream, "isatty", lambda: False)():
        size = _measured(fd)
    elif fd is None or (size := terminal_behind_launcher(fd)) is None:
        return None
    # a terminal that does not say its size (0 x 0, e.g. a new pseudo-terminal) would have tqdm hide its bar
    columns, lines = size if size is not None else (0, 0)
    return os.terminal_size((columns if columns > 1 else 80, lines if lines > 1 else 24))


def _measured(fd: int | None) -> os.terminal_size | None:
    try:
        return os.get_terminal_size(fd) if fd is not None else None
    except OSError:
        return None


def on_terminal() -> bool:
    """Whether stderr reaches a terminal (`terminal_size`): bars then, lines elsewhere."""
    return terminal_size() is not None


def examples(count: int) -> str:
    return f"{count} example" + ("" if count == 1 else "s")


class StepProgress:
    """Progress over `total` optimizer steps from `initial`, told at each logging step (`log`): the loss and the
    running count of examples the collator dropped (no observed modality). The count is told once in a notice
    the first time it is not zero, then with every logging step, and in total at the end (`close`), never per
    batch. Subclasses show it: a bar, lines, or nothing."""

    def __init__(self, total: int, initial: int = 0, desc: str = "training"):
        self.total, self.n, self.desc = total, initial, desc
        self.dropped = 0
        self._initial, self._start = initial, time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n

    def log(self, loss: float, dropped: int = 0) -> None:
        """A logging step: `loss` of the last optimizer step, `dropped` examples so far (all processes)."""
        if dropped and not self.dropped:
            self.notice(f"{self.desc}: the collator dropped {examples(dropped)} with no observed modality so far "
                        f"(left out of its batch; the others keep their pairings); the count follows at each "
                        f"logging step.")
        self.dropped = max(self.dropped, dropped)
        self._show(loss)

    def notice(self, message: str) -> None:
        """One line for the person watching, written where it does not break the progress shown."""

    def close(self) -> None:
        pass

    def _show(self, loss: float) -> None:
        pass

    def _dropped_total(self) -> str:
        return f"{examples(self.dropped)} with no observed modality dropped in all" if self.dropped else ""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ProgressLines(StepProgress):
    """Progress as one line on stderr per logging step (step, percentage, loss, dropped examples, time elapsed and
    left), and one when training ends. Written to `sys.stderr` itself, flushed: it shows without any logging
    configuration, at once in a pipe or a notebook."""

    def notice(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def _show(self, loss: float) -> None:
        elapsed = time.perf_counter() - self._start
        done = self.n - self._initial
        left = elapsed / done * (self.total - self.n) if done else float("nan")
        dropped = f", {examples(self.dropped)} dropped so far" if self.dropped else ""
        self.notice(f"{self.desc}: step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%), loss "
                    f"{loss:.4f}{dropped}, {elapsed:.0f} s elapsed, about {left:.0f} s left")

    def close(self) -> None:
        total = self._dropped_total()
        self.notice(f"{self.desc}: {self.n - self._initial} steps in {time.perf_counter() - self._start:.1f} s"
                    + (f"; {total}" if total else ""))


class ProgressBar(StepProgress):
    """A tqdm bar on stderr, the loss and dropped examples in its postfix. While it shows, this process's log
    records that would go to the console are written above it (`tqdm.write`) instead of through it
    (`_logging_above_bars`)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "training", ncols: int | None = None,
                 nrows: int | None = None):
        super().__init__(total, initial, desc)
        self.bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, ncols=ncols, nrows=nrows,
                        disable=False)
        self._logging = contextlib.ExitStack()
        self._logging.enter_context(_logging_above_bars())

    def update(self, n: int = 1) -> None:
        super().update(n)
        self.bar.update(n)

    def notice(self, message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    def _show(self, loss: float) -> None:
        postfix = {"loss": f"{loss:.4f}"}
        if self.dropped:
            postfix["dropped"] = self.dropped
        self.bar.set_postfix(postfix)

    def close(self) -> None:
        if self.bar.disable:  # closed already
            return
        self.bar.close()
        self._logging.close()
        if self.dropped:
            self.notice(f"{self.desc}: {self._dropped_total()}")


class _AboveBars(logging.Handler):
    """Writes records with `tqdm.write` (above the bars) to `stream` (None: stderr as it is when writing), in the
    place of a console handler, with its level, formatter and filters."""

    def __init__(self, stream=None, level: int = logging.NOTSET, formatter=None, filters=()):
        super().__init__(level)
        self.stream = stream
        self.setFormatter(formatter)
        self.filters = list(filters)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream or sys.stderr)
        except Exception:  # noqa: BLE001 - logging's contract: a failing handler reports, never raises
            self.handleError(record)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)


@contextlib.contextmanager
def _logging_above_bars():
    """The root logger's console handlers replaced by `_AboveBars` ones (its other handlers, e.g. files, left as
    they are); with no handler on the root, one that prints warnings as Python's last-resort handler would."""
    root = logging.getLogger()
    original = root.handlers
    if original:
        root.handlers = [_AboveBars(h.stream, h.level, h.formatter, h.filters) if _is_console(h) else h
                         for h in original]
    else:
        root.handlers = [_AboveBars(level=logging.WARNING)]
    try:
        yield
    finally:
        root.handlers = original


def step_progress(total: int, initial: int, desc: str, enabled: bool) -> StepProgress:
    """A `ProgressBar` where stderr reaches a terminal (`terminal_size`), `ProgressLines` elsewhere; nothing shown
    where not `enabled` (the processes other than the main one)."""
    if not enabled:
        return StepProgress(total, initial, desc)
    size = terminal_size()
    if size is None:
        return ProgressLines(total, initial, desc)
    # the size as tqdm takes it, which it cannot measure itself behind the launcher's pipe
    return ProgressBar(total, initial, desc, ncols=size.columns - 1, nrows=size.lines - 1)


__all__ = ["ProgressBar", "ProgressLines", "StepProgress", "on_terminal", "step_progress", "terminal_behind_launcher",
           "terminal_size"]
