"""A checkpoint loads with `trust_remote_code=True` where only torch, transformers, safetensors (and Pillow, for the
image processor) are installed: every copied file imports nothing else, and a process that cannot import the
package or any of its other dependencies loads model and processor and embeds text and video."""

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import BertTokenizer, ViTImageProcessor, Wav2Vec2FeatureExtractor

from calmrl_hf import CalMRLModel, CalMRLProcessor
from calmrl_hf.pipeline_calmrl import save_pipelines

from blocked_imports import blocking_prelude
from tiny_models import IMAGE_SIZE, tiny_config


# What `pip install calmrl_hf` brings besides torch / transformers / safetensors: none of it may be needed to load.
BLOCKED = ["calmrl_hf", "peft", "accelerate", "datasets", "evaluate", "scipy", "av", "soundfile"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "barks", "cat", "42"]
TEXTS = ["a dog barks", "a cat", "42"]
ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "model_card.md"


def _saved_checkpoint(folder):
    """A tiny fitted model and its processor saved into one folder, like the end of a training run."""
    torch.manual_seed(0)
    model = CalMRLModel(tiny_config()).eval()
    processor = CalMRLProcessor(BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}),
                                ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                                Wav2Vec2FeatureExtractor(return_attention_mask=True), num_frames=2, max_length=8)
    full = torch.ones(24, 4, dtype=torch.bool)
    with torch.no_grad():
        embeddings = torch.nn.functional.normalize(torch.randn(24, 4, 16), dim=-1)
    model.imputer.fit(embeddings, full, max_iter=5)
    save_pipelines(model, processor, folder)  # model, processor and the pipeline's code
    return model, processor


def _videos():
    generator = np.random.default_rng(0)
    return [generator.integers(0, 256, (5, 20, 24, 3), dtype=np.uint8) for _ in TEXTS]


def test_every_copied_file_imports_only_torch_transformers_safetensors_and_numpy(tmp_path):
    """numpy: a requirement of transformers itself (log_mel computes AST's filterbank with it)."""
    from transformers.dynamic_module_utils import get_imports

    _saved_checkpoint(tmp_path)
    copied = sorted(tmp_path.glob("*.py"))
    assert {"modeling_calmrl.py", "configuration_calmrl.py", "imputer.py", "lora.py",
            "processing_calmrl.py", "log_mel.py", "pixel_batch.py", "pipeline_calmrl.py"} <= {p.name for p in copied}
    for path in copied:
        third_party = set(get_imports(path)) - set(sys.stdlib_module_names)
        assert third_party <= {"torch", "transformers", "safetensors", "numpy"}, (path.name, third_party)


def test_the_import_check_catches_an_unguarded_optional_import(tmp_path):
    """The check above is the one transformers runs: an import in a function body counts, one behind an
    `is_*_available()` guard does not."""
    from transformers.dynamic_module_utils import get_imports

    planted = tmp_path / "planted.py"
    planted.write_text("def add_lora():\n    import peft\n")
    guarded = tmp_path / "guarded.py"
    guarded.write_text("from transformers.utils import is_peft_available\nif is_peft_available():\n    import peft\n")
    assert "peft" in get_imports(planted) and "peft" not in get_imports(guarded)


BLOCKING_SCRIPT = """
import glob

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor
from transformers.dynamic_module_utils import check_imports

# From the Hub, transformers checks the imports of every file the model needs (from a folder, of the first only)
for path in glob.glob({folder!r} + "/*.py"):
    check_imports(path)

model = AutoModel.from_pretrained({folder!r}, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained({folder!r}, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
videos = list(np.load({videos!r}))
batch = processor(text={texts!r}, vision=videos)
with torch.no_grad():
    text_features = model.get_text_features(**batch).pooler_output
    video_features = model.get_image_features(**batch).pooler_output
    encoding = model.encode(**batch)
reference = load_file({reference!r})
torch.testing.assert_close(text_features, reference["text"], rtol=0, atol=0)
torch.testing.assert_close(video_features, reference["video"], rtol=0, atol=0)
torch.testing.assert_close(encoding.imputed_embeddings, reference["imputed"], rtol=0, atol=0)

video = videos[0]
exec({card_usage!r})  # the model card's usage example, as written
assert out.logits_per_text_vision.shape == (1, 1) and enc.imputed_embeddings.shape == (2, 4, 16)
from transformers import pipeline

classifier = pipeline("zero-shot-multimodal-classification", model={folder!r}, trust_remote_code=True)
ranked = classifier(videos[0], candidate_labels=["a dog", "a cat"])
assert sorted(r["label"] for r in ranked) == ["a cat", "a dog"] and abs(sum(r["score"] for r in ranked) - 1) < 1e-6
loaded = sorted(name for name in BLOCKED if name in sys.modules)
assert not loaded, loaded
print("embedded", tuple(text_features.shape), tuple(video_features.shape))
"""


def card_usage(folder) -> str:
    """The model card's usage example for a checkpoint in `folder`."""
    card = CARD.read_text()
    return re.search(r"## Use\n.*?```python\n(.*?)```", card, re.S).group(1).replace("{{ repo_id }}", str(folder))


def test_the_card_names_what_loading_needs_and_the_package_depends_on_it():
    card = CARD.read_text()
    requirements = re.search(r"Requirements: (.*?)\n\n", card, re.S).group(1)
    assert all(f"`{name}`" in requirements for name in ("torch", "transformers", "safetensors", "pillow"))
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.lower().startswith("pillow") for d in dependencies)


@pytest.mark.slow
def test_remote_code_loads_and_embeds_without_the_package_or_its_extras(tmp_path):
    folder = tmp_path / "checkpoint"
    model, processor = _saved_checkpoint(folder)
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModel"].endswith("CalMRLModel")
    videos = _videos()
    np.save(tmp_path / "videos.npy", np.stack(videos))
    batch = processor(text=TEXTS, vision=videos)
    with torch.no_grad():
        reference = {"text": model.get_text_features(**batch).pooler_output,
                     "video": model.get_image_features(**batch).pooler_output,
                     "imputed": model.encode(**batch).imputed_embeddings}
    assert batch["vision_pixel_values"].shape == (3, 2, 3, IMAGE_SIZE, IMAGE_SIZE)  # videos: [n, T, C, H, W]
    save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp_path / "reference.safetensors"))
    script = blocking_prelude(BLOCKED) + textwrap.dedent(BLOCKING_SCRIPT).format(
        folder=str(folder), videos=str(tmp_path / "videos.npy"), texts=TEXTS,
        reference=str(tmp_path / "reference.safetensors"), card_usage=card_usage(folder))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embedded (3, 16) (3, 16)" in result.stdout
