"""Bad inputs are refused at the door with a message naming the input, its rows and what was expected: the
model's `{modality}_{field}` tensors (before any tower runs, their values read with one sync per forward) and the
processor's items (on the host, where they are made)."""

from __future__ import annotations

import os
import pathlib
import re
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.overrides import TorchFunctionMode
from transformers import ViTImageProcessor, Wav2Vec2FeatureExtractor

from calmrl_hf import CalMRLModel
from calmrl_hf.processing_calmrl import CalMRLProcessor

sys.path.insert(0, os.path.dirname(__file__))
from test_processing import tokenizer  # noqa: E402
from tiny_models import AUDIO_FRAMES, IMAGE_SIZE, MEL_BINS, MIXED_MASK, VOCAB_SIZE, tiny_batch, tiny_config  # noqa: E402


# ---------------------------------------------------------------------------------------------- the model's door
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = CalMRLModel(tiny_config()).eval()  # imputer never fitted
    calls = []
    for name, tower in model.encoders.items():
        tower.register_forward_pre_hook(lambda module, args, kwargs, name=name: calls.append(name), with_kwargs=True)
    model.tower_calls = calls
    return model


def refused(model, error, pattern, **inputs):
    """`model(**inputs)` (and `embed_modalities`, `encode`) raise `error` matching `pattern` before any tower ran."""
    for call in (model, model.embed_modalities, model.encode):
        model.tower_calls.clear()
        with pytest.raises(error, match=pattern):
            call(**inputs)
        assert model.tower_calls == [], f"a tower ran before the error: {model.tower_calls}"


def batch(**changes):
    return {**tiny_batch(MIXED_MASK, video=False), **changes}


def test_good_batch_passes_the_door(model):
    model.tower_calls.clear()
    with torch.no_grad():
        out = model(**batch())
    assert set(model.tower_calls) == {"vision", "audio", "text"}
    assert torch.isfinite(out.embeddings).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
@pytest.mark.parametrize("name", ["text", "subtitle"])
def test_token_ids_that_are_not_integers_are_refused(model, name, dtype):
    inputs = batch()
    inputs[f"{name}_input_ids"] = inputs[f"{name}_input_ids"].to(dtype)
    refused(model, TypeError, rf"{name}_input_ids must hold integer token ids.*{dtype}", **inputs)


@pytest.mark.parametrize("bad_id, row", [(-1, 0), (VOCAB_SIZE, 2), (10 ** 6, 4)])
def test_token_ids_outside_the_vocabulary_are_refused_naming_rows(model, bad_id, row):
    inputs = batch()
    ids = inputs["text_input_ids"].clone()
    ids[row, 3] = bad_id
    refused(model, ValueError, rf"text_input_ids holds ids outside the text tower's vocabulary \(expected ids in "
                               rf"\[0, {VOCAB_SIZE}\)\): rows \[{row}\] \(1 of 5\)", **{**inputs, "text_input_ids": ids})


def test_token_type_ids_outside_the_tower_are_refused(model):
    inputs = batch()
    types = torch.zeros_like(inputs["text_input_ids"])
    types[1, 0] = 2  # BERT has 2 token types
    refused(model, ValueError, r"text_token_type_ids holds ids outside.*token types.*rows \[1\]",
            **{**inputs, "text_token_type_ids": types})


@pytest.mark.parametrize("length", [65, 200])
def test_more_tokens_than_positions_are_refused(model, length):
    inputs = batch()
    n = inputs["text_input_ids"].shape[0]
    refused(model, ValueError, rf"text_input_ids has {length} tokens per row, more than the 64 positions.*"
                               r"max_position_embeddings=64",
            **{**inputs, "text_input_ids": torch.ones(n, length, dtype=torch.long),
               "text_attention_mask": torch.ones(n, length, dtype=torch.long)})


@pytest.mark.parametrize("shape, pattern", [
    ((4, 1, 2, 3, IMAGE_SIZE, IMAGE_SIZE), r"images \[n, C, H, W\] or videos \[n, T, C, H, W\], got 6-D"),
    ((4, IMAGE_SIZE, IMAGE_SIZE), r"got 3-D"),
    ((4, 4, IMAGE_SIZE, IMAGE_SIZE), r"has 4 channels.*takes 3.*RGBA"),
    ((4, 2, 1, IMAGE_SIZE, IMAGE_SIZE), r"has 1 channels.*takes 3"),
])
def test_pixel_values_of_the_wrong_shape_are_refused(model, shape, pattern):
    refused(model, ValueError, "vision_pixel_values.*" + pattern, **batch(vision_pixel_values=torch.zeros(shape)))


