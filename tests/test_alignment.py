"""Every objective against a direct computation written independently (SVD, explicit determinants, loops)."""

import pytest
import torch
import torch.nn.functional as F

from calmrl_hf.alignment import OBJECTIVES as REGISTRY
from calmrl_hf.alignment import (
    anchor_infonce_loss,
    anchor_shift,
    calibrated_anchor_shift,
    gram_loss,
    gram_singular_values,
    gram_volume,
    pairwise_infonce_loss,
    pmrl_loss,
    triangle_loss,
)


def unit(*shape, seed=0, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=-1)


def random_mask(batch, k, seed=0, anchor_always=True):
    mask = torch.rand(batch, k, generator=torch.Generator().manual_seed(seed)) > 0.35
    if anchor_always:
        mask[:, 0] = True  # the anchor (index 0) observed, so every objective has rows
    mask[0] = True  # one complete row
    mask[~mask.any(1), -1] = True  # every row observes something
    return mask


FULL = None  # modality_mask=None: all observed


# ---------------------------------------------------------------------------- references
def canonical(u, A):
    """The documented sign rule on a reference vector: sum_m <u, z^m> >= 0, ties by the first column."""
    key = (A.T @ u).sum()
    if abs(float(key.detach())) < 1e-6:
        key = A[:, 0] @ u
    return u if key >= 0 else -u


def reference_leading(Z, mask, flips=None):
    """Per instance, torch.linalg.svd(full_matrices=True) of the d x |Omega| observed matrix (authors' way).

    `flips` [B] of +-1 multiplies the backend's u before canonicalisation (a different LAPACK/cuSOLVER sign)."""
    values, vectors = [], []
    for b in range(Z.shape[0]):
        A = Z[b][mask[b]].T  # d x |Omega_b|
        U, S, _ = torch.linalg.svd(A, full_matrices=True)
        u = U[:, 0] if flips is None else U[:, 0] * flips[b]
        values.append(S)
        vectors.append(canonical(u, A))
    return values, torch.stack(vectors)


def reference_intra(values, tau1):
    return torch.stack([torch.logsumexp(s / tau1, 0) - s[0] / tau1 for s in values]).mean()


def reference_inter(U, tau2):
    logits = U @ U.T / tau2
    return (torch.logsumexp(logits, 1) - logits.diagonal()).mean()


def reference_pmrl(Z, mask, tau1=0.05, tau2=0.1):
    values, U = reference_leading(Z, mask)
    return reference_intra(values, tau1) + reference_inter(U, tau2)


def smoothed_ce(logits, eps):
    n = logits.shape[0]
    log_p = logits.log_softmax(dim=1)
    target = torch.full_like(log_p, eps / n) + torch.eye(n, dtype=logits.dtype) * (1 - eps)
    return -(target * log_p).sum(1).mean()


def reference_gram(Z, mask, temperature, eps=0.1, anchor=0):
    """Explicit Gram matrices of only the observed vectors, one det per (i, j)."""
    k = Z.shape[1]
    keep = [b for b in range(Z.shape[0]) if mask[b, anchor] and any(mask[b, m] for m in range(k) if m != anchor)]
    V = torch.zeros(len(keep), len(keep), dtype=Z.dtype)
    for a, i in enumerate(keep):
        for c, j in enumerate(keep):
            M = torch.stack([Z[i, anchor]] + [Z[j, m] for m in range(k) if m != anchor and mask[j, m]])
            V[a, c] = torch.linalg.det(M @ M.T).abs().sqrt()
    logits = -V / temperature
    return (smoothed_ce(logits, eps) + smoothed_ce(logits.T, eps)) / 2


