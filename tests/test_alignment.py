"""Every objective against a direct computation written independently (SVD, explicit determinants, loops)."""

import pytest
import torch
import torch.nn.functional as F

from calmrl_hf.alignment import (
    anchor_infonce_loss,
    anchor_shift,
    anchor_shift_bounds,
    calibrated_anchor_shift,
    gram_loss,
    gram_singular_values,
    pairwise_infonce_loss,
    pmrl_loss,
    triangle_loss,
)


def unit(*shape, seed=0, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=-1)


def random_mask(batch, k, seed=0):
    mask = torch.rand(batch, k, generator=torch.Generator().manual_seed(seed)) > 0.35
    mask[:, 0] = True  # the anchor (index 0) observed, so every objective has rows
    mask[0] = True  # and one complete row
    return mask


def reference_leading(Z, mask):
    """Per instance, torch.linalg.svd(full_matrices=True) of the d x |Omega| observed matrix (authors' way)."""
    values, vectors = [], []
    for b in range(Z.shape[0]):
        A = Z[b][mask[b]].T
        U, S, _ = torch.linalg.svd(A, full_matrices=True)
        u = U[:, 0]
        key = (A.T @ u).sum()
        if abs(float(key.detach())) < 1e-6:  # documented tie-break: first observed column
            key = A[:, 0] @ u
        values.append(S)
        vectors.append(u if key >= 0 else -u)
    return values, torch.stack(vectors)


def reference_pmrl(Z, mask, tau1=0.05, tau2=0.1):
    values, U = reference_leading(Z, mask)
    intra = torch.stack([torch.logsumexp(s / tau1, 0) - s[0] / tau1 for s in values]).mean()
    logits = U @ U.T / tau2
    inter = (torch.logsumexp(logits, 1) - logits.diagonal()).mean()
    return intra + inter


def smoothed_ce(logits, eps):
    n = logits.shape[0]
    log_p = logits.log_softmax(dim=1)
    target = torch.full_like(log_p, eps / n)
    target += torch.eye(n, dtype=logits.dtype) * (1 - eps)
    return -(target * log_p).sum(1).mean()


def reference_gram(Z, mask, temperature, eps=0.1, anchor=0):
    k = Z.shape[1]
    keep = [b for b in range(Z.shape[0]) if mask[b, anchor] and any(mask[b, m] for m in range(k) if m != anchor)]
    V = torch.zeros(len(keep), len(keep), dtype=Z.dtype)
    for a, i in enumerate(keep):
        for c, j in enumerate(keep):
            vectors = [Z[i, anchor]] + [Z[j, m] for m in range(k) if m != anchor and mask[j, m]]
            M = torch.stack(vectors)
            V[a, c] = torch.linalg.det(M @ M.T).abs().sqrt()
    logits = -V / temperature
    return (smoothed_ce(logits, eps) + smoothed_ce(logits.T, eps)) / 2


def reference_triangle(Z, temperature, eps=0.1, true_area=False):
    B = Z.shape[0]
    A = torch.zeros(B, B, dtype=Z.dtype)
    for i in range(B):
        for j in range(B):
            u, w = Z[i, 0] - Z[j, 1], Z[i, 0] - Z[j, 2]
            value = (u @ u) * (w @ w) - (u @ w) ** 2
            A[i, j] = value.sqrt() / 2 if true_area else value / 2
    logits = -A / temperature
    return (smoothed_ce(logits, eps) + smoothed_ce(logits.T, eps)) / 2


def clip_loss(x, y, temperature):
    logits = x @ y.T / temperature
    target = torch.arange(x.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def assert_same_value_and_gradient(ours, reference, Z):
    Z1 = Z.clone().requires_grad_(True)
    Z2 = Z.clone().requires_grad_(True)
    a, b = ours(Z1), reference(Z2)
    torch.testing.assert_close(a, b)
    ga, = torch.autograd.grad(a, Z1)
    gb, = torch.autograd.grad(b, Z2)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("masked", [False, True])
def test_pmrl_equals_svd_reference(masked):
    Z = unit(12, 4, 9)
    mask = random_mask(12, 4) if masked else torch.ones(12, 4, dtype=torch.bool)
    assert_same_value_and_gradient(lambda z: pmrl_loss(z, mask if masked else None, tau1=0.05, tau2=0.1),
                                   lambda z: reference_pmrl(z, mask), Z)


def test_singular_values_and_canonical_sign():
    Z = unit(10, 4, 9)
    mask = random_mask(10, 4)
    singular, u = gram_singular_values(Z, mask)
    values, reference_u = reference_leading(Z, mask)
    for b in range(10):
        n = int(mask[b].sum())
        torch.testing.assert_close(singular[b, :n], values[b])
        assert torch.all(singular[b, n:] == 0)
    torch.testing.assert_close(u, reference_u)
    assert torch.all((torch.einsum("bkd,bd->bk", Z, u) * mask).sum(1) >= -1e-9)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(10, dtype=torch.float64))


