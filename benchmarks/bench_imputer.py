"""PPCA imputer cost, measured side by side in one run.

    python -m benchmarks.bench_imputer            # 100,000 rows, k=4, d=512, q=64
    python -m benchmarks.bench_imputer --quick

1. One full EM iteration (E-step statistics + closed-form M-step) on N rows with mixed missingness patterns,
   against the matrix products no implementation can avoid, timed on the same data: the projection
   sum_m W_m^T (z_i^m - mu_m) / s2_m ([N, k, d] x [k, d, q]) and the cross moments B_m = sum_i z_i^m E[b~_i]^T
   ([d, N] x [N, q+1] per modality). Target: at most 2x.
2. The imputer's share of a training step: E-step + imputation of one batch of 256 against a forward + backward
   of a small CalMRLModel (tiny ViT / AST / BERT towers) on the same batch.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from calmrl_hf import PPCAImputer

from ._timing import machine, median_seconds


PATTERNS = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 1, 1], [1, 0, 1, 1]],
                        dtype=torch.bool)


def make_data(rows: int, k: int, dim: int, latent_dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(k, dim, latent_dim, generator=generator) / dim**0.5
    latent = torch.randn(rows, latent_dim, generator=generator)
    z = torch.einsum("kdq,nq->nkd", weight, latent) + 0.05 * torch.randn(rows, k, dim, generator=generator)
    z = F.normalize(z, dim=-1)
    mask = PATTERNS[:, :k][torch.randint(len(PATTERNS), (rows,), generator=generator)]
    mask[~mask.any(1), 0] = True
    return z, mask


def time_em_iteration(rows: int = 100_000, k: int = 4, dim: int = 512, latent_dim: int = 64,
                      repeats: int = 3) -> dict:
    z, mask = make_data(rows, k, dim, latent_dim)
    imputer = PPCAImputer(k, dim, latent_dim)
    imputer.m_step(imputer.sufficient_statistics(z, mask))  # a realistic (fitted) state

    def em_iteration():
        imputer.m_step(imputer.sufficient_statistics(z, mask))

    weight = imputer.weight.clone()
    latent = torch.randn(rows, latent_dim)
    observed = torch.where(mask.unsqueeze(-1), z, 0.0)

    def unavoidable_products():
        torch.einsum("nkd,kdq->nq", observed, weight)  # b_i
        for m in range(k):
            observed[:, m].T @ latent  # B_m = sum_i z_i^m m_i^T

    em = median_seconds(em_iteration, repeats)
    floor = median_seconds(unavoidable_products, repeats)
    return {"em_seconds": em, "products_seconds": floor, "ratio": em / floor}


def time_batch_share(batch_size: int = 256, repeats: int = 5) -> dict:
    from transformers import ASTConfig, BertConfig, ViTConfig

    from calmrl_hf import CalMRLConfig, CalMRLModel

    config = CalMRLConfig(
        encoder_configs={
            "vision": ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=128),
            "audio": ASTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                               patch_size=16, frequency_stride=16, time_stride=16, max_length=64, num_mel_bins=32),
            "text": BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128),
        },
        projection_dim=128, imputer_latent_dim=16,
    )
    model = CalMRLModel(config)
    generator = torch.Generator().manual_seed(0)
    mask = PATTERNS[torch.randint(len(PATTERNS), (batch_size,), generator=generator)]
    counts = mask.sum(0).tolist()
    batch = {
        "modality_mask": mask,
        "vision_pixel_values": torch.randn(counts[0], 3, 32, 32, generator=generator),
        "audio_input_values": torch.randn(counts[1], 64, 32, generator=generator),
        "text_input_ids": torch.randint(1, 1000, (counts[2], 16), generator=generator),
        "subtitle_input_ids": torch.randint(1, 1000, (counts[3], 16), generator=generator),
    }
    with torch.no_grad():
        embeddings, _ = model.embed_modalities(**batch)
    model.imputer.fit(embeddings, mask, max_iter=5)

    def train_step():
        model.zero_grad()
        model(**batch, return_loss=True).loss.backward()

    def imputer_step():
        model.imputer.impute(embeddings, mask)

    step = median_seconds(train_step, repeats)
    impute = median_seconds(imputer_step, repeats * 4)
    return {"train_step_seconds": step, "impute_seconds": impute, "share": impute / step}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num_modalities", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--latent_dim", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="10,000 rows, d=128, q=16")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.dim, args.latent_dim, args.batch_size = 10_000, 128, 16, 64
    print(f"Machine: {machine()}\n")
    em = time_em_iteration(args.rows, args.num_modalities, args.dim, args.latent_dim, args.repeats)
    print(f"One EM iteration, N={args.rows:,}, k={args.num_modalities}, d={args.dim}, q={args.latent_dim}, "
          f"mixed patterns\n")
    print("| | median time (s) |\n|---|---:|")
    print(f"| EM iteration (statistics + M-step) | {em['em_seconds']:.3f} |")
    print(f"| unavoidable products (projection + cross moments) | {em['products_seconds']:.3f} |")
    print(f"| ratio | {em['ratio']:.2f}x |\n")
    share = time_batch_share(args.batch_size)
    print(f"Batch of {args.batch_size}: imputer E-step + imputation vs a forward + backward of a small CalMRLModel\n")
    print("| | median time (ms) |\n|---|---:|")
    print(f"| forward + backward | {1e3 * share['train_step_seconds']:.1f} |")
    print(f"| E-step + imputation | {1e3 * share['impute_seconds']:.2f} |")
    print(f"| imputer / training step | {100 * share['share']:.2f}% |")
    return {"em": em, "batch": share}


if __name__ == "__main__":
    main()
