"""torch.compile on CPU for the main job's towers: forward + backward, eager against `compile_model`.

    python -m benchmarks.bench_compile              # the main job's batches of 32, best of 10
    python -m benchmarks.bench_compile --quick      # batches of 8, best of 3 (a smoke run)
    python -m benchmarks.bench_compile --threads 1  # one torch thread (steadier where other jobs share the cores)

The main job's model (`recipes/configs/mini_vast.yaml`: a ResNet on each of a video's 4 frames of 32x32, a ResNet on
the audio's 64 x 32 log-mel map, MiniLM-L6 for text, which both stages keep frozen) is built as the recipe builds
it, and fed its processor's outputs on synthetic media of the corpus's sizes (random frames, 0.6 s of noise,
captions of number words; speed does not depend on the content). Timed, eager and compiled alternating, the best
of `repeats` each (single passes drift on a shared machine):

- each tower alone, forward + backward of the mean of its output (the frozen text tower: forward, no gradient);
- a stage-1 step of the whole model: every row observes every modality, pairwise InfoNCE, forward + backward;
- stage-2 steps: video-text and audio-text rows mixed in four batches whose row counts per tower differ, PMRL
  (per step, over the four).

Then the recompilations as the observed-row counts change: a compiled copy takes stage-2 batches splitting the
rows between video-text and audio-text every way, and the graphs each compiled function holds are listed after
each (`compiled_graphs`; one graph is no recompilation).

Each row has its own compiled copy (`compile_model`, inductor) so that its first call, timed on its own, is its
compile time (with an empty inductor cache unless `--warm_cache`); "graphs" counts the graphs it compiled over all
its calls, graph breaks' pieces included (the stage-2 row: over batches whose observed-row counts change). Output
diff: the largest difference of the compiled output (a tower's last hidden state, a step's embeddings) from eager's,
over the largest eager value; loss diff: the largest relative difference of a step's loss.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from benchmarks._timing import machine
from calmrl_hf import CalMRLModel
from calmrl_hf.recipe.run import build_processor, load_recipe, parse_args, resolve_tower
from calmrl_hf.training.compiling import compile_model, compiled_graphs

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def main_job_model(recipe: dict) -> tuple[CalMRLModel, object]:
    """The recipe's model (seeded as the recipe seeds it) in its training state, and its processor."""
    towers = {name: resolve_tower(spec) for name, spec in recipe["model"]["towers"].items()}
    processor = build_processor(towers, recipe.get("processor", {}))
    torch.manual_seed(recipe.get("seed", 0))
    model = CalMRLModel.from_encoders(**towers, **recipe["model"].get("config", {}))
    model.train()
    model.encoders["text"].requires_grad_(False).eval()  # freeze_modalities: [text] in both stages
    return model, processor


def synthetic_batch(processor, rows: list[tuple[bool, bool]], rng: np.random.Generator) -> dict:
    """A batch of captioned rows, each with a video and / or a clip as `rows` says ((video, audio) per row)."""
    videos = [rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) if video else None for video, _ in rows]
    clips = [rng.standard_normal(9600).astype(np.float32) if audio else None for _, audio in rows]
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))) for _ in rows]
    return dict(processor(text=captions, vision=videos, audio=clips, sampling_rate=16000))


def tower_inputs(batch: dict, name: str) -> dict:
    """One tower's inputs as `run_tower` passes them (a video's frames as images)."""
    inputs = {key[len(name) + 1:]: value for key, value in batch.items() if key.startswith(f"{name}_")}
    if "pixel_values" in inputs and inputs["pixel_values"].dim() == 5:
        inputs["pixel_values"] = inputs["pixel_values"].flatten(0, 1)
    return inputs


def tower_pass(tower, inputs: dict, trains: bool) -> Callable[[], tuple[torch.Tensor, None]]:
    """A forward (+ backward) of one tower: (its output, no loss)."""
    def run():
        with torch.set_grad_enabled(trains):
            out = tower(**inputs, return_dict=True).last_hidden_state.float()
        if trains:
            out.mean().backward()
        return out.detach(), None
    return run


