"""One processor for every modality of a CalMRL model, for batches in which any modality may be missing.

`CalMRLProcessor(**{modality: list of items or None})` returns a `BatchFeature` with flat keys
`"{modality}_{field}"` holding the OBSERVED rows of each modality only, in batch order, plus `modality_mask`
[B, k] (bool, in the processor's modality order): exactly what `CalMRLModel.forward` takes. A modality absent from
the whole batch has no keys, so towers never run on placeholder inputs.

This module imports from the rest of the package only `log_mel` and `pixel_batch` (copied with it), and besides
only the standard library, torch, numpy and transformers, so `save_pretrained` can copy it next to a checkpoint
for `trust_remote_code=True` loading (see `register_auto_processor`). transformers' image processors need Pillow
(or torchvision).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from transformers import AutoProcessor, BatchFeature, ProcessorMixin

from .log_mel import ast_log_mel, computes_like
from .pixel_batch import accepts, pixel_values


logger = logging.getLogger(__name__)

DEFAULT_MODALITY_KINDS = {"vision": "vision", "audio": "audio", "text": "text", "subtitle": "text"}
MODALITY_KINDS = ("vision", "audio", "text")
# names a modality may not take: they are batch keys, dataset columns or keywords of `__call__`
RESERVED_NAMES = frozenset({"id", "ids", "index", "label", "labels", "modality", "modality_mask", "sampling_rate",
                            "return_tensors"})
# which component serves each kind, and the fields of its output the model takes (None: every tensor)
_COMPONENT_OF_KIND = {"text": "tokenizer", "vision": "image_processor", "audio": "feature_extractor"}
_TEXT_FIELDS = ("input_ids", "attention_mask")
# stands for a component recorded as absent while transformers resolves the others (`_resolve_subprocessors`)
_ABSENT = object()


def normalize_modalities(modalities=None) -> list[tuple[str, str]]:
    """`(name, kind)` pairs, in order, from any of the accepted spellings of a modality list.

    Accepts None (vision, audio, text, subtitle), a dict `{name: kind}`, a list of `[name, kind]` pairs, or a list
    of names whose kinds are the defaults (`"vision"`, `"audio"`, `"text"`, `"subtitle"` -> text).
    """
    if modalities is None:
        return list(DEFAULT_MODALITY_KINDS.items())
    if isinstance(modalities, str):
        raise TypeError(f"modalities must be a dict {{name: kind}} or a list of names or [name, kind] pairs, got the "
                        f"string {modalities!r}.")
    items = modalities.items() if isinstance(modalities, dict) else modalities
    pairs = []
    for item in items:
        if isinstance(item, str):
            if item not in DEFAULT_MODALITY_KINDS:
                raise ValueError(f"Modality {item!r} has no default kind; give it one, e.g. modalities="
                                 f"{{{item!r}: 'vision'}} (kinds: {list(MODALITY_KINDS)}).")
            item = (item, DEFAULT_MODALITY_KINDS[item])
        if len(item) != 2:
            raise ValueError(f"Each modality must be a name or a [name, kind] pair, got {item!r}.")
        name, kind = item
        if not isinstance(name, str) or not name:
            raise ValueError(f"A modality name must be a non-empty string, got {name!r}.")
        if name in RESERVED_NAMES:
            raise ValueError(f"{name!r} cannot name a modality (reserved: {sorted(RESERVED_NAMES)}).")
        if kind not in MODALITY_KINDS:
            raise ValueError(f"Modality {name!r} has kind {kind!r}; expected one of {list(MODALITY_KINDS)}.")
        pairs.append((name, kind))
    names = [name for name, _ in pairs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Modality names must be unique, got {duplicates} more than once in {names}.")
    if not pairs:
        raise ValueError("modalities is empty: give at least one modality.")
    return pairs


def sample_frame_indices(num_available: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread evenly over `num_available` frames: the centre of each of `num_frames` equal
    segments (8 frames, 4 samples -> [1, 3, 5, 7]). Shorter videos repeat frames (3 frames, 4 samples ->
    [0, 1, 1, 2])."""
    if num_available < 1:
        raise ValueError(f"A video needs at least one frame, got num_available={num_available}.")
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}.")
    # centre of segment i of [0, num_available) cut in num_frames: (i + 1/2) * num_available / num_frames
    return [min(int((2 * i + 1) * num_available / (2 * num_frames)), num_available - 1) for i in range(num_frames)]


