"""Alignment objectives over instance matrices, and the anchor-shift diagnostics of CalMRL's Theorem 1.

Every objective takes `embeddings` [B, k, d] (row b, modality m: the unit-norm embedding z_b^m) and an optional
`modality_mask` [B, k] (True = observed; None = all observed) and returns a scalar. With a mask and no
imputation, each instance uses only its observed columns: the "observed only" baseline. CalMRL is any of them
applied to observed + imputed columns (DESIGN.md section 3).

- `pmrl_loss`: PMRL (Liu et al., 2025): maximise each instance's leading singular value (intra) and keep the
  leading left singular vectors of different instances apart (inter).
- `gram_loss`: GRAM (Cicchetti et al., ICLR 2025): contrast the volume spanned by the anchor of one instance and
  the other modalities of another.
- `triangle_loss`: TRIANGLE (Cicchetti et al., 2025): the same with the area of the triangle of three modalities.
- `anchor_infonce_loss`: ImageBind-style symmetric InfoNCE of every modality against an anchor modality.
- `pairwise_infonce_loss`: symmetric InfoNCE over every pair of modalities.

Deviations from the authors' code, all deliberate and documented:
- PMRL's singular values and vector come from the k x k Gram eigendecomposition (exact, and far cheaper than
  `torch.linalg.svd(full_matrices=True)`, which builds a d x d U per instance); the gradient is guarded at
  repeated eigenvalues (finite where the authors' SVD gradient is not).
- PMRL's leading vector has a canonical sign (sum_m <u_b, z_b^m> >= 0; ties, as for two unit columns with a
  negative cosine, broken by the first observed column): the authors leave it to LAPACK/cuSOLVER.
- PMRL's inter term may use u gathered across processes (`gather_fn`); the authors use the per-GPU batch.
- GRAM's columns get the plain gradient of the symmetric formula (the authors build them under no_grad).
- Temperatures given as tensors (learnable) are clamped to at least 1e-3 (GRAM never clamps).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


_MIN_TEMPERATURE = 1e-3
# Eigenvalue gaps below this count as repeated: their (infinite) eigenvector-gradient terms are dropped.
_DEGENERATE_GAP = 1e-9
# Squared singular values below this are treated as exactly zero (masked or rank-deficient columns).
_ZERO_EIGENVALUE = 1e-12
# |sum(w)| below this is a tie of the canonical sign rule (w is a unit vector).
_SIGN_TIE = 1e-6


# ---------------------------------------------------------------------------- validation
def _check(embeddings: torch.Tensor, modality_mask: torch.Tensor | None) -> torch.Tensor:
    """Validate at the door; returns a bool mask (all True when None)."""
    if not isinstance(embeddings, torch.Tensor) or not torch.is_floating_point(embeddings):
        raise TypeError(f"embeddings must be a floating-point tensor [B, k, d], got "
                        f"{getattr(embeddings, 'dtype', type(embeddings).__name__)}.")
    if embeddings.dim() != 3:
        raise ValueError(f"embeddings must have shape [B, k, d], got {list(embeddings.shape)}.")
    if modality_mask is None:
        return torch.ones(embeddings.shape[:2], dtype=torch.bool, device=embeddings.device)
    if not isinstance(modality_mask, torch.Tensor) or modality_mask.dtype != torch.bool:
        raise TypeError(f"modality_mask must be a bool tensor [B, k], got "
                        f"{getattr(modality_mask, 'dtype', type(modality_mask).__name__)}.")
    if modality_mask.shape != embeddings.shape[:2]:
        raise ValueError(f"modality_mask must have shape {list(embeddings.shape[:2])} to match embeddings, got "
                         f"{list(modality_mask.shape)}.")
    empty = (~modality_mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"Rows {empty[:10].tolist()} of modality_mask observe no modality.")
    return modality_mask


def _masked(embeddings: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the unobserved columns (torch.where, so NaN there cannot leak), in at least float32."""
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    if mask is None:  # all observed: nothing to zero (saves a pass over [B, k, d] forward and backward)
        return embeddings.to(dtype)
    return torch.where(mask.unsqueeze(-1), embeddings.to(dtype), torch.zeros((), dtype=dtype,
                                                                             device=embeddings.device))


