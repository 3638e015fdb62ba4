"""The CalMRL pipeline: saved with the checkpoint, loaded by `pipeline(task, model=folder, trust_remote_code=True)`,
zero-shot classification equal to the CLIP-style computation, embeddings equal to `model.encode`."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertTokenizer, ViTImageProcessor, Wav2Vec2FeatureExtractor, pipeline

from calmrl_hf import CalMRLModel, CalMRLProcessor
from calmrl_hf.pipeline_calmrl import EMBEDDING_TASK, ZERO_SHOT_TASK, save_pipelines

from tiny_models import AUDIO_FRAMES, IMAGE_SIZE, MEL_BINS, tiny_config

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "barks", "cat", "42", "photo", "of"]
LABELS = ["a dog", "a cat", "42"]


class SpectrogramExtractor(Wav2Vec2FeatureExtractor):
    """The tiny AST tower takes [n, frames, mel] inputs: a waveform of frames x mel samples, reshaped."""

    def __call__(self, waves, **kwargs):
        batch = super().__call__(waves, **{**kwargs, "return_attention_mask": False})
        batch["input_values"] = batch["input_values"][:, : AUDIO_FRAMES * MEL_BINS].reshape(-1, AUDIO_FRAMES, MEL_BINS)
        return batch


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipelines")
    torch.manual_seed(0)
    model = CalMRLModel(tiny_config()).eval()
    model.imputer.fit(F.normalize(torch.randn(32, 4, 16), dim=-1), torch.ones(32, 4, dtype=torch.bool), max_iter=5)
    processor = CalMRLProcessor(BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}),
                                ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                                Wav2Vec2FeatureExtractor(return_attention_mask=False), num_frames=2)
    save_pipelines(model, processor, folder)
    return folder, model, processor


def test_the_checkpoint_carries_both_tasks_and_the_code(checkpoint):
    folder, _, _ = checkpoint
    tasks = json.loads((folder / "config.json").read_text())["custom_pipelines"]
    assert set(tasks) == {ZERO_SHOT_TASK, EMBEDDING_TASK}
    assert {t["impl"] for t in tasks.values()} == {"pipeline_calmrl.CalMRLPipeline"}
    assert (folder / "pipeline_calmrl.py").is_file() and (folder / "processing_calmrl.py").is_file()


def test_zero_shot_classification_of_images_and_videos_is_clip_style(checkpoint):
    folder, model, processor = checkpoint
    classifier = pipeline(ZERO_SHOT_TASK, model=str(folder), trust_remote_code=True)
    rng = np.random.default_rng(0)
    video, image = rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8), rng.integers(0, 256, (20, 20, 3),
                                                                                       dtype=np.uint8)
    for item in (video, image):
        result = classifier(item, candidate_labels=LABELS, hypothesis_template="a photo of {}")
        with torch.no_grad():
            item_embeds = model.get_image_features(**processor(vision=[item])).pooler_output
            label_embeds = model.get_text_features(**processor(text=[f"a photo of {x}" for x in LABELS])).pooler_output
        logits = model.logit_scale.exp() * F.normalize(item_embeds, dim=-1) @ F.normalize(label_embeds, dim=-1).T
        expected = dict(zip(LABELS, logits[0].softmax(dim=-1).tolist()))
        assert [r["score"] for r in result] == sorted((r["score"] for r in result), reverse=True)
        assert {r["label"]: r["score"] for r in result} == pytest.approx(expected, abs=1e-6)


def test_zero_shot_classification_of_audio(checkpoint):
    folder, model, _ = checkpoint
    processor = CalMRLProcessor(BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}),
                                feature_extractor=SpectrogramExtractor())
    classifier = pipeline(ZERO_SHOT_TASK, model=model, processor=processor)
    wave = np.random.default_rng(1).standard_normal(AUDIO_FRAMES * MEL_BINS).astype(np.float32)
    result = classifier(wave, candidate_labels=LABELS)
    with torch.no_grad():
        audio = model.get_audio_features(**processor(audio=[wave])).pooler_output
        labels = model.get_text_features(**processor(text=LABELS)).pooler_output
    expected = (model.logit_scale.exp() * F.normalize(audio, dim=-1) @ F.normalize(labels, dim=-1).T)[0].softmax(-1)
    assert {r["label"]: r["score"] for r in result} == pytest.approx(dict(zip(LABELS, expected.tolist())), abs=1e-6)
    # parameters given to pipeline(...) hold for every call that does not give them
    preset = pipeline(ZERO_SHOT_TASK, model=model, processor=processor, candidate_labels=LABELS)
    assert preset(wave) == result
    assert [r["label"] for r in preset(wave, candidate_labels=LABELS[:2])] == \
        [r["label"] for r in result if r["label"] in LABELS[:2]]
    with pytest.raises(TypeError, match=r"unknown parameters \['candidate_label'\]"):
        classifier(wave, candidate_label=LABELS)


def test_embedding_any_subset_is_model_encode(checkpoint):
    folder, model, processor = checkpoint
    embedder = pipeline(EMBEDDING_TASK, model=str(folder), trust_remote_code=True)
    video = np.random.default_rng(2).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    out = embedder({"text": "a dog barks", "vision": video})
    with torch.no_grad():
        encoding = model.encode(**processor(text=["a dog barks"], vision=[video]))
    assert set(out["embeddings"]) == {"vision", "text"} and set(out["imputed_embeddings"]) == {"audio", "subtitle"}
    torch.testing.assert_close(out["embeddings"]["text"], encoding.embeddings[0, 2])
    torch.testing.assert_close(out["imputed_embeddings"]["audio"], encoding.imputed_embeddings[0, 1])
    assert out["imputation_variance"]["audio"] == pytest.approx(float(encoding.imputation_variance[0, 1]))
    torch.testing.assert_close(out["fused_embedding"], encoding.fused_embeddings[0])
    with pytest.raises(ValueError, match="takes one example as a dict"):
        embedder("a dog barks")


def test_every_saved_model_carries_the_pipelines(checkpoint, tmp_path):
    """A model saved the plain way (`save_pretrained`, then its processor beside it, as the training loop and the
    main job save) gives the same pipeline as a `save_pipelines` folder."""
    folder, model, processor = checkpoint
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    tasks = json.loads((tmp_path / "config.json").read_text())["custom_pipelines"]
    assert set(tasks) == {ZERO_SHOT_TASK, EMBEDDING_TASK} and (tmp_path / "pipeline_calmrl.py").is_file()
    image = np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    plain = pipeline(ZERO_SHOT_TASK, model=str(tmp_path), trust_remote_code=True)(image, candidate_labels=LABELS)
    saved = pipeline(ZERO_SHOT_TASK, model=str(folder), trust_remote_code=True)(image, candidate_labels=LABELS)
    assert [r["label"] for r in plain] == [r["label"] for r in saved]
    assert np.allclose([r["score"] for r in plain], [r["score"] for r in saved])
