"""Retrieval at scale: 🤗 datasets' FAISS index (`calmrl_hf.evaluation.faiss_index.FaissIndex`) against the brute-force
`calmrl_hf.evaluation.retrieval.EmbeddingIndex`, on galleries of 100,000 and 1,000,000 unit-norm embeddings.

    python -m benchmarks.bench_faiss                       # 100k and 1M items, D=64, 1,000 queries, top-10
    python -m benchmarks.bench_faiss --sizes 10000 --quick

For each gallery: build time (from the embedding dataset to a searchable index) and time per query (a batch of
queries, divided by their number), and the recall@10 of the approximate index against the exact top-10. The
gallery is an embedding dataset as `calmrl embed --output x.parquet` writes it (id, modality_mask, one column per
modality), built here straight from Arrow arrays (random clustered embeddings: real galleries are not uniform).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from datasets import Dataset

from calmrl_hf.evaluation.faiss_index import FaissIndex
from calmrl_hf.evaluation.retrieval import EmbeddingIndex

from ._timing import machine


def clustered_gallery(size: int, dim: int, seed: int = 0) -> tuple[Dataset, torch.Tensor]:
    """An embedding dataset of `size` vision embeddings around 1,000 centres, and its [size, dim] tensor."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(1000, dim, generator=generator), dim=-1)
    assignment = torch.randint(0, 1000, (size,), generator=generator)
    vectors = F.normalize(centres[assignment] + 0.3 * torch.randn(size, dim, generator=generator) / dim ** 0.5, dim=-1)
    values = pa.array(vectors.numpy().reshape(-1))
    table = pa.table({"id": pa.array(np.arange(size)), "modality_mask": pa.array([[True]] * size),
                      "vision": pa.FixedSizeListArray.from_arrays(values, dim)})
    return Dataset(table), vectors


def seconds(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def measure(size: int, dim: int, num_queries: int, k: int, nlist: int, nprobe: int) -> list[tuple]:
    dataset, vectors = clustered_gallery(size, dim)
    generator = torch.Generator().manual_seed(1)
    queries = F.normalize(vectors[torch.randint(0, size, (num_queries,), generator=generator)]
                          + 0.1 * torch.randn(num_queries, dim, generator=generator) / dim ** 0.5, dim=-1)
    rows = []
    build, brute = seconds(lambda: EmbeddingIndex(vectors))
    search, (_, exact) = seconds(lambda: brute.search(queries, k))
    rows.append(("brute force (EmbeddingIndex)", build, search / num_queries, 1.0))
    factories = [("FAISS Flat (exact)", dict(string_factory="Flat")),
                 (f"FAISS IVF{nlist},Flat nprobe={nprobe}", dict(string_factory=f"IVF{nlist},Flat",
                                                                 train_size=min(size, 40 * nlist), nprobe=nprobe))]
    for name, settings in factories:
        build, index = seconds(lambda: FaissIndex(dataset, "vision", **settings))
        search, (_, found) = seconds(lambda: index.search(queries, k))
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found.tolist(), exact.tolist())])
        rows.append((name, build, search / num_queries, recall))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="100 queries, small IVF (seconds)")
    args = parser.parse_args(argv)
    print(f"Machine: {machine()}\n")
    for size in args.sizes:
        nlist = 64 if args.quick else max(64, int(4 * size ** 0.5) // 64 * 64)
        rows = measure(size, args.dim, 100 if args.quick else args.queries, args.k, nlist, nprobe=max(1, nlist // 32))
        print(f"N={size:,}, D={args.dim}, {100 if args.quick else args.queries} queries, top-{args.k}\n")
        print("| index | build (s) | per query (ms) | recall@k vs exact |\n|---|---:|---:|---:|")
        for name, build, per_query, recall in rows:
            print(f"| {name} | {build:.2f} | {1000 * per_query:.3f} | {recall:.3f} |")
        print()


if __name__ == "__main__":
    main()
