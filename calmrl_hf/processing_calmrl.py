"""One processor for every modality of a CalMRL model, for batches in which any modality may be missing.

`CalMRLProcessor(**{modality: list of items or None})` returns a `BatchFeature` with flat keys
`"{modality}_{field}"` holding the OBSERVED rows of each modality only, in batch order, plus `modality_mask`
[B, k] (bool, in the processor's modality order): exactly what `CalMRLModel.forward` takes. A modality absent from
the whole batch has no keys, so towers never run on placeholder inputs.

Each kind's tensors come from `processing_inputs`; the default modalities from `configuration_calmrl`. This module
imports from the rest of the package only model-side files (copied with it), and besides only the standard
library, torch, numpy and transformers, so `save_pretrained` can copy it next to a checkpoint for
`trust_remote_code=True` loading (see `register_auto_processor`). transformers' image processors need Pillow (or
torchvision).
"""

from __future__ import annotations

import torch
from transformers import AutoProcessor, BatchFeature, ProcessorMixin

from .configuration_calmrl import DEFAULT_KINDS
from .processing_inputs import TEXT_FIELDS, audio_features, text_features, vision_features


# a default modality that shares another's tower is of that modality's kind (subtitles are text): the config's table
DEFAULT_MODALITY_KINDS = DEFAULT_KINDS
MODALITY_KINDS = ("vision", "audio", "text")
# names a modality may not take: they are batch keys, dataset columns or keywords of `__call__`
RESERVED_NAMES = frozenset({"id", "ids", "index", "label", "labels", "modality", "modality_mask", "sampling_rate",
                            "return_tensors"})
