"""Check that the fast lane (`python -m pytest -m "not slow"`) still runs every module of calmrl_hf.

    pip install coverage
    python tests/fast_lane_coverage.py              # extra arguments go to pytest, e.g. -x

Runs the fast lane under coverage and lists each calmrl_hf/**/*.py with no executed line; exits 1 if there is one.
A top-level module also counts as run where its copy in a saved checkpoint ran as remote code (transformers'
dynamic modules, kept under a temporary HF_MODULES_CACHE here): sentence_transformers_calmrl.py, for one, is only
ever imported that way. (Not a test: it runs the whole fast lane.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "calmrl_hf"


def main(pytest_args: list[str]) -> int:
    import coverage

    with tempfile.TemporaryDirectory() as scratch:
        modules, data = Path(scratch) / "hf_modules", Path(scratch) / "coverage.data"
        modules.mkdir()
        env = {**os.environ, "HF_MODULES_CACHE": str(modules), "PYTHONPATH": str(ROOT),
               "TOKENIZERS_PARALLELISM": "false"}
        command = [sys.executable, "-m", "coverage", "run", f"--data-file={data}",
                   f"--source={PACKAGE},{modules}", "-m", "pytest", "-q", "-m", "not slow", *pytest_args]
        tests = subprocess.run(command, cwd=ROOT, env=env).returncode
        measured = coverage.Coverage(data_file=str(data))
        measured.load()
        run = set()  # (file name if top level, else path relative to the package) with an executed line
        for path in measured.get_data().measured_files():
            if not measured.get_data().lines(path):
                continue
            path = Path(path)
            if path.is_relative_to(PACKAGE):
                run.add(str(path.relative_to(PACKAGE)))
            elif path.is_relative_to(modules):  # a remote-code copy of a top-level module
                run.add(path.name)
        # files with no statement (an empty __init__.py) have nothing to run
        modules_of_package = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                                    if measured.analysis2(str(p))[1])
    never = [name for name in modules_of_package if name not in run]
    print(f"\nfast lane: pytest exit status {tests}; {len(modules_of_package) - len(never)} of "
          f"{len(modules_of_package)} calmrl_hf modules ran")
    for name in never:
        print(f"  never run in the fast lane: calmrl_hf/{name}")
    return 1 if never else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