def reference_triangle(Z, temperature, eps=0.1, true_area=False, vertices=(0, 1, 2)):
    a, p, r = vertices
    B = Z.shape[0]
    A = torch.zeros(B, B, dtype=Z.dtype)
    for i in range(B):
        for j in range(B):
            u, w = Z[i, a] - Z[j, p], Z[i, a] - Z[j, r]
            value = (u @ u) * (w @ w) - (u @ w) ** 2
            A[i, j] = value.sqrt() / 2 if true_area else value / 2
    logits = -A / temperature
    return (smoothed_ce(logits, eps) + smoothed_ce(logits.T, eps)) / 2


def clip_loss(x, y, temperature):
    logits = x @ y.T / temperature
    target = torch.arange(x.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def reference_infonce(Z, mask, pairs, temperature):
    losses = []
    for a, b in pairs:
        rows = [i for i in range(Z.shape[0]) if mask[i, a] and mask[i, b]]
        if len(rows) >= 2:
            losses.append(clip_loss(Z[rows, a], Z[rows, b], temperature))
    return sum(losses) / len(losses)


def assert_same_value_and_gradient(ours, reference, Z):
    Z1, Z2 = Z.clone().requires_grad_(True), Z.clone().requires_grad_(True)
    a, b = ours(Z1), reference(Z2)
    torch.testing.assert_close(a, b)
    (ga,), (gb,) = torch.autograd.grad(a, Z1), torch.autograd.grad(b, Z2)
    torch.testing.assert_close(ga, gb)


def mask_for(masked, batch, k, seed):
    return random_mask(batch, k, seed) if masked else torch.ones(batch, k, dtype=torch.bool)


# ---------------------------------------------------------------------------- PMRL
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("k", [3, 4])
def test_pmrl_equals_svd_reference(masked, k):
    Z = unit(12, k, 9, seed=k)
    mask = mask_for(masked, 12, k, seed=k)
    assert_same_value_and_gradient(lambda z: pmrl_loss(z, mask if masked else FULL, tau1=0.05, tau2=0.1),
                                   lambda z: reference_pmrl(z, mask), Z)


def test_pmrl_other_temperatures_and_fewer_dimensions_than_modalities():
    Z = unit(6, 4, 9, seed=20)
    assert_same_value_and_gradient(lambda z: pmrl_loss(z, tau1=0.01, tau2=0.3),
                                   lambda z: reference_pmrl(z, torch.ones(6, 4, dtype=torch.bool), 0.01, 0.3), Z)
    narrow = unit(6, 4, 2, seed=21)  # d=2 < k=4: the d x k matrix has 2 singular values, not 4
    torch.testing.assert_close(pmrl_loss(narrow), reference_pmrl(narrow, torch.ones(6, 4, dtype=torch.bool)))


def test_pmrl_masked_row_equals_its_observed_submatrix():
    """Observed only: a masked row is the instance of its observed columns; masked singular values leave the
    intra softmax (they are not entered as zeros)."""
    Z = unit(3, 4, 7, seed=22)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    singular, u = gram_singular_values(Z, mask)
    for b in range(3):
        sub = Z[b : b + 1, mask[b]]
        sub_singular, sub_u = gram_singular_values(sub)
        n = int(mask[b].sum())
        torch.testing.assert_close(singular[b, :n], sub_singular[0])
        torch.testing.assert_close(u[b], sub_u[0])
        # one row: inter = 0, so this is the intra term alone
        torch.testing.assert_close(pmrl_loss(Z[b : b + 1], mask[b : b + 1]), pmrl_loss(sub))
    # tau1 = 1 makes the difference visible: zeros would add exp(0) twice to the softmax
    with_zeros = torch.logsumexp(torch.cat([singular[0, :2], torch.zeros(2, dtype=Z.dtype)]), 0) - singular[0, 0]
    without = torch.logsumexp(singular[0, :2], 0) - singular[0, 0]
    torch.testing.assert_close(pmrl_loss(Z[:1], mask[:1], tau1=1.0), without)
    assert float(with_zeros - without) > 0.1


def test_singular_values_and_canonical_sign():
    Z = unit(10, 4, 9)
    mask = random_mask(10, 4)
    singular, u = gram_singular_values(Z, mask)
    values, reference_u = reference_leading(Z, mask)
    for b in range(10):
        n = int(mask[b].sum())
        torch.testing.assert_close(singular[b, :n], values[b])
        assert torch.all(singular[b, n:] == 0)  # masked columns: zeros at the end
    assert torch.all(singular[:, :-1] >= singular[:, 1:])  # descending
    torch.testing.assert_close(u, reference_u)
    projections = torch.einsum("bkd,bd->bk", Z, u) * mask
    assert torch.all(projections.sum(1) >= -1e-12)  # sum_m <u_b, z_b^m> >= 0
    ties = projections.sum(1).abs() < 1e-9  # two columns with a negative cosine: the first observed decides
    assert ties.any() and torch.all(projections[ties].gather(1, mask[ties].int().argmax(1, keepdim=True)) > 0)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(10, dtype=torch.float64))


