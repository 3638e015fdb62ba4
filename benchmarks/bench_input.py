"""Does the main job's input pipeline keep up? Decoding throughput of the loaders against PyAV alone, and the main
job's step time split into waiting for data and computing.

    python -m benchmarks.bench_input                 # the main job's corpus (generated if absent), both tables
    python -m benchmarks.bench_input --steps 20      # shorter step timing

1. Decoded examples per second of the main job's loaders (`with_media_decoding` + `CalMRLCollator`, batches of
   32 as training reads them) over the video-text (MSR-VTT format) and audio-text (AudioCaps format) splits, with
   0, 1 and 2 DataLoader workers, against decoding the same files with PyAV alone in this process (the floor:
   open, decode every frame / packet, convert to arrays; no sampling, no processor). The ratio "per core" divides
   raw throughput by the loader's, where the loader uses max(1, workers) cores for decoding. Each rate is the best
   of 3 measurements, raw and loaders interleaved.
2. PyAV's frame threads on and off, decoding as `decode_video` does: the corpus's clips and clips of four sizes.
3. The main job's stage-1 step (its model, processor and batch size; text tower frozen) with each worker setting:
   per step, the time the loop waits for the next batch and the time of forward + backward + optimizer step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks._timing import machine
from calmrl_hf.data import CalMRLCollator, model_inputs, with_media_decoding
from calmrl_hf.recipe.run import build_processor, load_data, load_recipe, parse_args, resolve_tower
from calmrl_hf.training import CalMRLTrainingArguments, build_dataloaders

ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 32
WORKERS = (0, 1, 2)
REPEATS = 3  # throughput measurements, interleaved; the best of each is reported


def raw_video(path: str) -> np.ndarray:
    """Every frame of `path` as RGB arrays, PyAV alone."""
    import av

    with av.open(path) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def raw_audio(path: str) -> np.ndarray:
    """Every sample of `path` as float32, PyAV alone."""
    import av

    with av.open(path) as container:
        return np.concatenate([frame.to_ndarray().reshape(-1) for frame in container.decode(audio=0)])


def raw_rate(paths: list[str], decode) -> float:
    """Examples per second of `decode` over `paths`, after a first pass (files in the page cache, libraries
    loaded: as the loader's timed second pass)."""
    for path in paths:
        decode(path)
    start = time.perf_counter()
    for path in paths:
        decode(path)
    return len(paths) / (time.perf_counter() - start)


def sampled_frames(path: str, threads: bool, num_frames: int = 4) -> None:
    """Decode `path` up to its last of `num_frames` evenly sampled frames, converting those (as `decode_video`),
    with PyAV's frame threads (thread_type AUTO) or without (what `decode_video` does)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        if threads:
            stream.thread_type = "AUTO"
        wanted = set(np.linspace(0, stream.frames - 1, num_frames).round().astype(int).tolist())
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                frame.to_ndarray(format="rgb24")
            if index >= max(wanted):
                break


def encoded_clip(folder: Path, width: int, height: int, frames: int = 32) -> str:
    """A `frames`-frame h264 clip of moving noise at width x height, encoded with PyAV."""
    import av

    path = folder / f"clip_{width}x{height}.mp4"
    base = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            picture = av.VideoFrame.from_ndarray(np.roll(base, 3 * index, axis=1), format="rgb24")
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def frame_thread_table(corpus_paths: list[str]) -> str:
    """Videos per second decoded as `decode_video` decodes (4 sampled frames) with and without frame threads: the
    corpus's clips, and 32-frame clips of four sizes."""
    import tempfile

    lines = ["| videos | frame threads (videos/s) | none (videos/s) |", "|---|---:|---:|"]
    with tempfile.TemporaryDirectory() as folder:
        sets = {"the corpus's 32x32 clips": corpus_paths}
        for width, height in ((128, 128), (256, 256), (640, 480), (1280, 720)):
            sets[f"32 frames of {width}x{height}"] = [encoded_clip(Path(folder), width, height)] * 10
        for name, paths in sets.items():
            rates = {True: [], False: []}
            for repeat in range(REPEATS):  # best of each, the order alternating
                for threads in ((True, False) if repeat % 2 == 0 else (False, True)):
                    rates[threads].append(raw_rate(paths, lambda path, t=threads: sampled_frames(path, t)))
            lines.append(f"| {name} | {max(rates[True]):.0f} | {max(rates[False]):.0f} |")
    return "\n".join(lines)


def loader(dataset, collator, workers: int, persistent: bool = True) -> DataLoader:
    """The training loop's train loader (`calmrl_hf.training.build_dataloaders`) with `workers` workers."""
    args = CalMRLTrainingArguments(output_dir="unused", dataloader_num_workers=workers,
                                   dataloader_persistent_workers=persistent)
    return build_dataloaders(dataset, None, None, collator, BATCH_SIZE, args)[0]


def loader_rate(dataset, collator, workers: int) -> float:
    """Examples per second over the second pass of a persistent-worker loader (the first starts the workers)."""
    batches = loader(dataset, collator, workers)
    for _ in batches:
        pass
    start, rows = time.perf_counter(), 0
    for batch in batches:
        rows += int(batch["modality_mask"].shape[0])
    return rows / (time.perf_counter() - start)


def throughput_table(splits: dict, collator) -> str:
    lines = ["| split | raw PyAV (examples/s) | " + " | ".join(f"loader, {w} workers" for w in WORKERS)
             + " | raw / loader per core (0 workers) |", "|---|---:|" + "---:|" * len(WORKERS) + "---:|"]
    for name, (dataset, column, decode) in splits.items():
        paths = [str(p) for p in dataset[column]]
        decoded = with_media_decoding(dataset, num_frames=collator.processor.num_frames,
                                      sampling_rate=collator.processor.feature_extractor.sampling_rate)
        raws, loaders = [], {w: [] for w in WORKERS}
        for _ in range(REPEATS):  # interleaved, the best of each: this machine's speed drifts between runs
            raws.append(raw_rate(paths, decode))
            for w in WORKERS:
                loaders[w].append(loader_rate(decoded, collator, w))
        raw, rates = max(raws), [max(loaders[w]) for w in WORKERS]
        lines.append(f"| {name} | {raw:.0f} | " + " | ".join(f"{r:.0f}" for r in rates) + f" | {raw / rates[0]:.2f}x |")
    return "\n".join(lines)


def epochs(batches: DataLoader):
    """The loader's batches, epoch after epoch (persistent workers carry over)."""
    while True:
        yield from batches


def step_times(model, dataset, collator, workers: int, steps: int) -> tuple[float, float]:
    """Median seconds per step waiting for the batch, and computing it (forward + backward + AdamW step)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = epochs(loader(dataset, collator, workers))
    waits, computes = [], []
    for step in range(steps + 2):
        start = time.perf_counter()
        batch = next(batches)
        ready = time.perf_counter()
        model(**model_inputs(batch), return_loss=True).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 2:  # the first two: workers starting, allocator warming up
            waits.append(ready - start)
            computes.append(time.perf_counter() - ready)
    return float(np.median(waits)), float(np.median(computes))


def step_table(recipe: dict, towers: dict, dataset, collator, steps: int) -> str:
    from calmrl_hf import CalMRLModel

    lines = ["| workers | data wait (ms/step) | compute (ms/step) | wait share of the step |", "|---:|---:|---:|---:|"]
    for workers in WORKERS:
        torch.manual_seed(0)
        model = CalMRLModel.from_encoders(**towers, **recipe["model"].get("config", {}))
        model.config.alignment_objective = recipe["stage1"].get("alignment_objective", "pmrl")
        model.encoders["text"].requires_grad_(False).eval()
        model.train()
        model.encoders["text"].eval()
        wait, compute = step_times(model, dataset, collator, workers, steps)
        lines.append(f"| {workers} | {1000 * wait:.0f} | {1000 * compute:.0f} | {100 * wait / (wait + compute):.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per worker setting")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides")
    args = parser.parse_args(argv)
    recipe_argv = [item for override in args.set for item in ("--set", override)]
    recipe = load_recipe(parse_args(recipe_argv))
    towers = {name: resolve_tower(spec) for name, spec in recipe["model"]["towers"].items()}
    collator = CalMRLCollator(build_processor(towers, recipe.get("processor", {})))

    class _MainProcess:  # load_data asks the accelerator which process writes the corpus: this one
        @staticmethod
        def main_process_first():
            import contextlib

            return contextlib.nullcontext()

    data = load_data(recipe["data"], recipe.get("seed", 0), _MainProcess())
    stage2 = data["stage2"]
    video = stage2.filter(lambda row: row["vision"] is not None)
    audio = stage2.filter(lambda row: row["audio"] is not None)
    splits = {"video-text (4 frames of 32x32 mp4)": (video, "vision", raw_video),
              "audio-text (16 kHz wav)": (audio, "audio", raw_audio)}
    report = [f"Machine: {machine()}.", "", throughput_table(splits, collator), "",
              frame_thread_table([str(p) for p in video["vision"]][:300]), ""]
    decode = dict(num_frames=collator.processor.num_frames,
                  sampling_rate=collator.processor.feature_extractor.sampling_rate)
    report.append(step_table(recipe, towers, with_media_decoding(data["stage1"], **decode), collator, args.steps))
    text = "\n".join(report)
    print(text)
    return text


if __name__ == "__main__":
    main()
