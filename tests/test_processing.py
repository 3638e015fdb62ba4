import numpy as np
import pytest
import torch
from transformers import AutoProcessor, BertTokenizerFast, ViTImageProcessor, Wav2Vec2FeatureExtractor

from calmrl_hf import CalMRLModel, CalMRLProcessor
from calmrl_hf.processing_calmrl import sample_frame_indices

from tiny_models import tiny_config


@pytest.fixture()
def processor(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "barks", "cat", "42"]))
    return CalMRLProcessor(BertTokenizerFast(vocab_file=str(vocab)),
                           ViTImageProcessor(size={"height": 16, "width": 16}),
                           Wav2Vec2FeatureExtractor(return_attention_mask=True), num_frames=2, max_length=6)


def video(frames=5, level=0):
    return np.stack([np.full((20, 24, 3), 10 * (t + level), dtype=np.uint8) for t in range(frames)])


def test_observed_rows_only_and_mask(processor):
    batch = processor(text=["a dog barks", None, "a cat"], vision=[video(), video(), None],
                      audio=[None, np.zeros(1600, dtype=np.float32), np.ones(800, dtype=np.float32)],
                      sampling_rate=16000)
    assert batch["modality_mask"].tolist() == [[True, False, True, False], [True, True, False, False],
                                               [False, True, True, False]]
    assert batch["text_input_ids"].shape[0] == 2 and batch["text_attention_mask"].shape[0] == 2
    assert batch["vision_pixel_values"].shape == (2, 2, 3, 16, 16)
    assert batch["audio_input_values"].shape == (2, 1600) and batch["audio_attention_mask"][1].sum() == 800
    assert not any(key.startswith("subtitle_") for key in batch)


def test_images_and_truncation(processor):
    batch = processor(vision=[np.zeros((20, 20, 3), dtype=np.uint8)] * 3, text=["a dog " * 10] * 3)
    assert batch["vision_pixel_values"].shape == (3, 3, 16, 16)
    assert batch["text_input_ids"].shape[1] == 6


def test_frames_are_sampled_evenly():
    assert sample_frame_indices(8, 4) == [1, 3, 5, 7]
    assert sample_frame_indices(3, 4) == [0, 1, 1, 2]
    assert sample_frame_indices(1, 2) == [0, 0]


def test_feeds_the_model(processor):
    model = CalMRLModel(tiny_config(encoder_configs={**tiny_config().encoder_configs,
                                                     "audio": {"model_type": "wav2vec2", "hidden_size": 32,
                                                               "num_hidden_layers": 1, "num_attention_heads": 2,
                                                               "intermediate_size": 64, "conv_dim": [8, 8],
                                                               "conv_stride": [5, 4], "conv_kernel": [10, 8],
                                                               "num_conv_pos_embeddings": 8,
                                                               "num_conv_pos_embedding_groups": 2,
                                                               "vocab_size": 10},
                                                     "vision": {**tiny_config().encoder_configs["vision"],
                                                                "image_size": 16}}))
    batch = processor(text=["a dog", None], subtitle=["42", "42"], vision=[video(), None],
                      audio=[None, np.random.default_rng(0).standard_normal(1600).astype(np.float32)])
    out = model(**batch)
    assert out.embeddings.shape == (2, 4, 16) and torch.isfinite(out.loss)


def test_save_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path / "proc")
    loaded = CalMRLProcessor.from_pretrained(tmp_path / "proc")
    assert loaded.num_frames == 2 and loaded.max_length == 6 and loaded.modalities == processor.modalities
    tiny_config().save_pretrained(tmp_path / "proc")  # a model folder: config + processor
    auto = AutoProcessor.from_pretrained(tmp_path / "proc")
    assert isinstance(auto, CalMRLProcessor)
    inputs = dict(text=["a dog", "cat"], vision=[video(), video(level=3)])
    for key, value in processor(**inputs).items():
        assert torch.equal(value, auto(**inputs)[key]), key


def test_bad_inputs(processor):
    with pytest.raises(ValueError, match=r"Unknown modalities \['smell'\]"):
        processor(smell=["x"])
    with pytest.raises(ValueError, match="one entry per example"):
        processor(text=["a"], vision=[video(), video()])
    with pytest.raises(ValueError, match=r"Examples \[1\] have no observed modality"):
        processor(text=["a", None])
    with pytest.raises(ValueError, match="mixes images and videos"):
        processor(vision=[video(), np.zeros((20, 20, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="expects 16000 Hz"):
        processor(audio=[np.zeros(10, dtype=np.float32)], sampling_rate=8000)
    with pytest.raises(TypeError, match="strings"):
        processor(text=[3])