def test_canonical_sign_tie_is_broken_by_the_first_observed_column():
    z = unit(1, 1, 5, seed=23)[0, 0]
    Z = torch.stack([z, -z]).unsqueeze(0)  # cosine -1: u = +-z, sum_m <u, z^m> = 0 exactly
    _, u = gram_singular_values(Z)
    assert float(u[0] @ z) > 0.99


def test_inter_term_is_invariant_to_the_backend_sign_once_canonical():
    """Any sign the SVD backend returns gives our inter term once canonicalised; raw signs do not."""
    Z = unit(10, 4, 8, seed=24)
    mask = random_mask(10, 4, seed=24)
    values, _ = reference_leading(Z, mask)
    ours_inter = pmrl_loss(Z, mask) - reference_intra(values, 0.05)
    raw_inters = []
    for seed in range(5):
        flips = torch.where(torch.rand(10, generator=torch.Generator().manual_seed(seed)) < 0.5, -1.0, 1.0)
        _, U = reference_leading(Z, mask, flips=flips.double())
        torch.testing.assert_close(reference_inter(U, 0.1), ours_inter)
        raw = []
        for b in range(10):
            U_full, _, _ = torch.linalg.svd(Z[b][mask[b]].T, full_matrices=True)
            raw.append(U_full[:, 0] * flips[b])
        raw_inters.append(float(reference_inter(torch.stack(raw), 0.1)))
    assert max(raw_inters) - min(raw_inters) > 1e-3  # without the rule the inter term depends on the signs


def test_reflection_of_the_space_changes_nothing():
    Z = unit(8, 3, 6)
    flipped = Z.clone()
    flipped[:, :, 0] *= -1
    torch.testing.assert_close(pmrl_loss(flipped), pmrl_loss(Z))


def test_gathered_columns_give_the_same_loss_and_gradient_as_one_big_batch():
    """Two halves, each with the other half's u as extra columns: each returns its share (sum of its rows' terms
    / N, times the processes: one here), so the two shares add up to the whole batch's loss."""
    Z = unit(8, 3, 5, seed=9)
    whole = Z.clone().requires_grad_(True)
    pmrl_loss(whole).backward()
    parts = Z.clone().requires_grad_(True)
    _, u_all = gram_singular_values(parts)
    halves = [pmrl_loss(parts[i : i + 4], gather_fn=lambda u, i=i: (torch.cat([u_all[:i], u, u_all[i + 4:]]), i))
              for i in (0, 4)]
    total = halves[0] + halves[1]
    total.backward()
    torch.testing.assert_close(total, pmrl_loss(Z))
    torch.testing.assert_close(parts.grad, whole.grad)


# ---------------------------------------------------------------------------- GRAM
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("k", [3, 4])
def test_gram_equals_explicit_determinants(masked, k):
    Z = unit(7, k, 6, seed=k)
    mask = mask_for(masked, 7, k, seed=k)
    assert_same_value_and_gradient(lambda z: gram_loss(z, mask if masked else FULL, temperature=0.3),
                                   lambda z: reference_gram(z, mask, 0.3), Z)