def step_pass(model, batches: list[dict]) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Forward + backward of the model on each batch: (the embeddings, the losses)."""
    def run():
        embeddings, losses = [], []
        for batch in batches:
            out = model(**batch, return_loss=True)
            out.loss.backward()
            embeddings.append(out.embeddings.detach().flatten())
            losses.append(out.loss.detach())
        model.zero_grad(set_to_none=True)
        return torch.cat(embeddings), torch.stack(losses)
    return run


def compare(eager_run: Callable, compiled_run: Callable, repeats: int) -> dict:
    """First compiled call (compile time), then `repeats` rounds alternating which goes first; best of each."""
    start = time.perf_counter()
    compiled_value = compiled_run()
    compile_seconds = time.perf_counter() - start
    eager_value = eager_run()
    times = {"eager": [], "compiled": []}
    for round_ in range(repeats):
        order = [("eager", eager_run), ("compiled", compiled_run)]
        for name, run in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    (compiled_out, compiled_loss), (eager_out, eager_loss) = compiled_value, eager_value
    loss_difference = None if eager_loss is None else float(((compiled_loss - eager_loss) / eager_loss).abs().max())
    return {"eager": min(times["eager"]), "compiled": min(times["compiled"]), "compile": compile_seconds,
            "difference": float((compiled_out - eager_out).abs().max() / eager_out.abs().max()),
            "loss_difference": loss_difference}


def graph_sweep(eager: CalMRLModel, processor, batch_size: int, rng: np.random.Generator) -> list[tuple]:
    """Compiled graphs per function (`compiled_graphs`) after stage-2 batches splitting `batch_size` rows between
    video-text and audio-text every way from 2 videos to batch_size - 2: [(videos, {function: graphs})]."""
    eager.config.alignment_objective = "pmrl"
    model = compile_model(copy.deepcopy(eager))
    sweep = []
    for videos in range(2, batch_size - 1, 2):
        batch = synthetic_batch(processor, [(True, False)] * videos + [(False, True)] * (batch_size - videos), rng)
        step_pass(model, [batch])()
        sweep.append((videos, compiled_graphs(model)))
    return sweep


def run(batch_size: int = 32, repeats: int = 10) -> dict:
    recipe = load_recipe(parse_args([]))
    eager, processor = main_job_model(recipe)
    rng = np.random.default_rng(0)
    stage1 = synthetic_batch(processor, [(True, True)] * batch_size, rng)
    stage2 = [synthetic_batch(processor, [(True, False)] * videos + [(False, True)] * (batch_size - videos), rng)
              for videos in (batch_size // 2, batch_size * 3 // 8, batch_size * 5 // 8, batch_size // 4)]
    results = {}

    def compiled_copy():
        graphs = CompileCounterWithBackend("inductor")
        return compile_model(copy.deepcopy(eager), backend=graphs), graphs

    names = {"vision": "vision tower (ResNet, {n} videos x 4 frames of 32x32), forward + backward",
             "audio": "audio tower (ResNet, {n} log-mel maps of 64 x 32), forward + backward",
             "text": "text tower (MiniLM-L6, {n} captions, frozen: forward only)"}
    for name, label in names.items():
        model, graphs = compiled_copy()
        inputs = tower_inputs(stage1, name)
        trains = name != "text"
        result = compare(tower_pass(eager.encoders[name], inputs, trains),
                         tower_pass(model.encoders[name], inputs, trains), repeats)
        results[label.format(n=batch_size)] = {**result, "graphs": graphs.frame_count}
    for label, objective, batches in (("stage-1 step (all modalities, pairwise InfoNCE)", "pairwise_infonce", [stage1]),
                                      ("stage-2 step (video-text / audio-text rows mixed, PMRL; 4 batches)", "pmrl",
                                       stage2)):
        eager.config.alignment_objective = objective
        model, graphs = compiled_copy()
        result = compare(step_pass(eager, batches), step_pass(model, batches), repeats)
        scale = len(batches)
        results[label] = {**result, "eager": result["eager"] / scale, "compiled": result["compiled"] / scale,
                          "graphs": graphs.frame_count}
    return results, graph_sweep(eager, processor, batch_size, rng)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="batches of 8, best of 3")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 measures steadily on a machine other jobs share")
    parser.add_argument("--warm_cache", action="store_true",
                        help="use inductor's on-disk cache of compiled code (compile times of a second run)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch_size, args.repeats = 8, 3
    with tempfile.TemporaryDirectory() as cache:
        if not args.warm_cache:  # inductor keeps compiled code on disk: an empty cache times the first compile
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        results, sweep = run(args.batch_size, args.repeats)
    print(f"torch.compile (inductor) against eager, best of {args.repeats}, batches of {args.batch_size} "
          f"({machine()})\n")
    print("| | eager (ms) | compiled (ms) | compiled is faster by | compile time (s) | graphs | output diff | "
          "loss diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, value in results.items():
        loss = "" if value["loss_difference"] is None else f"{value['loss_difference']:.1e}"
        print(f"| {name} | {1e3 * value['eager']:.1f} | {1e3 * value['compiled']:.1f} | "
              f"{value['eager'] / value['compiled']:.2f}x | {value['compile']:.0f} | {value['graphs']} | "
              f"{value['difference']:.1e} | {loss} |")
    print(f"\nGraphs each compiled function holds after stage-2 batches of {args.batch_size} rows, videos from 2 to "
          f"{args.batch_size - 2} (the rest audio clips), in that order:\n")
    functions = list(sweep[-1][1])
    print("| videos / clips in the batch | " + " | ".join(functions) + " |")
    print("|---|" + "---:|" * len(functions))
    for videos, graphs in sweep:
        print(f"| {videos} / {args.batch_size - videos} | " + " | ".join(str(graphs.get(f, 0)) for f in functions)
              + " |")
    return results


if __name__ == "__main__":
    main()