def test_integer_pixel_values_are_refused(model):
    pixels = torch.zeros(4, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    refused(model, TypeError, r"vision_pixel_values must be floating point.*uint8", **batch(vision_pixel_values=pixels))


@pytest.mark.parametrize("shape, pattern", [
    ((3, AUDIO_FRAMES, 8), rf"\[n, frames, {MEL_BINS}\].*num_mel_bins={MEL_BINS}"),
    ((3, AUDIO_FRAMES, 128), r"num_mel_bins"),
    ((3, AUDIO_FRAMES * 16), r"spectrogram"),
    ((3, AUDIO_FRAMES + 1, MEL_BINS), rf"{AUDIO_FRAMES + 1} frames.*takes {AUDIO_FRAMES}"),
])
def test_spectrograms_the_audio_tower_cannot_take_are_refused(model, shape, pattern):
    refused(model, ValueError, "audio_input_values.*" + pattern, **batch(audio_input_values=torch.zeros(shape)))


def test_inputs_with_zero_rows_are_refused(model):
    mask = MIXED_MASK.clone()
    mask[:, 1] = False  # no row observes audio, and yet an empty audio tensor is given
    inputs = {**tiny_batch(mask, video=False), "audio_input_values": torch.zeros(0, AUDIO_FRAMES, MEL_BINS)}
    refused(model, ValueError, r"audio_input_values has no rows.*leave out a modality no row observes", **inputs)
    only = {"text_input_ids": torch.zeros(0, 7, dtype=torch.long)}
    refused(model, ValueError, r"text_input_ids has no rows", **only)


@pytest.mark.parametrize("field, value, row", [("vision_pixel_values", float("nan"), 2),
                                               ("audio_input_values", float("inf"), 0),
                                               ("vision_pixel_values", float("-inf"), 3)])
def test_nan_inputs_are_refused_with_an_unfitted_imputer(model, field, value, row):
    assert not model.imputer.fitted_modalities.any()
    inputs = batch()
    bad = inputs[field].clone()
    bad[row].view(-1)[5] = value
    refused(model, ValueError, rf"{field} contains NaN or inf: rows \[{row}\]", **{**inputs, field: bad})


def test_attention_mask_rows_of_zeros_are_refused(model):
    inputs = batch()
    mask = inputs["subtitle_attention_mask"].clone()
    mask[1] = 0  # subtitle row 1 has no token: its embedding would have norm 0 and still count as observed
    refused(model, ValueError, r"subtitle_attention_mask has rows of zeros \(no token.*rows \[1\] \(1 of 3\)",
            **{**inputs, "subtitle_attention_mask": mask})
    mask = inputs["text_attention_mask"].clone()
    mask[4] = 2
    refused(model, ValueError, r"text_attention_mask holds values other than 0 and 1: rows \[4\]",
            **{**inputs, "text_attention_mask": mask})


@pytest.mark.parametrize("delta", [-2, 3])
def test_attention_mask_of_another_length_than_its_ids_is_refused(model, delta):
    inputs = batch()
    ids = inputs["text_input_ids"]
    mask = torch.ones(ids.shape[0], ids.shape[1] + delta, dtype=torch.long)
    refused(model, ValueError, rf"text_attention_mask has shape \[5, {7 + delta}\] but text_input_ids has \[5, 7\]",
            **{**inputs, "text_attention_mask": mask})


def test_every_bad_value_of_a_batch_is_read_with_one_sync(model):
    """The door's value checks (mask row counts, rows observing nothing, ids in range, mask rows, NaN) of every
    modality are one device-to-host read, whatever the number of modalities."""
    from calmrl_hf.modality_inputs import check_tower_inputs, raise_bad_values, resolve_modality_mask

    inputs = batch()
    mask = inputs.pop("modality_mask")
    grouped = {name: {key[len(name) + 1:]: value for key, value in inputs.items() if key.startswith(name + "_")}
               for name in model.config.modalities}
    reads = []

    class CountReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__",
                                                  "nonzero", "numpy"):
                reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with CountReads():
        pending = []
        resolve_modality_mask(model.config.modalities, grouped, mask, pending)
        for name, fields in grouped.items():
            pending += check_tower_inputs(name, model.encoders[model.config.encoder_owner(name)], fields)
        raise_bad_values(pending)
    assert reads == ["tolist"], reads
    assert len(pending) > 8  # several checks per modality, all read together


def test_get_features_checks_its_inputs_too(model):
    ids = torch.full((2, 5), VOCAB_SIZE + 3)
    with pytest.raises(ValueError, match=r"text_input_ids holds ids outside.*rows \[0, 1\]"):
        model.get_text_features(input_ids=ids)
    with pytest.raises(ValueError, match=r"vision_pixel_values has 4 channels"):
        model.get_image_features(pixel_values=torch.zeros(1, 4, IMAGE_SIZE, IMAGE_SIZE))