def test_gram_identity_fill_leaves_the_determinant_of_the_observed_sub_gram():
    Z = unit(5, 4, 6, seed=25)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)
    V = gram_volume(Z, mask)
    for i in range(5):
        for j in range(5):
            M = torch.stack([Z[i, 0]] + [Z[j, m] for m in range(1, 4) if mask[j, m]])
            torch.testing.assert_close(V[i, j], torch.linalg.det(M @ M.T).sqrt())


@pytest.mark.parametrize("anchor", [1, 2])
def test_gram_with_other_anchor_and_rows_missing_it(anchor):
    Z = unit(8, 3, 5, seed=2)
    mask = random_mask(8, 3, seed=3, anchor_always=False)
    assert not mask[:, anchor].all() and mask[:, anchor].sum() >= 2  # some rows lack the anchor: dropped
    assert_same_value_and_gradient(lambda z: gram_loss(z, mask, temperature=0.2, anchor=anchor),
                                   lambda z: reference_gram(z, mask, 0.2, anchor=anchor), Z)
    Z1 = Z.clone().requires_grad_(True)
    gram_loss(Z1, mask, temperature=0.2, anchor=anchor).backward()
    dropped = ~mask[:, anchor]
    assert torch.all(Z1.grad[dropped] == 0)


def test_gram_label_smoothing_zero_is_plain_cross_entropy():
    Z = unit(6, 3, 5, seed=26)
    assert_same_value_and_gradient(lambda z: gram_loss(z, temperature=0.1, label_smoothing=0.0),
                                   lambda z: reference_gram(z, torch.ones(6, 3, dtype=torch.bool), 0.1, eps=0.0), Z)


# ---------------------------------------------------------------------------- TRIANGLE
@pytest.mark.parametrize("true_area", [False, True])
def test_triangle_equals_explicit_areas(true_area):
    Z = unit(6, 3, 5, seed=3)
    assert_same_value_and_gradient(lambda z: triangle_loss(z, temperature=0.2, true_area=true_area),
                                   lambda z: reference_triangle(z, 0.2, true_area=true_area), Z)


def test_triangle_with_other_anchor():
    Z = unit(6, 3, 5, seed=27)
    assert_same_value_and_gradient(lambda z: triangle_loss(z, temperature=0.2, anchor=1),
                                   lambda z: reference_triangle(z, 0.2, vertices=(1, 0, 2)), Z)


@pytest.mark.parametrize("true_area", [False, True])
def test_triangle_observed_only_uses_complete_rows_and_named_modalities(true_area):
    Z = unit(8, 4, 5, seed=4)
    mask = random_mask(8, 4, seed=4)
    chosen = [0, 2, 3]
    keep = mask[:, chosen].all(1)
    assert 2 <= int(keep.sum()) < 8
    assert_same_value_and_gradient(
        lambda z: triangle_loss(z, mask, temperature=0.2, modalities=chosen, true_area=true_area),
        lambda z: reference_triangle(z[keep], 0.2, vertices=(0, 2, 3), true_area=true_area), Z)


# ---------------------------------------------------------------------------- InfoNCE
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("anchor", [0, 2])
def test_anchor_infonce_equals_loop_over_pairs(masked, anchor):
    Z = unit(10, 4, 6, seed=5)
    mask = mask_for(masked, 10, 4, seed=5)
    mask[:, anchor] |= torch.arange(10) < 6  # enough rows with the anchor
    pairs = [(anchor, m) for m in range(4) if m != anchor]
    assert_same_value_and_gradient(lambda z: anchor_infonce_loss(z, mask if masked else FULL, anchor=anchor,
                                                                 temperature=0.1),
                                   lambda z: reference_infonce(z, mask, pairs, 0.1), Z)


