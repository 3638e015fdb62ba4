"""AST's log-mel filterbank features, all frames of a clip at once.

Without torchaudio (no build of it exists for torch 2.13), transformers' `ASTFeatureExtractor` computes its
Kaldi-style filterbank with `audio_utils.spectrogram`, which loops over the 10 ms frames in Python: one FFT call
per frame. `ast_log_mel` computes the same numbers with every frame of a clip in one array: the same float64
steps (per-frame DC offset removed, pre-emphasis 0.97, Hann window, 512-point FFT stored as complex64, power,
mel filters, floor, log), then AST's padding or truncation to `max_length` frames and its normalisation.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

FRAME_LENGTH, HOP_LENGTH, FFT_LENGTH = 400, 160, 512  # 25 ms frames every 10 ms at 16 kHz
PREEMPHASIS = 0.97
MEL_FLOOR = 1.192092955078125e-07


def computes_like(feature_extractor) -> bool:
    """Whether `ast_log_mel` gives what `feature_extractor` gives: an ASTFeatureExtractor on its numpy path (it
    has `mel_filters` only there; with torchaudio it calls Kaldi's fbank instead) whose filterbank is AST's own."""
    from transformers import ASTFeatureExtractor

    return (isinstance(feature_extractor, ASTFeatureExtractor) and hasattr(feature_extractor, "mel_filters")
            and type(feature_extractor)._extract_fbank_features is ASTFeatureExtractor._extract_fbank_features)


def clip_log_mel(wave: np.ndarray, window: np.ndarray, mel_filters: np.ndarray) -> np.ndarray:
    """log(max(floor, |FFT(window x preemphasis(frame - mean(frame)))|^2 @ mel_filters)) [frames, mel] (float32)
    of a mono clip of at least FRAME_LENGTH samples."""
    samples = np.asarray(wave, dtype=np.float32).astype(np.float64)
    num_frames = 1 + (samples.size - FRAME_LENGTH) // HOP_LENGTH
    frames = sliding_window_view(samples, FRAME_LENGTH)[::HOP_LENGTH][:num_frames]  # [F, 400], a view
    frames = frames - frames.mean(axis=1, keepdims=True)
    emphasised = np.empty_like(frames)
    emphasised[:, 1:] = frames[:, 1:] - PREEMPHASIS * frames[:, :-1]  # x[t] - 0.97 x[t-1]
    emphasised[:, 0] = frames[:, 0] * (1 - PREEMPHASIS)
    spectrum = np.fft.rfft(emphasised * window.astype(np.float64), n=FFT_LENGTH, axis=1).astype(np.complex64)
    power = np.abs(spectrum, dtype=np.float64) ** 2  # [F, 257]
    mel = np.maximum(MEL_FLOOR, (mel_filters.T @ power.T))  # [mel, F], the reference's order of products
    return np.log(mel).T.astype(np.float32)


def ast_log_mel(waves: list[np.ndarray], feature_extractor) -> torch.Tensor:
    """`feature_extractor(waves, return_tensors="pt")["input_values"]` [n, max_length, mel] of an
    ASTFeatureExtractor on its numpy path (`computes_like`): the clips' log-mel maps, zero-padded or truncated to
    `max_length` frames, normalised as (x - mean) / (2 std) when `do_normalize`."""
    max_length, num_mel = feature_extractor.max_length, feature_extractor.num_mel_bins
    batch = np.zeros((len(waves), max_length, num_mel), dtype=np.float32)
    for row, wave in enumerate(waves):
        if np.asarray(wave).size < FRAME_LENGTH:
            raise ValueError(f"Audio row {row} has {np.asarray(wave).size} samples, fewer than one "
                             f"{FRAME_LENGTH}-sample frame of the log-mel map.")
        fbank = clip_log_mel(wave, feature_extractor.window, feature_extractor.mel_filters)[:max_length]
        batch[row, : fbank.shape[0]] = fbank
    if feature_extractor.do_normalize:
        batch = (batch - feature_extractor.mean) / (feature_extractor.std * 2)
    return torch.from_numpy(batch)


__all__ = ["ast_log_mel", "clip_log_mel", "computes_like"]