# ---------------------------------------------------------------------------------------------- given embeddings
@pytest.mark.parametrize("fill, pattern", [(0.0, r"a zero vector \(norm 0\) in an observed slot \(row 1, modality 0"),
                                           (float("nan"), r"NaN or inf in an observed entry \(row 1, modality 0")])
def test_encode_embeddings_refuses_observed_slots_that_are_zero_or_nan(fill, pattern):
    torch.manual_seed(0)
    model = CalMRLModel(tiny_config()).eval()
    embeddings = torch.nn.functional.normalize(torch.randn(6, 4, 16), dim=-1) * MIXED_MASK.unsqueeze(-1)
    model.imputer.fit(embeddings, MIXED_MASK, max_iter=5)
    for fitted in (True, False):
        if not fitted:
            model.imputer = CalMRLModel(tiny_config()).imputer  # a fresh, unfitted imputer: still refused
        bad = embeddings.clone()
        bad[1, 0] = fill  # row 1 observes vision
        for step in (model.encode_embeddings, model.impute_missing):
            with pytest.raises(ValueError, match=pattern):
                step(bad, MIXED_MASK)
        model.encode_embeddings(embeddings, MIXED_MASK)  # zero in MISSING slots is fine


# ---------------------------------------------------------------------------------------------- the processor
@pytest.fixture(scope="module")
def processor():
    return CalMRLProcessor(tokenizer(), ViTImageProcessor(size={"height": 16, "width": 16}),
                           Wav2Vec2FeatureExtractor(return_attention_mask=True), num_frames=2, max_length=6)


def test_rgba_and_grey_alpha_images_become_rgb_as_pil_converts_them(processor):
    rgba = np.random.default_rng(0).integers(0, 256, (20, 24, 4), dtype=np.uint8)
    rgb = processor(vision=[rgba[..., :3]])["vision_pixel_values"]
    assert torch.equal(processor(vision=[rgba])["vision_pixel_values"], rgb)  # alpha dropped, no compositing
    assert torch.equal(processor(vision=[Image.fromarray(rgba, "RGBA")])["vision_pixel_values"], rgb)
    assert torch.equal(processor(vision=[rgba.transpose(2, 0, 1)])["vision_pixel_values"], rgb)  # channels first
    grey_alpha = rgba[..., :2]
    expected = processor(vision=[np.repeat(grey_alpha[..., :1], 3, axis=-1)])["vision_pixel_values"]
    assert torch.equal(processor(vision=[grey_alpha])["vision_pixel_values"], expected)
    assert torch.equal(processor(vision=[Image.fromarray(grey_alpha, "LA")])["vision_pixel_values"], expected)
    video = processor(vision=[[rgba, rgba[..., :3]]])["vision_pixel_values"]
    assert video.shape == (1, 2, 3, 16, 16) and torch.equal(video[0, 0], video[0, 1])


@pytest.mark.parametrize("height", [1, 3])
@pytest.mark.parametrize("channels", [None, 1, 3, 4])
def test_images_one_or_three_pixels_high_are_not_taken_for_channels_first(processor, height, channels):
    """Found by the property below: [1, W, 1] or [3, W, 3] reached the image processor, which guessed channels first."""
    image = np.full((height, 10) if channels is None else (height, 10, channels), 200, np.uint8)
    pixels = processor(vision=[image])["vision_pixel_values"]
    assert pixels.shape == (1, 3, 16, 16)
    assert torch.allclose(pixels, pixels[0, 0, 0, 0])  # one grey level everywhere, every channel


@pytest.mark.parametrize("shape", [(16, 16, 5), (16, 16, 7), (0, 16, 3), (16, 0), (2, 3, 4, 5, 6)])
def test_images_that_are_not_images_are_refused_naming_the_row(processor, shape):
    image = np.zeros(shape, np.uint8)
    with pytest.raises(ValueError, match=r"Modality 'vision', row 1"):
        processor(vision=[None, image], text=["a", "dog"])


@pytest.mark.parametrize("item", ["clip.wav", pathlib.Path("clip.wav"), b"RIFF"])
def test_a_path_given_as_audio_is_refused(processor, item):
    kind = type(item).__name__
    with pytest.raises(TypeError, match=rf"Audio for 'audio', row 2: CalMRLProcessor expects a waveform array; got a "
                                        rf"{kind}: decode it first with calmrl_hf.data.decode_audio"):
        processor(audio=[np.zeros(400, np.float32), None, item], text=["a", "dog", "cat"])