@pytest.mark.parametrize("masked", [False, True])
def test_pairwise_infonce_equals_loop_over_pairs(masked):
    Z = unit(10, 4, 6, seed=6)
    mask = mask_for(masked, 10, 4, seed=6)
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    assert_same_value_and_gradient(lambda z: pairwise_infonce_loss(z, mask if masked else FULL, temperature=0.1),
                                   lambda z: reference_infonce(z, mask, pairs, 0.1), Z)


def test_infonce_skips_pairs_with_fewer_than_two_rows():
    Z = unit(4, 3, 5, seed=28)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 1], [1, 1, 0]], dtype=torch.bool)  # (0, 2) in one row only
    torch.testing.assert_close(anchor_infonce_loss(Z, mask, anchor=0, temperature=0.1),
                               clip_loss(Z[[0, 1, 3], 0], Z[[0, 1, 3], 1], 0.1))


# ---------------------------------------------------------------------------- gradients
# every public loss as f(embeddings, mask); `REGISTRY` (alignment.OBJECTIVES) is what the model calls
LOSSES = {
    "pmrl": lambda z, m: pmrl_loss(z, m),
    "gram": lambda z, m: gram_loss(z, m, temperature=0.5),
    "triangle": lambda z, m: triangle_loss(z, m, temperature=0.5, modalities=[0, 1, 2]),
    "triangle_true_area": lambda z, m: triangle_loss(z, m, temperature=0.5, modalities=[0, 1, 2], true_area=True),
    "anchor": lambda z, m: anchor_infonce_loss(z, m, anchor=0, temperature=0.5),
    "pairwise": lambda z, m: pairwise_infonce_loss(z, m, temperature=0.5),
}
GRADCHECK_MASKS = {
    3: [[1, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 1]],
    4: [[1, 1, 1, 1], [1, 0, 1, 0], [1, 1, 1, 0], [0, 1, 1, 1]],
}


@pytest.mark.parametrize("objective", list(LOSSES))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("k", [3, 4])
def test_gradcheck_float64(objective, masked, k):
    Z = unit(4, k, 5, seed=6).requires_grad_(True)
    mask = torch.tensor(GRADCHECK_MASKS[k], dtype=torch.bool) if masked else None
    assert torch.autograd.gradcheck(lambda z: LOSSES[objective](z, mask), (Z,))


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_singular_values_and_vector(masked):
    Z = unit(4, 4, 5, seed=7).requires_grad_(True)
    mask = torch.tensor(GRADCHECK_MASKS[4], dtype=torch.bool) if masked else None
    assert torch.autograd.gradcheck(lambda z: gram_singular_values(z, mask), (Z,))


@pytest.mark.parametrize("objective", ["gram", "triangle", "anchor", "pairwise"])
def test_learnable_temperature_gets_a_gradient_and_is_clamped(objective):
    Z = unit(6, 3, 5, seed=7)
    functions = {"gram": gram_loss, "triangle": triangle_loss,
                 "anchor": lambda z, **kw: anchor_infonce_loss(z, anchor=0, **kw), "pairwise": pairwise_infonce_loss}
    loss = functions[objective]
    temperature = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    loss(Z, temperature=temperature).backward()
    assert temperature.grad is not None and temperature.grad != 0
    for tiny in (torch.tensor(1e-8, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64), 1e-6):
        torch.testing.assert_close(loss(Z, temperature=tiny), loss(Z, temperature=1e-3))


