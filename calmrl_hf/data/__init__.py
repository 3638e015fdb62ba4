"""Datasets that mark missing modalities, lazy media decoding, per-process splitting, and batching."""

from .collator import CalMRLCollator, model_inputs
from .counters import SharedCounts
from .loaders import load_annotations, load_audiocaps, load_msrvtt, load_vast, read_annotations
from .media import (
    DecodingFailures,
    MediaDecoder,
    MediaDecodingError,
    MediaPathError,
    decode_audio,
    decode_image,
    decode_video,
    resample_audio,
    with_media_decoding,
)
from .schema import align_modalities, concatenate, dataset_modalities, features_for, interleave
from .sharding import for_process


__all__ = ["CalMRLCollator", "model_inputs", "DecodingFailures", "MediaDecoder", "MediaDecodingError", "MediaPathError",
           "SharedCounts",
           "align_modalities", "concatenate", "dataset_modalities", "decode_audio", "decode_image", "decode_video",
           "features_for", "for_process", "interleave", "load_annotations", "load_audiocaps", "load_msrvtt",
           "load_vast", "read_annotations", "resample_audio", "with_media_decoding"]
