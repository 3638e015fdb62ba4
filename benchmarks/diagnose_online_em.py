"""Is the training loop's online EM what degrades the imputer in stage 2? Run it on FIXED embeddings and see.

    python -m benchmarks.diagnose_online_em

Trains the controlled benchmark's stage 1 (seed 0), freezes the towers, and embeds its stage-2 instances (half
vision-text, half audio-text) and its full-modality test set once. The imputer is then (a) warm-started by full
EM on the stage-1 embeddings, (b) updated online exactly as in training (`ImputerUpdater`: EMA statistics of
partial batches, with and without the warm-start prior) for 300 steps on the fixed partial embeddings, (c) refitted
by full EM on the partial embeddings. Each is scored on the test set: cosine of the imputed to the true embedding,
and the anchor shift without and with calibration. If (b) stays at (a)'s level, the degradation seen after stage 2
comes from the towers moving under the imputer, not from the online EM.
"""

from __future__ import annotations

import copy
import logging
import tempfile

import torch

from calmrl_hf.training import ImputerUpdater, CalMRLTrainingArguments, build_accelerator, train

from .metrics import imputation_metrics
from .synthetic.run import AUDIO_TEXT, FULL, PATTERNS, VISION_TEXT, Sizes, World, build_model, collate


def main() -> list[tuple[str, dict]]:
    logging.basicConfig(level=logging.WARNING)
    sizes = Sizes()
    world = World(sizes, 0)
    stage1, stage2, test = (world.sample(sizes.stage1, FULL), world.sample(2 * sizes.stage2, FULL),
                            world.sample(sizes.test, FULL))
    torch.manual_seed(0)
    model = build_model(sizes)
    with tempfile.TemporaryDirectory() as workdir:
        args = CalMRLTrainingArguments(output_dir=workdir, max_steps=sizes.stage1_steps, seed=0, learning_rate=1e-3,
                                       per_device_train_batch_size=sizes.batch_size, logging_steps=10 ** 6)
        accelerator = build_accelerator(args)
        train(model, stage1, args, collate_fn=collate, accelerator=accelerator)
    model.eval()
    with torch.no_grad():
        stage1_z, stage1_mask = model.embed_modalities(**collate(list(stage1)))
        stage2_z, _ = model.embed_modalities(**collate(list(stage2)))
        test_z, _ = model.embed_modalities(**collate(list(test)))
    stage2_mask = torch.tensor([VISION_TEXT] * sizes.stage2 + [AUDIO_TEXT] * sizes.stage2)
    rows = []

    def record(name: str) -> None:
        rows.append((name, imputation_metrics(model, test_z, PATTERNS)))

    model.imputer.fit(stage1_z, stage1_mask, max_iter=50)
    record("(a) warm start: full EM on the stage-1 (full-modality) embeddings")
    warm_state = copy.deepcopy(model.imputer.state_dict())
    warm_statistics = model.imputer.sufficient_statistics(stage1_z, stage1_mask)
    for decay in (0.95, 0.995):
        for prior in (True, False):
            model.imputer.load_state_dict(warm_state)
            updater = ImputerUpdater(model, accelerator, CalMRLTrainingArguments(output_dir="unused",
                                                                                 imputer_ema_decay=decay))
            if prior:  # as the training loop seeds it: one EMA window of warm-start statistics
                updater.seed(warm_statistics, sizes.batch_size / (1.0 - decay))
            generator = torch.Generator().manual_seed(0)
            for _ in range(300):
                rows_drawn = torch.randint(0, len(stage2_mask), (sizes.batch_size,), generator=generator)
                updater(stage2_z[rows_drawn], stage2_mask[rows_drawn])
            record(f"(b) + 300 online steps on fixed partial embeddings, EMA {decay}, "
                   f"{'with' if prior else 'without'} the warm-start prior")
    model.imputer.load_state_dict(warm_state)
    model.imputer.fit(torch.cat([stage1_z, stage2_z]), torch.cat([stage1_mask, stage2_mask]), max_iter=50)
    record("(c) full EM on stage-1 + partial stage-2 embeddings")

    print("| imputer | imputation cosine | mean imputation cosine | anchor shift, observed only | calibrated |")
    print("|---|---:|---:|---:|---:|")
    for name, metrics in rows:
        print(f"| {name} | {metrics['imputation_cosine']:.3f} | {metrics['mean_imputation_cosine']:.3f} | "
              f"{metrics['anchor_shift_observed_only']:.3f} | {metrics['anchor_shift_calibrated']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