def test_pmrl_temperatures_may_be_tensors():
    Z = unit(6, 3, 5, seed=8)
    tau1 = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    tau2 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    loss = pmrl_loss(Z, tau1=tau1, tau2=tau2)
    loss.backward()
    torch.testing.assert_close(loss, pmrl_loss(Z))
    assert tau1.grad is not None and tau2.grad is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_repeated_singular_values_keep_finite_gradients(dtype):
    base = unit(5, 1, 6, seed=8, dtype=dtype)
    Z = base.expand(5, 4, 6).clone().requires_grad_(True)  # all modalities of an instance coincide
    loss = pmrl_loss(Z)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(Z.grad).all()
    singular, u = gram_singular_values(Z)
    torch.testing.assert_close(singular[:, 0], torch.full((5,), 2.0, dtype=dtype))  # sqrt(k)
    assert torch.all(singular[:, 1:] == 0)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[1, 2:] = False  # masked columns: more repeated zero eigenvalues
    mask[2, 1:] = False  # a single observed column
    Z.grad = None
    pmrl_loss(Z, mask).backward()
    assert torch.isfinite(Z.grad).all()
    Z.grad = None  # a tie at the top: two orthogonal columns (s1 = s2 = 1), u any vector of their span
    eye = torch.eye(6, dtype=dtype)
    tie = torch.stack([eye[:4], eye[1:5], eye[2:6]]).requires_grad_(True)
    pmrl_loss(tie, torch.tensor([[1, 1, 0, 0]] * 3, dtype=torch.bool)).backward()
    assert torch.isfinite(tie.grad).all()
    for name in ("gram", "triangle", "triangle_true_area", "anchor", "pairwise"):  # zero volumes / areas
        Z3 = Z[:, :3].detach().clone().requires_grad_(True)
        loss = LOSSES[name](Z3, None)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(Z3.grad).all(), name


