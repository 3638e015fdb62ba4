"""CalMRL model: modality towers -> projection -> unit-norm embeddings -> PPCA imputation -> alignment.

The data flow of one forward pass, each arrow one method you can find by name (the files they lean on in
brackets):

    inputs ──embed_modalities──> embeddings [B, k, D] + modality_mask [B, k]   (modality_inputs, towers)
           ──impute_missing────> imputed_embeddings [B, k, D] + aligned_mask [B, k]   (imputer)
           ──alignment_loss────> loss   (alignment.OBJECTIVES; plus the matching head's term: fusion)

Loading rules live in `loading.py`, LoRA adapters in `lora.py`.

Reference: Liu et al., "Calibrated Multimodal Representation Learning with Missing Modalities", ICML 2026
(arXiv 2511.12034).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .alignment import OBJECTIVES, gram_singular_values
from .configuration_calmrl import DEFAULT_MODALITIES, DEFAULT_SHARED_ENCODERS, CalMRLConfig
from .feature_encoder import FeatureEncoderConfig, FeatureEncoderModel
from .fusion import FusionEncoder
from .imputer import PPCAImputer
from .loading import load_strictly, load_tower
from .lora import add_lora, freeze_lora_towers, is_lora_layer
from .modality_inputs import check_feature_inputs, check_finite_embeddings, group_inputs, resolve_modality_mask
from .towers import run_tower
from .validation import check_embeddings


AutoModel.register(FeatureEncoderConfig, FeatureEncoderModel, exist_ok=True)
# Saved before the imputer recorded its modality order: such checkpoints still load (the order is not checked).
LEGACY_OPTIONAL_KEYS = ("imputer.modality_codes",)


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


class CalMRLPreTrainedModel(PreTrainedModel):
    config: CalMRLConfig
    config_class = CalMRLConfig
    base_model_prefix = "calmrl"
    main_input_name = "modality_mask"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # The PPCA parameters are closed-form statistics that bf16 would destroy. `_keep_in_fp32_modules` acts only
    # for fp16; the strict variant keeps them float32 under bf16 too (it also makes the module's integer buffers
    # float32, which is why the imputer's bookkeeping buffers are float).
    _keep_in_fp32_modules_strict = ["imputer"]
    # Checkpoints saved before the imputer dropped its write-only `num_observed` buffer still load.
    _keys_to_ignore_on_load_unexpected = [r"^imputer\.num_observed$"]

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
            init.constant_(module.temperature, self.config.temperature)
        elif is_lora_layer(module):
            # a fresh adapter starts as the identity: B = 0 (A keeps peft's own initialisation)
            for layer in module.lora_B.values():
                init.zeros_(layer.weight)

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        """`PreTrainedModel.from_pretrained`, but strict: safetensors only, and a checkpoint that does not match
        the config is an error (`loading.load_strictly`), imputer buffers included, and so is a config whose
        modality order differs from the one the imputer was saved with."""
        model, info = load_strictly(super().from_pretrained, *args, optional_keys=LEGACY_OPTIONAL_KEYS, **kwargs)
        if "imputer.modality_codes" not in info.get("missing_keys", ()):
            model.imputer.check_modality_order()
        freeze_lora_towers(model.encoders, model.config.lora)  # loading re-creates the parameters
        return (model, info) if output_loading_info else model


class CalMRLModel(CalMRLPreTrainedModel):
    """Towers for each modality, a projection head each, the PPCA imputer and the alignment objective."""

    def __init__(self, config: CalMRLConfig):
        super().__init__(config)
        self.encoders = nn.ModuleDict(
            {name: AutoModel.from_config(config.get_encoder_config(name)) for name in config.encoder_configs}
        )
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
        self.temperature = nn.Parameter(
            torch.tensor(float(config.temperature)), requires_grad=config.learnable_temperature
        )
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

    # ------------------------------------------------------------------ construction from towers
    @classmethod
    def from_encoders(
        cls,
        *,
        modalities: list[str] | None = None,
        shared_encoders: dict[str, str] | None = None,
        **kwargs,
    ) -> "CalMRLModel":
        """Build a CalMRLModel around pretrained towers.

        Keyword arguments named after a modality give its tower: a local folder or Hub repo id (loaded with
        `AutoModel.from_pretrained`), a `PreTrainedModel` (e.g. `CLIPVisionModel.from_pretrained(...)` for a
        composite checkpoint), or a config (randomly initialised tower). Every other keyword argument goes to
        `CalMRLConfig`. Without `modalities`, the default modalities whose tower is given (or shared) are used.

        ```python
        >>> model = CalMRLModel.from_encoders(text="sentence-transformers/all-MiniLM-L6-v2", vision=vit_folder)
        ```
        """
        known = list(modalities) if modalities is not None else list(DEFAULT_MODALITIES)
        towers = {name: kwargs.pop(name) for name in list(kwargs) if name in known}
        if not towers:
            raise ValueError(f"from_encoders needs at least one tower, given as a keyword argument named after a "
                             f"modality ({known}).")
        if shared_encoders is None:
            shared_encoders = {m: t for m, t in DEFAULT_SHARED_ENCODERS.items() if t in towers and m in known}
        if modalities is None:
            modalities = [m for m in DEFAULT_MODALITIES if m in towers or m in shared_encoders]
        lora = kwargs.pop("lora", None)  # injected after the pretrained weights are in (keys change, B = 0)
        loaded = {name: load_tower(name, spec) for name, spec in towers.items()}
        config = CalMRLConfig(
            modalities=modalities,
            encoder_configs={
                name: tower.config if isinstance(tower, PreTrainedModel) else tower for name, tower in loaded.items()
            },
            shared_encoders=shared_encoders,
            **kwargs,
        )
        model = cls(config)
        for name, tower in loaded.items():
            if isinstance(tower, PreTrainedModel):
                model.encoders[name].load_state_dict(tower.state_dict())
        if lora is not None:
            model.config.lora = lora
            model.config._validate_calmrl()
            add_lora(model.encoders, lora)  # peft starts each adapter at B = 0: the tower is unchanged until trained
        return model

    # ------------------------------------------------------------------ one modality
    def get_modality_features(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings [n, D] of one modality, in the manner of CLIP's `get_text_features`.

        ```python
        >>> text_embeds = model.get_modality_features("text", input_ids=ids, attention_mask=mask)
        >>> video_embeds = model.get_modality_features("vision", pixel_values=frames)  # [n, T, C, H, W]
        ```
        """
        return self._embed_modality(name, inputs)[0]

    def _embed_modality(self, name: str, inputs: dict[str, torch.Tensor]):
        """(unit-norm embeddings [n, D], token states [n, L, H], token mask [n, L]) of one modality's n rows: its
        tower (`towers.run_tower`, pooled as `config.pooling[name]` says), then its projection head."""
        self.config.modality_index(name)
        check_feature_inputs(name, inputs)
        tower = self.encoders[self.config.encoder_owner(name)]
        pooled, tokens, token_mask = run_tower(tower, self.config.pooling[name], name, inputs)
        projected = self.projections[name](pooled)  # [n, D]
        check_finite_embeddings(name, projected)
        return F.normalize(projected, dim=-1), tokens, token_mask

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
        grouped = group_inputs(self.config.modalities, modality_inputs)
        modality_mask = resolve_modality_mask(self.config.modalities, grouped, modality_mask)
        batch_size = modality_mask.shape[0]
        embeddings = None
        tokens = {}
        for name, inputs in grouped.items():
            index = self.config.modality_index(name)
            features, states, state_mask = self._embed_modality(name, inputs)  # [n_m, D], [n_m, L, H], [n_m, L]
            if return_tokens:
                tokens[name] = (states, state_mask)
            if embeddings is None:
                embeddings = features.new_zeros(batch_size, self.config.num_modalities, self.config.projection_dim)
            rows = modality_mask[:, index].nonzero().squeeze(1).to(features.device)
            column = torch.full_like(rows, index)
            embeddings = embeddings.index_put((rows, column), features)  # [B, k, D], observed rows of modality
        return (embeddings, modality_mask, tokens) if return_tokens else (embeddings, modality_mask)

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
        method = self.config.imputer_method
        if method == "none":
            return embeddings, modality_mask
        if method == "zero":
            return embeddings, torch.ones_like(modality_mask)
        fitted = self.imputer.fitted_modalities.to(modality_mask.device)  # [k]
        conditioning_mask = modality_mask & fitted
        if exclude_anchor and method == "ppca":
            conditioning_mask[:, self.config.modality_index(self.config.anchor_modality)] = False
        imputable_rows = conditioning_mask.any(dim=1)  # rows with at least one fitted observed modality
        aligned_mask = modality_mask | (fitted & imputable_rows.unsqueeze(1))
        if bool((aligned_mask == modality_mask).all()):
            return embeddings, modality_mask
        if method == "ppca":
            source = embeddings if self.config.impute_with_grad else embeddings.detach()
            # z^_{m'} = W_{m'} m_i + mu_{m'}, m_i the posterior mean of the shared latent (imputer.py)
            imputed = torch.zeros_like(embeddings)
            imputed[imputable_rows] = self.imputer.impute(source[imputable_rows], conditioning_mask[imputable_rows])
        else:  # "mean": the marginal mean mu_{m'} of the modality
            imputed = self.imputer.mean.to(embeddings.dtype).unsqueeze(0).expand_as(embeddings)
        if self.config.renormalize_imputed:
            imputed = F.normalize(imputed, dim=-1)
        filled = torch.where(aligned_mask.unsqueeze(-1), imputed, torch.zeros_like(imputed))
        return torch.where(modality_mask.unsqueeze(-1), embeddings, filled), aligned_mask

    # ------------------------------------------------------------------ step 3: align
    def alignment_loss(self, embeddings: torch.Tensor, aligned_mask: torch.Tensor) -> torch.Tensor:
        """The configured objective (`alignment.OBJECTIVES[config.alignment_objective]`) on [B, k, D] embeddings
        over the columns of `aligned_mask`; contrastive objectives use the model's (clamped) temperature."""
        mask = None if bool(aligned_mask.all()) else aligned_mask
        return OBJECTIVES[self.config.alignment_objective].loss(embeddings, mask, self.config, self.temperature)

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
        embeddings, modality_mask = self.embed_modalities(modality_mask, **modality_inputs)
        return self.encode_embeddings(embeddings, modality_mask)

    @torch.no_grad()
    def encode_embeddings(self, embeddings: torch.Tensor, modality_mask: torch.Tensor) -> CalMRLEncoding:
        """What `encode` gives, from embeddings [B, k, D] computed before (`embed_modalities`, `calmrl embed`):
        the missing ones imputed as the config says (fitted modalities only, renormalised), their posterior
        variance, and the fused embedding. `calmrl impute` runs this."""
        check_embeddings(embeddings, modality_mask, num_modalities=self.config.num_modalities,
                         dim=self.config.projection_dim, mask_optional=False)
        imputed, aligned_mask = self.impute_missing(embeddings, modality_mask)
        imputed_mask = aligned_mask & ~modality_mask
        variance = torch.zeros(modality_mask.shape, dtype=embeddings.dtype, device=embeddings.device)
        conditioning = modality_mask & self.imputer.fitted_modalities.to(modality_mask.device)
        rows = conditioning.any(dim=1) & imputed_mask.any(dim=1)
        if self.config.imputer_method == "ppca" and bool(rows.any()):
            variance[rows] = self.imputer.imputation_variance(embeddings[rows], conditioning[rows]).to(variance.dtype)
            variance = torch.where(imputed_mask, variance, torch.zeros_like(variance))
        _, fused = gram_singular_values(imputed, aligned_mask)
        return CalMRLEncoding(embeddings=embeddings, modality_mask=modality_mask, imputed_embeddings=imputed,
                              imputed_mask=imputed_mask, imputation_variance=variance,
                              fused_embeddings=F.normalize(fused, dim=-1))

    # ------------------------------------------------------------------ matching head (fusion.py)
    def matching_step(self, embeddings: torch.Tensor, modality_mask: torch.Tensor, tokens: dict):
        """The matching term with hard negatives (`FusionEncoder.matching_step`), drawn from the batch of every
        process when `config.gather_across_processes`; None when fewer than two rows qualify."""
        return self.fusion.matching_step(embeddings, modality_mask, tokens, self.temperature,
                                         gather=self.config.gather_across_processes)

    @torch.no_grad()
    def matching_scores(self, caption_inputs: dict[str, torch.Tensor],
                        condition_inputs: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        """P(match) [n] of n (caption, condition) pairs, row by row, for re-ranking retrieval candidates.

        `caption_inputs` are the caption modality's inputs (e.g. input_ids, attention_mask) with n rows;
        `condition_inputs` maps each condition modality to its inputs with n rows (all observed).
        """
        if self.fusion is None:
            raise ValueError("This model has no matching head: set fusion_num_layers > 0 in its config.")
        _, caption_states, caption_mask = self._embed_modality(self.config.matching_modality, caption_inputs)
        tokens = {name: self._embed_modality(name, inputs)[1:] for name, inputs in condition_inputs.items()}
        return self.fusion.match_probability(caption_states, caption_mask, tokens)

    def forward(
        self,
        modality_mask: torch.Tensor | None = None,
        return_loss: bool = True,
        imputer_update_fn: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
        **modality_inputs: torch.Tensor,
    ) -> CalMRLOutput:
        r"""
        Args:
            modality_mask (`torch.BoolTensor` of shape `[B, k]`, *optional*):
                True where row b observes modality m (order: `config.modalities`). Defaults to all given modalities
                observed for every row.
            return_loss (`bool`, *optional*, defaults to `True`): compute the alignment loss.
            imputer_update_fn (`Callable`, *optional*):
                Called with the detached embeddings [B, k, D] and the mask before imputation: the imputer step of
                CalMRL's bi-step (the training loop passes one that accumulates statistics and runs the M-step).
            **modality_inputs: `{modality}_{field}` tensors holding the observed rows of each modality, e.g.
                `text_input_ids`, `text_attention_mask`, `vision_pixel_values` ([n, C, H, W] or video
                [n, T, C, H, W]), `audio_input_values`.

        ```python
        >>> out = model(modality_mask=mask, text_input_ids=ids, text_attention_mask=att, vision_pixel_values=px)
        >>> out.loss.backward()
        ```
        """
        with_matching = return_loss and self.fusion is not None and self.config.matching_weight > 0
        embeddings, modality_mask, *tokens = self.embed_modalities(modality_mask, return_tokens=with_matching,
                                                                   **modality_inputs)
        if imputer_update_fn is not None:
            imputer_update_fn(embeddings.detach(), modality_mask)
        imputed, aligned_mask = self.impute_missing(embeddings, modality_mask,
                                                    exclude_anchor=not self.config.impute_from_anchor)
        singular_values, anchor_embeddings = gram_singular_values(imputed, aligned_mask)
        loss = alignment = matching = None
        if return_loss:
            loss = alignment = self.alignment_loss(imputed, aligned_mask)
            if with_matching:  # on observed modalities only (imputed embeddings have no tokens)
                matching = self.matching_step(embeddings, modality_mask, tokens[0])
                if matching is not None:
                    loss = alignment + self.config.matching_weight * matching
        return CalMRLOutput(
            loss=loss,
            alignment_loss=alignment,
            matching_loss=matching,
            embeddings=embeddings,
            modality_mask=modality_mask,
            imputed_embeddings=imputed,
            aligned_mask=aligned_mask,
            singular_values=singular_values,
            anchor_embeddings=anchor_embeddings,
        )


__all__ = ["CalMRLEncoding", "CalMRLModel", "CalMRLOutput", "CalMRLPreTrainedModel"]