# which component serves each kind
_COMPONENT_OF_KIND = {"text": "tokenizer", "vision": "image_processor", "audio": "feature_extractor"}
# CLIP's and CLAP's keywords, each meaning the processor's first modality of a kind
KIND_ALIASES = {"images": "vision", "videos": "vision", "audio": "audio", "audios": "audio", "text": "text"}
# tokenizer keywords `__call__` passes through to the tokenizer (as CLIP's processor does)
TOKENIZER_KEYWORDS = ("padding", "truncation", "max_length", "pad_to_multiple_of")
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
            (`processing_inputs.sample_frame_indices`).
        max_length (`int`, *optional*, defaults to 64): token budget of text inputs (longer ones are truncated).
        audio_as_image (`bool`, *optional*, defaults to False): hand a spectrogram feature extractor's output
            [n, T, mel] (e.g. `ASTFeatureExtractor`'s log-mel map) to the audio tower as a 1-channel image
            `{name}_pixel_values` [n, 1, T, mel], for convolutional audio towers (a ResNet config with
            `num_channels=1`).
        audio_dynamic_range_db (`float`, *optional*): floor each clip's log-mel map this many dB below its own peak
            (`processing_inputs.floor_dynamic_range`; padding frames read as that floor), so that the quiet parts of
            clean and noisy clips look alike. Needs a feature extractor with `mean` and `std` (AST's normalisation).

    A component may be None when no modality of its kind is used; calling with such a modality raises. Such a
    component is recorded as null in `processor_config.json`, and `from_pretrained` gives None for it.

    Inputs (`__call__`): one keyword per modality, each a list with one entry per example, None where the modality
    is missing for that example; a modality not passed at all is missing for every example. A single item (a
    string, an image, a waveform) is a batch of one. CLIP's and CLAP's keywords also work: `text=` (the first
    text-kind modality, when no modality is named "text"), `images=` / `videos=` (the first vision-kind one),
    `audio=` / `audios=` (the first audio-kind one); `padding`, `truncation`, `max_length` and
    `pad_to_multiple_of` go to the tokenizer. Items are:

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
                fields = [f for f in TEXT_FIELDS if f in component.model_input_names]
            elif kind == "vision" or self.audio_as_image:
                fields = ["pixel_values"]
            else:
                fields = list(component.model_input_names)
            names += [f"{name}_{field}" for field in fields]
        return names + ["modality_mask"]

    # ------------------------------------------------------------------ batching
    def __call__(self, *, sampling_rate: int | None = None, return_tensors: str | None = "pt",
                 **inputs) -> BatchFeature:
        """Batch one list per modality (None entries = missing) into observed-rows-only tensors + `modality_mask`."""
        if return_tensors not in ("pt", None):
            raise ValueError(f"CalMRLProcessor returns PyTorch tensors only: return_tensors must be 'pt', got "
                             f"{return_tensors!r}.")
        tokenizer_kwargs = {key: inputs.pop(key) for key in TOKENIZER_KEYWORDS if key in inputs}
        given = self._given_inputs(self._resolve_aliases(inputs))
        mask = self._modality_mask(given)
        data: dict[str, torch.Tensor] = {}
        for name, kind in self.modalities:
            rows = [i for i, item in enumerate(given.get(name, ())) if item is not None]
            if not rows:
                continue
            features = self._features(name, kind, [given[name][i] for i in rows], rows, sampling_rate,
                                      tokenizer_kwargs)
            data.update({f"{name}_{field}": value for field, value in features.items()})
        data["modality_mask"] = mask
        return BatchFeature(data=data)

    def _resolve_aliases(self, inputs: dict) -> dict:
        """Modality keywords as given, CLIP's / CLAP's (`images`, `videos`, `audio(s)`, `text`) renamed to the first
        modality of their kind; a single item becomes a batch of one."""
        resolved = {}
        for key, items in inputs.items():
            name = key
            if key not in self.modality_kinds and key in KIND_ALIASES:
                kind = KIND_ALIASES[key]
                name = next((n for n, k in self.modalities if k == kind), None)
                if name is None:
                    raise ValueError(f"{key}= needs a {kind}-kind modality; this processor has "
                                     f"{self.modality_kinds}.")
            elif key not in self.modality_kinds:
                hint = (f" (tokenizer keywords: {list(TOKENIZER_KEYWORDS)}; CLIP-style keywords: "
                        f"{sorted(KIND_ALIASES)})")
                raise ValueError(f"Unknown modalities {[key]}; this processor knows {self.modality_names}{hint}.")
            if name in resolved:
                raise ValueError(f"{key}= and another keyword both give modality {name!r}: pass it once.")
            resolved[name] = [items] if self._is_single_item(self.modality_kinds[name], items) else items
        return resolved

    @staticmethod
    def _is_single_item(kind: str, items) -> bool:
        """One example rather than a list of them: a string, an image (PIL or an array of 2-3 dims), a video array
        (4 dims) or a waveform (a 1-D array or tensor)."""
        if items is None or isinstance(items, (list, tuple)):
            return False
        if isinstance(items, str):
            return True
        dims = getattr(items, "ndim", None)
        if kind == "vision":
            return dims is None or dims in (2, 3, 4)  # a PIL image has no ndim
        return kind == "audio" and dims == 1

    def _given_inputs(self, modality_inputs: dict) -> dict[str, list]:
        """The modalities passed (not None), checked: one list per modality, one length for all."""
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
        if next(iter(lengths.values())) == 0:
            raise ValueError("The batch is empty: the modality lists have no entries.")
        return given

    def _modality_mask(self, given: dict[str, list]) -> torch.Tensor:
        """[B, k] bool: which rows observe which modality; every row must observe one."""
        batch_size = len(next(iter(given.values())))
        mask = torch.zeros(batch_size, len(self.modalities), dtype=torch.bool)  # [B, k]
        for index, name in enumerate(self.modality_names):
            if name in given:
                mask[:, index] = torch.tensor([item is not None for item in given[name]])
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"Rows {empty[:10]} of the batch have no observed modality (every entry is None); every "
                             f"example needs at least one of {self.modality_names}.")
        return mask

    def _features(self, name: str, kind: str, items: list, rows: list[int], sampling_rate: int | None,
                  tokenizer_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
        """The tensors of modality `name` for its observed `items` (from batch rows `rows`), by the component of its
        kind (`processing_inputs`)."""
        component = _COMPONENT_OF_KIND[kind]
        if getattr(self, component) is None:
            raise ValueError(f"Modality {name!r} is {kind}-kind and needs a {component}, but this processor was built "
                             f"with {component}=None.")
        if kind == "text":
            settings = dict(tokenizer_kwargs or {})
            return text_features(self.tokenizer, name, items, rows, settings.pop("max_length", self.max_length),
                                 **settings)
        if kind == "vision":
            return vision_features(self.image_processor, name, items, rows, self.num_frames)
        return audio_features(self.feature_extractor, name, items, rows, sampling_rate,
                              dynamic_range_db=self.audio_dynamic_range_db, as_image=self.audio_as_image)

    # ------------------------------------------------------------------ the model's modalities
    @classmethod
    def for_model(cls, model_or_config, **kwargs) -> "CalMRLProcessor":
        """A processor whose modalities are those of a `CalMRLModel` (or its config), in its order: `kwargs` are the
        components and settings (`tokenizer=`, `image_processor=`, `feature_extractor=`, `num_frames=`, ...).
        Kinds: those of `kwargs["modalities"]` where given, else the defaults (subtitle is text), else the kind of
        the modality whose tower a modality shares."""
        config = getattr(model_or_config, "config", model_or_config)
        kinds = dict(normalize_modalities(kwargs.pop("modalities"))) if kwargs.get("modalities") else {}
        return cls(modalities=modality_kinds_of(config, kinds), **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' `from_pretrained`; from a model folder, the modalities are the model's (its config.json),
        whatever the processor was built with, and a folder that holds no processor says so."""
        import os

        folder = str(pretrained_model_name_or_path)
        if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "processor_config.json")):
            raise OSError(f"{folder} holds no processor (no processor_config.json): it was saved without one. Build "
                          f"it with CalMRLProcessor.for_model(model, tokenizer=..., image_processor=..., "
                          f"feature_extractor=...) and save it there with processor.save_pretrained({folder!r}).")
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        config = _model_config_dict(pretrained_model_name_or_path, kwargs)
        if config is not None and config.get("modalities"):
            processor.modalities = [[name, kind] for name, kind in modality_kinds_of(
                config, processor.modality_kinds).items()]
        return processor

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


def modality_kinds_of(config, known: dict[str, str] | None = None) -> dict[str, str]:
    """{modality: kind} of a CalMRL config (an object or its dict), in its order: the kind in `known`, else the
    default kind of the name, else that of the modality whose tower it shares."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    shared = get("shared_encoders") or {}
    kinds = {**DEFAULT_MODALITY_KINDS, **(known or {})}
    result = {}
    for name in get("modalities"):
        kind = kinds.get(name) or kinds.get(shared.get(name, ""))
        if kind is None:
            raise ValueError(f"The model's modality {name!r} has no known kind: give the processor its kinds, e.g. "
                             f"modalities={{{name!r}: 'vision'}} (kinds: {list(MODALITY_KINDS)}).")
        result[name] = kind
    return result


def _model_config_dict(pretrained_model_name_or_path, kwargs: dict) -> dict | None:
    """The CalMRL model config saved next to a processor (config.json of model_type "calmrl"), or None."""
    import json

    from transformers.utils import cached_file

    try:
        path = cached_file(pretrained_model_name_or_path, "config.json", _raise_exceptions_for_missing_entries=False,
                           **{key: kwargs[key] for key in ("cache_dir", "revision", "token", "local_files_only")
                              if key in kwargs})
    except OSError:
        return None
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    return config if config.get("model_type") == "calmrl" else None


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


__all__ = ["CalMRLProcessor", "DEFAULT_MODALITY_KINDS", "KIND_ALIASES", "MODALITY_KINDS", "modality_kinds_of",
           "normalize_modalities", "register_auto_processor"]
