"""CLIP-style entry points of a CalMRL model: one modality's embeddings and its tower's outputs.

    text = model.get_text_features(**tokenizer(["a dog barks"], return_tensors="pt"))   # or **processor(text=...)
    video = model.get_image_features(pixel_values=frames)                 # [n, C, H, W] or [n, T, C, H, W]
    audio = model.get_audio_features(**processor(audio=[waveform]))
    subtitle = model.get_text_features(**processor(subtitle=["..."]), modality="subtitle")

Each returns a `BaseModelOutputWithPooling` whose `pooler_output` is the projected embedding [n, D] (not
normalised, as in CLIP: `F.normalize` it, or read the unit-norm embeddings of `embed_modalities` / `encode`), and
the tower's `last_hidden_state`, `hidden_states` and `attentions` (with `output_hidden_states=True` /
`output_attentions=True`). Imports torch and transformers only: this file is copied into checkpoints as remote code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .modality_inputs import cast_features, check_feature_inputs, defer_checks, feature_inputs, finite_embeddings_check
from .towers import run_tower, tower_input_names


@dataclass
class CalMRLModalityOutput(BaseModelOutputWithPooling):
    r"""
    One modality's tower outputs and its embedding.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `[n, L, H]`): the tower's token states (a video's frames'
            tokens one after the other, [n, T * L, H]).
        pooler_output (`torch.FloatTensor` of shape `[n, D]`): the projected embedding (pooled as
            `config.pooling` says, then the modality's projection head), not normalised.
        hidden_states, attentions: the tower's, when asked for (`output_hidden_states`, `output_attentions`).
        token_mask (`torch.BoolTensor` of shape `[n, L]`): the tokens of `last_hidden_state` that are not padding.
    """

    token_mask: torch.BoolTensor | None = None


class CalMRLFeaturesMixin:
    """`get_text_features`, `get_image_features`, `get_audio_features` (and `get_modality_features`) of
    `CalMRLModel`, each for any modality of its kind through `modality=`."""

    @can_return_tuple
    def get_text_features(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                          token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
                          modality: str = "text", **kwargs: Unpack[TransformersKwargs]) -> CalMRLModalityOutput:
        r"""
        Embeddings of texts: the tokenizer's outputs (`input_ids`, `attention_mask`, `token_type_ids`) or the
        processor's (`text_input_ids`, ...; `modality_mask` and other modalities' inputs are left aside).

        modality (`str`, *optional*, defaults to `"text"`): a text-kind modality, e.g. `"subtitle"` (its own
            projection head over the shared text tower).

        ```python
        >>> inputs = tokenizer(["a dog barks", "a cat"], padding=True, return_tensors="pt")
        >>> text_embeds = model.get_text_features(**inputs).pooler_output   # [2, D]
        ```
        """
        given = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     position_ids=position_ids)
        return self._modality_outputs(modality, {**given, **kwargs})

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor | None = None, *, modality: str = "vision",
                           **kwargs: Unpack[TransformersKwargs]) -> CalMRLModalityOutput:
        r"""
        Embeddings of images `pixel_values` [n, C, H, W] or videos [n, T, C, H, W] (the mean of the frames' pooled
        features, then the projection), or the processor's `vision_pixel_values`.

        modality (`str`, *optional*, defaults to `"vision"`): a vision-kind modality.
        """
        return self._modality_outputs(modality, {"pixel_values": pixel_values, **kwargs})

    @can_return_tuple
    def get_audio_features(self, input_values: torch.Tensor | None = None,
                           input_features: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                           modality: str = "audio", **kwargs: Unpack[TransformersKwargs]) -> CalMRLModalityOutput:
        r"""
        Embeddings of audio: the feature extractor's outputs (`input_values` for AST / Wav2Vec2, `input_features`
        for Whisper-like towers, `attention_mask`) or the processor's (`audio_input_values`, ...).

        modality (`str`, *optional*, defaults to `"audio"`): an audio-kind modality.
        """
        given = dict(input_values=input_values, input_features=input_features, attention_mask=attention_mask)
        return self._modality_outputs(modality, {**given, **kwargs})

    def get_modality_features(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings [n, D] of modality `name` (any modality, its tower's inputs plain or prefixed):
        `F.normalize` of the `pooler_output` the `get_*_features` methods return.

        ```python
        >>> text_embeds = model.get_modality_features("text", input_ids=ids, attention_mask=mask)
        ```
        """
        return F.normalize(self._modality_outputs(name, inputs).pooler_output, dim=-1)

    def _modality_outputs(self, name: str, given: dict) -> CalMRLModalityOutput:
        """Modality `name`'s tower (`towers.run_tower`, pooled as `config.pooling[name]` says) and projection head
        on the n rows of its inputs, from a getter's keyword arguments (`modality_inputs.feature_inputs`)."""
        self.config.modality_index(name)
        tower = self.encoders[self.config.encoder_owner(name)]
        inputs, tower_kwargs = feature_inputs(name, self.config.modalities, given, tower_input_names(tower))
        return self._run_modality(name, inputs, tower_kwargs)

    def _run_modality(self, name: str, inputs: dict[str, torch.Tensor], tower_kwargs: dict) -> CalMRLModalityOutput:
        check_feature_inputs(name, inputs)
        tower = self.encoders[self.config.encoder_owner(name)]
        inputs = cast_features(inputs, getattr(tower, "dtype", None))  # float32 processor outputs into a bf16 tower
        pooled, tokens, token_mask, outputs = run_tower(tower, self.config.pooling[name], name, inputs,
                                                        **tower_kwargs)
        projection = self.projections[name]
        embeds = projection(pooled.to(projection.weight.dtype))  # [n, D]
        # read at once, or with the other modalities' and the step's values (`checks_read_together`)
        defer_checks([finite_embeddings_check(name, embeds)])
        return CalMRLModalityOutput(last_hidden_state=tokens, pooler_output=embeds,
                                    hidden_states=getattr(outputs, "hidden_states", None),
                                    attentions=getattr(outputs, "attentions", None), token_mask=token_mask)


__all__ = ["CalMRLFeaturesMixin", "CalMRLModalityOutput"]
