"""Training progress where people run things, with no logging set up: a bar on a terminal (also behind `accelerate
launch`'s pipe), one line per logging step on stderr elsewhere, dropped examples summarised, not told per batch."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import queue
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
import torch

from calmrl_hf.training.progress import ProgressBar, ProgressLines, StepProgress, step_progress, terminal_size

from launching import free_port, kill_group, launch_environment
from progress_worker import EMPTY, tiny_run


WORKER = Path(__file__).parent / "progress_worker.py"
STEP_LINE = re.compile(r"^training run: step (\d+)/(\d+) \(\d+%\), loss \d+\.\d{4}")
# tqdm's redraw: a carriage return not ending a line, then the bar with its count and rate
BAR_REDRAW = re.compile(r"\r(?!\n)training run: +\d+%\|[^|\r\n]*\| *(\d+)/8 \[[^\]]*(?:it/s|s/it)")


def read_lines(stream, into: queue.Queue) -> None:
    """Put each line of `stream` into `into` as it arrives, then None when the stream closes."""
    for line in iter(stream.readline, ""):
        into.put(line)
    into.put(None)


def pty_pair(columns: int = 120) -> tuple[int, int]:
    """A new pseudo-terminal (master, slave), `columns` wide."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    return master, slave


def read_until_closed(master: int, process: subprocess.Popen, timeout: float) -> str:
    """All `process` writes to the terminal `master` until it closes; past `timeout` s the process group is killed
    and the test fails with the output so far."""
    chunks, deadline = [], time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            kill_group(process)
            pytest.fail(f"killed after {timeout} s:\n{b''.join(chunks).decode(errors='replace')[-4000:]}")
        if not select.select([master], [], [], min(left, 1.0))[0]:
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=30)
    return b"".join(chunks).decode(errors="replace")


# ------------------------------------------------------------------------------------------------ where it goes
def test_a_terminal_gets_a_bar_a_pipe_lines_other_processes_nothing(monkeypatch):
    master, slave = pty_pair(columns=100)
    terminal = open(slave, "w", buffering=1)
    try:
        monkeypatch.setattr(sys, "stderr", terminal)
        assert terminal_size().columns == 100
        with step_progress(10, 0, "training run", enabled=True) as bar:
            assert isinstance(bar, ProgressBar) and bar.bar.ncols == 99
            bar.update(2)
            bar.log(0.5)
        drawn = os.read(master, 65536).decode()
        assert re.search(r"\rtraining run: +20%\|[^|]*\| 2/10 \[[^\]]*, loss=0\.5000\]", drawn), repr(drawn)
        silent = step_progress(10, 0, "training run", enabled=False)  # the other processes
        assert type(silent) is StepProgress
        silent.log(0.5, dropped=3)
        silent.close()
        assert not select.select([master], [], [], 0.1)[0]  # nothing written
    finally:
        terminal.close()
        os.close(master)
    master, slave = pty.openpty()  # a terminal that does not say its size (0 x 0): tqdm would hide the bar
    with open(slave, "w", buffering=1) as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        assert tuple(terminal_size()) == (80, 24)
        with step_progress(10, 0, "training run", enabled=True) as bar:
            bar.update(3)
            bar.log(0.5)
        assert "3/10" in os.read(master, 65536).decode()
    os.close(master)
    read, write = os.pipe()
    with open(write, "w") as pipe, open(read):
        monkeypatch.setattr(sys, "stderr", pipe)
        assert terminal_size() is None  # a pipe no launcher reads: `python train.py 2>&1 | cat`
        assert isinstance(step_progress(10, 0, "training run", enabled=True), ProgressLines)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # an object without a file (as a notebook's stream may be)
    assert isinstance(step_progress(10, 0, "training run", enabled=True), ProgressLines)