def _temperature(value) -> torch.Tensor | float:
    if isinstance(value, torch.Tensor):
        return value.clamp_min(_MIN_TEMPERATURE)
    if value <= 0:
        raise ValueError(f"A temperature must be positive, got {value}.")
    return value


# ---------------------------------------------------------------------------- singular values
class _SymmetricEigh(torch.autograd.Function):
    """`torch.linalg.eigh` whose backward drops the terms of (nearly) repeated eigenvalues.

    For A = V diag(L) V^T: gA = V (diag(gL) + F o (V^T gV - gV^T V) / 2) V^T with F_ij = 1 / (L_j - L_i). At
    repeated eigenvalues F is infinite while the loss does not depend on the rotation inside the eigenspace, so
    those terms are set to zero (the standard guard; torch's own backward returns NaN there).
    """

    @staticmethod
    def forward(ctx, matrix: torch.Tensor):
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
        ctx.save_for_backward(eigenvalues, eigenvectors)
        return eigenvalues, eigenvectors

    @staticmethod
    def backward(ctx, grad_eigenvalues, grad_eigenvectors):
        eigenvalues, eigenvectors = ctx.saved_tensors
        inner = torch.zeros_like(eigenvectors)
        if grad_eigenvectors is not None:
            gap = eigenvalues.unsqueeze(-2) - eigenvalues.unsqueeze(-1)  # L_j - L_i
            safe = gap.abs() > _DEGENERATE_GAP * eigenvalues.abs().amax(dim=-1, keepdim=True).unsqueeze(-1).clamp_min(1)
            inverse_gap = torch.where(safe, 1.0 / torch.where(safe, gap, torch.ones_like(gap)), torch.zeros_like(gap))
            projected = eigenvectors.transpose(-2, -1) @ grad_eigenvectors
            inner = inverse_gap * (projected - projected.transpose(-2, -1)) / 2
        if grad_eigenvalues is not None:
            inner = inner + torch.diag_embed(grad_eigenvalues)
        return eigenvectors @ inner @ eigenvectors.transpose(-2, -1)