def test_inter_term_is_invariant_to_the_backend_sign_once_canonical():
    Z = unit(8, 3, 6)
    loss = pmrl_loss(Z)
    flipped_columns = Z.clone()
    flipped_columns[:, :, 0] *= -1  # a reflection of the space changes nothing
    torch.testing.assert_close(pmrl_loss(flipped_columns), loss)


@pytest.mark.parametrize("masked", [False, True])
def test_gram_equals_explicit_determinants(masked):
    Z = unit(7, 4, 6, seed=1)
    mask = random_mask(7, 4, seed=1) if masked else torch.ones(7, 4, dtype=torch.bool)
    assert_same_value_and_gradient(lambda z: gram_loss(z, mask if masked else None, temperature=0.3),
                                   lambda z: reference_gram(z, mask, 0.3), Z)


def test_gram_with_other_anchor():
    Z = unit(6, 3, 5, seed=2)
    assert_same_value_and_gradient(lambda z: gram_loss(z, temperature=0.2, anchor=2),
                                   lambda z: reference_gram(z, torch.ones(6, 3, dtype=torch.bool), 0.2, anchor=2), Z)


@pytest.mark.parametrize("true_area", [False, True])
def test_triangle_equals_explicit_areas(true_area):
    Z = unit(6, 3, 5, seed=3)
    assert_same_value_and_gradient(lambda z: triangle_loss(z, temperature=0.2, true_area=true_area),
                                   lambda z: reference_triangle(z, 0.2, true_area=true_area), Z)


def test_triangle_observed_only_uses_complete_rows_and_named_modalities():
    Z = unit(8, 4, 5, seed=4)
    mask = random_mask(8, 4, seed=4)
    chosen = [0, 2, 3]
    keep = mask[:, chosen].all(1)
    assert 2 <= int(keep.sum()) < 8
    torch.testing.assert_close(
        triangle_loss(Z, mask, temperature=0.2, modalities=chosen),
        reference_triangle(Z[keep][:, chosen], 0.2),
    )
    with pytest.raises(ValueError, match="exactly three"):
        triangle_loss(Z)


def test_anchor_and_pairwise_infonce_equal_loops_over_pairs():
    Z = unit(10, 4, 6, seed=5)
    mask = random_mask(10, 4, seed=5)
    expected_anchor, expected_pairs = [], []
    for a in range(4):
        for b in range(a + 1, 4):
            both = mask[:, a] & mask[:, b]
            if both.sum() >= 2:
                loss = clip_loss(Z[both, a], Z[both, b], 0.1)
                expected_pairs.append(loss)
                if a == 0:
                    expected_anchor.append(loss)
    assert_same_value_and_gradient(lambda z: anchor_infonce_loss(z, mask, anchor=0, temperature=0.1),
                                   lambda z: torch.stack([clip_loss(z[(mask[:, 0] & mask[:, m])][:, 0],
                                                                    z[(mask[:, 0] & mask[:, m])][:, m], 0.1)
                                                          for m in range(1, 4)
                                                          if (mask[:, 0] & mask[:, m]).sum() >= 2]).mean(), Z)
    torch.testing.assert_close(pairwise_infonce_loss(Z, mask, temperature=0.1), torch.stack(expected_pairs).mean())
    torch.testing.assert_close(anchor_infonce_loss(Z, mask, anchor=0, temperature=0.1),
                               torch.stack(expected_anchor).mean())


@pytest.mark.parametrize("objective", ["pmrl", "gram", "triangle", "anchor", "pairwise"])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_float64(objective, masked):
    k = 3
    Z = unit(4, k, 5, seed=6).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool) if masked else None
    functions = {
        "pmrl": lambda z: pmrl_loss(z, mask),
        "gram": lambda z: gram_loss(z, mask, temperature=0.5),
        "triangle": lambda z: triangle_loss(z, mask, temperature=0.5),
        "anchor": lambda z: anchor_infonce_loss(z, mask, anchor=0, temperature=0.5),
        "pairwise": lambda z: pairwise_infonce_loss(z, mask, temperature=0.5),
    }
    assert torch.autograd.gradcheck(functions[objective], (Z,))