def test_lines_reach_stderr_without_logging_and_tell_the_time_left(monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    with step_progress(10, 2, "training run", enabled=True) as progress:  # resumed at step 2
        for step in range(8):
            progress.update(1)
            if (step + 1) % 4 == 0:
                progress.log(0.5, dropped=0 if step < 4 else 3)
    lines = stderr.getvalue().splitlines()
    assert lines[0].startswith("training run: step 6/10 (60%), loss 0.5000,") and "dropped" not in lines[0]
    assert lines[1].startswith("training run: the collator dropped 3 examples with no observed modality so far")
    assert lines[2].startswith("training run: step 10/10 (100%), loss 0.5000, 3 examples dropped so far,")
    assert "about 0 s left" in lines[2]
    assert lines[3].startswith("training run: 8 steps in ") and lines[3].endswith(
        "; 3 examples with no observed modality dropped in all")
    assert len(lines) == 4


def test_the_bar_keeps_log_records_above_it(monkeypatch):
    """While a bar shows, a warning goes through `tqdm.write` (the bar is cleared, the line written, the bar
    redrawn), with no handler configured as with the program's own; afterwards the root logger is as it was."""
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    with ProgressBar(4, 0, "training run", ncols=80) as bar:
        bar.update(1)
        logging.getLogger("calmrl_hf.somewhere").warning("a warning while training")
        logging.getLogger("calmrl_hf.somewhere").info("not shown, as Python would not show it")
    # the bar cleared (80 spaces), the warning on its own line, the bar drawn again below it
    assert "\r" + " " * 80 + "\ra warning while training\n\rtraining run:" in stderr.getvalue()
    assert "not shown" not in stderr.getvalue() and root.handlers == []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    monkeypatch.setattr(root, "handlers", [handler])
    with ProgressBar(4, 0, "training run", ncols=80):
        logging.getLogger("calmrl_hf.somewhere").warning("formatted")
        assert root.handlers != [handler]
    assert root.handlers == [handler] and "LOG formatted\n" in stderr.getvalue()


# ------------------------------------------------------------------------------------------------ a user's run
def test_dropped_examples_are_summarised_not_told_per_batch(tmp_path, monkeypatch, caplog):
    """The tiny run drops 2 examples an epoch in 4 batches of 4: 8 steps are 2 epochs, 4 dropped. The count shows at
    every logging step and in all at the end; the collator warns about no batch."""
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    with caplog.at_level(logging.DEBUG, logger="calmrl_hf.data.collator"):
        output = tiny_run(str(tmp_path / "run"), max_steps=8, logging_steps=2)
    assert output.global_step == 8
    dropping_batches = [r for r in caplog.records if r.getMessage().startswith("Dropped")]
    assert dropping_batches and all(r.levelno == logging.DEBUG for r in dropping_batches)  # ids, at debug only
    lines = stderr.getvalue().splitlines()
    step_lines = [line for line in lines if STEP_LINE.match(line)]
    assert len(step_lines) == 8 // 2
    counts = [int(re.search(r"(\d+) examples? dropped so far", line).group(1)) for line in step_lines]
    assert counts == sorted(counts) and counts[-1] == 2 * len(EMPTY)
    assert sum("the collator dropped" in line for line in lines) == 1  # one notice, not one per batch
    ours = [line for line in lines if line.startswith("training run: ")]  # (saving the model draws its own bar)
    assert len(ours) == len(step_lines) + 2 and ours[-2] == step_lines[-1]
    assert ours[-1].endswith(f"; {2 * len(EMPTY)} examples with no observed modality dropped in all")


def test_disable_tqdm_shows_no_progress_and_trains_the_same(tmp_path, monkeypatch):
    """Trainer's `disable_tqdm`: neither a line nor a bar, and the same losses as the run that shows them."""
    shown, hidden = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", shown)
    torch.manual_seed(0)  # the model's initialisation
    showing = tiny_run(str(tmp_path / "shown"), max_steps=4, logging_steps=2)
    monkeypatch.setattr(sys, "stderr", hidden)
    torch.manual_seed(0)
    silent = tiny_run(str(tmp_path / "hidden"), max_steps=4, logging_steps=2, disable_tqdm=True)
    assert [line for line in shown.getvalue().splitlines() if line.startswith("training shown: ")]
    assert not [line for line in hidden.getvalue().splitlines() if line.startswith("training hidden")]
    assert silent.losses == showing.losses


@pytest.mark.slow
def test_a_piped_script_prints_a_line_per_logging_step_while_it_runs(tmp_path):
    """`python my_train.py | cat`: stderr a pipe, no logging configured. One line per logging step on stderr, there
    before the run ends (the worker waits on stdin after training until the test has read them)."""
    process = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), "8", "2", "--wait"],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=launch_environment(tmp_path), start_new_session=True)
    arriving: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(process.stderr, arriving), daemon=True)
    reader.start()
    lines, deadline = [], time.monotonic() + 180
    try:
        while not (lines and lines[-1].startswith("training run: 8 steps in")):
            try:
                line = arriving.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                pytest.fail("no closing progress line in 180 s:\n" + "".join(lines))
            assert line is not None, "stderr closed before the closing progress line:\n" + "".join(lines)
            lines.append(line)
        assert process.poll() is None  # the lines came while the run was alive
        process.stdin.write("\n")
        process.stdin.close()
        process.wait(timeout=60)
        reader.join(timeout=60)
    finally:
        kill_group(process)
    rest = "".join(iter(arriving.get_nowait, None))
    assert process.returncode == 0, rest[-4000:]
    step_lines = [line for line in lines if STEP_LINE.match(line)]
    assert [int(STEP_LINE.match(line).group(1)) for line in step_lines] == [2, 4, 6, 8]
    assert not any("\r" in line for line in step_lines)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate CLI")