class _HeldComponents:
    """`CalMRLProcessor.get_attributes`, the list of components `ProcessorMixin` works through. Read on the class (as
    `from_pretrained`, `from_dict` and `to_dict` do): every component `__init__` takes. Read on an instance (as
    `save_pretrained` and `__repr__` do): the components it holds, so that an absent (None) one is neither saved
    nor shown. A component not set yet counts as held: `ProcessorMixin.__init__` checks its arguments against this
    list before it sets them."""

    def __get__(self, instance, owner):
        def every() -> list[str]:
            return ProcessorMixin.get_attributes.__func__(owner)

        def held() -> list[str]:
            values = vars(instance)
            return [name for name in every() if name not in values or values[name] is not None]

        return every if instance is None else held


class CalMRLProcessor(ProcessorMixin):
    r"""
    Wraps a tokenizer (every text-kind modality: caption, subtitle, ...), an image processor (images and the sampled
    frames of videos) and an audio feature extractor, and batches examples whose modalities may be missing.

    Args:
        tokenizer (`PreTrainedTokenizerBase`, *optional*): tokenizer of the text tower(s).
        image_processor (`BaseImageProcessor`, *optional*): image processor of the vision tower, applied to each
            image and to each sampled video frame.
        feature_extractor (`SequenceFeatureExtractor`, *optional*): feature extractor of the audio tower.
        modalities (`dict[str, str]` or list, *optional*): modality name -> kind (`"vision"`, `"audio"` or
            `"text"`) in the model's modality order (the k axis of `modality_mask`); also a list of `[name, kind]`
            pairs or of default names. Defaults to vision, audio, text, subtitle (subtitle is text-kind).
        num_frames (`int`, *optional*, defaults to 4): frames sampled evenly from each video
            (`sample_frame_indices`).
        max_length (`int`, *optional*, defaults to 64): token budget of text inputs (longer ones are truncated).
        audio_as_image (`bool`, *optional*, defaults to False): hand a spectrogram feature extractor's output
            [n, T, mel] (e.g. `ASTFeatureExtractor`'s log-mel map) to the audio tower as a 1-channel image
            `{name}_pixel_values` [n, 1, T, mel], for convolutional audio towers (a ResNet config with
            `num_channels=1`).
        audio_dynamic_range_db (`float`, *optional*): floor each clip's log-mel map this many dB below its own peak
            (`floor_dynamic_range`; padding frames read as that floor), so that the quiet parts of clean and noisy
            clips look alike. Needs a feature extractor with `mean` and `std` (AST's normalisation).

    A component may be None when no modality of its kind is used; calling with such a modality raises. Such a
    component is recorded as null in `processor_config.json`, and `from_pretrained` gives None for it.

    Inputs (`__call__`): one keyword per modality, each a list with one entry per example, None where the modality
    is missing for that example; a modality not passed at all is missing for every example. Items are:

    - text kind: `str`;
    - vision kind: an image (PIL image, `np.ndarray` [H, W, C] or [H, W]) or a video (`np.ndarray` [T, H, W, C] or
      a list of frames); images give `{name}_pixel_values` [n, C, H, W], videos [n, T, C, H, W] with
      T = `num_frames`. One batch holds images or videos for a modality, not both;
    - audio kind: 1-D float waveform (mono) at `sampling_rate`. Audio is NOT resampled here: when `sampling_rate`
      differs from the feature extractor's, a ValueError says so (`calmrl_hf.data.decode_audio` and
      `calmrl_hf.data.resample_audio` resample). `sampling_rate=None` means "already at the extractor's rate".

    ```python
    >>> batch = processor(text=["a dog barks", None], audio=[None, waveform], vision=[frames, frames],
    ...                   sampling_rate=16000)
    >>> batch["modality_mask"]  # [[True, False, True, False], [True, True, False, False]]
    >>> batch["text_input_ids"].shape[0]  # 1: the observed rows only
    >>> model(**batch)
    ```
    """

    def __init__(self, tokenizer=None, image_processor=None, feature_extractor=None, modalities=None,
                 num_frames: int = 4, max_length: int = 64, audio_as_image: bool = False,
                 audio_dynamic_range_db: float | None = None):
        # kept as [name, kind] lists: the order is the model's k axis, and JSON objects would be saved with sorted keys
        self.modalities = [[name, kind] for name, kind in normalize_modalities(modalities)]
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}.")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}.")
        if audio_dynamic_range_db is not None and not audio_dynamic_range_db > 0:
            raise ValueError(f"audio_dynamic_range_db must be positive (dB below each clip's peak) or None, got "
                             f"{audio_dynamic_range_db!r}.")
        self.num_frames = num_frames
        self.max_length = max_length
        self.audio_as_image = bool(audio_as_image)
        self.audio_dynamic_range_db = audio_dynamic_range_db
        super().__init__(tokenizer=tokenizer, image_processor=image_processor, feature_extractor=feature_extractor)

    # ------------------------------------------------------------------ description
    @property
    def modality_kinds(self) -> dict[str, str]:
        """Modality name -> kind, in the model's modality order."""
        return {name: kind for name, kind in self.modalities}

    @property
    def modality_names(self) -> list[str]:
        """Modality names in the model's modality order (the columns of `modality_mask`)."""
        return [name for name, _ in self.modalities]

    @property
    def model_input_names(self) -> list[str]:
        """The keys this processor can return (for the components it has)."""
        names = []
        for name, kind in self.modalities:
            component = getattr(self, _COMPONENT_OF_KIND[kind])
            if component is None:
                continue
            if kind == "text":
                fields = [f for f in _TEXT_FIELDS if f in component.model_input_names]
            elif kind == "vision" or self.audio_as_image:
                fields = ["pixel_values"]
            else:
                fields = list(component.model_input_names)
            names += [f"{name}_{field}" for field in fields]
        return names + ["modality_mask"]

    # ------------------------------------------------------------------ batching
    def __call__(self, *, sampling_rate: int | None = None, return_tensors: str | None = "pt",
                 **modality_inputs) -> BatchFeature:
        """Batch one list per modality (None entries = missing) into observed-rows-only tensors + `modality_mask`."""
        if return_tensors not in ("pt", None):
            raise ValueError(f"CalMRLProcessor returns PyTorch tensors only: return_tensors must be 'pt', got "
                             f"{return_tensors!r}.")
        unknown = sorted(set(modality_inputs) - set(self.modality_names))
        if unknown:
            raise ValueError(f"Unknown modalities {unknown}; this processor knows {self.modality_names}.")
        given = {name: items for name, items in modality_inputs.items() if items is not None}
        if not given:
            raise ValueError(f"No inputs: pass a list (None where missing) for some of {self.modality_names}.")
        for name, items in given.items():
            if not isinstance(items, (list, tuple)):
                raise TypeError(f"Modality {name!r} takes a list with one entry per example (None where missing), "
                                f"got {type(items).__name__}.")
        lengths = {name: len(items) for name, items in given.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"Every modality's list must have one entry per example (None where missing); got "
                             f"lengths {lengths}.")
        batch_size = next(iter(lengths.values()))
        if batch_size == 0:
            raise ValueError("The batch is empty: the modality lists have no entries.")

        mask = torch.zeros(batch_size, len(self.modalities), dtype=torch.bool)  # [B, k]
        for index, name in enumerate(self.modality_names):
            if name in given:
                mask[:, index] = torch.tensor([item is not None for item in given[name]])
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"Rows {empty[:10]} of the batch have no observed modality (every entry is None); every "
                             f"example needs at least one of {self.modality_names}.")

        data: dict[str, torch.Tensor] = {}
        for name, kind in self.modalities:
            items = given.get(name)
            if items is None:
                continue
            rows = [i for i, item in enumerate(items) if item is not None]
            if not rows:
                continue
            present = [items[i] for i in rows]
            self._require_component(name, kind)
            if kind == "text":
                features = self._text(name, present, rows)
            elif kind == "vision":
                features = self._vision(name, present, rows)
            else:
                features = self._audio(name, present, rows, sampling_rate)
            data.update({f"{name}_{field}": value for field, value in features.items()})
        data["modality_mask"] = mask
        return BatchFeature(data=data)

    def _require_component(self, name: str, kind: str) -> None:
        component = _COMPONENT_OF_KIND[kind]
        if getattr(self, component) is None:
            raise ValueError(f"Modality {name!r} is {kind}-kind and needs a {component}, but this processor was built "
                             f"with {component}=None.")

    def _text(self, name: str, texts: Sequence, rows: list[int]) -> dict[str, torch.Tensor]:
        bad = [(row, type(t).__name__) for row, t in zip(rows, texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"Modality {name!r} expects strings; rows {[r for r, _ in bad[:5]]} hold "
                            f"{[t for _, t in bad[:5]]}.")
        encoded = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        return {key: encoded[key] for key in _TEXT_FIELDS if key in encoded}  # [n, L]

    def _vision(self, name: str, items: Sequence, rows: list[int]) -> dict[str, torch.Tensor]:
        is_video = [_is_video(item) for item in items]
        if any(is_video) and not all(is_video):
            videos = [row for row, v in zip(rows, is_video) if v]
            images = [row for row, v in zip(rows, is_video) if not v]
            raise ValueError(f"Modality {name!r} mixes videos (rows {videos[:5]}) and images (rows {images[:5]}) in "
                             f"one batch; pass an image as a 1-frame video ([1, H, W, C]) or keep them apart.")
        if not any(is_video):
            images = [_as_image(item, name, row) for item, row in zip(items, rows)]
            return {"pixel_values": self._pixel_values(images)}  # [n, C, H, W]
        frames = []
        for item, row in zip(items, rows):
            video = [_as_image(frame, name, row) for frame in item]  # T_i frames [H, W, C]
            if not video:
                raise ValueError(f"Modality {name!r}, row {row}: the video has no frames.")
            frames += [video[i] for i in sample_frame_indices(len(video), self.num_frames)]
        pixels = self._pixel_values(frames)
        return {"pixel_values": pixels.unflatten(0, (len(items), self.num_frames))}  # [n, T, C, H, W]

    def _pixel_values(self, images: list) -> torch.Tensor:
        if accepts(self.image_processor, images):  # already the output size: all at once, no PIL round trip
            return pixel_values(self.image_processor, images)
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def _audio(self, name: str, items: Sequence, rows: list[int], sampling_rate: int | None) -> dict[str, torch.Tensor]:
        expected = self.feature_extractor.sampling_rate
        if sampling_rate is not None and sampling_rate != expected:
            raise ValueError(f"Audio for {name!r} is at sampling_rate={sampling_rate} Hz but the feature extractor "
                             f"expects {expected} Hz; resample first (calmrl_hf.data.resample_audio, or decode with "
                             f"calmrl_hf.data.decode_audio(path, {expected})).")
        waves = []
        for item, row in zip(items, rows):
            wave = (item.detach() if isinstance(item, torch.Tensor) else torch.tensor(item)).float().numpy()
            if wave.ndim != 1 or wave.size == 0:
                raise ValueError(f"Audio for {name!r}, row {row}: expected 1-D mono samples, got shape "
                                 f"{list(wave.shape)}.")
            waves.append(wave)
        if computes_like(self.feature_extractor):  # AST's log-mel map without its per-frame Python loop
            features = {"input_values": ast_log_mel(waves, self.feature_extractor)}
        else:
            encoded = self.feature_extractor(waves, sampling_rate=expected, padding=True, return_tensors="pt")
            features = {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}
        if self.audio_dynamic_range_db is None and not self.audio_as_image:
            return features
        spectrogram = features.get("input_values")
        if spectrogram is None or spectrogram.dim() != 3:
            raise ValueError(f"audio_as_image / audio_dynamic_range_db need a spectrogram feature extractor (input_values "
                             f"[n, T, mel], e.g. ASTFeatureExtractor); {type(self.feature_extractor).__name__} gave "
                             f"{ {k: list(v.shape) for k, v in features.items()} }.")
        if self.audio_dynamic_range_db is not None:
            spectrogram = floor_dynamic_range(spectrogram, self.audio_dynamic_range_db, self.feature_extractor)
        if not self.audio_as_image:
            return {**features, "input_values": spectrogram}
        return {"pixel_values": spectrogram.unsqueeze(1)}  # [n, 1, T, mel]

    # ------------------------------------------------------------------ save / load with absent components
    # on an instance, the components it holds: `save_pretrained` saves those only (`_HeldComponents`)
    get_attributes = _HeldComponents()

    def check_argument_for_proper_class(self, argument_name, argument):
        """Components may be None (no modality of that kind); others are checked as transformers does."""
        if argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def to_dict(self):
        output = super().to_dict()
        for attribute in type(self).get_attributes():
            if getattr(self, attribute) is None:
                output[attribute] = None  # recorded, so from_pretrained does not look for it
        return output

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, token: str | None = None,
                    revision: str | None = None, create_pr: bool = False, private: bool | None = None, **kwargs) -> str:
        """Upload the processor's files to `repo_id`, the same files the model's push holds. Unlike transformers'
        default, no README: a generic card would replace the model's filled one."""
        import tempfile

        from transformers.utils.hub import hf_api

        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return self._upload_modified_files(folder, repo_id, files_timestamps={}, commit_message=commit_message,
                                               token=token, create_pr=create_pr, revision=revision)

    @classmethod
    def _absent_components(cls, processor_dict: dict) -> list[str]:
        """The components a saved `processor_config.json` (as a dict) records as null."""
        return [name for name in cls.get_attributes() if name in processor_dict and processor_dict[name] is None]

    @classmethod
    def _resolve_subprocessors(cls, pretrained_model_name_or_path, processor_dict, **kwargs):
        """Load the components the folder holds; those recorded as null are None (the hook transformers >= 5.25
        calls). transformers loads every component not given as a keyword argument, so each absent one is given as
        a placeholder, then set to None; a component the caller gives is used as given."""
        absent = [name for name in cls._absent_components(processor_dict) if kwargs.get(name) is None]
        processor_dict, kwargs = super()._resolve_subprocessors(
            pretrained_model_name_or_path, processor_dict, **{**kwargs, **dict.fromkeys(absent, _ABSENT)})
        return {**processor_dict, **dict.fromkeys(absent)}, kwargs

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """The components in `get_attributes` order, None for those recorded as null (the hook transformers 5.0 to
        5.24 call instead of `_resolve_subprocessors`)."""
        absent = cls._absent_components(processor_dict or {})
        if not absent:
            return super()._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **kwargs)
        from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

        loaders = {"tokenizer": AutoTokenizer, "image_processor": AutoImageProcessor,
                   "feature_extractor": AutoFeatureExtractor}
        return [None if name in absent else loaders[name].from_pretrained(pretrained_model_name_or_path, **kwargs)
                for name in cls.get_attributes()]


