"""transformers' own zero-shot pipelines (`zero-shot-image-classification`, `zero-shot-audio-classification`) on a
saved CalMRL model folder: they call `model(input_ids=..., pixel_values=...)` with one image (or sound) and N
candidate texts and no mask, and read CLIP's `logits_per_image` (CLAP's `logits_per_audio`)."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ASTFeatureExtractor, BertTokenizer, ViTImageProcessor, pipeline

from calmrl_hf import CalMRLModel, CalMRLProcessor

from blocked_imports import blocking_prelude
from tiny_models import AUDIO_FRAMES, IMAGE_SIZE, MEL_BINS, tiny_config

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "barks", "cat", "42", "photo", "sound", "of",
         "this", "is", "."]
LABELS = ["dog", "cat", "42"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model and its processor saved the plain way (`save_pretrained` of each), as training runs save them."""
    folder = tmp_path_factory.mktemp("clip_style")
    torch.manual_seed(0)
    model = CalMRLModel(tiny_config()).eval()
    processor = CalMRLProcessor(BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}),
                                ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                                ASTFeatureExtractor(num_mel_bins=MEL_BINS, max_length=AUDIO_FRAMES), num_frames=2)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8))


def _clip_scores(model, processor, query: dict, template: str) -> dict[str, float]:
    """softmax_j(exp(logit_scale) <query, text_j>) from the model's feature methods: the reference."""
    with torch.no_grad():
        kind, inputs = next(iter(query.items()))
        features = getattr(model, f"get_{kind}_features")(**inputs).pooler_output
        texts = model.get_text_features(**processor(text=[template.format(x) for x in LABELS])).pooler_output
    logits = model.logit_scale.exp() * F.normalize(features, dim=-1) @ F.normalize(texts, dim=-1).T  # [1, N]
    return dict(zip(LABELS, logits[0].softmax(dim=-1).tolist()))


def test_zero_shot_image_classification_pipeline_is_clip_style(saved):
    folder, model, processor = saved
    classifier = pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)
    result = classifier(_image(), candidate_labels=LABELS)
    # the pipeline's own preprocessing: a single image through the folder's image processor, its template
    pixel_values = classifier.image_processor(images=[_image()], return_tensors="pt")["pixel_values"]
    expected = _clip_scores(model, processor, {"image": {"pixel_values": pixel_values}}, "This is a photo of {}.")
    assert [r["score"] for r in result] == sorted((r["score"] for r in result), reverse=True)
    assert {r["label"]: r["score"] for r in result} == pytest.approx(expected, abs=1e-6)


def test_zero_shot_audio_classification_pipeline_is_clap_style(saved):
    folder, model, processor = saved
    classifier = pipeline("zero-shot-audio-classification", model=str(folder), trust_remote_code=True)
    wave = np.random.default_rng(2).standard_normal(16000).astype(np.float32)
    result = classifier(wave, candidate_labels=LABELS)
    features = classifier.feature_extractor([wave], sampling_rate=16000, return_tensors="pt")["input_values"]
    expected = _clip_scores(model, processor, {"audio": {"input_values": features}}, "This is a sound of {}.")
    assert {r["label"]: r["score"] for r in result} == pytest.approx(expected, abs=1e-6)


def test_the_image_pipeline_runs_from_the_folder_alone(saved):
    """Where only torch, transformers, safetensors and Pillow are installed: the folder's remote code, registered
    for AutoModelForZeroShotImageClassification in its auto_map, gives the same scores."""
    folder, model, processor = saved
    expected = pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)(
        _image(), candidate_labels=LABELS)
    script = blocking_prelude(["calmrl_hf", "peft", "accelerate", "datasets", "evaluate", "scipy", "av", "soundfile"])
    script += textwrap.dedent(f"""
        import json
        import numpy as np
        from PIL import Image
        from transformers import pipeline
        image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8))
        classifier = pipeline("zero-shot-image-classification", model={str(folder)!r}, trust_remote_code=True)
        assert type(classifier.model).__module__.startswith("transformers_modules"), type(classifier.model).__module__
        print(json.dumps(classifier(image, candidate_labels={LABELS!r})))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    import json
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["label"] for r in result] == [r["label"] for r in expected]
    assert [r["score"] for r in result] == pytest.approx([r["score"] for r in expected], abs=1e-6)


def test_one_image_and_n_texts_without_a_mask_are_rows_of_their_own(saved):
    """CLIP's call: separate image and text batches of different sizes. Each input is a row of its own; the logits
    are those of the same rows given with an explicit block mask, and a loss (which pairs rows) is refused."""
    _, model, processor = saved
    texts = dict(processor(text=[f"a photo of {x}" for x in LABELS]))
    texts.pop("modality_mask")
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=texts["text_input_ids"], attention_mask=texts["text_attention_mask"],
                    pixel_values=images)
        mask = torch.zeros(5, 4, dtype=torch.bool)
        mask[:2, 0] = True  # vision first: the model's order
        mask[2:, 2] = True
        explicit = model(modality_mask=mask, vision_pixel_values=images, **texts)
    assert out.logits_per_image.shape == (2, 3) and out.logits_per_text.shape == (3, 2)
    assert torch.equal(out.modality_mask, mask)
    torch.testing.assert_close(out.logits_per_image, explicit.logits_per_image, rtol=0, atol=0)
    torch.testing.assert_close(out.image_embeds, explicit.image_embeds, rtol=0, atol=0)
    with pytest.raises(ValueError, match="same number of rows"):
        model(input_ids=texts["text_input_ids"], pixel_values=images, return_loss=True)