@pytest.mark.parametrize("processes", [1])  # the launcher that pipes (two processes: torchrun, a terminal)
def test_accelerate_launch_on_a_terminal_draws_a_bar(tmp_path, processes):
    """`accelerate launch` in a terminal (a real pseudo-terminal). With one process its launcher hands the script a
    pipe for stderr and copies it to the terminal; with two, torchrun hands them the terminal. The main process
    draws a bar there (redrawn in place, as wide as the terminal), with no line per step, no line per batch that
    drops examples, and the dropped count summed over the processes (each epoch drops 2: 16 examples, 4 to a batch,
    8 steps are 2 epochs on one process, 4 on two)."""
    master, slave = pty_pair(columns=120)
    where = (["--cpu", "--num_processes", "1"] if processes == 1 else
             ["--multi_gpu", "--num_processes", "2", "--main_process_port", free_port()])
    command = ["accelerate", "launch", *where, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
               "no", str(WORKER), str(tmp_path), "8", "2"]
    process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=launch_environment(tmp_path),
                               start_new_session=True)
    os.close(slave)
    try:
        output = read_until_closed(master, process, timeout=240)
    finally:
        os.close(master)
        kill_group(process)
    assert process.returncode == 0, output[-4000:]
    dropped = 2 * len(EMPTY) * processes
    redraws = BAR_REDRAW.findall(output)
    assert len(redraws) >= 4 and redraws[-1] == "8"  # the bar, redrawn in place (at least every logging step)
    last = [m for m in re.finditer(r"\r(?!\n)(training run: +\d+%\|[^\r\n]*)", output)][-1].group(1)
    assert len(last) == 119 and "loss=" in last and f"dropped={dropped}]" in last
    assert not any(STEP_LINE.match(line) for line in output.splitlines())  # no log lines instead of the bar
    assert "Dropped" not in output and output.count("the collator dropped") == 1
    assert f"training run: {dropped} examples with no observed modality dropped in all" in output


# ------------------------------------------------------------------------------------------------ the main job's end
def planted_results() -> dict[str, dict[str, float]]:
    """Both stages' test metrics as `evaluate` names them: class R@1 high, instance R@1 and their mean over every
    direction (`mean_R@1`, 17.6) far lower, as in the main job."""
    from calmrl_hf.recipe.report import DIRECTION_GROUPS

    directions = [d for _, group in DIRECTION_GROUPS for d in group]
    results = {}
    for shift, stage in ((-10.0, "stage1"), (0.0, "stage2")):
        results[stage] = {f"{d}/class_R@1": shift + 80.0 + 1.5 * i for i, d in enumerate(directions)}
        results[stage].update({f"{d}/R@1": 10.0 + i for i, d in enumerate(directions)})
        results[stage]["mean_R@1"] = 17.6
    return results


def test_the_closing_line_reports_the_tables_headline(tmp_path, monkeypatch, capsys):
    """The recipe's report (table, then closing line) and the line logged as each stage ends give one headline, named
    one way: the table's last row, which is the mean of its four observed-pair rows (read back from the table)."""
    from calmrl_hf.recipe import run as recipe_run
    from calmrl_hf.recipe.report import HEADLINE_NAME, MEAN_LABEL, closing_line, stage_line

    monkeypatch.setattr(recipe_run, "plot_training", lambda *args, **kwargs: None)
    results = planted_results()
    recipe_run.report(tmp_path, results, {}, 12.0, "pmrl on the observed modalities only")
    lines = capsys.readouterr().out.strip().splitlines()
    observed = [line.split() for line in lines if line.split()[:1] and line.split()[0] in (
        "text->vision", "vision->text", "text->audio", "audio->text")]
    assert len(observed) == 4
    means = [f"{sum(float(row[column]) for row in observed) / 4:.1f}" for column in (1, 2)]  # class R@1, stages
    assert lines[-2].startswith(MEAN_LABEL) and lines[-2].split()[-3:-1] == means
    assert lines[-1] == f"{HEADLINE_NAME}: {means[0]} after stage1, {means[1]} after stage2. The recipe ran 12 s " \
                        "(from reading its config to this line)."
    assert stage_line("stage2", 300, results["stage2"]) == f"stage2 finished at step 300: {HEADLINE_NAME} {means[1]}"
    assert "17.6" not in lines[-1]  # not the instance-level mean over every direction
    without_audio = {stage: {k: v for k, v in metrics.items() if "audio" not in k}
                     for stage, metrics in results.items()}
    assert stage_line("stage1", 5, without_audio["stage1"]).endswith(f"no {HEADLINE_NAME} (a direction is missing)")
    assert closing_line(without_audio, 3.0) == "The recipe ran 3 s (from reading its config to this line)."