def floor_dynamic_range(log_mel: torch.Tensor, range_db: float, feature_extractor) -> torch.Tensor:
    """[n, T, mel] log-mel maps, normalised as `feature_extractor` (AST's: (log power - mean) / (2 std), padded
    with 0 before normalising) does, with every value below (the clip's peak - `range_db`) raised to it, and the
    padding frames set to it: the quiet parts of clean and noisy clips then look alike, and padding reads as
    silence."""
    mean, std = getattr(feature_extractor, "mean", None), getattr(feature_extractor, "std", None)
    if mean is None or std is None:
        raise ValueError(f"audio_dynamic_range_db needs a feature extractor with AST's normalisation (`mean`, `std`); "
                         f"{type(feature_extractor).__name__} has none.")
    scale = 2 * std if getattr(feature_extractor, "do_normalize", True) else 1.0
    shift = mean if getattr(feature_extractor, "do_normalize", True) else 0.0
    padding = (log_mel == (0.0 - shift) / scale).all(dim=-1, keepdim=True)  # [n, T, 1]
    peak = log_mel.masked_fill(padding, float("-inf")).amax(dim=(1, 2), keepdim=True)  # [n, 1, 1]
    floor = peak - range_db / 10 * math.log(10) / scale  # dB of power in natural-log units, normalised
    return torch.where(padding, floor, torch.maximum(log_mel, floor))


