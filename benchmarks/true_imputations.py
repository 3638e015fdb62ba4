"""The diagnostics' imputations: the true embeddings of the modalities stage 2 hides, as detached columns.

`PMRL (true missing, detached)` puts the model's own embedding of the hidden input (eval mode, no gradient) in each
imputed slot: the ceiling of any imputer. `PMRL (noisy true, detached)` puts a fixed per-row corruption of it
whose cosine to the truth is the warm-started PPCA imputer's on the first stage-2 batch:

    x_i = c t_i + sqrt(1 - c^2) e_i,   e_i a fixed random unit vector of row i orthogonal to t_i,   cos(x_i, t_i) = c
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from calmrl_hf import CalMRLModel


class WithTruth(torch.utils.data.Dataset):
    """Stage 2's rows, each with the same instance whole (`full[index]`) and its index."""

    def __init__(self, partial, full):
        if len(partial) != len(full):
            raise ValueError(f"the partial and full splits differ in length: {len(partial)} vs {len(full)}")
        self.partial, self.full = partial, full

    def __len__(self) -> int:
        return len(self.partial)

    def __getitem__(self, index: int) -> dict:
        return {"partial": self.partial[index], "full": self.full[index], "row": index}


def collate_with_truth(collate_fn: Callable) -> Callable[[list[dict]], dict]:
    """The benchmark's collate on the partial rows, plus `true_inputs` (the full rows collated) and `rows`; other
    datasets' items (the warm start's, evaluation's) as the benchmark's collate makes them."""

    def collate(items: list[dict]) -> dict:
        if "partial" not in items[0]:
            return collate_fn(items)
        batch = collate_fn([item["partial"] for item in items])
        batch["true_inputs"] = collate_fn([item["full"] for item in items])
        batch["rows"] = torch.tensor([item["row"] for item in items])
        return batch

    return collate


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """The model in eval mode (no dropout, batch-norm running statistics untouched), each module's mode restored."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


class TrueImputations:
    """`imputation_fn` of `calmrl_hf.training.train` for the diagnostics: `kind` "exact" or "noisy"."""

    def __init__(self, kind: str, num_rows: int, seed: int):
        if kind not in ("exact", "noisy"):
            raise ValueError(f"kind = {kind!r}; expected 'exact' or 'noisy'.")
        self.kind, self.num_rows, self.seed = kind, num_rows, seed
        self.noise: torch.Tensor | None = None  # [N, k, D] fixed per-row directions
        self.cosine: float | None = None  # c, measured once

    @torch.no_grad()
    def __call__(self, model: CalMRLModel, batch: dict) -> tuple[torch.Tensor, dict]:
        batch = dict(batch)
        true_inputs, rows = batch.pop("true_inputs"), batch.pop("rows")
        true_inputs = {key: value for key, value in true_inputs.items() if key not in ("labels", "index", "ids")}
        with evaluating(model):
            truth, _ = model.embed_modalities(**true_inputs)  # [B, k, D] unit norm
        if self.kind == "exact":
            return truth, batch
        if self.noise is None:
            generator = torch.Generator().manual_seed(10_000 + self.seed)
            self.noise = torch.randn((self.num_rows, *truth.shape[1:]), generator=generator)
            self.cosine = self.ppca_cosine(model, truth, batch["modality_mask"])
        noise = self.noise[rows].to(truth)
        orthogonal = F.normalize(noise - (noise * truth).sum(-1, keepdim=True) * truth, dim=-1)  # e_i
        c = self.cosine
        return c * truth + (1.0 - c**2) ** 0.5 * orthogonal, batch

    @staticmethod
    def ppca_cosine(model: CalMRLModel, truth: torch.Tensor, observed: torch.Tensor) -> float:
        """The model's PPCA imputer's mean cosine to the truth over the missing vision / audio slots of a batch."""
        imputed = F.normalize(model.imputer.impute(truth, observed.to(truth.device)), dim=-1)
        columns = torch.zeros_like(observed)
        for name in ("vision", "audio"):
            columns[:, model.config.modality_index(name)] = True
        missing = ~observed.to(truth.device) & columns.to(truth.device)
        return float(F.cosine_similarity(imputed, truth, dim=-1)[missing].mean())