def test_learnable_temperature_gets_a_gradient_and_is_clamped():
    Z = unit(6, 3, 5, seed=7)
    temperature = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    gram_loss(Z, temperature=temperature).backward()
    assert temperature.grad is not None and temperature.grad != 0
    tiny = torch.tensor(1e-8, dtype=torch.float64)
    torch.testing.assert_close(gram_loss(Z, temperature=tiny), gram_loss(Z, temperature=1e-3))


def test_repeated_singular_values_keep_finite_gradients():
    base = unit(5, 1, 6, seed=8)
    Z = base.expand(5, 4, 6).clone().requires_grad_(True)  # all modalities of an instance coincide
    loss = pmrl_loss(Z)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(Z.grad).all()
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[1, 2:] = False  # masked columns: repeated zero eigenvalues
    Z.grad = None
    pmrl_loss(Z, mask).backward()
    assert torch.isfinite(Z.grad).all()


def test_gathered_columns_give_the_same_loss_as_one_big_batch():
    """pmrl_loss on two halves with the other half's u as extra columns == the inter term of the whole."""
    Z = unit(8, 3, 5, seed=9)
    whole = pmrl_loss(Z)
    _, u_all = gram_singular_values(Z)
    halves = [pmrl_loss(Z[i : i + 4], gather_fn=lambda u, i=i: (torch.cat([u_all[:i], u, u_all[i + 4:]]), i))
              for i in (0, 4)]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole)


def test_anchor_shift_bounds_hold_on_random_instances():
    Z = unit(2000, 4, 16, seed=10)
    generator = torch.Generator().manual_seed(11)
    mask = torch.rand(2000, 4, generator=generator) > 0.5
    mask[torch.arange(2000), torch.randint(4, (2000,), generator=generator)] = True  # >= 1 observed
    all_observed = mask.all(1)
    mask[all_observed, 0] = False  # >= 1 missing
    mask[~mask.any(1), 1] = True
    shift = anchor_shift(Z, mask)
    lower, upper = anchor_shift_bounds(Z, mask)
    assert torch.all(lower <= shift + 1e-9)
    assert torch.all(shift <= upper + 1e-9)
    assert float(shift.mean()) > 0.1  # the bounds are not trivially met by a zero shift
    # calibration with the true missing embeddings removes the shift entirely
    torch.testing.assert_close(calibrated_anchor_shift(Z, Z), torch.zeros(2000, dtype=torch.float64))
    # and calibration with noisy embeddings leaves less shift than dropping them
    noisy = torch.where(mask.unsqueeze(-1), Z, F.normalize(Z + 0.3 * unit(2000, 4, 16, seed=12), dim=-1))
    assert float(calibrated_anchor_shift(Z, noisy).mean()) < float(shift.mean())


def test_bad_inputs_raise_clear_errors():
    Z = unit(4, 3, 5)
    with pytest.raises(ValueError, match=r"\[B, k, d\]"):
        pmrl_loss(Z[0])
    with pytest.raises(TypeError, match="bool"):
        pmrl_loss(Z, torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"shape \[4, 3\]"):
        pmrl_loss(Z, torch.ones(4, 2, dtype=torch.bool))
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[2] = False
    with pytest.raises(ValueError, match=r"Rows \[2\]"):
        gram_loss(Z, mask)
    with pytest.raises(ValueError, match="anchor"):
        gram_loss(Z, anchor=5)
    only_anchor = torch.zeros(4, 3, dtype=torch.bool)
    only_anchor[:, 0] = True
    with pytest.raises(ValueError, match="no instance observes the anchor"):
        gram_loss(Z, only_anchor)
    with pytest.raises(ValueError, match="positive"):
        pairwise_infonce_loss(Z, temperature=0.0)


def test_nan_in_masked_columns_does_not_leak():
    Z = unit(6, 3, 5, seed=13)
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[1, 2] = mask[3, 1] = False
    dirty = Z.clone()
    dirty[~mask] = float("nan")
    for loss in (pmrl_loss, lambda z, m: gram_loss(z, m), lambda z, m: pairwise_infonce_loss(z, m)):
        torch.testing.assert_close(loss(dirty, mask), loss(Z, mask))
