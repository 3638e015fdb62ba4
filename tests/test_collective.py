"""Cross-process gathers on 2 CPU processes (torchrun, gloo): unequal batches, every objective, no hang."""

from __future__ import annotations

import pytest
import torch

from collective_fixtures import SPLIT, objective_batches, objective_losses
from launching import torchrun


pytestmark = pytest.mark.slow  # every test reads a 2-process torchrun


@pytest.fixture(scope="module")
def objective_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("objectives")
    torchrun("dist_objectives_worker.py", str(out))
    return [torch.load(out / f"rank_{rank}.pt") for rank in (0, 1)]


@pytest.mark.parametrize("name", list(objective_losses()))
def test_gathered_objective_equals_the_single_process_loss_on_the_whole_batch(objective_runs, name):
    """4 rows on rank 0, 7 on rank 1 (rank 0 has no row for one InfoNCE pair, none for TRIANGLE): the mean of the
    processes' losses is the one-process loss of all 11 rows, and the gradient each process gets for its own rows
    (summed over the processes' losses by the gather's backward) is 2 x the whole-batch gradient of those rows, so
    that DDP's averaging over the 2 processes gives exactly the whole-batch gradient."""
    embeddings, mask = objective_batches()
    whole = embeddings.clone().requires_grad_(True)
    reference = objective_losses()[name](whole, mask, None)
    reference.backward()
    rank0, rank1 = objective_runs[0][name], objective_runs[1][name]
    torch.testing.assert_close((rank0["loss"] + rank1["loss"]) / 2, reference.detach())
    torch.testing.assert_close(rank0["grad"] / 2, whole.grad[:SPLIT])
    torch.testing.assert_close(rank1["grad"] / 2, whole.grad[SPLIT:])
    assert rank0["loss"] != rank1["loss"]  # the processes' shares differ: each is its own rows' part


@pytest.fixture(scope="module")
def model_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    torchrun("dist_model_worker.py", str(out))
    return [torch.load(out / f"rank_{rank}.pt") for rank in (0, 1)]


@pytest.mark.parametrize("objective", ["pmrl", "pairwise_infonce", "gram"])
def test_every_rank_runs_every_tower_and_the_matching_term_whatever_its_batch(model_runs, objective):
    """Rank 1's batch has no vision row and one matching row (it used to skip the vision tower, and to return
    from `matching_step` before the gather the other rank waited in). Both ranks return, run every tower, give
    the same tower and head parameters a gradient (all but the poolers mean pooling leaves unused; rank 1's
    vision tower included), and their alignment losses average to the one-process loss of the whole batch."""
    from collective_fixtures import model_batch, model_config

    from calmrl_hf import CalMRLModel

    for run in model_runs:
        assert run[objective]["towers"] == ["audio", "text", "vision"]
        towers_without_grad = [n for n in run[objective]["no_grad"] if not n.startswith(("fusion.", "logit_scale"))]
        assert towers_without_grad == [f"encoders.{m}.pooler.dense.{w}" for m in ("vision", "text")
                                       for w in ("weight", "bias")]
        assert torch.isfinite(run[objective]["matching_loss"])
    torch.manual_seed(0)
    reference = CalMRLModel(model_config(objective)).eval()(**model_batch(), return_loss=True)
    mean = (model_runs[0][objective]["alignment_loss"] + model_runs[1][objective]["alignment_loss"]) / 2
    torch.testing.assert_close(mean, reference.alignment_loss.detach(), rtol=1e-5, atol=1e-6)
