"""CalMRL model: modality towers -> projection -> unit-norm embeddings -> PPCA imputation -> alignment.

The data flow of one forward pass, each arrow one method you can find by name:

    inputs ──embed_modalities──> embeddings [B, k, D] + modality_mask [B, k]
           ──impute_missing────> imputed_embeddings [B, k, D] + aligned_mask [B, k]
           ──alignment_loss────> loss

Reference: Liu et al., "Calibrated Multimodal Representation Learning with Missing Modalities", ICML 2026
(arXiv 2511.12034).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .alignment import (
    anchor_infonce_loss,
    gram_loss,
    gram_singular_values,
    pairwise_infonce_loss,
    pmrl_loss,
    triangle_loss,
)
from .collective import gather_padded, gather_with_grad, world_size
from .configuration_calmrl import DEFAULT_MODALITIES, DEFAULT_SHARED_ENCODERS, CalMRLConfig
from .feature_encoder import FeatureEncoderConfig, FeatureEncoderModel
from .fusion import FusionEncoder, matching_loss, sample_hard_negatives
from .imputer import PPCAImputer


AutoModel.register(FeatureEncoderConfig, FeatureEncoderModel, exist_ok=True)

# Inputs whose values are ids or masks, not features: they are never checked for NaN.
_INTEGER_LIKE_FIELDS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# Temperatures are clamped here so a learnable one can never reach zero (GRAM leaves it unclamped).
_MIN_TEMPERATURE = 1e-3


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
    # The PPCA parameters are closed-form statistics: bf16 would destroy them (HF-NOTES: `_strict` also for bf16).
    _keep_in_fp32_modules_strict = ["imputer"]

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
                module.num_modalities, module.dim, module.latent_dim, noise_var_floor=self.config.imputer_noise_var_floor
            ).to(module.weight.device)
            for name, buffer in fresh.named_buffers():
                init.copy_(getattr(module, name), buffer)
        elif isinstance(module, CalMRLModel):
            init.constant_(module.temperature, self.config.temperature)
        elif type(module).__module__.startswith("peft.") and hasattr(module, "lora_B"):
            # a fresh adapter starts as the identity: B = 0 (A keeps peft's own initialisation)
            for layer in module.lora_B.values():
                init.zeros_(layer.weight)


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
        )
        self.temperature = nn.Parameter(
            torch.tensor(float(config.temperature)), requires_grad=config.learnable_temperature
        )
        if config.lora is not None:
            self._add_lora(config.lora)
        self.fusion = None
        if config.fusion_num_layers > 0:
            caption_config = config.get_encoder_config(config.matching_modality)
            width = config.get_encoder_width(config.matching_modality)
            heads = config.fusion_num_attention_heads or getattr(caption_config, "num_attention_heads", 1)
            others = {m: config.get_encoder_width(m) for m in config.modalities
                      if m != config.matching_modality}
            self.fusion = FusionEncoder(width, config.fusion_num_layers, heads, others, config.num_modalities)
        self.post_init()

    def _add_lora(self, settings: dict) -> None:
        """Inject LoRA adapters (peft) into the named towers and freeze those towers' base weights."""
        from peft import LoraConfig, inject_adapter_in_model

        lora_config = LoraConfig(r=settings.get("r", 8), lora_alpha=settings.get("alpha", 16),
                                 lora_dropout=settings.get("dropout", 0.0),
                                 target_modules=list(settings["target_modules"]))
        for name in settings["modalities"]:
            inject_adapter_in_model(lora_config, self.encoders[name])
        self._freeze_lora_towers()

    def _freeze_lora_towers(self) -> None:
        """Only the adapters of LoRA towers train (also after loading, which re-creates parameters)."""
        for name in (self.config.lora or {}).get("modalities", []):
            for parameter_name, parameter in self.encoders[name].named_parameters():
                parameter.requires_grad = "lora_" in parameter_name

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
        loaded = {name: _load_tower(name, spec) for name, spec in towers.items()}
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
            model._add_lora(lora)  # peft starts each adapter at B = 0: the tower is unchanged until trained
        return model

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but a checkpoint that does not match the config is an error.

        transformers only logs missing or unexpected keys (and leaves garbage in the missing ones); a CalMRL
        checkpoint must load completely, imputer buffers included.
        """
        return_info = kwargs.pop("output_loading_info", False)
        if kwargs.get("use_safetensors") is False:
            raise ValueError("CalMRL checkpoints load from safetensors only (pickle files are never unpickled).")
        kwargs["use_safetensors"] = True
        location = Path(str(args[0])) if args else None
        if location is not None and location.is_dir() and not list(location.glob("*.safetensors")):
            pickles = sorted(p.name for p in location.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
            raise ValueError(f"{location} has no safetensors weights{f' (only {pickles})' if pickles else ''}; "
                             f"CalMRL refuses to unpickle checkpoints. Convert them to safetensors first.")
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except SafetensorError as error:
            raise ValueError(f"The safetensors weights of {args[0] if args else 'the checkpoint'} are corrupt or "
                             f"tampered with: {error}") from error
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            raise ValueError(
                f"The checkpoint does not match the model config (tensor shapes differ): {error}"
            ) from error
        problems = {key: sorted(info.get(key) or []) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {key: value for key, value in problems.items() if value}
        if problems:
            details = "; ".join(f"{key}: {value[:8]}{' ...' if len(value) > 8 else ''}" for key, value in problems.items())
            raise ValueError(
                f"The checkpoint does not match the model config ({details}). Check that the config's modalities, "
                f"encoders, projection_dim and imputer_latent_dim are those the checkpoint was saved with."
            )
        model._freeze_lora_towers()
        return (model, info) if return_info else model

    # ------------------------------------------------------------------ towers
    def _run_tower(self, name: str, inputs: dict[str, torch.Tensor]):
        """Tower of modality `name`: pooled features [n, H], token states [n, L, H] and their bool mask [n, L].

        A video [n, T, C, H, W] runs frame by frame: pooled features are averaged over its T frames, token states
        are the T frames' tokens one after the other [n, T * L, H].
        """
        tower = self.encoders[self.config.encoder_owner(name)]
        pixel_values = inputs.get("pixel_values")
        num_frames = None
        if pixel_values is not None and pixel_values.dim() == 5:
            num_frames = pixel_values.shape[1]
            inputs = {**inputs, "pixel_values": pixel_values.flatten(0, 1)}  # [n * T, C, H, W]
        outputs = tower(**inputs, return_dict=True)
        attention_mask = inputs.get("attention_mask")
        tokens = outputs.last_hidden_state  # [n (* T), L, H]
        if tokens.dim() == 4:  # convolutional towers (ResNet, ConvNext): feature map [n, C, h, w] -> [n, h * w, C]
            tokens = tokens.flatten(2).transpose(1, 2)
        pooled = self._pool(name, tower, outputs, tokens, attention_mask)
        if attention_mask is not None and attention_mask.shape == tokens.shape[:2]:
            token_mask = attention_mask.bool()
        else:
            token_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if num_frames is not None:
            pooled = pooled.unflatten(0, (-1, num_frames)).mean(dim=1)  # mean over frames
            tokens = tokens.unflatten(0, (-1, num_frames)).flatten(1, 2)  # [n, T * L, H]
            token_mask = token_mask.unflatten(0, (-1, num_frames)).flatten(1, 2)
        return pooled, tokens, token_mask

    def _pool(self, name: str, tower: nn.Module, outputs, hidden: torch.Tensor,
              attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Pooled features [n, H] of token states `hidden` [n, L, H] (or the tower's pooler output)."""
        mode = self.config.pooling[name]
        if mode == "pooler":
            if getattr(outputs, "pooler_output", None) is None:
                raise ValueError(f"pooling[{name!r}] = 'pooler' but the {type(tower).__name__} tower has no pooler_output.")
            return outputs.pooler_output.flatten(1)  # convolutional towers pool to [n, C, 1, 1]
        if mode == "cls":
            return hidden[:, 0]
        if attention_mask is not None and attention_mask.shape[1] != hidden.shape[1]:
            # e.g. Wav2Vec2: the mask covers audio samples, the features are frames
            if hasattr(tower, "_get_feature_vector_attention_mask"):
                attention_mask = tower._get_feature_vector_attention_mask(hidden.shape[1], attention_mask)
            else:
                attention_mask = None
        if attention_mask is None:
            return hidden.mean(dim=1)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [n, L, 1]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def get_modality_features(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings [n, D] of one modality, in the manner of CLIP's `get_text_features`.

        ```python
        >>> text_embeds = model.get_modality_features("text", input_ids=ids, attention_mask=mask)
        >>> video_embeds = model.get_modality_features("vision", pixel_values=frames)  # [n, T, C, H, W]
        ```
        """
        return self._encode(name, inputs)[0]

    def _encode(self, name: str, inputs: dict[str, torch.Tensor]):
        """(unit-norm embeddings [n, D], token states [n, L, H], token mask [n, L]) of one modality."""
        self.config.modality_index(name)
        _check_feature_inputs(name, inputs)
        pooled, tokens, token_mask = self._run_tower(name, inputs)
        return F.normalize(self.projections[name](pooled), dim=-1), tokens, token_mask

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
        grouped = self._group_inputs(modality_inputs)
        modality_mask = self._resolve_modality_mask(grouped, modality_mask)
        batch_size = modality_mask.shape[0]
        embeddings = None
        tokens = {}
        for name, inputs in grouped.items():
            index = self.config.modality_index(name)
            features, states, state_mask = self._encode(name, inputs)  # [n_m, D], [n_m, L, H], [n_m, L]
            if return_tokens:
                tokens[name] = (states, state_mask)
            if embeddings is None:
                embeddings = features.new_zeros(batch_size, self.config.num_modalities, self.config.projection_dim)
            rows = modality_mask[:, index].nonzero().squeeze(1).to(features.device)
            column = torch.full_like(rows, index)
            embeddings = embeddings.index_put((rows, column), features)  # [B, k, D], observed rows of modality
        return (embeddings, modality_mask, tokens) if return_tokens else (embeddings, modality_mask)

    def _group_inputs(self, modality_inputs: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Split flat `{modality}_{field}` keyword arguments by modality (longest modality name wins)."""
        by_length = sorted(self.config.modalities, key=len, reverse=True)
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in modality_inputs.items():
            if value is None:
                continue
            name = next((m for m in by_length if key.startswith(m + "_") and len(key) > len(m) + 1), None)
            if name is None:
                raise ValueError(
                    f"Unknown input {key!r}: inputs are named '{{modality}}_{{field}}' (e.g. 'text_input_ids', "
                    f"'vision_pixel_values') with a modality among {self.config.modalities}."
                )
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"Input {key!r} must be a torch.Tensor, got {type(value).__name__}.")
            grouped.setdefault(name, {})[key[len(name) + 1 :]] = value
        if not grouped:
            raise ValueError(f"No modality inputs given; expected keys like 'text_input_ids' for the modalities "
                             f"{self.config.modalities}.")
        # keep the k-axis order so outputs do not depend on keyword order
        return {name: grouped[name] for name in self.config.modalities if name in grouped}

    def _resolve_modality_mask(self, grouped, modality_mask):
        rows = {name: next(iter(inputs.values())).shape[0] for name, inputs in grouped.items()}
        for name, inputs in grouped.items():
            for field, value in inputs.items():
                if value.shape[0] != rows[name]:
                    raise ValueError(
                        f"Inputs of modality {name!r} disagree on the number of rows: {name}_{field} has "
                        f"{value.shape[0]}, expected {rows[name]}."
                    )
        k = self.config.num_modalities
        if modality_mask is None:
            sizes = set(rows.values())
            if len(sizes) != 1:
                raise ValueError(
                    f"Without a modality_mask every modality must have the same number of rows; got {rows}. "
                    f"Pass modality_mask [B, {k}] when some rows miss a modality."
                )
            batch_size = sizes.pop()
            device = next(iter(next(iter(grouped.values())).values())).device
            modality_mask = torch.zeros(batch_size, k, dtype=torch.bool, device=device)
            for name in grouped:
                modality_mask[:, self.config.modality_index(name)] = True
            return modality_mask
        if not isinstance(modality_mask, torch.Tensor) or modality_mask.dtype != torch.bool:
            raise TypeError(f"modality_mask must be a bool tensor [B, {k}], got "
                            f"{getattr(modality_mask, 'dtype', type(modality_mask).__name__)}.")
        if modality_mask.dim() != 2 or modality_mask.shape[1] != k:
            raise ValueError(
                f"modality_mask must have shape [B, {k}] (modalities {self.config.modalities}), got "
                f"{list(modality_mask.shape)}."
            )
        empty = (~modality_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"Rows {empty[:10]} of modality_mask observe no modality; every row needs at least one.")
        for name in self.config.modalities:
            expected = int(modality_mask[:, self.config.modality_index(name)].sum())
            given = rows.get(name, 0)
            if given != expected:
                raise ValueError(
                    f"modality_mask marks {expected} rows as observing {name!r} but its inputs have {given} rows "
                    f"(inputs hold the observed rows only, in batch order)."
                )
        return modality_mask

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
            # z^_{m'} = W_{m'} m_i + mu_{m'}, m_i the posterior mean of the shared latent (DESIGN §2)
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
        """The configured alignment objective on [B, k, D] embeddings over the columns of `aligned_mask`."""
        config = self.config
        mask = None if bool(aligned_mask.all()) else aligned_mask
        temperature = self.temperature.clamp_min(_MIN_TEMPERATURE)
        anchor = config.modality_index(config.anchor_modality)
        if config.alignment_objective == "pmrl":
            gather_fn = gather_with_grad if config.gather_across_processes and world_size() > 1 else None
            return pmrl_loss(embeddings, mask, tau1=config.pmrl_tau1, tau2=config.pmrl_tau2, gather_fn=gather_fn)
        if config.alignment_objective == "gram":
            return gram_loss(embeddings, mask, temperature=temperature, label_smoothing=config.label_smoothing,
                             anchor=anchor)
        if config.alignment_objective == "triangle":
            modalities = None
            if config.triangle_modalities is not None:
                modalities = [config.modality_index(m) for m in config.triangle_modalities]
                anchor = modalities[0]
            return triangle_loss(embeddings, mask, temperature=temperature, label_smoothing=config.label_smoothing,
                                 anchor=anchor, modalities=modalities)
        if config.alignment_objective == "anchor_infonce":
            return anchor_infonce_loss(embeddings, mask, anchor=anchor, temperature=temperature)
        return pairwise_infonce_loss(embeddings, mask, temperature=temperature)

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

    # ------------------------------------------------------------------ matching head
    def _condition_memory(self, modality_mask: torch.Tensor, tokens: dict, rows: torch.Tensor):
        """Condition tokens of batch rows `rows`: their observed non-caption modalities' tokens in the fusion space,
        concatenated and padded: ([n, M, W], bool mask [n, M]). Imputed modalities have no tokens: never fed."""
        caption = self.config.matching_modality
        per_row_states, per_row_masks = [[] for _ in rows], [[] for _ in rows]
        for name, (states, state_mask) in tokens.items():
            if name == caption:
                continue
            index = self.config.modality_index(name)
            position = modality_mask[:, index].long().cumsum(0) - 1  # batch row -> row of this modality's inputs
            projected = self.fusion.condition_tokens(name, index, states)
            for slot, row in enumerate(rows.tolist()):
                if modality_mask[row, index]:
                    per_row_states[slot].append(projected[position[row]])
                    per_row_masks[slot].append(state_mask[position[row]])
        width = self.fusion.head.in_features
        reference = next(iter(tokens.values()))[0]
        empty_state = reference.new_zeros(1, width)  # a row without condition: one masked placeholder
        empty_mask = torch.zeros(1, dtype=torch.bool, device=reference.device)
        memory = nn.utils.rnn.pad_sequence([torch.cat(s) if s else empty_state for s in per_row_states],
                                           batch_first=True)  # [n, M, W]
        memory_mask = nn.utils.rnn.pad_sequence([torch.cat(m) if m else empty_mask for m in per_row_masks],
                                                batch_first=True)  # [n, M]
        return memory, memory_mask

    def matching_step(self, embeddings: torch.Tensor, modality_mask: torch.Tensor, tokens: dict):
        """The matching term with hard negatives, over the rows observing the caption and another modality.

        Per row: the positive pair, one negative condition for its caption and one negative caption for its
        condition, each drawn in proportion to softmax(alignment similarity / temperature) from the batch gathered
        across processes (`gather_across_processes`), the positive excluded. Returns None when fewer than two rows
        of the local batch qualify.
        """
        caption = self.config.matching_modality
        caption_index = self.config.modality_index(caption)
        others = torch.ones(self.config.num_modalities, dtype=torch.bool, device=modality_mask.device)
        others[caption_index] = False
        eligible = modality_mask[:, caption_index] & (modality_mask & others).any(dim=1)
        rows = eligible.nonzero().flatten()
        if rows.numel() < 2:
            return None
        caption_states, caption_mask = tokens[caption]
        caption_position = modality_mask[:, caption_index].long().cumsum(0) - 1
        captions, captions_mask = caption_states[caption_position[rows]], caption_mask[caption_position[rows]]
        memory, memory_mask = self._condition_memory(modality_mask, tokens, rows)
        # similarity of caption i and condition j: caption embedding vs mean of j's observed other embeddings
        condition_embeds = (embeddings[rows] * (modality_mask[rows] & others).unsqueeze(-1)).sum(dim=1)
        condition_embeds = F.normalize(condition_embeds, dim=-1)
        caption_embeds = embeddings[rows, caption_index]
        # negatives come from the batch of every process (padded gather; the local part keeps its gradient)
        gather = self.config.gather_across_processes and world_size() > 1
        pool = [gather_padded(t) if gather else (t, None, 0) for t in
                (captions, captions_mask, memory, memory_mask, caption_embeds, condition_embeds)]
        (all_captions, valid, offset), (all_captions_mask, _, _), (all_memory, _, _), (all_memory_mask, _, _), \
            (all_caption_embeds, _, _), (all_condition_embeds, _, _) = pool
        n = rows.numel()
        own = torch.arange(n, device=rows.device)
        temperature = self.temperature.clamp_min(_MIN_TEMPERATURE)
        negative_condition = sample_hard_negatives(caption_embeds @ all_condition_embeds.T / temperature,
                                                   own + offset, valid)  # a condition for each local caption
        negative_caption = sample_hard_negatives(condition_embeds @ all_caption_embeds.T / temperature,
                                                 own + offset, valid)  # a caption for each local condition
        pair_captions = torch.cat([all_captions[own + offset], all_captions[own + offset],
                                   all_captions[negative_caption]])
        pair_captions_mask = torch.cat([all_captions_mask[own + offset], all_captions_mask[own + offset],
                                        all_captions_mask[negative_caption]])
        pair_memory = torch.cat([all_memory[own + offset], all_memory[negative_condition], all_memory[own + offset]])
        pair_memory_mask = torch.cat([all_memory_mask[own + offset], all_memory_mask[negative_condition],
                                      all_memory_mask[own + offset]])
        labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(rows.device)
        logits = self.fusion(pair_captions, pair_captions_mask, pair_memory, pair_memory_mask)
        return matching_loss(logits, labels)

    @torch.no_grad()
    def matching_scores(self, caption_inputs: dict[str, torch.Tensor],
                        condition_inputs: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        """P(match) [n] of n (caption, condition) pairs, row by row, for re-ranking retrieval candidates.

        `caption_inputs` are the caption modality's inputs (e.g. input_ids, attention_mask) with n rows;
        `condition_inputs` maps each condition modality to its inputs with n rows (all observed).
        """
        if self.fusion is None:
            raise ValueError("This model has no matching head: set fusion_num_layers > 0 in its config.")
        caption = self.config.matching_modality
        _, caption_states, caption_mask = self._encode(caption, caption_inputs)
        n = caption_states.shape[0]
        mask = torch.zeros(n, self.config.num_modalities, dtype=torch.bool, device=caption_states.device)
        tokens = {}
        for name, inputs in condition_inputs.items():
            _, states, state_mask = self._encode(name, inputs)
            if states.shape[0] != n:
                raise ValueError(f"condition {name!r} has {states.shape[0]} rows for {n} captions.")
            tokens[name] = (states, state_mask)
            mask[:, self.config.modality_index(name)] = True
        memory, memory_mask = self._condition_memory(mask, tokens, torch.arange(n, device=mask.device))
        logits = self.fusion(caption_states, caption_mask, memory, memory_mask)
        return logits.float().softmax(dim=-1)[:, 1]

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


def _check_feature_inputs(name: str, inputs: dict[str, torch.Tensor]) -> None:
    if not inputs:
        raise ValueError(f"No inputs given for modality {name!r}.")
    for field, value in inputs.items():
        if field in _INTEGER_LIKE_FIELDS or not torch.is_floating_point(value):
            continue
        if not bool(torch.isfinite(value).all()):
            bad_rows = (~torch.isfinite(value.flatten(1) if value.dim() > 1 else value.unsqueeze(1))).any(1)
            raise ValueError(
                f"Input {name}_{field} contains NaN or inf (rows {bad_rows.nonzero().flatten().tolist()[:10]} of "
                f"that modality's inputs)."
            )


def _load_tower(name: str, spec) -> PreTrainedModel | PreTrainedConfig:
    if isinstance(spec, (PreTrainedModel, PreTrainedConfig)):
        return spec
    if isinstance(spec, str):
        return AutoModel.from_pretrained(spec)
    raise TypeError(
        f"The tower of {name!r} must be a folder or repo id, a PreTrainedModel or a config; got {type(spec).__name__}."
    )


__all__ = ["CalMRLEncoding", "CalMRLModel", "CalMRLOutput", "CalMRLPreTrainedModel"]
