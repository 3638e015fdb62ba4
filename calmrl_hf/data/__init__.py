"""Datasets that mark missing modalities, lazy media decoding, and batching."""

from .collator import CalMRLCollator
from .loaders import (
    align_modalities,
    concatenate,
    dataset_modalities,
    features_for,
    for_process,
    load_annotations,
    load_audiocaps,
    load_msrvtt,
    load_vast,
)
from .media import DecodingFailures, MediaDecoder, MediaDecodingError, decode_audio, decode_video, with_media_decoding


__all__ = ["CalMRLCollator", "DecodingFailures", "MediaDecoder", "MediaDecodingError", "align_modalities",
           "concatenate", "dataset_modalities", "decode_audio", "decode_video", "features_for", "for_process",
           "load_annotations", "load_audiocaps", "load_msrvtt", "load_vast", "with_media_decoding"]
