"""CalMRL model: modality towers -> projection -> unit-norm embeddings -> PPCA imputation -> alignment.

The data flow of one forward pass, each arrow one method you can find by name (the files they lean on in
brackets):

    inputs ──embed_modalities──> embeddings [B, k, D] + modality_mask [B, k]   (modality_inputs, towers)
           ──impute_missing────> imputed_embeddings [B, k, D] + aligned_mask [B, k]   (imputer)
           ──alignment_loss────> loss   (alignment.OBJECTIVES; plus the matching head's term: matching_head)

A batch is validated once, where it enters the model (`forward`, `encode`, `embed_modalities`, and each public
step given embeddings of its own); the steps of a forward pass run unchecked on what the door let in. The door's
one read brings the modality mask back too (`host_mask.HostMask`): the steps index and branch on its host copy,
never by reading the device back. Loading rules live in `loading.py`, LoRA adapters in `lora.py`, the matching /
re-ranking API in `matching_head.py`.

Reference: Liu et al., "Calibrated Multimodal Representation Learning with Missing Modalities", ICML 2026
(arXiv 2511.12034).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .alignment import OBJECTIVES, _gram_singular_values, clamp_temperature
from .collective import world_size
from .configuration_calmrl import CalMRLConfig
from .feature_encoder import FeatureEncoderConfig, FeatureEncoderModel
from .host_mask import HostMask, host_mask_known
from .imputer import PPCAImputer
from .loading import config_from_towers, load_strictly
from .lora import add_lora, freeze_lora_towers, is_lora_layer
from .matching_head import FusionEncoder, MatchingHeadMixin
from .modality_features import CalMRLFeaturesMixin, CalMRLModalityOutput
from .modality_inputs import (PendingCheck, check_tower_inputs, checks_read_together, group_inputs, inputs_checked,
                              raise_bad_values, rename_clip_inputs, resolve_modality_mask, split_tower_flags)
from .towers import build_towers, run_on_placeholder, towers_support
from .validation import check_embeddings, empty_rows_check, observed_embeddings_check


AutoModel.register(FeatureEncoderConfig, FeatureEncoderModel, exist_ok=True)


@dataclass
class CalMRLOutput(ModelOutput):
    """
    Output of [`CalMRLModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
            The alignment objective on observed + imputed embeddings plus `matching_weight` x the matching term.
        alignment_loss (`torch.FloatTensor` of shape `()`, *optional*): the alignment objective alone.
        matching_loss (`torch.FloatTensor` of shape `()`, *optional*): the matching term (models with a matching
            head, when the batch has at least two instances with a caption and another observed modality).
        embeddings (`torch.FloatTensor` of shape `[B, k, D]`):
            Unit-norm embeddings of the observed modalities; rows of missing modalities are zero.
        modality_mask (`torch.BoolTensor` of shape `[B, k]`): True where a modality was observed.
        imputed_embeddings (`torch.FloatTensor` of shape `[B, k, D]`):
            Observed embeddings with the missing ones filled in by the imputer (zero where nothing was imputed).
        aligned_mask (`torch.BoolTensor` of shape `[B, k]`): the columns the alignment objective used.
        singular_values (`torch.FloatTensor` of shape `[B, k]`):
            Singular values of each instance's d x k matrix of aligned columns, descending (0 for unused columns).
        anchor_embeddings (`torch.FloatTensor` of shape `[B, D]`):
            Leading left singular vector of each instance (the "anchor" all its modalities align to).
        logit_scale (`torch.FloatTensor` of shape `()`): log of the inverse (clamped) temperature, as CLIP's; the
            parameter `model.logit_scale` it comes from has shape `[1]`.
        logits_per_<a>_<b> (`torch.FloatTensor` of shape `[n_a, n_b]`): for every ordered pair of modalities
            observed in the batch, `exp(logit_scale)` x the cosine similarities between the n_a observed rows of
            `a` and the n_b observed rows of `b`, in batch order (`logits_per_text_vision`, `logits_per_vision_text`
            = its transpose, ...). Set as keys of the output, like its fields.
        text_embeds, image_embeds, audio_embeds, logits_per_text, logits_per_image, logits_per_audio: CLIP's and
            CLAP's names (`clip_fields`): the observed embeddings of the first modality of each kind, and, when the
            batch holds text and exactly one other modality, CLIP's logits (`logits_per_image` [n_image, n_text]).
        <modality>_model_output (`CalMRLModalityOutput`): each embedded modality's tower outputs (hidden states and
            attentions with `output_hidden_states` / `output_attentions`), like CLIP's `text_model_output`.
    """

    loss: torch.FloatTensor | None = None
    alignment_loss: torch.FloatTensor | None = None
    matching_loss: torch.FloatTensor | None = None
    embeddings: torch.FloatTensor | None = None
    modality_mask: torch.BoolTensor | None = None
    imputed_embeddings: torch.FloatTensor | None = None
    aligned_mask: torch.BoolTensor | None = None
    singular_values: torch.FloatTensor | None = None
    anchor_embeddings: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None

    def __init__(self, outputs: dict | None = None, **named):
        # the fields, then the keys named after the modalities (`logits_per_<a>_<b>`, `<modality>_model_output`);
        # rebuilt from a dict by DDP / torch's pytree (`CalMRLOutput(**output)`) and accelerate (`CalMRLOutput(output)`)
        outputs = {**(outputs or {}), **named}
        for field in fields(self):
            self.__dict__[field.name] = outputs.pop(field.name, None)
        self.__post_init__()
        for key, value in outputs.items():
            self[key] = value

    def to_tuple(self) -> tuple:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


@dataclass
class CalMRLEncoding(ModelOutput):
    """
    Output of [`CalMRLModel.encode`]: what a model knows about a batch with any subset of modalities.

    Args:
        embeddings (`torch.FloatTensor` of shape `[B, k, D]`): unit-norm embeddings of the observed modalities.
        modality_mask (`torch.BoolTensor` of shape `[B, k]`): the observed modalities.
        imputed_embeddings (`torch.FloatTensor` of shape `[B, k, D]`): observed embeddings, missing ones imputed.
        imputed_mask (`torch.BoolTensor` of shape `[B, k]`): the slots that were imputed.
        imputation_variance (`torch.FloatTensor` of shape `[B, k]`): posterior variance per coordinate of each
            imputed slot (0 where observed or not imputed), the imputation's uncertainty.
        fused_embeddings (`torch.FloatTensor` of shape `[B, D]`): the leading left singular vector of each
            instance's observed + imputed embeddings, a single query that represents all its modalities.
    """

    embeddings: torch.FloatTensor | None = None
    modality_mask: torch.BoolTensor | None = None
    imputed_embeddings: torch.FloatTensor | None = None
    imputed_mask: torch.BoolTensor | None = None
    imputation_variance: torch.FloatTensor | None = None
    fused_embeddings: torch.FloatTensor | None = None


ZERO_SHOT_IMAGE_AUTO_CLASS = "AutoModelForZeroShotImageClassification"
CLIP_NAMES = {"text": "text", "vision": "image", "audio": "audio"}  # kind -> CLIP's / CLAP's word


def clip_fields(kinds: dict[str, str], observed: dict[str, torch.Tensor], logits: dict) -> dict:
    """CLIP's and CLAP's output names: `text_embeds` / `image_embeds` / `audio_embeds` (the observed rows of the
    first modality of each kind), and when the batch holds a text-kind modality and exactly one other modality,
    `logits_per_text` [n_text, n_other] and `logits_per_image` or `logits_per_audio` [n_other, n_text]."""
    fields = {}
    firsts = {}
    for name in observed:
        if name in kinds:
            firsts.setdefault(kinds[name], name)
    for kind, name in firsts.items():
        fields[f"{CLIP_NAMES[kind]}_embeds"] = observed[name]
    others = [name for name in observed if kinds.get(name) != "text"]
    if "text" in firsts and len(others) == 1 and others[0] in kinds:
        text, other = firsts["text"], others[0]
        fields["logits_per_text"] = logits[f"logits_per_{text}_{other}"]
        fields[f"logits_per_{CLIP_NAMES[kinds[other]]}"] = logits[f"logits_per_{other}_{text}"]
    return fields


class CalMRLPreTrainedModel(PreTrainedModel):
    config: CalMRLConfig
    config_class = CalMRLConfig
    base_model_prefix = "calmrl"
    main_input_name = "modality_mask"
    supports_gradient_checkpointing = True
    # The PPCA parameters are closed-form statistics that bf16 would destroy. `_keep_in_fp32_modules` acts only
    # for fp16; the strict variant keeps them float32 under bf16 too (it also makes the module's integer buffers
    # float32, which is why the imputer's bookkeeping buffers are float).
    _keep_in_fp32_modules_strict = ["imputer"]

    # The attention implementations a CalMRL model supports are those all its towers support (the model has no
    # attention of its own but the matching head's, which runs on torch's scaled_dot_product_attention).
    @property
    def _supports_sdpa(self) -> bool:
        return towers_support(self.config, "_supports_sdpa")

    @property
    def _supports_flash_attn(self) -> bool:
        return towers_support(self.config, "_supports_flash_attn")

    @property
    def _supports_flex_attn(self) -> bool:
        return towers_support(self.config, "_supports_flex_attn")

    def _init_weights(self, module):
        if getattr(module, "_fusion_init", False):
            # the matching head's fusion encoder keeps PyTorch's init: N(0, initializer_range) on its Linear layers
            # starves the head of its condition signal (see `FusionEncoder.init_module`). Loaded weights are kept:
            # transformers guards torch's init functions during `initialize_weights`.
            FusionEncoder.init_module(module)
            return
        super()._init_weights(module)
        if isinstance(module, PPCAImputer):
            fresh = PPCAImputer(
                module.num_modalities, module.dim, module.latent_dim,
                noise_var_floor=self.config.imputer_noise_var_floor, modality_names=module.modality_names,
            ).to(module.weight.device)
            for name, buffer in fresh.named_buffers():
                init.copy_(getattr(module, name), buffer)
        elif isinstance(module, CalMRLModel):
            init.constant_(module.logit_scale, -math.log(self.config.temperature))
        elif is_lora_layer(module):
            # a fresh adapter starts as the identity: B = 0 (A keeps peft's own initialisation)
            for layer in module.lora_B.values():
                init.zeros_(layer.weight)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, and the package's pipeline tasks registered in the folder
        (`config.custom_pipelines` and the pipeline's code), so that `pipeline("zero-shot-multimodal-classification",
        model=folder, trust_remote_code=True)` works on every saved model (with its processor saved beside it)."""
        from .pipeline_calmrl import pipeline_tasks, save_pipeline_code

        self.config.custom_pipelines = pipeline_tasks()
        if self._auto_class is not None and {"text", "vision"} <= set(self.config.modality_kinds().values()):
            # transformers' own zero-shot-image-classification pipeline loads this auto class (the audio one AutoModel)
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}),
                                    ZERO_SHOT_IMAGE_AUTO_CLASS: f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"}
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            save_pipeline_code(save_directory)
        return result

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        """`PreTrainedModel.from_pretrained`, but strict: safetensors only, and a checkpoint that does not match
        the config is an error (`loading.load_strictly`), imputer buffers included, and so is a config whose
        modality order differs from the one the imputer was saved with."""
        model, info = load_strictly(super().from_pretrained, *args, **kwargs)
        model.imputer.check_modality_order()
        freeze_lora_towers(model.encoders, model.config.lora)  # loading re-creates the parameters
        return (model, info) if output_loading_info else model


class CalMRLModel(MatchingHeadMixin, CalMRLFeaturesMixin, CalMRLPreTrainedModel):
    """Towers for each modality, a projection head each, the PPCA imputer and the alignment objective; the CLIP-style
    `get_text_features` / `get_image_features` / `get_audio_features` come from `CalMRLFeaturesMixin`, the matching
    head's `matching_step` / `get_matching_tokens` / `rerank` from `MatchingHeadMixin`."""

    def __init__(self, config: CalMRLConfig, encoders: dict[str, PreTrainedModel] | None = None):
        r"""
        encoders (`dict[str, PreTrainedModel]`, *optional*): towers to use as they are (e.g. pretrained ones,
            as `from_encoders` passes them), by the modality they encode; the others are built from their configs.
        """
        super().__init__(config)
        self.encoders = build_towers(config, encoders or {})
        # device_map="auto" must not split a tower's layers either
        self._no_split_modules = {m for tower in self.encoders.values() for m in (tower._no_split_modules or [])}
        self.projections = nn.ModuleDict(
            {
                name: nn.Linear(config.get_encoder_width(name), config.projection_dim, bias=False)
                for name in config.modalities
            }
        )
        self.imputer = PPCAImputer(
            config.num_modalities,
            config.projection_dim,
            config.imputer_latent_dim,
            noise_var_floor=config.imputer_noise_var_floor,
            modality_names=config.modalities,
        )
        # log(1 / temperature), shape [1] as SigLIP's (FSDP refuses 0-dim parameters); `temperature` reads it
        self.logit_scale = nn.Parameter(torch.full((1,), -math.log(config.temperature)),
                                        requires_grad=config.learnable_temperature)
        if config.lora is not None:
            add_lora(self.encoders, config.lora)
        self.fusion = None
        if config.fusion_num_layers > 0:
            caption = config.matching_modality
            heads = config.fusion_num_attention_heads or getattr(config.get_encoder_config(caption),
                                                                 "num_attention_heads", 1)
            others = {m: config.get_encoder_width(m) for m in config.modalities if m != caption}
            self.fusion = FusionEncoder(config.get_encoder_width(caption), config.fusion_num_layers, heads, others,
                                        config.modalities, caption)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The text tower's token embeddings (the tower of `text`, or else of the anchor modality): what peft's
        `enable_input_require_grads` hooks for LoRA with gradient checkpointing."""
        return self._text_tower().get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self._text_tower().set_input_embeddings(value)

    def _text_tower(self) -> PreTrainedModel:
        text = "text" if "text" in self.config.modalities else self.config.anchor_modality
        return self.encoders[self.config.encoder_owner(text)]

    # ------------------------------------------------------------------ construction from towers
    @classmethod
    def from_encoders(
        cls,
        *,
        modalities: list[str] | None = None,
        shared_encoders: dict[str, str] | None = None,
        **kwargs,
    ) -> "CalMRLModel":
        """Build a CalMRLModel around pretrained towers, kept as they are (transformers' VisionTextDualEncoder idiom).

        Keyword arguments named after a modality give its tower: a local folder or Hub repo id (loaded with
        `AutoModel.from_pretrained`), a `PreTrainedModel` (e.g. `CLIPVisionModel.from_pretrained(...)` for a
        composite checkpoint), or a config (randomly initialised tower). Every other keyword argument goes to
        `CalMRLConfig`. Without `modalities`, the default modalities whose tower is given (or shared) are used.
        Each tower's config object becomes the model config's (`config.text_config is model.encoders["text"].config`).

        ```python
        >>> model = CalMRLModel.from_encoders(text="sentence-transformers/all-MiniLM-L6-v2", vision=vit_folder)
        ```
        """
        lora = kwargs.pop("lora", None)  # injected once the pretrained towers are in (keys change, B = 0)
        config, pretrained = config_from_towers(modalities, shared_encoders, kwargs)
        model = cls(config, encoders=pretrained)
        if lora is not None:
            model.config.lora = lora
            model.config._validate_calmrl()
            add_lora(model.encoders, lora)  # peft starts each adapter at B = 0: the tower is unchanged until trained
        return model

    @property
    def temperature(self) -> torch.Tensor:
        """The contrastive temperature exp(-logit_scale), 0-dim (the objectives clamp it to >= 1e-3)."""
        return torch.exp(-self.logit_scale).reshape(())

    def clamped_logit_scale(self) -> torch.Tensor:
        """log(1 / temperature) [()] with the temperature clamped as the objectives clamp it (CLIP's output field)."""
        return -torch.log(clamp_temperature(self.temperature))

    # ------------------------------------------------------------------ step 1: embed
    def embed_modalities(
        self, modality_mask: torch.Tensor | None = None, return_tokens: bool = False, **modality_inputs: torch.Tensor
    ):
        """Embed every observed modality of a batch.

        `modality_inputs` are named `{modality}_{field}` (e.g. `text_input_ids`, `vision_pixel_values`,
        `audio_input_values`) and hold the OBSERVED rows of that modality only, in batch order. `modality_mask`
        [B, k] says which rows observe which modality; without it, every given modality is taken as observed
        for all rows. Returns `(embeddings [B, k, D], modality_mask [B, k])`, zeros in missing slots, and with
        `return_tokens` a third element: {modality: (token states [n_m, L, H], token mask [n_m, L])}.
        """
        embeddings, modality_mask, outputs, _ = self._embed_batch(modality_mask, modality_inputs)
        if not return_tokens:
            return embeddings, modality_mask
        tokens = {name: (out.last_hidden_state, out.token_mask) for name, out in outputs.items()}
        return embeddings, modality_mask, tokens

    def _embed_batch(self, modality_mask: torch.Tensor | None, modality_inputs: dict, unpaired: bool = True):
        """(unit-norm embeddings [B, k, D], modality_mask [B, k], {modality: CalMRLModalityOutput}, the mask's
        `HostMask`) of a batch; `unpaired`: without a mask, modalities given with different numbers of rows are rows
        of their own."""
        modality_inputs, tower_flags = split_tower_flags(modality_inputs)
        modality_inputs = rename_clip_inputs(self.config.modality_kinds(), modality_inputs)  # CLIP's input_ids, ...
        grouped = group_inputs(self.config.modalities, modality_inputs)
        # the door: shapes and dtypes at once (free), every value check of the batch (mask row counts, ids in
        # range, NaN, mask rows of zeros) read with ONE device-to-host sync, all before any tower runs
        pending = []
        modality_mask = resolve_modality_mask(self.config.modalities, grouped, modality_mask, pending, unpaired)
        for name, inputs in grouped.items():
            pending += check_tower_inputs(name, self.encoders[self.config.encoder_owner(name)], inputs)
        host = self._read_on_host(modality_mask, pending)
        # the towers' outputs are checked (finite) with one read for all, or with the step's next (`forward`)
        with inputs_checked(list(grouped)), checks_read_together():
            embeddings, outputs = self._embed_checked(grouped, host, tower_flags)
        return embeddings, modality_mask, outputs, host

    def _embed_checked(self, grouped: dict, host: HostMask, tower_flags: dict):
        batch_size = host.device.shape[0]
        embeddings = None
        outputs: dict[str, CalMRLModalityOutput] = {}
        # with several processes every modality runs, in the config's order and entering the embeddings the same
        # way (the processes' collectives inside the towers, forward and backward, must come in the same order);
        # an absent one on a placeholder row whose zero-row slice is put in place (it adds nothing)
        for name in self.config.modalities:
            if name in grouped:
                outputs[name] = self._run_modality(name, grouped[name], tower_flags)
                features = F.normalize(outputs[name].pooler_output, dim=-1)  # [n_m, D]
            elif world_size() > 1:
                outputs[name], features = run_on_placeholder(  # [0, D]
                    functools.partial(self._run_modality, name, tower_kwargs={}),
                    self.encoders[self.config.encoder_owner(name)], host.device.device)
            else:
                continue
            index = self.config.modality_index(name)
            if embeddings is None:
                embeddings = features.new_zeros(batch_size, self.config.num_modalities, self.config.projection_dim)
            rows = host.rows(index).to(features.device)
            column = torch.full_like(rows, index)
            embeddings = embeddings.index_put((rows, column), features)  # [B, k, D], observed rows of modality
        return embeddings, outputs

    def _read_on_host(self, modality_mask: torch.Tensor, pending: Sequence[PendingCheck] = ()) -> HostMask:
        """The mask's `HostMask`: the mask and the imputer's fitted modalities (what the steps decide on) read with
        the door's `pending` checks, one sync."""
        mask_values, fitted = raise_bad_values(pending, reads=[modality_mask, self.imputer.fitted_modalities])
        self.imputer.remember_fitted(fitted)
        return HostMask(modality_mask, np.reshape(mask_values, modality_mask.shape))

    def _check_embeddings(self, embeddings: torch.Tensor, modality_mask: torch.Tensor) -> HostMask:
        """The door of embeddings [B, k, D] given to a step (not from `embed_modalities`): their shape and mask, and
        with a PPCA imputer the values it reads (`PPCAImputer.check_values`), read with the mask in one sync.
        Returns the mask's `HostMask`."""
        check_embeddings(embeddings, modality_mask, num_modalities=self.config.num_modalities,
                         dim=self.config.projection_dim, mask_optional=False, every_row_observed=False)
        checks = [empty_rows_check(modality_mask),
                  observed_embeddings_check(embeddings, modality_mask, self.config.modalities)]
        if self.config.imputer_method == "ppca":
            fitted = self.imputer.fitted_modalities.to(modality_mask.device)
            checks.append(self.imputer.values_check(embeddings, modality_mask & fitted))
        return self._read_on_host(modality_mask, [PendingCheck(*check) for check in checks])

    # ------------------------------------------------------------------ step 2: impute
    def impute_missing(
        self, embeddings: torch.Tensor, modality_mask: torch.Tensor, *, exclude_anchor: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill the missing embeddings as the config says; returns `(imputed [B, k, D], aligned_mask [B, k])`.

        `aligned_mask` marks the columns the objective uses: observed ones plus imputed ones. With `ppca` or `mean`,
        only modalities the imputer has been fitted on are imputed (a never-seen modality has no estimate yet).
        `exclude_anchor`: PPCA imputations are conditioned on the observed modalities other than the anchor
        (`config.impute_from_anchor = False`).
        """
        imputed, aligned = self._impute_batch(embeddings, self._check_embeddings(embeddings, modality_mask),
                                              exclude_anchor)
        return imputed, aligned.device

    def _impute_missing(self, embeddings: torch.Tensor, modality_mask: torch.Tensor, exclude_anchor: bool = False,
                        imputations: torch.Tensor | None = None, impute_modalities=None):
        """`impute_missing` unchecked, for embeddings made by the model (a teacher's): reads the mask back (one
        sync); `_impute_batch` is the same given the mask's host copy."""
        imputed, aligned = self._impute_batch(embeddings, self._read_on_host(modality_mask), exclude_anchor,
                                              imputations, impute_modalities)
        return imputed, aligned.device

    def _impute_batch(self, embeddings: torch.Tensor, host: HostMask, exclude_anchor: bool = False,
                      imputations: torch.Tensor | None = None,
                      impute_modalities: torch.Tensor | Sequence[bool] | None = None) -> tuple[torch.Tensor, HostMask]:
        """(imputed [B, k, D], the aligned mask's `HostMask`) of embeddings whose mask `host` holds, nothing read
        back (`impute_missing`'s steps)."""
        method = self.config.imputer_method
        if method == "none":
            return embeddings, host
        modality_mask = host.device
        allowed = self._imputable_columns(impute_modalities, modality_mask.device)  # [k]
        if method == "zero":  # the missing slots already hold zeros
            return embeddings, host | allowed
        fitted = self.imputer.fitted_on_host(modality_mask.device)  # [k]
        conditioning = host & fitted
        if exclude_anchor and method == "ppca":
            conditioning = conditioning.with_column(self.config.modality_index(self.config.anchor_modality), False)
        imputable = conditioning.any_per_row()  # rows with at least one fitted observed modality
        imputed_columns = fitted & allowed
        aligned = host | HostMask(imputed_columns.device & imputable.device.unsqueeze(1),
                                  imputed_columns.values & imputable.values[:, None])
        if (aligned.values == host.values).all():
            return embeddings, host
        if imputations is not None:  # made outside the model (a teacher's), never from the row's own embeddings
            imputed = imputations.detach().to(embeddings.dtype)
        elif method == "ppca":
            source = embeddings if self.config.impute_with_grad else embeddings.detach()
            # z^_{m'} = W_{m'} m_i + mu_{m'}, m_i the posterior mean of the shared latent (imputer.py)
            rows, conditioning = imputable.rows(), conditioning.select_rows(imputable)
            imputed = torch.zeros_like(embeddings)
            imputed[rows] = self.imputer._impute(source[rows], conditioning.device, host_mask=conditioning)
        else:  # "mean": the marginal mean mu_{m'} of the modality
            imputed = self.imputer.mean.to(embeddings.dtype).unsqueeze(0).expand_as(embeddings)
        if self.config.renormalize_imputed:
            imputed = F.normalize(imputed, dim=-1)
        filled = torch.where(aligned.device.unsqueeze(-1), imputed, torch.zeros_like(imputed))
        return torch.where(modality_mask.unsqueeze(-1), embeddings, filled), aligned

    def _imputable_columns(self, impute_modalities: torch.Tensor | Sequence[bool] | None,
                           device: torch.device) -> HostMask:
        """The modalities [k] that may get imputed columns: all (None), or the flags given (a tensor is read back:
        pass a sequence of bools to read nothing)."""
        k = self.config.num_modalities
        if impute_modalities is None:
            return HostMask(torch.ones(k, dtype=torch.bool, device=device), np.ones(k, dtype=bool))
        if isinstance(impute_modalities, torch.Tensor):
            return HostMask.read(impute_modalities.to(device))
        if len(impute_modalities) != k:
            raise ValueError(f"impute_modalities has {len(impute_modalities)} flags for the {k} modalities "
                             f"{list(self.config.modalities)}.")
        return HostMask.constant(impute_modalities, device)

    # ------------------------------------------------------------------ step 3: align
    def alignment_loss(self, embeddings: torch.Tensor, aligned_mask: torch.Tensor) -> torch.Tensor:
        """The configured objective (`alignment.OBJECTIVES[config.alignment_objective]`) on [B, k, D] embeddings
        over the columns of `aligned_mask`; contrastive objectives use the model's (clamped) temperature."""
        check_embeddings(embeddings, aligned_mask, mask_name="aligned_mask", num_modalities=self.config.num_modalities,
                         dim=self.config.projection_dim, mask_optional=False, every_row_observed=False)
        host = self._read_on_host(aligned_mask, [PendingCheck(*empty_rows_check(aligned_mask, "aligned_mask"))])
        return self._alignment_loss(embeddings, aligned_mask, host)

    # Objective.loss's signature; None: OBJECTIVES[config.alignment_objective].loss (training.compile_model: compiled)
    objective_loss_fn: Callable | None = None

    def _alignment_loss(self, embeddings: torch.Tensor, aligned_mask: torch.Tensor,
                        host: HostMask | None = None) -> torch.Tensor:
        """The objective given, or not (`host`: nothing read back), the aligned mask's host copy."""
        all_aligned = bool(aligned_mask.all()) if host is None else host.all
        if self.objective_loss_fn is not None:  # compiled (`training.compile_model`): the mask on the device only
            return self.objective_loss_fn(embeddings, None if all_aligned else aligned_mask, self.config,
                                          self.temperature)
        if all_aligned:
            return OBJECTIVES[self.config.alignment_objective].loss(embeddings, None, self.config, self.temperature)
        return OBJECTIVES[self.config.alignment_objective].loss(embeddings, aligned_mask, self.config, self.temperature,
                                                                host_mask=host)

    @torch.no_grad()
    def encode(self, modality_mask: torch.Tensor | None = None, **modality_inputs: torch.Tensor) -> CalMRLEncoding:
        """Embed any subset of modalities, impute the missing ones with their uncertainty, and fuse them.

        ```python
        >>> enc = model.encode(**processor(text=["a dog barks"], audio=[waveform]))   # no video
        >>> enc.imputed_embeddings[:, 0]          # the imputed vision embedding
        >>> enc.imputation_variance[:, 0]         # and how uncertain it is
        >>> enc.fused_embeddings                  # one query for text + audio (+ imputed vision, subtitle)
        ```
        """
        embeddings, _, _, host = self._embed_batch(modality_mask, modality_inputs)
        return self._encode_embeddings(embeddings, host)

    @torch.no_grad()
    def encode_embeddings(self, embeddings: torch.Tensor, modality_mask: torch.Tensor) -> CalMRLEncoding:
        """What `encode` gives, from embeddings [B, k, D] computed before (`embed_modalities`, `calmrl embed`):
        the missing ones imputed as the config says (fitted modalities only, renormalised), their posterior
        variance, and the fused embedding. `calmrl impute` runs this."""
        return self._encode_embeddings(embeddings, self._check_embeddings(embeddings, modality_mask))

    def _encode_embeddings(self, embeddings: torch.Tensor, host: HostMask) -> CalMRLEncoding:
        modality_mask = host.device
        imputed, aligned = self._impute_batch(embeddings, host)
        imputed_mask = aligned & ~host
        variance = torch.zeros(modality_mask.shape, dtype=embeddings.dtype, device=embeddings.device)
        conditioning = host & self.imputer.fitted_on_host(modality_mask.device)
        rows = conditioning.any_per_row() & imputed_mask.any_per_row()
        if self.config.imputer_method == "ppca" and rows.any:
            index, conditioning = rows.rows(), conditioning.select_rows(rows)
            variance[index] = self.imputer._imputation_variance(embeddings[index], conditioning.device,
                                                                conditioning).to(variance.dtype)
            variance = torch.where(imputed_mask.device, variance, torch.zeros_like(variance))
        _, fused = _gram_singular_values(imputed, aligned.device)
        return CalMRLEncoding(embeddings=embeddings, modality_mask=modality_mask, imputed_embeddings=imputed,
                              imputed_mask=imputed_mask.device, imputation_variance=variance,
                              fused_embeddings=F.normalize(fused, dim=-1))

    @can_return_tuple
    def forward(
        self,
        modality_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        imputer_update_fn: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
        imputations: torch.Tensor | None = None,
        impute_modalities: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CalMRLOutput:
        r"""
        Args:
            modality_mask (`torch.BoolTensor` of shape `[B, k]`, *optional*):
                True where row b observes modality m (order: `config.modalities`). Defaults to all given modalities
                observed for every row.
            return_loss (`bool`, *optional*): compute the alignment loss (as CLIP's `return_loss`, none unless
                asked; the training loop asks).
            imputer_update_fn (`Callable`, *optional*):
                Called with the detached embeddings [B, k, D] and the mask before imputation: the imputer step of
                CalMRL's bi-step (the training loop passes one that accumulates statistics and runs the M-step).
                The towers' outputs are checked (finite) by the first read after the towers: one the function makes
                with `modality_inputs.raise_bad_values(take_deferred_checks(), ...)`, else right after it returns;
                `host_mask.host_mask_of(mask)` gives the mask's host copy without reading it back.
            imputations (`torch.FloatTensor` of shape `[B, k, D]`, *optional*):
                Values for the missing slots made outside the model, e.g. a teacher's PPCA posterior from its own
                embeddings of the row (`CalMRLTrainingArguments.imputation_source="teacher"`); used detached instead
                of the model's imputation of the row from its own embeddings (which the towers could learn to agree
                with). The slots imputed are the same: missing, fitted, and in `impute_modalities`.
            impute_modalities (`torch.BoolTensor` of shape `[k]` or a sequence of k bools, *optional*):
                The modalities that may get imputed columns (default: every modality the imputer is fitted on, the
                paper's); the training loop passes those whose towers train on the run's data, as bools (a tensor
                is read back to the host, a device-to-host sync).
            **kwargs: `{modality}_{field}` tensors holding the observed rows of each modality, e.g.
                `text_input_ids`, `text_attention_mask`, `vision_pixel_values` ([n, C, H, W] or video
                [n, T, C, H, W]), `audio_input_values`; and `output_hidden_states` / `output_attentions` for the
                towers (in `<modality>_model_output`), `return_dict`.

        ```python
        >>> out = model(**processor(text=["a dog barks", "a cat"], vision=[video_1, video_2]), return_loss=True)
        >>> out.loss.backward()
        >>> out.logits_per_text_vision.softmax(dim=1)   # [2 texts, 2 videos]
        ```
        """
        with_matching = bool(return_loss) and self.fusion is not None and self.config.matching_weight > 0
        with checks_read_together():  # the towers' output checks: read with the imputer step's values (one read)
            # a loss pairs rows: without a mask, modalities of different row counts are refused then
            embeddings, modality_mask, tower_outputs, host = self._embed_batch(modality_mask, kwargs,
                                                                               unpaired=not return_loss)
            if imputer_update_fn is not None:
                with host_mask_known(host):
                    imputer_update_fn(embeddings.detach(), modality_mask)
        # the batch was validated where it entered (`_embed_batch`): the steps run unchecked, on its mask's host copy
        imputed, aligned = self._impute_batch(embeddings, host, not self.config.impute_from_anchor, imputations,
                                              impute_modalities)
        aligned_mask = aligned.device
        singular_values, anchor_embeddings = _gram_singular_values(imputed, aligned_mask)
        loss = alignment = matching = None
        if return_loss:
            loss = alignment = self._alignment_loss(imputed, aligned_mask, aligned)
            if with_matching:  # on observed modalities only (imputed embeddings have no tokens)
                tokens = {name: (out.last_hidden_state, out.token_mask) for name, out in tower_outputs.items()}
                matching = self.matching_step(embeddings, modality_mask, tokens)
                if matching is not None:
                    loss = alignment + self.config.matching_weight * matching
        logit_scale = self.clamped_logit_scale()
        columns = {name: self.config.modality_index(name) for name in tower_outputs}
        observed = {name: embeddings[host.rows(i), i] for name, i in columns.items()}  # [n_m, D] each
        # CLIP's logits_per_text: exp(logit_scale) <text, image>, here for every ordered pair of observed modalities
        logits = {f"logits_per_{a}_{b}": logit_scale.exp() * observed[a] @ observed[b].T  # [n_a, n_b]
                  for a in observed for b in observed if a != b}
        logits.update(clip_fields(self.config.modality_kinds(), observed, logits))
        return CalMRLOutput(loss=loss, alignment_loss=alignment, matching_loss=matching, embeddings=embeddings,
                            modality_mask=modality_mask, imputed_embeddings=imputed, aligned_mask=aligned_mask,
                            singular_values=singular_values, anchor_embeddings=anchor_embeddings,
                            logit_scale=logit_scale, **logits,
                            **{f"{name}_model_output": out for name, out in tower_outputs.items()})


__all__ = ["CalMRLEncoding", "CalMRLModel", "CalMRLOutput", "CalMRLPreTrainedModel"]
