"""How good is a trained model's imputer? Imputation error and anchor shift on held-out full-modality data.

    python -m benchmarks.diagnose_imputation outputs/mini_vast/stage2 --data outputs/mini_vast_data
    python -m benchmarks.diagnose_imputation outputs/mini_vast/stage2 --data outputs/mini_vast_data --refit 8

For each partial pattern of the paper's stage 2 (video-text: audio and subtitle missing; audio-text: vision and
subtitle missing) the test instances' true embeddings are hidden, imputed by the model's own imputer from the
observed ones, and compared with the truth (MSE, cosine) next to mean imputation; the anchor shift of the
observed-only matrix and of the calibrated one (observed + imputed) is measured against the true full-modality
anchor. `--refit Q` also fits a fresh PPCA (latent Q) by full EM on the same model's embeddings of the
full-modality training split, which separates the PPCA model's quality from the online fit's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from calmrl_hf import CalMRLModel, CalMRLProcessor, PPCAImputer
from calmrl_hf.data import CalMRLCollator, load_vast, model_inputs, with_media_decoding
from calmrl_hf.evaluation.metrics import anchor_shift_report, imputation_error


PATTERNS = {"video-text": ("audio", "subtitle"), "audio-text": ("vision", "subtitle")}


@torch.no_grad()
def embed_split(model, processor, data_root: Path, split: str, batch_size: int = 50):
    root = data_root / "vast"
    dataset = with_media_decoding(load_vast(root / f"annotations_{split}.json", root / "videos", root / "audios"),
                                  num_frames=processor.num_frames)
    collator = CalMRLCollator(processor)
    embeddings, masks = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        z, mask = model.embed_modalities(**model_inputs(batch))
        embeddings.append(z)
        masks.append(mask)
    return torch.cat(embeddings), torch.cat(masks)


def diagnose(imputer: PPCAImputer, truth: torch.Tensor, full_mask: torch.Tensor, modalities: list[str]) -> dict:
    results = {}
    for pattern, hidden in PATTERNS.items():
        mask = full_mask.clone()
        for name in hidden:
            mask[:, modalities.index(name)] = False
        imputed = F.normalize(imputer.impute(truth, mask), dim=-1)
        mean = torch.where(mask.unsqueeze(-1), truth, F.normalize(imputer.mean, dim=-1).expand_as(truth))
        results[pattern] = {"ppca": imputation_error(truth, imputed, ~mask),
                            "mean": imputation_error(truth, mean, ~mask),
                            "anchor_shift": anchor_shift_report(truth, mask, imputed)}
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a saved CalMRL model folder (with its processor)")
    parser.add_argument("--data", type=Path, default=Path("outputs/mini_vast_data"), help="mini VAST corpus root")
    parser.add_argument("--refit", type=int, metavar="Q", help="also fit a fresh PPCA with latent Q on the train split")
    args = parser.parse_args(argv)
    model = CalMRLModel.from_pretrained(args.model).eval()
    processor = CalMRLProcessor.from_pretrained(args.model)
    modalities = model.config.modalities
    truth, mask = embed_split(model, processor, args.data, "test")
    imputers = {"model's imputer": model.imputer}
    if args.refit:
        train_z, train_mask = embed_split(model, processor, args.data, "train")
        refit = PPCAImputer(len(modalities), train_z.shape[-1], args.refit)
        refit.fit(train_z, train_mask, max_iter=100)
        imputers[f"PPCA refit (q={args.refit})"] = refit
    print("| imputer | pattern | cosine (PPCA) | cosine (mean) | MSE (PPCA) | MSE (mean) | "
          "anchor shift observed-only | anchor shift calibrated |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    report = {}
    for name, imputer in imputers.items():
        report[name] = diagnose(imputer, truth, mask, modalities)
        for pattern, r in report[name].items():
            print(f"| {name} | {pattern} | {r['ppca']['cosine']:.3f} | {r['mean']['cosine']:.3f} | "
                  f"{r['ppca']['mse']:.3f} | {r['mean']['mse']:.3f} | {r['anchor_shift']['observed_only']:.3f} | "
                  f"{r['anchor_shift']['calibrated']:.3f} |")
    return report


if __name__ == "__main__":
    main()
