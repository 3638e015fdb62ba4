"""The imputer step of CalMRL's bi-step (`ImputerUpdater`) and its warm start (full EM before training).

Statistics are additive (`PPCAStatistics` are sums over rows), so the batch statistics of all processes are summed
with ONE all-reduce of a flat float64 vector, accumulated (exponential moving average or per epoch), and every
process runs the same closed-form M-step on identical statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from ..host_mask import HostMask, host_mask_of
from ..imputer import PPCAStatistics
from ..modality_inputs import raise_bad_values, take_deferred_checks
from ..modeling_calmrl import CalMRLModel
from .arguments import CalMRLTrainingArguments
from .evaluation import embed_dataset


logger = get_logger(__name__)


class ImputerUpdater:
    """The imputer step, passed to `CalMRLModel.forward` as `imputer_update_fn`: the batch's statistics (observed
    entries only), summed across processes, accumulated, then the closed-form M-step."""

    def __init__(self, model: CalMRLModel, accelerator: Accelerator, args: CalMRLTrainingArguments):
        self.imputer = model.imputer
        self.accelerator = accelerator
        self.mode = args.imputer_statistics
        self.decay = args.imputer_ema_decay
        imputer = self.imputer
        self.min_rows = args.imputer_min_rows or 2 * (imputer.latent_dim + 1)
        self.statistics = PPCAStatistics.zeros(imputer.num_modalities, imputer.dim, imputer.latent_dim,
                                               device=imputer.weight.device)
        self.prior_statistics = self.statistics.scale(0.0)  # warm-start statistics, see `seed`
        self.enabled = model.config.imputer_method in ("ppca", "mean") and self.mode != "frozen"

    def start_epoch(self) -> None:
        if self.mode == "epoch":
            self.statistics = self.statistics.scale(0.0)

    @torch.no_grad()
    def __call__(self, embeddings: torch.Tensor, modality_mask: torch.Tensor) -> None:
        if not self.enabled:
            return
        embeddings = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))  # bf16 -> float32
        # forward validated this batch where it entered the model and read its mask back then: no second check,
        # and the statistics find the mask's patterns on its host copy
        batch_stats = self.imputer._sufficient_statistics(embeddings, modality_mask, host_mask_of(modality_mask))
        flat = self.accelerator.reduce(batch_stats.to_flat(), reduction="sum")  # one all-reduce
        imputer = self.imputer
        batch_stats = PPCAStatistics.from_flat(flat, imputer.num_modalities, imputer.dim, imputer.latent_dim)
        decay = self.decay if self.mode == "ema" else 1.0
        # S <- decay * S + S_batch (ema), or S <- S + S_batch within the epoch
        statistics = self.statistics.scale(decay) + batch_stats
        total = statistics + self.prior_statistics
        ready = total.count >= self.min_rows  # a modality's first M-step waits for enough rows (min_rows >= 1)
        # the step's one read: the checks forward held back (its towers' outputs are finite), whether the summed
        # statistics are finite, and which modalities the M-step updates
        finite, ready_values = raise_bad_values(take_deferred_checks(),
                                                reads=[torch.isfinite(total.to_flat()).all(), ready])
        if not finite[0]:
            self.imputer._check_statistics(total)  # raises, naming the field and the modalities
        self.statistics = statistics
        # the M-step's parameters need no check of their own: they solve finite statistics of unit-norm embeddings
        self.imputer._update_modalities(total, HostMask(ready, ready_values), verify=False)

    def seed(self, statistics: PPCAStatistics, window_rows: float) -> None:
        """Keep warm-start statistics as a fixed prior that every M-step adds to the accumulated ones.

        Scaled to at most `window_rows` rows per modality (`warm_start_window`: the mass of one full EMA window, or
        one epoch in epoch mode), so it weighs like the recent data; it never decays: it is the only source of the
        cross-modal statistics that partial data (video-text, audio-text) never observes together (vision-audio),
        which online EM on partial batches alone would forget.
        """
        self.prior_statistics = statistics.scale((window_rows / statistics.count.clamp_min(1.0)).clamp(max=1.0))

    def state_dict(self) -> dict[str, Any]:
        return {"statistics": self.statistics.state_dict(), "prior_statistics": self.prior_statistics.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.statistics.load_state_dict(state["statistics"])
        self.prior_statistics.load_state_dict(state["prior_statistics"])


def warm_start_imputer(
    model, dataloader, accelerator: Accelerator, max_iter: int
) -> tuple[list[float], PPCAStatistics]:
    """Fit the imputer by full EM on the embeddings of a (full-modality) dataset; identical on every process.

    Returns the log-likelihood history and the statistics of the data under the fitted parameters.
    """
    data = embed_dataset(model, dataloader, accelerator)
    imputer = accelerator.unwrap_model(model).imputer
    embeddings = data["embeddings"].to(imputer.weight.device)
    mask = data["modality_mask"].to(imputer.weight.device)
    history = imputer.fit(embeddings, mask, max_iter=max_iter)
    return history, imputer.sufficient_statistics(embeddings, mask)


def warm_start_window(args: CalMRLTrainingArguments, rows_per_step: int, train_loader, streaming: bool) -> float:
    """The rows the warm-start prior weighs as (`ImputerUpdater.seed`): one EMA window, or one epoch in epoch mode
    (one EMA window for a streaming train set too: an epoch's length may be unknown)."""
    if args.imputer_statistics == "ema" or streaming:
        return rows_per_step / (1.0 - args.imputer_ema_decay)
    return rows_per_step * len(train_loader)


def warm_start(imputer_step: ImputerUpdater, model, dataloader, accelerator: Accelerator, max_iter: int,
               window_rows: float) -> None:
    """Fit the imputer on the warm-start data by full EM and keep its statistics as the imputer step's prior,
    weighing at most `window_rows` rows per modality."""
    history, statistics = warm_start_imputer(model, dataloader, accelerator, max_iter)
    imputer_step.seed(statistics, window_rows)
    logger.info("Imputer warm start: %d EM iterations, log-likelihood %.1f -> %.1f.",
                len(history), history[0], history[-1])


__all__ = ["ImputerUpdater", "warm_start", "warm_start_imputer", "warm_start_window"]
