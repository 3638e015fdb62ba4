"""CalMRL model configuration.

A `CalMRLConfig` declares the modalities of the shared embedding space, the encoder ("tower") of
each modality, the projection into the shared space, the PPCA imputer of missing embeddings and the
alignment objective. Encoders may be shared between modalities (by default the subtitle modality
reuses the text tower with its own projection head).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from contextvars import ContextVar
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.utils import logging

from .alignment import OBJECTIVES
from .feature_encoder import FeatureEncoderConfig
from .validation import unknown_name_message


logger = logging.get_logger(__name__)
# Why GRAM / TRIANGLE and imputed columns do not mix (measured: README, "What the benchmarks show").
VOLUME_WITH_IMPUTATION_WARNING = (
    "alignment_objective={objective!r} with imputer_method={method!r}: {objective} contrasts an anchor with a "
    "column's other modalities through a volume that factorises into a part of the column alone and the anchor's "
    "distance to it (GRAM: V_ij = vol(column j) * dist(anchor_i, span(column j)); TRIANGLE: |z_j^1 - z_j^2| * the "
    "anchor's distance to their line). With imputed columns (functions of the column's observed embeddings) the "
    "column-only part varies across columns and dominates the contrast, and training lowers it by pulling the "
    "column's modalities together instead of aligning them with the anchor: retrieval collapses. Observed-only "
    "GRAM (imputer_method='none') or an objective without a volume (pmrl, *_infonce) does not have this problem."
)


# Towers over precomputed features resolve by model_type like any transformers config (also as remote code).
AutoConfig.register(FeatureEncoderConfig.model_type, FeatureEncoderConfig, exist_ok=True)


DEFAULT_MODALITIES = ("vision", "audio", "text", "subtitle")
DEFAULT_ENCODER_MODEL_TYPES = {"vision": "vit", "audio": "audio-spectrogram-transformer", "text": "bert"}
DEFAULT_SHARED_ENCODERS = {"subtitle": "text"}
# the kind (what a processor makes of it, what CLIP calls it) of each default modality name
DEFAULT_KINDS = {"vision": "vision", "audio": "audio", "text": "text", "subtitle": "text"}
DEFAULT_POOLING = {"vision": "cls", "audio": "mean", "text": "mean", "subtitle": "mean"}

POOLING_MODES = ("cls", "mean", "pooler")
# Keys a config dict may carry besides the dataclass fields: what transformers itself writes into config.json or
# consumes in `PreTrainedConfig.__post_init__`.
TRANSFORMERS_CONFIG_KEYS = frozenset({
    "model_type", "auto_map", "transformers_version", "architectures", "_name_or_path", "name_or_path",
    "_commit_hash", "torch_dtype", "num_labels", "output_attentions", "attn_implementation",
    "experts_implementation", "per_layer_config", "_attn_implementation_internal",
    "_experts_implementation_internal", "custom_pipelines",
})
# True while `from_dict` builds a config from a file: unknown keys are then a warning, not an error.
_LOADING_FROM_DICT: ContextVar[bool] = ContextVar("calmrl_loading_from_dict", default=False)
IMPUTER_METHODS = ("ppca", "mean", "zero", "none")
# Instance flag: set once `__post_init__` has checked the config (then assignments are checked too).
_CHECKED = "_calmrl_checked"


@dataclasses.dataclass(frozen=True)
class NumberRange:
    """What a numeric setting accepts: its type (`int` or `float`), its bounds (inclusive or not), whether None is
    allowed, and the same in words for the error message (e.g. "> 0", "in [0, 1)", ">= 1 or None")."""

    kind: type
    words: str
    low: float | None = None
    low_inclusive: bool = True
    high: float | None = None
    high_inclusive: bool = False
    optional: bool = False

    @property
    def expected(self) -> str:
        """"an integer >= 1", "a number > 0 or None", or the words themselves where they say what it is."""
        if self.words[:1].isalpha():
            return self.words
        return f"{'an integer' if self.kind is int else 'a number'} {self.words}"


def coerce_number(name: str, value: Any, spec: NumberRange) -> Any:
    """`value` as `spec.kind` where it is one: a number of the other kind (an int for a float field; a float with an
    integral value for an int field), or a string that reads as one (YAML reads `7e-2` as a string). A bool is not a
    number here. Raises TypeError (not a number) or ValueError (a string that is no number, a fraction for an int
    field), naming the field; the range is `check_number`'s."""
    if value is None:
        if spec.optional:
            return None
        raise TypeError(f"{name} must be {spec.expected}, got None.")
    if _is_bool(value):
        raise TypeError(f"{name} must be {spec.expected}, got the boolean {value!r}.")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if spec.kind is int and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise ValueError(f"{name} must be {spec.expected}, got the string {value!r}.") from None
    if isinstance(value, numbers.Integral):
        return spec.kind(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if spec.kind is float:
            return value
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise ValueError(f"{name} must be {spec.expected}, got {value!r}.")
    raise TypeError(f"{name} must be {spec.expected}, got {type(value).__name__} {value!r}.")


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's too


def check_number(name: str, value: Any, spec: NumberRange) -> None:
    """ValueError naming the field when `value` (already `coerce_number`'s) is outside `spec`'s range, NaN or
    infinite."""
    if value is None and spec.optional:
        return
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {spec.expected} (finite), got {value!r}.")
    below = spec.low is not None and (value < spec.low if spec.low_inclusive else value <= spec.low)
    above = spec.high is not None and (value > spec.high if spec.high_inclusive else value >= spec.high)
    if below or above:
        raise ValueError(f"{name} must be {spec.words}, got {value!r}.")


def check_bool(name: str, value: Any) -> bool:
    """A switch is True or False: a string ("true", "no") or a number is refused, naming the field (YAML reads
    `true` as a boolean already; a quoted "false" would otherwise count as True)."""
    if _is_bool(value):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}.")