def test_audio_that_is_not_a_waveform_is_refused(processor):
    with pytest.raises(TypeError, match=r"row 0: .*got a dict.*item\['array'\]"):
        processor(audio=[{"array": np.zeros(10), "sampling_rate": 16000}])
    with pytest.raises(TypeError, match=r"row 1: CalMRLProcessor expects a waveform array"):
        processor(audio=[np.zeros(10), [object()]])
    with pytest.raises(ValueError, match=r"row 1: the waveform holds NaN or inf samples \(1 of 10\)"):
        processor(audio=[np.zeros(10), np.array([0.0] * 9 + [np.nan])])


def test_an_image_path_is_refused(processor):
    with pytest.raises(TypeError, match=r"Modality 'vision', row 0: .*got a str: open it first"):
        processor(vision=["cat.png"])


def test_zero_rows_are_refused_by_the_processor(processor):
    with pytest.raises(ValueError, match="The batch is empty"):
        processor(text=[], vision=[])
    with pytest.raises(ValueError, match=r"Rows \[0, 1\] of the batch have no observed modality"):
        processor(text=[None, None])
    with pytest.raises(ValueError, match=r"Audio for 'audio', row 0: expected 1-D mono samples, got shape \[0\]"):
        processor(audio=[np.zeros(0, np.float32)])


# ---------------------------------------------------------------------------------------------- properties
NAMES = ("vision", "audio", "text", "subtitle")
def _mostly(good, **bad):
    """Mostly `good`, else one of the `bad` strategies: both outcomes stay common."""
    kinds = ["good"] * 12 + list(bad)
    return st.sampled_from(kinds).flatmap(lambda kind: good if kind == "good" else bad[kind])


_texts = _mostly(st.one_of(st.sampled_from(["a dog barks", "cat", "42 a cat", ""]), st.text(max_size=12)),
                 number=st.integers(0, 3))
_pixels = st.builds(lambda shape, seed: np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8),
                    st.tuples(st.sampled_from([1, 3, 4, 8, 16, 20]), st.integers(1, 20),
                              st.sampled_from([1, 2, 3, 3, 3, 4])), st.integers(0, 3))
_images = _mostly(_pixels,
                  grey=st.builds(lambda h, w: np.full((h, w), 7, np.uint8), st.integers(1, 20), st.integers(1, 20)),
                  channels=st.builds(lambda c: np.zeros((8, 8, c), np.uint8), st.integers(5, 6)),
                  empty=st.builds(lambda h: np.zeros((h, 0, 3), np.uint8), st.integers(0, 4)))
_waves = _mostly(st.builds(lambda n, seed: np.random.default_rng(seed).standard_normal(n).astype(np.float32),
                           st.integers(1, 600), st.integers(0, 3)),
                 nan=st.builds(lambda n: np.append(np.zeros(n, np.float32), np.nan), st.integers(0, 50)),
                 path=st.sampled_from(["clip.wav", pathlib.Path("x.flac")]),
                 empty=st.just(np.zeros(0, np.float32)))
_ITEMS = {"vision": _images, "audio": _waves, "text": _texts, "subtitle": _texts}


@st.composite
def batches(draw):
    size = draw(st.integers(1, 3))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    entry = {name: st.sampled_from([True, True, True, False]).flatmap(lambda given, name=name: _ITEMS[name] if given
                                                               else st.none()) for name in names}
    return {name: draw(st.lists(entry[name], min_size=size, max_size=size)) for name in names}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(batches())
def test_the_processor_returns_the_observed_rows_or_names_the_problem(processor, inputs):
    try:
        out = processor(**inputs)
    except (ValueError, TypeError) as error:
        message = str(error)
        assert re.search(r"[Rr]ows? \[?\d|row \d", message) or any(repr(name) in message for name in inputs), message
        return
    size = len(next(iter(inputs.values())))
    expected = torch.tensor([[name in inputs and inputs[name][row] is not None for name in NAMES]
                             for row in range(size)])
    assert torch.equal(out["modality_mask"], expected)
    for name in NAMES:
        fields = {key: value for key, value in out.items() if key.startswith(name + "_")}
        count = int(expected[:, NAMES.index(name)].sum())
        assert (not fields) == (count == 0), (name, list(fields))
        for key, value in fields.items():
            assert isinstance(value, torch.Tensor) and value.shape[0] == count, (key, value.shape, count)
            if torch.is_floating_point(value):
                assert torch.isfinite(value).all(), key
        if name == "vision" and fields:
            assert fields["vision_pixel_values"].shape[1:] == (3, 16, 16)