def _canonical_sign(top: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """+-1 [B, 1] making sum_m <u_b, z_b^m> = s_b1 sum(w_b) >= 0.

    Tie-break: two unit columns with a negative cosine give sum(w_b) = 0 exactly (u is their difference), where
    the rule alone would leave the sign to rounding; there <u_b, z_b^first observed> >= 0 decides.
    """
    total = top.sum(dim=-1, keepdim=True)
    first_observed = mask.to(torch.int8).argmax(dim=-1, keepdim=True)
    key = torch.where(total.abs() > _SIGN_TIE, total, top.gather(-1, first_observed))
    return torch.where(key >= 0, 1.0, -1.0).to(top.dtype)


def gram_singular_values(
    embeddings: torch.Tensor, modality_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values [B, k] (descending; 0 for masked columns) and leading left singular vector u [B, d].

    Computed from the k x k Gram G_b = A_b^T A_b of the d x k matrix A_b of observed columns: eigenvalues s^2,
    u_b = A_b w_b / s_b1 with w_b the top eigenvector, sign canonical: sum_m <u_b, z_b^m> >= 0.
    Returned in at least float32.
    """
    mask = _check(embeddings, modality_mask)
    columns = _masked(embeddings, modality_mask)  # A_b^T  [B, k, d]
    gram = columns @ columns.transpose(1, 2)  # G_b = A_b^T A_b  [B, k, k]
    eigenvalues, eigenvectors = _SymmetricEigh.apply(gram)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(-1), eigenvectors.flip(-1)
    positive = eigenvalues > _ZERO_EIGENVALUE
    # s = sqrt(lambda), with a zero (and a zero gradient) where lambda ~ 0: sqrt' is infinite at 0
    singular = torch.where(positive, eigenvalues.clamp_min(_ZERO_EIGENVALUE).sqrt(), torch.zeros_like(eigenvalues))
    top = eigenvectors[..., 0]  # w_b [B, k]
    top = top * _canonical_sign(top, mask)
    u = (top.unsqueeze(1) @ columns).squeeze(1) / singular[:, :1].clamp_min(_ZERO_EIGENVALUE)  # A_b w_b / s_b1
    return singular, u


# ---------------------------------------------------------------------------- objectives
def pmrl_loss(
    embeddings: torch.Tensor,
    modality_mask: torch.Tensor | None = None,
    *,
    tau1: float = 0.05,
    tau2: float = 0.1,
    gather_fn: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None,
) -> torch.Tensor:
    """PMRL: intra-instance singular-value softmax plus inter-instance contrast of leading singular vectors.

        intra = mean_b [ logsumexp_{m in Omega_b}(s_bm / tau1) - s_b1 / tau1 ]
        inter = mean_b [ logsumexp_c(<u_b, u_c> / tau2) - <u_b, u_b> / tau2 ]

    `gather_fn(u) -> (u_all, offset)` supplies the inter term's columns from every process; the positive of local
    row b is column offset + b.
    """
    mask = _check(embeddings, modality_mask)
    singular, u = gram_singular_values(embeddings, modality_mask)
    # row b has |Omega_b| singular values: the first |Omega_b| of the descending list
    observed = torch.arange(mask.shape[1], device=mask.device) < mask.sum(dim=1, keepdim=True)
    intra_logits = torch.where(observed, singular / tau1, torch.full_like(singular, float("-inf")))
    intra = (torch.logsumexp(intra_logits, dim=1) - singular[:, 0] / tau1).mean()
    columns, offset = gather_fn(u) if gather_fn is not None else (u, 0)
    inter_logits = u @ columns.T / tau2  # [B, B_all]
    positives = torch.arange(u.shape[0], device=u.device) + offset
    inter = (torch.logsumexp(inter_logits, dim=1) - inter_logits.gather(1, positives[:, None]).squeeze(1)).mean()
    return intra + inter


def _symmetric_cross_entropy(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # (CE_eps(logits, arange) + CE_eps(logits^T, arange)) / 2
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, targets, label_smoothing=label_smoothing)) / 2


def gram_volume(embeddings: torch.Tensor, modality_mask: torch.Tensor | None = None, *, anchor: int = 0):
    """V [B, B]: V_ij = sqrt|det Gram(z_i^anchor, z_j^m for every observed m != anchor)|.

    A missing modality of column j enters the Gram as a unit row/column of the identity, which leaves the
    determinant equal to that of the observed sub-Gram.
    """
    mask = _check(embeddings, modality_mask)
    k = embeddings.shape[1]
    _anchor_index(anchor, k)
    columns = _masked(embeddings, mask)
    others = [m for m in range(k) if m != anchor]
    anchors = columns[:, anchor]  # [B, d]
    rest = columns[:, others]  # [B, k-1, d]
    batch = columns.shape[0]
    cross = torch.einsum("id,jmd->ijm", anchors, rest)  # <z_i^anchor, z_j^m>  [B, B, k-1]
    rest_gram = rest @ rest.transpose(1, 2)  # [B, k-1, k-1]
    missing = (~mask[:, others]).to(rest_gram.dtype)
    rest_gram = rest_gram + torch.diag_embed(missing)  # identity rows for missing modalities
    gram = columns.new_empty(batch, batch, k, k)
    gram[:, :, 0, 0] = (anchors * anchors).sum(-1).unsqueeze(1)
    gram[:, :, 0, 1:] = cross
    gram[:, :, 1:, 0] = cross
    gram[:, :, 1:, 1:] = rest_gram.unsqueeze(0)
    # sqrt guarded: its derivative is infinite at zero volume
    return torch.linalg.det(gram).abs().clamp_min(_ZERO_EIGENVALUE).sqrt()


def _anchor_index(anchor: int, k: int) -> int:
    if not 0 <= anchor < k:
        raise ValueError(f"anchor must be a modality index in [0, {k}), got {anchor}.")
    return anchor


def gram_loss(
    embeddings: torch.Tensor,
    modality_mask: torch.Tensor | None = None,
    *,
    temperature=0.07,
    label_smoothing: float = 0.1,
    anchor: int = 0,
) -> torch.Tensor:
    """GRAM volume contrastive loss: symmetric label-smoothed cross-entropy over logits -V / T.

    Observed only: an instance takes part when it observes the anchor and at least one other modality; column j
    then spans its observed modalities only. Raises if no instance qualifies.
    """
    mask = _check(embeddings, modality_mask)
    _anchor_index(anchor, mask.shape[1])
    others = [m for m in range(mask.shape[1]) if m != anchor]
    keep = mask[:, anchor] & mask[:, others].any(dim=1)
    if not bool(keep.any()):
        raise ValueError("gram_loss: no instance observes the anchor modality together with another modality.")
    volume = gram_volume(embeddings[keep], mask[keep], anchor=anchor)
    return _symmetric_cross_entropy(-volume / _temperature(temperature), label_smoothing)


def triangle_area(embeddings: torch.Tensor, *, anchor: int, first: int, second: int, true_area: bool = False):
    """A [B, B] between the anchor of row i and modalities `first`, `second` of column j.

    With u = z_i^anchor - z_j^first, w = z_i^anchor - z_j^second: (|u|^2 |w|^2 - <u, w>^2) / 2 as in the
    authors' training code (2 area^2), or the true area sqrt(|u|^2 |w|^2 - <u, w>^2) / 2.
    """
    a, p, r = embeddings[:, anchor], embeddings[:, first], embeddings[:, second]
    aa = (a * a).sum(-1).unsqueeze(1)  # |a_i|^2  [B, 1]
    ap, ar = a @ p.T, a @ r.T  # <a_i, p_j>, <a_i, r_j>  [B, B]
    pp, rr, pr = (p * p).sum(-1), (r * r).sum(-1), (p * r).sum(-1)  # [B]
    uu = aa - 2 * ap + pp  # |u|^2
    ww = aa - 2 * ar + rr  # |w|^2
    uw = aa - ap - ar + pr  # <u, w>
    squared = (uu * ww - uw**2).clamp_min(0.0)
    if true_area:
        return squared.clamp_min(_ZERO_EIGENVALUE).sqrt() / 2
    return squared / 2


def triangle_loss(
    embeddings: torch.Tensor,
    modality_mask: torch.Tensor | None = None,
    *,
    temperature=0.07,
    label_smoothing: float = 0.1,
    anchor: int = 0,
    modalities: list[int] | None = None,
    true_area: bool = False,
) -> torch.Tensor:
    """TRIANGLE area contrastive loss over three modalities (`modalities`, or all k when k == 3).

    Observed only: the instances observing all three modalities take part (a triangle needs its three
    vertices); raises if none does.
    """
    mask = _check(embeddings, modality_mask)
    k = mask.shape[1]
    if modalities is None:
        if k != 3:
            raise ValueError(f"triangle_loss needs exactly three modalities; got k={k}: pass modalities=[a, b, c].")
        modalities = list(range(3))
    if len(modalities) != 3 or len(set(modalities)) != 3 or not all(0 <= m < k for m in modalities):
        raise ValueError(f"modalities must be three distinct indices in [0, {k}), got {modalities}.")
    if anchor not in modalities:
        raise ValueError(f"anchor {anchor} must be one of the triangle's modalities {modalities}.")
    first, second = [m for m in modalities if m != anchor]
    keep = mask[:, modalities].all(dim=1)
    if not bool(keep.any()):
        raise ValueError(f"triangle_loss: no instance observes all three modalities {modalities}.")
    columns = _masked(embeddings[keep], mask[keep])
    area = triangle_area(columns, anchor=anchor, first=first, second=second, true_area=true_area)
    return _symmetric_cross_entropy(-area / _temperature(temperature), label_smoothing)


def _pair_infonce(columns, mask, pairs, temperature) -> torch.Tensor:
    """Mean over pairs (a, b) with >= 2 rows observing both of the symmetric CLIP loss on those rows."""
    losses = []
    for a, b in pairs:
        both = mask[:, a] & mask[:, b]
        if int(both.sum()) < 2:
            continue
        logits = columns[both, a] @ columns[both, b].T / temperature
        losses.append(_symmetric_cross_entropy(logits, 0.0))
    if not losses:
        raise ValueError(f"No pair of modalities among {pairs} is observed together in at least two rows.")
    return torch.stack(losses).mean()


def anchor_infonce_loss(embeddings: torch.Tensor, modality_mask: torch.Tensor | None = None, *, anchor: int,
                        temperature=0.07) -> torch.Tensor:
    """ImageBind-style: symmetric InfoNCE between the anchor and each other modality, over the rows observing
    both (pairs with fewer than two such rows are skipped), averaged over modalities."""
    mask = _check(embeddings, modality_mask)
    _anchor_index(anchor, mask.shape[1])
    pairs = [(anchor, m) for m in range(mask.shape[1]) if m != anchor]
    return _pair_infonce(_masked(embeddings, mask), mask, pairs, _temperature(temperature))


def pairwise_infonce_loss(embeddings: torch.Tensor, modality_mask: torch.Tensor | None = None, *,
                          temperature=0.07) -> torch.Tensor:
    """Symmetric InfoNCE over every pair of modalities, each over the rows observing both, averaged over pairs."""
    mask = _check(embeddings, modality_mask)
    k = mask.shape[1]
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    return _pair_infonce(_masked(embeddings, mask), mask, pairs, _temperature(temperature))


# ---------------------------------------------------------------------------- anchor shift (Theorem 1)
def _aligned(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """`other` with its sign flipped where it points away from `reference` (singular vectors have no sign)."""
    return other * torch.where((reference * other).sum(-1, keepdim=True) >= 0, 1.0, -1.0)


@torch.no_grad()
def anchor_shift(embeddings: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
    """||u1 - u1^Omega|| [B]: shift of the leading left singular vector when only `modality_mask` is observed."""
    mask = _check(embeddings, modality_mask)
    _, full = gram_singular_values(embeddings)
    _, observed = gram_singular_values(embeddings, mask)
    return (full - _aligned(full, observed)).norm(dim=-1)


@torch.no_grad()
def anchor_shift_bounds(embeddings: torch.Tensor, modality_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Theorem 1's bounds [B] on the anchor shift, with plain (not squared) singular values:

        lower = sqrt(2 (1 - (sigma_1^Omega + eta^2) / sigma_1)),  eta^2 = sum_{m missing} <u1^Omega, z^m>^2
        upper = sqrt(2) ||Z^missing||_2 / (sigma_1 - sigma_2)     (inf where sigma_1 = sigma_2)
    """
    mask = _check(embeddings, modality_mask)
    full_singular, _ = gram_singular_values(embeddings)
    observed_singular, observed_u = gram_singular_values(embeddings, mask)
    columns = embeddings.to(observed_u.dtype)
    missing = ~mask
    eta_sq = (((columns @ observed_u.unsqueeze(-1)).squeeze(-1) ** 2) * missing).sum(dim=1)
    ratio = (observed_singular[:, 0] + eta_sq) / full_singular[:, 0]
    lower = (2 * (1 - ratio)).clamp_min(0.0).sqrt()
    has_missing = missing.any(dim=1)
    missing_norm = torch.zeros_like(lower)
    if bool(has_missing.any()):
        missing_singular, _ = gram_singular_values(embeddings[has_missing], missing[has_missing])
        missing_norm[has_missing] = missing_singular[:, 0]  # spectral norm of the missing columns
    gap = full_singular[:, 0] - full_singular[:, 1]
    upper = torch.where(gap > 0, (2**0.5) * missing_norm / gap.clamp_min(_ZERO_EIGENVALUE),
                        torch.full_like(gap, float("inf")))
    return lower, upper


@torch.no_grad()
def calibrated_anchor_shift(true_embeddings: torch.Tensor, calibrated_embeddings: torch.Tensor) -> torch.Tensor:
    """||u1(true full Z) - u1(calibrated Z)|| [B]: the anchor shift left after imputing the missing columns."""
    _check(true_embeddings, None)
    _check(calibrated_embeddings, None)
    if true_embeddings.shape != calibrated_embeddings.shape:
        raise ValueError(f"true and calibrated embeddings must have the same shape, got "
                         f"{list(true_embeddings.shape)} and {list(calibrated_embeddings.shape)}.")
    _, true_u = gram_singular_values(true_embeddings)
    _, calibrated_u = gram_singular_values(calibrated_embeddings)
    return (true_u - _aligned(true_u, calibrated_u)).norm(dim=-1)


__all__ = [
    "anchor_infonce_loss",
    "anchor_shift",
    "anchor_shift_bounds",
    "calibrated_anchor_shift",
    "gram_loss",
    "gram_singular_values",
    "gram_volume",
    "pairwise_infonce_loss",
    "pmrl_loss",
    "triangle_area",
    "triangle_loss",
]