# The numeric settings of `CalMRLConfig` and what each accepts (checked at construction and on every assignment).
CONFIG_NUMBERS = {
    "projection_dim": NumberRange(int, ">= 1", low=1),
    "imputer_latent_dim": NumberRange(int, ">= 1 (and < projection_dim)", low=1),
    "imputer_noise_var_floor": NumberRange(float, "> 0", low=0, low_inclusive=False),
    "pmrl_tau1": NumberRange(float, "> 0", low=0, low_inclusive=False),
    "pmrl_tau2": NumberRange(float, "> 0", low=0, low_inclusive=False),
    "temperature": NumberRange(float, "> 0", low=0, low_inclusive=False),
    "label_smoothing": NumberRange(float, "in [0, 1)", low=0, high=1),
    "matching_weight": NumberRange(float, ">= 0", low=0),
    "matching_num_negatives": NumberRange(int, ">= 1", low=1),
    "fusion_num_layers": NumberRange(int, ">= 0", low=0),
    "fusion_num_attention_heads": NumberRange(int, ">= 1 or None", low=1, optional=True),
    "initializer_range": NumberRange(float, "> 0", low=0, low_inclusive=False),
}
CONFIG_SWITCHES = ("renormalize_imputed", "impute_with_grad", "impute_from_anchor", "learnable_temperature",
                   "gather_across_processes")


def _as_config(config: PreTrainedConfig | dict) -> PreTrainedConfig:
    """An encoder sub-config as a config object (a dict needs its `model_type`)."""
    if isinstance(config, dict):
        if "model_type" not in config:
            raise ValueError(
                f"An encoder config given as a dict needs a 'model_type' key (e.g. 'bert', 'vit'); got keys "
                f"{sorted(config)}."
            )
        config_dict = copy.deepcopy(config)
        return AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    if not isinstance(config, PreTrainedConfig):
        raise TypeError(f"An encoder config must be a transformers config or a dict, got {type(config).__name__}.")
    return config


