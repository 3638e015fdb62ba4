"""The package's layout rule: the directory is the boundary.

calmrl_hf/*.py (the top level) holds exactly the files a saved checkpoint carries as remote code, plus __init__.py
and cli.py (the console entry point); the subpackages (training/, evaluation/, sharing/, recipe/, data/, ...) hold
the rest, and no top-level module imports one of them (a checkpoint folder has no subpackages). The sets are
computed from the package's files, so a new top-level module or subpackage is covered without editing this file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizer, ViTImageProcessor, Wav2Vec2FeatureExtractor

import calmrl_hf
from calmrl_hf import CalMRLModel, CalMRLProcessor
from calmrl_hf.pipeline_calmrl import save_pipelines
from calmrl_hf.sharing.sentence_transformers import save_sentence_transformers

from tiny_models import IMAGE_SIZE, tiny_config


PACKAGE = Path(calmrl_hf.__file__).resolve().parent
NOT_REMOTE_CODE = {"__init__.py", "cli.py"}  # top-level files no checkpoint carries
ENTRY_POINT = "cli.py"  # the console script: it runs training, evaluation, sharing; the one importer of subpackages
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "barks"]


def subpackages(package: Path = PACKAGE) -> set[str]:
    """The names of the package's subpackages (folders with an __init__.py)."""
    return {init.parent.name for init in package.glob("*/__init__.py")}


def top_level_modules(package: Path = PACKAGE) -> set[str]:
    return {path.name for path in package.glob("*.py")}


def _subpackage_of(module: str, subpackages: set[str]) -> str | None:
    """`module` (a dotted name relative to the package) if it names a subpackage or something in one."""
    return module if module.split(".")[0] in subpackages else None


def subpackage_imports(path: Path, subpackages: set[str], package: str = "calmrl_hf") -> list[tuple[int, str]]:
    """(line, absolute module) for every import of one of `subpackages` of `package` in the module at `path`,
    wherever it is (module level, functions, try blocks): `from .training import x`, `from . import training`,
    `from calmrl_hf.training import x`, `from calmrl_hf import training`, `import calmrl_hf.training`, and
    `importlib.import_module("calmrl_hf.training")` / `import_module(".training", ...)` / `__import__(...)` with
    a literal name."""
    found = []

    def record(node: ast.AST, relative: str | None) -> None:
        if relative is not None:
            found.append((node.lineno, f"{package}.{relative}"))

    def check_names(node: ast.AST, base: str, names: list[ast.alias]) -> None:
        for alias in names:
            record(node, _subpackage_of(f"{base}{alias.name}" if base else alias.name, subpackages))

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:  # from .x import y / from . import x
                if module:
                    record(node, _subpackage_of(module, subpackages))
                else:
                    check_names(node, "", node.names)
            elif node.level == 0 and (module == package or module.startswith(f"{package}.")):
                if module == package:
                    check_names(node, "", node.names)
                else:
                    record(node, _subpackage_of(module[len(package) + 1:], subpackages))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(f"{package}."):
                    record(node, _subpackage_of(alias.name[len(package) + 1:], subpackages))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            name = node.args[0].value
            if function in ("import_module", "__import__"):
                if name.startswith(f"{package}."):
                    record(node, _subpackage_of(name[len(package) + 1:], subpackages))
                elif name.startswith(".") and not name.startswith(".."):
                    record(node, _subpackage_of(name[1:], subpackages))
    return sorted(set(found))


def layout_violations(package: Path = PACKAGE) -> set[tuple[str, str]]:
    """(file, imported subpackage module) for every top-level module but the entry point that imports a
    subpackage."""
    names = subpackages(package)
    return {(path.name, module) for path in sorted(package.glob("*.py")) if path.name != ENTRY_POINT
            for _, module in subpackage_imports(path, names)}


def _model_and_processor():
    torch.manual_seed(0)
    model = CalMRLModel(tiny_config()).eval()
    processor = CalMRLProcessor(BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}),
                                ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                                Wav2Vec2FeatureExtractor(return_attention_mask=True), num_frames=2, max_length=8)
    return model, processor


def test_saved_folders_carry_exactly_the_top_level_modules(tmp_path):
    """A saved model, a saved processor, a pipeline folder and a sentence-transformers folder together carry every
    top-level module but __init__.py and cli.py, and nothing else: a top-level file no checkpoint needs belongs in
    a subpackage, and a checkpoint never needs a file from one."""
    model, processor = _model_and_processor()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "processor")
    save_pipelines(model, processor, tmp_path / "pipeline")
    save_sentence_transformers(model, processor, tmp_path / "sentence_transformers")
    carried = {path.name for folder in ("model", "processor", "pipeline", "sentence_transformers")
               for path in (tmp_path / folder).glob("*.py")}
    expected = top_level_modules() - NOT_REMOTE_CODE
    assert carried == expected, {"carried, not top level": sorted(carried - expected),
                                 "top level, never carried": sorted(expected - carried)}


def test_no_top_level_module_imports_a_subpackage():
    assert {"training", "evaluation", "sharing", "recipe", "data"} <= subpackages()
    assert layout_violations() == set()


PLANTED = {
    "from .training import train": "calmrl_hf.training",
    "from .evaluation.metrics import recall_at_k": "calmrl_hf.evaluation.metrics",
    "from . import sharing": "calmrl_hf.sharing",
    "from calmrl_hf.recipe.run import run": "calmrl_hf.recipe.run",
    "from calmrl_hf import data": "calmrl_hf.data",
    "import calmrl_hf.training.loop": "calmrl_hf.training.loop",
    "import calmrl_hf.data as data": "calmrl_hf.data",
    "def f():\n    from .data.media import decode_audio": "calmrl_hf.data.media",
    "try:\n    from calmrl_hf.sharing.hub import push_model\nexcept ImportError:\n    pass": "calmrl_hf.sharing.hub",
    "import importlib\nimportlib.import_module('calmrl_hf.evaluation')": "calmrl_hf.evaluation",
    "from importlib import import_module\nimport_module('.recipe', 'calmrl_hf')": "calmrl_hf.recipe",
}
ALLOWED = [
    "from .modeling_calmrl import CalMRLModel",
    "from . import imputer",
    "from calmrl_hf import CalMRLModel",
    "import calmrl_hf.imputer",
    "from .datasets_helper import x",  # a top-level module whose name only starts like a subpackage's
    "from transformers.training_args import TrainingArguments",
    "from ..training import x",  # outside the package
    '"""Docstrings may name calmrl_hf.training.train and `from .training import train`."""',
]


@pytest.mark.parametrize("source", list(PLANTED))
def test_the_import_check_catches_a_planted_subpackage_import(tmp_path, source):
    package = tmp_path / "calmrl_hf"
    for name in ("training", "evaluation", "sharing", "recipe", "data"):
        (package / name).mkdir(parents=True)
        (package / name / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "planted.py").write_text(f'"""A top-level module."""\n\nimport torch\n\n{source}\n')
    (package / ENTRY_POINT).write_text("from .training import train\n")  # the entry point may
    assert layout_violations(package) == {("planted.py", PLANTED[source])}


def test_the_import_check_lets_other_imports_pass(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("\n".join(ALLOWED) + "\n")
    assert subpackage_imports(planted, {"training", "evaluation", "sharing", "recipe", "data"}) == []