def test_singular_values_in_float32_match_the_svd():
    Z = unit(64, 4, 128, seed=29, dtype=torch.float32)
    singular, u = gram_singular_values(Z)
    values, reference_u = reference_leading(Z, torch.ones(64, 4, dtype=torch.bool))
    torch.testing.assert_close(singular, torch.stack(values), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u, reference_u, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- dtypes and NaN
@pytest.mark.parametrize("objective", list(LOSSES))
def test_half_precision_inputs_are_computed_and_returned_in_float32(objective):
    Z = unit(6, 3, 8, seed=30, dtype=torch.float32)
    mask = torch.tensor(GRADCHECK_MASKS[3] + [[1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    half = Z.to(torch.bfloat16).requires_grad_(True)
    loss = LOSSES[objective](half, mask)
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, LOSSES[objective](half.detach().float(), mask))
    assert LOSSES[objective](Z.double(), mask).dtype == torch.float64


@pytest.mark.parametrize("objective", list(LOSSES))
def test_bf16_autocast_does_not_lower_the_precision_inside(objective):
    """Under autocast the objectives still compute in float32 (the training loop runs them under bf16)."""
    Z = unit(6, 3, 8, seed=32, dtype=torch.float32)
    mask = torch.tensor(GRADCHECK_MASKS[3] + [[1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    weight = torch.eye(8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = Z @ weight  # bf16 under autocast, as a projection head's output would be
        assert projected.dtype == torch.bfloat16
        loss = LOSSES[objective](projected, mask)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(weight.grad).all()
    torch.testing.assert_close(loss, LOSSES[objective](projected.detach().float(), mask))


@pytest.mark.parametrize("objective", list(LOSSES))
def test_nan_in_masked_columns_does_not_leak(objective):
    Z = unit(6, 3, 5, seed=13)
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[1, 2] = mask[3, 1] = False
    dirty = Z.clone().requires_grad_(True)
    with torch.no_grad():
        dirty[~mask] = float("nan")
    loss = LOSSES[objective](dirty, mask)
    loss.backward()
    torch.testing.assert_close(loss, LOSSES[objective](Z, mask))
    assert torch.isfinite(dirty.grad).all() and torch.all(dirty.grad[~mask] == 0)


# ---------------------------------------------------------------------------- anchor shift (Theorem 1)
def test_calibration_removes_the_anchor_shift():
    Z = unit(2000, 4, 16, seed=10)
    generator = torch.Generator().manual_seed(11)
    mask = torch.rand(2000, 4, generator=generator) > 0.5
    mask[torch.arange(2000), torch.randint(4, (2000,), generator=generator)] = True  # >= 1 observed
    mask[mask.all(1), torch.randint(4, (int(mask.all(1).sum()),), generator=generator)] = False  # >= 1 missing
    assert mask.any(1).all() and not mask.all(1).any()
    shift = anchor_shift(Z, mask)
    assert float(shift.mean()) > 0.1  # dropping columns moves the anchor
    # calibration with the true missing embeddings removes the shift entirely
    torch.testing.assert_close(calibrated_anchor_shift(Z, Z), torch.zeros(2000, dtype=torch.float64))
    # and calibration with noisy embeddings leaves less shift than dropping them
    noisy = torch.where(mask.unsqueeze(-1), Z, F.normalize(Z + 0.3 * unit(2000, 4, 16, seed=12), dim=-1))
    assert float(calibrated_anchor_shift(Z, noisy).mean()) < float(shift.mean())


def test_anchor_shift_equals_the_svd_definition():
    Z = unit(20, 4, 8, seed=14)
    mask = random_mask(20, 4, seed=14)
    _, observed_u = reference_leading(Z, mask)
    _, full_u = reference_leading(Z, torch.ones(20, 4, dtype=torch.bool))
    expected = torch.minimum((full_u - observed_u).norm(dim=1), (full_u + observed_u).norm(dim=1))
    torch.testing.assert_close(anchor_shift(Z, mask), expected)
    assert torch.all(anchor_shift(Z, torch.ones(20, 4, dtype=torch.bool)) < 1e-7)


# ---------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    Z = unit(4, 3, 5)
    with pytest.raises(ValueError, match=r"embeddings must have shape \[B, k, d\], got \[3, 5\]"):
        pmrl_loss(Z[0])
    with pytest.raises(TypeError, match="floating-point"):
        pmrl_loss(torch.ones(4, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="B, k, d >= 1"):
        pmrl_loss(Z[:0])
    with pytest.raises(TypeError, match="modality_mask must be a bool tensor"):
        pmrl_loss(Z, torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"modality_mask must have shape \[4, 3\].*got \[4, 2\]"):
        pmrl_loss(Z, torch.ones(4, 2, dtype=torch.bool))
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[2] = mask[3] = False
    for objective in LOSSES.values():
        with pytest.raises(ValueError, match=r"Rows \[2, 3\]"):
            objective(Z, mask)
    with pytest.raises(ValueError, match="anchor must be a modality index"):
        gram_loss(Z, anchor=5)
    with pytest.raises(ValueError, match="anchor must be a modality index"):
        anchor_infonce_loss(Z, anchor=-1)
    only_anchor = torch.zeros(4, 3, dtype=torch.bool)
    only_anchor[:, 0] = True
    with pytest.raises(ValueError, match="no instance observes the anchor"):
        gram_loss(Z, only_anchor)
    with pytest.raises(ValueError, match="no instance observes all three"):
        triangle_loss(Z, torch.tensor([[1, 1, 0]] * 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="exactly three"):
        triangle_loss(unit(4, 4, 5))
    with pytest.raises(ValueError, match="three distinct indices"):
        triangle_loss(unit(4, 4, 5), modalities=[0, 1, 1])
    with pytest.raises(ValueError, match="must be one of the triangle's modalities"):
        triangle_loss(unit(4, 4, 5), modalities=[1, 2, 3])
    with pytest.raises(ValueError, match="No pair of modalities"):
        pairwise_infonce_loss(Z, torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature must be a positive"):
        pairwise_infonce_loss(Z, temperature=0.0)
    with pytest.raises(ValueError, match="tau1 must be a positive"):
        pmrl_loss(Z, tau1=-0.05)
    with pytest.raises(ValueError, match="0-dim tensor"):
        gram_loss(Z, temperature=torch.ones(2))
    with pytest.raises(ValueError, match="label_smoothing"):
        gram_loss(Z, label_smoothing=1.5)
    with pytest.raises(ValueError, match="gather_fn must return"):
        pmrl_loss(Z, gather_fn=lambda u: (u, 3))
    with pytest.raises(ValueError, match="same shape"):
        calibrated_anchor_shift(Z, Z[:2])


# ---------------------------------------------------------------------------- packaging and devices
def test_module_imports_only_torch_and_the_standard_library():
    """alignment.py is copied into checkpoints as remote code."""
    import ast
    import sys

    import calmrl_hf.alignment as module

    tree = ast.parse(open(module.__file__).read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots - {"torch"} <= set(sys.stdlib_module_names) | {"__future__"}, roots


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("objective", list(LOSSES))
def test_objectives_follow_the_device_of_their_inputs(objective, device):
    Z = unit(8, 3, 16, seed=31, dtype=torch.float32)
    mask = torch.tensor(GRADCHECK_MASKS[3] * 2, dtype=torch.bool)
    on_device = Z.to(device).requires_grad_(True)
    loss = LOSSES[objective](on_device, mask.to(device))
    loss.backward()
    assert loss.device == on_device.device and torch.isfinite(on_device.grad).all()
    torch.testing.assert_close(loss.cpu(), LOSSES[objective](Z, mask), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(REGISTRY))
def test_registry_objectives_follow_the_device_of_their_inputs(name, device):
    """As the model calls them: `OBJECTIVES[name].loss(embeddings, mask, config, temperature)`."""
    from tiny_models import tiny_config

    config = tiny_config(modalities=["vision", "audio", "text"], alignment_objective=name, imputer_method="none")
    Z = unit(8, 3, 16, seed=31, dtype=torch.float32)
    mask = torch.tensor(GRADCHECK_MASKS[3] * 2, dtype=torch.bool)
    temperature = torch.tensor(0.07, requires_grad=True)
    on_device = Z.to(device).requires_grad_(True)
    loss = REGISTRY[name].loss(on_device, mask.to(device), config, temperature.to(device))
    loss.backward()
    assert loss.device == on_device.device and torch.isfinite(on_device.grad).all()
    torch.testing.assert_close(loss.cpu(), REGISTRY[name].loss(Z, mask, config, temperature), atol=1e-4, rtol=1e-4)


def test_gram_volume_factorises_into_column_volume_and_anchor_distance():
    """V_ij = vol(column j's non-anchor modalities) * dist(z_i^anchor, their span) (Schur complement): the part
    of GRAM's logits that depends on column j alone, which imputed columns make vary (see the config warning)."""
    from calmrl_hf.alignment import gram_volume

    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(5, 4, 16, dtype=torch.float64), dim=-1)
    volume = gram_volume(embeddings, anchor=2)
    rest = embeddings[:, [0, 1, 3]]  # [B, 3, d]
    column_volume = torch.linalg.det(rest @ rest.transpose(1, 2)).sqrt()  # [B]
    basis, _ = torch.linalg.qr(rest.transpose(1, 2))  # [B, d, 3]: orthonormal basis of each column's span
    anchors = embeddings[:, 2]  # [B, d]
    projected = torch.einsum("jdr,jer,ie->ijd", basis, basis, anchors)  # P_j z_i  [B, B, d]
    distance = (anchors.unsqueeze(1) - projected).norm(dim=-1)  # [B, B]
    torch.testing.assert_close(volume, column_volume.unsqueeze(0) * distance)


def test_config_warns_about_volume_objectives_with_imputed_columns():
    from transformers.testing_utils import CaptureLogger

    from calmrl_hf import CalMRLConfig, configuration_calmrl

    with CaptureLogger(configuration_calmrl.logger) as captured:
        CalMRLConfig(alignment_objective="gram", imputer_method="mean")
    assert "alignment_objective='gram' with imputer_method='mean'" in captured.out
    with CaptureLogger(configuration_calmrl.logger) as captured:
        CalMRLConfig(alignment_objective="gram", imputer_method="none")
        CalMRLConfig(alignment_objective="pmrl", imputer_method="ppca")
    assert captured.out == ""
