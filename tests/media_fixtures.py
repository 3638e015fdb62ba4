"""Tiny media files written by the tests: mp4 videos whose frames encode their index, and wav tones."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 32
RATE = 16000


def write_video(path: Path, num_frames: int = 8, offset: int = 0) -> Path:
    """Frame t is a flat grey of level 20 * (t + offset) (so decoded frames tell which index they are)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "0"}
        for t in range(num_frames):
            frame = np.full((SIZE, SIZE, 3), 20 * (t + offset), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_wav(path: Path, frequency: float = 440.0, seconds: float = 0.25, rate: int = RATE) -> Path:
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(str(path), (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32), rate)
    return path


def frame_levels(frames: np.ndarray) -> list[int]:
    """The index encoded in each decoded frame."""
    return [int(round(float(frame.mean()) / 20)) for frame in frames]