def _is_video(item) -> bool:
    if isinstance(item, (list, tuple)):
        return True
    return getattr(item, "ndim", None) == 4


def _as_image(item, name: str, row: int):
    """An image as an array the image processor takes: [H, W, C] (grey [H, W] gets 3 channels); PIL passes as is."""
    if hasattr(item, "convert") and hasattr(item, "size"):  # PIL image
        return item
    array = torch.as_tensor(item) if isinstance(item, (list, tuple)) else item
    if isinstance(array, torch.Tensor):
        array = array.numpy()
    if array.ndim == 2:  # grey: three equal channels
        array = torch.tensor(array).unsqueeze(-1).repeat(1, 1, 3).numpy()
    if array.ndim != 3:
        raise ValueError(f"Modality {name!r}, row {row}: expected an image [H, W, C] (or a video [T, H, W, C] / a list "
                         f"of frames), got shape {list(array.shape)}.")
    return array


def register_auto_processor(config_class, remote_code: bool = True) -> None:
    """Make `AutoProcessor.from_pretrained(folder)` return a `CalMRLProcessor` for folders of `config_class`.

    `AutoProcessor.register(config_class, CalMRLProcessor)` lets AutoProcessor resolve the processor class named in
    `processor_config.json` wherever `calmrl_hf` is imported. With `remote_code`, `save_pretrained` also writes an
    `auto_map` and copies this module into the folder, so `AutoProcessor.from_pretrained(folder,
    trust_remote_code=True)` works where `calmrl_hf` is not installed.
    """
    AutoProcessor.register(config_class, CalMRLProcessor, exist_ok=True)
    if remote_code:
        CalMRLProcessor.register_for_auto_class("AutoProcessor")


__all__ = ["CalMRLProcessor", "DEFAULT_MODALITY_KINDS", "floor_dynamic_range", "normalize_modalities", "register_auto_processor",
           "sample_frame_indices"]