def _config_to_dict(config: PreTrainedConfig) -> dict:
    """Canonical JSON-safe form of an encoder sub-config: its diff against the defaults, with `model_type`, without
    `dtype` (the model's one dtype, the top-level config's, is the towers': transformers sets it on every
    sub-config when loading)."""
    as_dict = config.to_diff_dict()
    as_dict.pop("transformers_version", None)
    as_dict.pop("dtype", None)
    as_dict["model_type"] = config.model_type
    return as_dict


class _TowerSubConfigs:
    """`CalMRLConfig.sub_configs`: one `{modality}_config` per tower (`text_config`, `vision_config`, ...), so that
    transformers hands `dtype` and `attn_implementation` on to the towers' configs as it does for CLIP's. The
    class has no fixed sub-configs (the towers are the instance's)."""

    def __get__(self, config, owner=None) -> dict:
        towers = {} if config is None else (config.__dict__.get("encoder_configs") or {})
        return {f"{name}_config": type(tower) for name, tower in towers.items() if isinstance(tower, PreTrainedConfig)}


class CalMRLConfig(PreTrainedConfig):
    r"""
    Configuration of a [`CalMRLModel`]: modality towers -> projection -> unit-norm embeddings [B, k, D] ->
    PPCA imputation of the missing ones -> alignment loss.

    Args:
        modalities (`list[str]`, *optional*, defaults to `["vision", "audio", "text", "subtitle"]`):
            Names of the modalities, in the order of the `k` axis of every embedding tensor and modality mask.
        encoder_configs (`dict[str, PreTrainedConfig | dict]`, *optional*):
            Encoder config of each modality that has its own tower (any transformers config that
            `AutoModel.from_config` can build). Defaults to ViT / AST / BERT base configs for vision / audio / text.
        shared_encoders (`dict[str, str]`, *optional*, defaults to `{"subtitle": "text"}`):
            Modalities that reuse another modality's tower (each keeps its own projection head).
        pooling (`dict[str, str]`, *optional*):
            How each modality's token features are pooled: `"cls"` (first token), `"mean"` (mean over tokens that the
            attention mask keeps) or `"pooler"` (the tower's `pooler_output`). Defaults to cls for vision, mean otherwise.
        projection_dim (`int`, *optional*, defaults to 512):
            Dimension `D` of the shared embedding space.
        imputer_method (`str`, *optional*, defaults to `"ppca"`):
            How missing embeddings are filled before alignment: `"ppca"` (posterior mean of the PPCA model, CalMRL),
            `"mean"` (the modality's marginal mean), `"zero"` (zero vectors) or `"none"` (observed-only alignment).
        imputer_latent_dim (`int`, *optional*, defaults to 64):
            Dimension `q` of the shared PPCA latent.
        imputer_noise_var_floor (`float`, *optional*, defaults to 1e-6):
            Lower bound of each modality's PPCA noise variance.
        renormalize_imputed (`bool`, *optional*, defaults to `True`):
            Project imputed embeddings back onto the unit sphere (the objectives assume unit-norm columns).
        impute_with_grad (`bool`, *optional*, defaults to `True`):
            Let gradients flow through the (linear) imputation into the observed embeddings.
        impute_from_anchor (`bool`, *optional*, defaults to `True`):
            In training, condition the imputations the objective sees on the anchor modality too. GRAM, TRIANGLE
            and anchor InfoNCE contrast the anchor of one instance with the other columns of another: imputations
            conditioned on the anchor carry that instance's own anchor into its columns, so the positive can be
            recognised through the imputed columns alone and the observed towers are no longer pulled together.
            `False` conditions them on the other observed modalities only (a row observing only its anchor is then
            not imputed). Inference (`encode`) always conditions on every observed modality.
        alignment_objective (`str`, *optional*, defaults to `"pmrl"`):
            One of `"pmrl"`, `"gram"`, `"triangle"`, `"anchor_infonce"`, `"pairwise_infonce"`.
        pmrl_tau1 (`float`, *optional*, defaults to 0.5): PMRL intra-instance temperature. 0.5 is the value chosen on
            the validation splits of both quality benchmarks (`benchmarks/*/hyperparameters.json`) for towers that are
            still learning: at the PMRL authors' 0.05 (fine-tuning pretrained 1B-parameter towers; 0.01 for
            pre-training) the intra term saturates once matched cosines pass about 0.5 and stops pulling modalities
            together. `recipes/configs/vast.yaml` keeps the authors' values for pretrained VAST-scale towers.
        pmrl_tau2 (`float`, *optional*, defaults to 0.5): PMRL inter-instance temperature (validated as tau1; the
            authors use 0.1).
        temperature (`float`, *optional*, defaults to 0.07): temperature of the contrastive objectives.
        learnable_temperature (`bool`, *optional*, defaults to `True`): train the contrastive temperature (clamped).
        label_smoothing (`float`, *optional*, defaults to 0.1): label smoothing of GRAM / TRIANGLE.
        anchor_modality (`str`, *optional*): anchor of GRAM / TRIANGLE / anchor InfoNCE; defaults to `"text"` when
            there is such a modality, else the first modality.
        triangle_modalities (`list[str]`, *optional*): the three modalities TRIANGLE uses (anchor first).
        gather_across_processes (`bool`, *optional*, defaults to `True`):
            Use the embeddings of every process as negatives (all-gather with gradient of the local part, batches of
            any size): PMRL's inter term, GRAM's and TRIANGLE's columns, every InfoNCE pair, the matching head's hard
            negatives. Each process returns its share, so the mean over processes is the concatenated batch's loss.
            The PMRL authors use the per-GPU batch only; gathering is our documented deviation.
        matching_weight (`float`, *optional*, defaults to 0.1): weight alpha of the matching term (the paper's 0.1);
            it applies when the model has a matching head (`fusion_num_layers > 0`).
        matching_num_negatives (`int`, *optional*, defaults to 1): hard negatives per row and direction in the
            matching term (the authors' 1: one negative condition per caption and one negative caption per
            condition); the positives are weighted so that positives and negatives keep the 1 : 2 balance.
        fusion_num_layers (`int`, *optional*, defaults to 0): layers of the fusion encoder of the matching head
            (0: no matching head).
        fusion_num_attention_heads (`int`, *optional*): attention heads of the fusion layers; defaults to the
            caption tower's.
        matching_modality (`str`, *optional*): the caption modality the fusion encoder reads (its tower's width is
            the fusion width); defaults to the anchor modality.
        lora (`dict`, *optional*): LoRA adapters (peft) on some towers, e.g. `{"modalities": ["text"], "r": 8,
            "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"]}`. Those towers' base weights are
            frozen and only their adapters train; adapters are saved and loaded with the model.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the projection heads' initialisation.

    Example:

    ```python
    >>> from transformers import BertConfig
    >>> from calmrl_hf import CalMRLConfig, CalMRLModel
    >>> config = CalMRLConfig(
    ...     modalities=["text", "subtitle"],
    ...     encoder_configs={"text": BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                                         intermediate_size=64, vocab_size=100)},
    ...     projection_dim=16, imputer_latent_dim=4)
    >>> model = CalMRLModel(config)
    ```
    """

    model_type = "calmrl"
    sub_configs = _TowerSubConfigs()

    modalities: list[str] | None = None
    encoder_configs: dict[str, Any] | None = None
    shared_encoders: dict[str, str] | None = None
    pooling: dict[str, str] | None = None
    projection_dim: int = 512
    imputer_method: str = "ppca"
    imputer_latent_dim: int = 64
    imputer_noise_var_floor: float = 1e-6
    renormalize_imputed: bool = True
    impute_with_grad: bool = True
    impute_from_anchor: bool = True
    alignment_objective: str = "pmrl"
    pmrl_tau1: float = 0.5
    pmrl_tau2: float = 0.5
    temperature: float = 0.07
    learnable_temperature: bool = True
    label_smoothing: float = 0.1
    anchor_modality: str | None = None
    triangle_modalities: list[str] | None = None
    gather_across_processes: bool = True
    matching_weight: float = 0.1
    matching_num_negatives: int = 1
    fusion_num_layers: int = 0
    fusion_num_attention_heads: int | None = None
    matching_modality: str | None = None
    lora: dict[str, Any] | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self._refuse_unknown_keys(kwargs)
        self.modalities = list(self.modalities) if self.modalities is not None else list(DEFAULT_MODALITIES)
        if self.shared_encoders is None:
            self.shared_encoders = {m: s for m, s in DEFAULT_SHARED_ENCODERS.items() if m in self.modalities}
        if self.encoder_configs is None:
            self.encoder_configs = {
                m: AutoConfig.for_model(DEFAULT_ENCODER_MODEL_TYPES[m])
                for m in self.modalities
                if m in DEFAULT_ENCODER_MODEL_TYPES and m not in self.shared_encoders
            }
        self.encoder_configs = {m: _as_config(c) for m, c in self.encoder_configs.items()}
        # transformers sets the top-level attn_implementation (None unless asked) on every sub-config: keep the
        # towers' own choice (e.g. a loaded tower's) unless one was asked for
        tower_attention = {m: c._attn_implementation_internal for m, c in self.encoder_configs.items()}
        attention_asked = kwargs.get("attn_implementation") is not None
        if self.anchor_modality is None:
            self.anchor_modality = "text" if "text" in self.modalities else self.modalities[0]
        if self.matching_modality is None:
            self.matching_modality = self.anchor_modality
        pooling = {m: DEFAULT_POOLING.get(m, "mean") for m in self.modalities}
        pooling.update(self.pooling or {})
        self.pooling = pooling
        super().__post_init__(**kwargs)
        if not attention_asked:
            for name, implementation in tower_attention.items():
                self.encoder_configs[name]._attn_implementation_internal = implementation
        self._validate_calmrl()
        # from now on every assignment of a CalMRL field is checked (`__setattr__`); not part of the saved config
        self.__dict__[_CHECKED] = True

    def __setattr__(self, key: str, value: Any) -> None:
        """Numbers given as strings or as the other kind of number are converted (`coerce_number`), switches must be
        booleans, and once the config is constructed a CalMRL field is only set to a value `_validate_calmrl` accepts
        (`config.alignment_objective = "nope"` is refused here, not at the first forward; the old value stays)."""
        if key in CONFIG_NUMBERS:
            value = coerce_number(key, value, CONFIG_NUMBERS[key])
        elif key in CONFIG_SWITCHES:
            value = check_bool(key, value)
        if key not in _CALMRL_FIELDS or not self.__dict__.get(_CHECKED):
            super().__setattr__(key, value)
            return
        missing = object()
        previous = self.__dict__.get(key, missing)
        super().__setattr__(key, value)
        try:
            self._validate_calmrl()
        except Exception:
            if previous is missing:
                self.__dict__.pop(key, None)
            else:
                super().__setattr__(key, previous)
            raise

    def update(self, config_dict: dict[str, Any]):
        """`PreTrainedConfig.update`, checked once all the values are set (settings that depend on each other, such
        as projection_dim and imputer_latent_dim, may change together); nothing changes when they are refused."""
        if not self.__dict__.get(_CHECKED):
            return super().update(config_dict)
        missing = object()
        previous = {key: self.__dict__.get(key, missing) for key in config_dict}
        self.__dict__[_CHECKED] = False
        try:
            super().update(config_dict)
            self._validate_calmrl()
        except Exception:
            for key, value in previous.items():
                if value is missing:
                    self.__dict__.pop(key, None)
                else:
                    self.__dict__[key] = value
            raise
        finally:
            self.__dict__[_CHECKED] = True

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """`PreTrainedConfig.from_dict` (what `from_pretrained` reads config.json with): unknown keys there are
        reported in a warning instead of refused, so that a config written by a newer version still loads."""
        token = _LOADING_FROM_DICT.set(True)
        try:
            return super().from_dict(config_dict, **kwargs)
        finally:
            _LOADING_FROM_DICT.reset(token)

    def _refuse_unknown_keys(self, extra: dict[str, Any]) -> None:
        """A misspelt argument (`imputer_methd="none"`) would otherwise be stored and ignored, silently changing the
        experiment: refuse it with a suggestion (warn when loading a saved config)."""
        unknown = sorted(key for key in extra if key not in TRANSFORMERS_CONFIG_KEYS)
        if not unknown:
            return
        known = [field.name for field in dataclasses.fields(self)]
        message = unknown_name_message("CalMRLConfig keys", unknown, known)
        if _LOADING_FROM_DICT.get():
            logger.warning(f"{message} They are kept as attributes and ignored by CalMRL.")
        else:
            raise ValueError(message)

    def __getattr__(self, key: str):
        # `text_config`, `vision_config`, ...: the towers' configs (the `sub_configs`), named as in CLIP / CLAP
        towers = self.__dict__.get("encoder_configs")
        name = key[: -len("_config")] if key.endswith("_config") else None
        if isinstance(towers, dict) and name in towers:
            return towers[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["encoder_configs"] = {m: _config_to_dict(c) for m, c in self.encoder_configs.items()}
        output.pop(_CHECKED, None)
        return output

    def _validate_calmrl(self) -> None:
        for name, spec in CONFIG_NUMBERS.items():  # converted on assignment (`__setattr__`), checked here
            check_number(name, coerce_number(name, getattr(self, name), spec), spec)
        for name in CONFIG_SWITCHES:
            check_bool(name, getattr(self, name))
        if not isinstance(self.alignment_objective, str) or not isinstance(self.imputer_method, str):
            raise TypeError(f"alignment_objective and imputer_method must be strings, got "
                            f"{self.alignment_objective!r} and {self.imputer_method!r}.")
        modalities = self.modalities
        if len(modalities) < 2:
            raise ValueError(f"CalMRLConfig needs at least two modalities, got modalities={modalities}.")
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"Modality names must be unique, got modalities={modalities}.")
        for name in modalities:
            if not name.isidentifier():
                raise ValueError(f"Modality name {name!r} must be a Python identifier (it prefixes input names).")
        for field in ("encoder_configs", "shared_encoders", "pooling"):
            unknown = sorted(set(getattr(self, field)) - set(modalities))
            if unknown:
                raise ValueError(f"{field} names unknown modalities {unknown}; the modalities are {modalities}.")
        for name, target in self.shared_encoders.items():
            if target not in self.encoder_configs:
                raise ValueError(
                    f"shared_encoders maps {name!r} to {target!r}, which has no encoder of its own "
                    f"(encoder_configs has {sorted(self.encoder_configs)})."
                )
            if name in self.encoder_configs:
                raise ValueError(f"Modality {name!r} has both its own encoder config and a shared encoder.")
        without_encoder = [m for m in modalities if m not in self.encoder_configs and m not in self.shared_encoders]
        if without_encoder:
            raise ValueError(
                f"Modalities {without_encoder} have no encoder: give each an entry in encoder_configs or map it to "
                f"another modality in shared_encoders."
            )
        for name, mode in self.pooling.items():
            if mode not in POOLING_MODES:
                raise ValueError(f"pooling[{name!r}] = {mode!r}; expected one of {POOLING_MODES}.")
        if self.imputer_method not in IMPUTER_METHODS:
            raise ValueError(f"imputer_method = {self.imputer_method!r}; expected one of {IMPUTER_METHODS}.")
        if self.alignment_objective not in OBJECTIVES:
            raise ValueError(
                f"alignment_objective = {self.alignment_objective!r}; expected one of {tuple(OBJECTIVES)}."
            )
        if self.anchor_modality not in modalities:
            raise ValueError(f"anchor_modality = {self.anchor_modality!r} is not one of the modalities {modalities}.")
        if self.triangle_modalities is not None:
            unknown = [m for m in self.triangle_modalities if m not in modalities]
            if len(self.triangle_modalities) != 3 or unknown:
                raise ValueError(
                    f"triangle_modalities must name three of {modalities}, got {self.triangle_modalities}."
                )
        if self.matching_modality not in modalities:
            raise ValueError(f"matching_modality = {self.matching_modality!r} is not one of the modalities {modalities}.")
        if self.lora is not None:
            unknown = sorted(set(self.lora) - {"modalities", "r", "alpha", "dropout", "target_modules"})
            towers = self.lora.get("modalities") or []
            if unknown or not towers or not self.lora.get("target_modules"):
                raise ValueError(f"lora needs 'modalities' and 'target_modules' (and optionally r, alpha, dropout); "
                                 f"got {self.lora}.")
            bad = [m for m in towers if m not in self.encoder_configs]
            if bad:
                raise ValueError(f"lora names {bad}, which have no tower of their own (towers: "
                                 f"{sorted(self.encoder_configs)}).")
        if self.alignment_objective in ("gram", "triangle") and self.imputer_method != "none":
            logger.warning_once(VOLUME_WITH_IMPUTATION_WARNING.format(objective=self.alignment_objective,
                                                                      method=self.imputer_method))
        if self.imputer_latent_dim >= self.projection_dim:
            raise ValueError(
                f"imputer_latent_dim ({self.imputer_latent_dim}) must be smaller than projection_dim "
                f"({self.projection_dim}): the PPCA latent is a low-rank summary of the embeddings."
            )

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    def modality_index(self, name: str) -> int:
        """Position of modality `name` on the `k` axis; a clear error for an unknown name."""
        if name not in self.modalities:
            raise ValueError(f"Unknown modality {name!r}; this model's modalities are {self.modalities}.")
        return self.modalities.index(name)

    def modality_kinds(self) -> dict[str, str]:
        """{modality: kind} for the modalities whose kind is known ("vision", "audio", "text"): a default name's, or
        that of the modality whose tower it shares; in the model's order."""
        kinds = {}
        for name in self.modalities:
            kind = DEFAULT_KINDS.get(name) or DEFAULT_KINDS.get(self.shared_encoders.get(name, ""))
            if kind is not None:
                kinds[name] = kind
        return kinds

    def encoder_owner(self, name: str) -> str:
        """The modality whose tower encodes `name` (itself unless shared)."""
        self.modality_index(name)
        return self.shared_encoders.get(name, name)

    def get_encoder_config(self, name: str) -> PreTrainedConfig:
        """The transformers config of the tower that encodes modality `name` (the tower's own config object)."""
        return self.encoder_configs[self.encoder_owner(name)]

    def get_encoder_width(self, name: str) -> int:
        """Width of the features the tower of modality `name` outputs: `hidden_size`, or the last stage's channels
        of a convolutional tower (`hidden_sizes[-1]`: ResNet, ConvNext)."""
        config = self.get_encoder_config(name)
        width = getattr(config, "hidden_size", None)
        if width is None and getattr(config, "hidden_sizes", None):
            width = config.hidden_sizes[-1]
        if width is None:
            raise ValueError(f"The {config.model_type} tower of {name!r} has neither hidden_size nor hidden_sizes.")
        return int(width)


# The fields CalMRL declares (not transformers' own): checked on every assignment once the config is constructed.
_CALMRL_FIELDS = frozenset(CalMRLConfig.__annotations__)
__all__ = ["CalMRLConfig"]
