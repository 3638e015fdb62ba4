"""Alignment objectives over instance matrices, and the anchor-shift diagnostics of CalMRL's Theorem 1.

Every objective takes `embeddings` [B, k, d] (row b, modality m: the unit-norm embedding z_b^m) and an optional
`modality_mask` [B, k] (True = observed; None = all observed) and returns a scalar. With a mask and no
imputation, each instance uses only its observed columns: the "observed only" baseline. CalMRL is any of them
applied to observed + imputed columns: the imputer fills the missing columns first, so every instance enters the
objective with all k columns (`OBJECTIVES` maps each `CalMRLConfig.alignment_objective` to its function).

Objectives (each written the way its authors' public training code computes it):

- `pmrl_loss`: PMRL (Liu, Xia, Ng, Chua, "Principled Multimodal Representation Learning", arXiv 2507.17343;
  code: Xiaohao-Liu/PMRL): maximise each instance's leading singular value (intra) and keep the leading left
  singular vectors of different instances apart (inter).
- `gram_loss`: GRAM (Cicchetti, Grassucci, Sigillo, Comminiello, "Gramian Multimodal Representation Learning
  and Alignment", ICLR 2025, arXiv 2412.11959; code: ispamm/GRAM): contrast the volume spanned by the anchor of
  one instance and the other modalities of another.
- `triangle_loss`: TRIANGLE (Cicchetti, Grassucci, Comminiello, "A TRIANGLE Enables Multimodal Alignment Beyond
  Cosine Similarity", NeurIPS 2025; code: ispamm/TRIANGLE): the same with the area of the triangle of three modalities.
- `anchor_infonce_loss`: ImageBind-style (Girdhar et al., CVPR 2023) symmetric InfoNCE of every modality
  against an anchor modality.
- `pairwise_infonce_loss`: symmetric InfoNCE over every pair of modalities.

Diagnostics (CalMRL, arXiv 2511.12034, Theorem 1: how far the leading left singular vector, the "anchor", moves
when columns are missing, and how far it stays after calibration): `anchor_shift`, `calibrated_anchor_shift`.
Building block: `gram_singular_values`.

Deviations from the authors' code, all deliberate:
- PMRL's singular values and vector come from the k x k Gram eigendecomposition (exact, and far cheaper than
  `torch.linalg.svd(full_matrices=True)`, which builds a d x d U per instance). The eigh gradient drops the
  terms of (numerically) repeated eigenvalues, so it stays finite where the authors' SVD gradient is not;
  eigenvalues below the resolution of the Gram route (k * eps * lambda_max) count as exactly zero (singular
  value 0, zero gradient: a valid subgradient at the kink of s = sqrt(lambda)).
- PMRL's leading vector has a canonical sign, sum_m <u_b, z_b^m> >= 0 (ties, as for two unit columns with a
  negative cosine, broken by the first observed column); the authors leave it to LAPACK/cuSOLVER, which makes
  their inter term backend-dependent.
- Negatives gathered across processes (`gather_fn`, `collective.gather_with_grad`, per-process batches of any
  size): PMRL's inter term (the authors use the per-GPU batch), GRAM's and TRIANGLE's columns, every InfoNCE
  pair. In open_clip's local-loss form: each process scores its own rows against every process's columns (and
  its own columns against every row), and returns world size x the sum of its rows' terms / N, so the mean over
  processes, which DDP's gradient averaging optimises, is the loss of the concatenated batch.
- GRAM's and TRIANGLE's columns get the plain gradient of the symmetric formula (the authors build the gathered
  side under no_grad, even on one GPU: rows train the anchor, columns the other modalities).
- Temperatures (floats or 0-dim, possibly learnable, tensors) are clamped to at least 1e-3 (GRAM and TRIANGLE
  never clamp theirs).

Observed-only semantics with a mask (choices of ours, the authors' code assumes complete instances):
- PMRL: row b uses the d x |Omega_b| matrix of its observed columns; its intra softmax runs over its own
  min(|Omega_b|, d) singular values (masked ones excluded, not entered as zeros).
- GRAM: V_ij uses the anchor of row i and the observed non-anchor modalities of column j (missing ones enter
  the Gram as rows/columns of the identity, which leaves the determinant that of the observed sub-Gram). An
  instance takes part (as a row and as a column: the symmetric loss needs both) only if it observes the anchor
  and at least one other modality; an instance without its anchor has no positive in either direction. Raises
  if no instance qualifies. Volumes of columns with fewer observed modalities are of lower dimension, hence
  larger on average: that bias is inherent to observed-only GRAM and is what imputation removes.
- TRIANGLE: only instances observing all three modalities take part (a triangle needs its three vertices;
  dropping a vertex would turn the area into a segment, not comparable); raises if none does.
- InfoNCE losses: a pair of modalities enters over the rows observing both; pairs with fewer than two such rows
  (no negative) are skipped; the loss is the mean over the remaining pairs; raises if none remains.

Numerics: all work is done in at least float32 (bf16/fp16 inputs are upcast; autocast is switched off inside),
and the objectives return that dtype (float32 for half-precision inputs, else the input dtype); gradients reach
the inputs in their own dtype. Unobserved entries are never read (NaN there cannot leak). A row observing no
modality is an error.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .collective import gather_with_grad, world_size
from .host_mask import HostMask
from .validation import check_embeddings


# Temperatures are clamped to at least this, so a learnable one can never reach zero.
MIN_TEMPERATURE = 1e-3
# Eigenvalue gaps below this fraction of max(|lambda|, 1) count as repeated in the eigh backward: their
# (infinite) eigenvector-gradient terms are dropped. Per dtype: max(1e-9, 100 eps).
_DEGENERATE_GAP_FLOOR = 1e-9
# |sum(w)| below this is a tie of the canonical sign rule (w is a unit vector).
_SIGN_TIE = 1e-6
# Guard for sqrt / division at zero (volume, area, singular value).
_TINY = 1e-12


# ---------------------------------------------------------------------------- validation
def _full_precision(function):
    """Run `function` with autocast off on the device of its tensor arguments: the work is done in at least
    float32 as documented (under a bf16 autocast the Gram, eigh inputs and determinants would otherwise drop to
    bf16). Inputs in half precision are upcast inside; gradients flow back in their dtype."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        device_type = tensor.device.type if tensor is not None else "cpu"
        try:
            active = torch.is_autocast_enabled(device_type)
        except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
            active = False
        with torch.autocast(device_type, enabled=False) if active else contextlib.nullcontext():
            return function(*args, **kwargs)

    return wrapper


def _check(embeddings: torch.Tensor, modality_mask: torch.Tensor | None, name: str = "embeddings") -> None:
    """Validate at the door (`validation.check_embeddings`): the public functions check their batch once, then run
    their unchecked implementation (`_pmrl_loss`, ...), which the model and `OBJECTIVES` call directly on the
    embeddings the model validated where they entered it."""
    check_embeddings(embeddings, modality_mask, name=name)


def _observed(embeddings: torch.Tensor, modality_mask: torch.Tensor | None) -> torch.Tensor:
    """The bool mask [B, k]: as given, or all True when None."""
    if modality_mask is None:
        return torch.ones(embeddings.shape[:2], dtype=torch.bool, device=embeddings.device)
    return modality_mask


def _on_host(mask: torch.Tensor, modality_mask: torch.Tensor | None, host_mask: HostMask | None) -> HostMask:
    """`mask` (`_observed`'s) with its host copy, for selecting rows without reading the device back: the caller's
    (`host_mask`, the model's), all True without a modality_mask, else read (one sync)."""
    if host_mask is not None:
        return host_mask
    return HostMask.all_true(mask) if modality_mask is None else HostMask.read(mask)


def _masked(embeddings: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the unobserved columns (torch.where, so NaN there cannot leak), in at least float32."""
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    if mask is None:  # all observed: nothing to zero (saves a pass over [B, k, d] forward and backward)
        return embeddings.to(dtype)
    return torch.where(mask.unsqueeze(-1), embeddings.to(dtype), torch.zeros((), dtype=dtype,
                                                                             device=embeddings.device))


def clamp_temperature(value, name: str = "temperature") -> torch.Tensor | float:
    """A float or a 0-dim tensor (learnable temperatures keep their gradient), clamped to >= `MIN_TEMPERATURE`."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name} must be a float or a 0-dim tensor, got a tensor of shape {list(value.shape)}.")
        return value.reshape(()).clamp_min(MIN_TEMPERATURE)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive finite number or a 0-dim tensor, got {value!r}.")
    return max(float(value), MIN_TEMPERATURE)


def _label_smoothing(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {value!r}.")
    return float(value)


def _anchor_index(anchor: int, k: int) -> int:
    try:
        index = operator.index(anchor)
    except TypeError:
        index = None
    if isinstance(anchor, bool) or index is None or not 0 <= index < k:
        raise ValueError(f"anchor must be a modality index in [0, {k}), got {anchor!r}.")
    return index


GatherFn = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def _gather(gather_fn: GatherFn | None, local: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(rows of every process [N, ...], offset of the local rows, processes the loss is averaged over).

    Without `gather_fn` the local rows alone (offset 0, one process). With it, the gradient reaches the local rows
    only (`collective.gather_with_grad`); each process then returns `world * (sum of its rows' terms) / N`, so
    that the mean over processes (what DDP's gradient averaging optimises) is the loss of the whole batch.
    """
    if gather_fn is None:
        return local, 0, 1
    gathered, offset = gather_fn(local)
    if gathered.shape[1:] != local.shape[1:] or not 0 <= offset <= gathered.shape[0] - local.shape[0]:
        raise ValueError(f"gather_fn must return (gathered [N, {', '.join(map(str, local.shape[1:]))}], offset) with "
                         f"0 <= offset <= N - {local.shape[0]}, got gathered {list(gathered.shape)} and offset "
                         f"{offset}.")
    return gathered, offset, world_size()


def _local_symmetric_cross_entropy(row_logits: torch.Tensor, column_logits: torch.Tensor, offset: int, world: int,
                                   label_smoothing: float) -> torch.Tensor:
    """This process's share of the symmetric loss (CE_eps(L, arange) + CE_eps(L^T, arange)) / 2 of an [N, N]
    logit matrix L, from its local rows `row_logits` = L[own, :] and local columns `column_logits` = L[:, own]^T,
    both [n, N] (open_clip's local-loss form); `world` x the sum over the local rows / N."""
    total = row_logits.shape[1]
    targets = torch.arange(row_logits.shape[0], device=row_logits.device) + offset
    terms = (F.cross_entropy(row_logits, targets, label_smoothing=label_smoothing, reduction="sum")
             + F.cross_entropy(column_logits, targets, label_smoothing=label_smoothing, reduction="sum")) / 2
    return terms * world / total


# ---------------------------------------------------------------------------- singular values
class _GramMatrix(torch.autograd.Function):
    """G = C C^T [..., k, k] with the one-product backward gC = (gG + gG^T) C (autograd would take two)."""

    @staticmethod
    def forward(ctx, columns: torch.Tensor):
        ctx.save_for_backward(columns)
        return columns @ columns.transpose(-2, -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_gram):
        (columns,) = ctx.saved_tensors
        return (grad_gram + grad_gram.transpose(-2, -1)).to(columns.dtype) @ columns


class _SymmetricEigh(torch.autograd.Function):
    """`torch.linalg.eigh` whose backward drops the terms of (nearly) repeated eigenvalues.

    For A = V diag(L) V^T: gA = V (diag(gL) + F o (V^T gV - gV^T V) / 2) V^T with F_ij = 1 / (L_j - L_i). At
    repeated eigenvalues F is infinite while a loss that is a function of the eigenspace does not depend on the
    rotation inside it, so those terms are set to zero (the standard guard; torch's own backward returns NaN).
    """

    @staticmethod
    def forward(ctx, matrix: torch.Tensor):
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
        ctx.save_for_backward(eigenvalues, eigenvectors)
        return eigenvalues, eigenvectors

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_eigenvalues, grad_eigenvectors):
        eigenvalues, eigenvectors = ctx.saved_tensors
        inner = torch.zeros_like(eigenvectors)
        if grad_eigenvectors is not None:
            gap = eigenvalues.unsqueeze(-2) - eigenvalues.unsqueeze(-1)  # L_j - L_i  [..., k, k]
            relative = max(_DEGENERATE_GAP_FLOOR, 100 * torch.finfo(eigenvalues.dtype).eps)
            scale = eigenvalues.abs().amax(dim=-1, keepdim=True).unsqueeze(-1).clamp_min(1)
            safe = gap.abs() > relative * scale
            inverse_gap = torch.where(safe, 1.0 / torch.where(safe, gap, torch.ones_like(gap)), torch.zeros_like(gap))
            projected = eigenvectors.transpose(-2, -1) @ grad_eigenvectors  # V^T gV
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


def _leading(columns: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values [B, k] (descending) and canonical u [B, d] of the matrices A_b with A_b^T = columns[b]."""
    gram = _GramMatrix.apply(columns)  # G_b = A_b^T A_b  [B, k, k]
    eigenvalues, eigenvectors = _SymmetricEigh.apply(gram)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(-1), eigenvectors.flip(-1)  # descending: s_b1^2 first
    # below k * eps * lambda_max an eigenvalue is rounding noise of the Gram route: exactly zero (sqrt' = inf at 0)
    k = columns.shape[1]
    resolution = (k * torch.finfo(eigenvalues.dtype).eps * eigenvalues[:, :1]).clamp_min(_TINY)
    positive = eigenvalues > resolution
    # s = sqrt(lambda); the clamp keeps the unused branch's gradient finite
    singular = torch.where(positive, eigenvalues.clamp_min(_TINY).sqrt(), torch.zeros_like(eigenvalues))
    top = eigenvectors[..., 0]  # w_b [B, k]
    top = top * _canonical_sign(top, mask)
    u = (top.unsqueeze(1) @ columns).squeeze(1) / singular[:, :1].clamp_min(_TINY)  # u_b = A_b w_b / s_b1  [B, d]
    return singular, u


def gram_singular_values(
    embeddings: torch.Tensor, modality_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values [B, k] (descending; 0 for masked columns, at the end) and leading left singular vector
    u [B, d] of the d x k matrices A_b = [z_b^1 ... z_b^k] restricted to the observed columns.

    Computed from the k x k Gram G_b = A_b^T A_b (masked columns zeroed): eigenvalues s^2, u_b = A_b w_b / s_b1
    with w_b the top eigenvector; sign canonical: sum_m <u_b, z_b^m> >= 0. Differentiable, with finite gradients
    at repeated singular values. Returned in at least float32.
    """
    _check(embeddings, modality_mask)
    return _gram_singular_values(embeddings, modality_mask)


@_full_precision
def _gram_singular_values(embeddings: torch.Tensor, modality_mask: torch.Tensor | None):
    """`gram_singular_values` on a batch validated before."""
    return _leading(_masked(embeddings, modality_mask), _observed(embeddings, modality_mask))


# ---------------------------------------------------------------------------- PMRL
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

    Row b uses its observed columns only (its own number of singular values in the intra softmax).
    `gather_fn(u) -> (u_all [N, d], offset)` supplies the inter term's columns from every process, with the
    gradient of the local part (`collective.gather_with_grad`; batches may differ in size); the positive of local
    row b is column offset + b. Without it the columns are the local batch. With it, the loss is this process's
    share, world size x sum over local rows / N: the mean over processes is the loss of the concatenated batch.
    """
    _check(embeddings, modality_mask)
    return _pmrl_loss(embeddings, modality_mask, tau1, tau2, gather_fn)


@_full_precision
def _pmrl_loss(embeddings, modality_mask, tau1, tau2, gather_fn: GatherFn | None) -> torch.Tensor:
    """`pmrl_loss` on a batch validated before."""
    mask = _observed(embeddings, modality_mask)
    tau1, tau2 = clamp_temperature(tau1, "tau1"), clamp_temperature(tau2, "tau2")
    singular, u = _leading(_masked(embeddings, modality_mask), mask)
    # row b has min(|Omega_b|, d) singular values: the leading ones of the descending list
    count = mask.sum(dim=1, keepdim=True).clamp_max(embeddings.shape[2])
    observed = torch.arange(mask.shape[1], device=mask.device) < count  # [B, k]
    intra_logits = torch.where(observed, singular / tau1, torch.full_like(singular, float("-inf")))
    intra = torch.logsumexp(intra_logits, dim=1) - singular[:, 0] / tau1  # [B]
    columns, offset, world = _gather(gather_fn, u)
    inter_logits = u @ columns.T / tau2  # <u_b, u_c> / tau2  [B, N]
    positives = torch.arange(u.shape[0], device=u.device) + offset
    inter = torch.logsumexp(inter_logits, dim=1) - inter_logits.gather(1, positives[:, None]).squeeze(1)  # [B]
    return (intra + inter).sum() * world / columns.shape[0]  # the mean over the rows of every process


# ---------------------------------------------------------------------------- GRAM and TRIANGLE
def gram_volume(
    embeddings: torch.Tensor, modality_mask: torch.Tensor | None = None, *, anchor: int = 0
) -> torch.Tensor:
    """V [B, B]: V_ij = sqrt|det Gram(z_i^anchor, z_j^m for every observed m != anchor)|.

    A missing modality of column j enters the Gram as a row/column of the identity, which leaves the
    determinant equal to that of the observed sub-Gram (expand along that row). A row whose anchor is masked
    has a zero anchor, hence zero volumes: leave such rows out before calling (as `gram_loss` does).
    """
    _check(embeddings, modality_mask)
    return _gram_volume(embeddings, modality_mask, anchor)


@_full_precision
def _gram_volume(embeddings: torch.Tensor, modality_mask: torch.Tensor | None, anchor: int) -> torch.Tensor:
    """`gram_volume` on a batch validated before."""
    mask = _observed(embeddings, modality_mask)
    anchor = _anchor_index(anchor, embeddings.shape[1])
    columns = _masked(embeddings, modality_mask)
    return _volume_between(columns[:, anchor], columns, mask, anchor)


def _volume_between(anchors: torch.Tensor, columns: torch.Tensor, mask: torch.Tensor, anchor: int) -> torch.Tensor:
    """V [n, m] between row anchors [n, d] and the non-anchor modalities of columns [m, k, d] (mask [m, k])."""
    k = columns.shape[1]
    others = [m for m in range(k) if m != anchor]
    rest = columns[:, others]  # z_j^m, m != anchor  [m, k-1, d]
    cross = torch.einsum("id,jmd->ijm", anchors, rest)  # <z_i^anchor, z_j^m>  [n, m, k-1]
    rest_gram = rest @ rest.transpose(1, 2)  # <z_j^m, z_j^m'>  [m, k-1, k-1]
    rest_gram = rest_gram + torch.diag_embed((~mask[:, others]).to(rest_gram.dtype))  # identity for missing
    gram = columns.new_empty(anchors.shape[0], columns.shape[0], k, k)  # [n, m, k, k]
    gram[:, :, 0, 0] = (anchors * anchors).sum(-1).unsqueeze(1)
    gram[:, :, 0, 1:] = cross
    gram[:, :, 1:, 0] = cross
    gram[:, :, 1:, 1:] = rest_gram.unsqueeze(0)
    # V = sqrt|det G|, sqrt guarded: its derivative is infinite at zero volume
    return torch.linalg.det(gram).abs().clamp_min(_TINY).sqrt()


def _anchor_contrast(local, packed: torch.Tensor, unpack: Callable, score: Callable, *, temperature,
                     label_smoothing: float, gather_fn: GatherFn | None, nobody: str) -> torch.Tensor:
    """GRAM's and TRIANGLE's loss (CE_eps(-S/T, arange) + CE_eps(-S^T/T, arange)) / 2, this process's share, of the
    scores S [N, N] (volumes, areas) between the anchor of instance i and the other modalities of instance j.

    `local` holds this process's instances as `score` takes them; `packed` [n, ...] is what travels to the other
    processes (`gather_fn`) and `unpack` turns the gathered rows back into `score`'s form. `score(anchors_of,
    columns_of)` gives [n_a, n_c]. Raises `nobody` when no process has an instance.
    """
    gathered, offset, world = _gather(gather_fn, packed)
    if gathered.shape[0] == 0:
        raise ValueError(nobody)
    everyone = unpack(gathered)
    rows = score(local, everyone)  # local anchors x all  [n, N]
    local_columns = rows.T if gather_fn is None else score(everyone, local).T  # all anchors x local  [n, N]
    return _local_symmetric_cross_entropy(-rows / temperature, -local_columns / temperature, offset, world,
                                          label_smoothing)


def gram_loss(
    embeddings: torch.Tensor,
    modality_mask: torch.Tensor | None = None,
    *,
    temperature=0.07,
    label_smoothing: float = 0.1,
    anchor: int = 0,
    gather_fn: GatherFn | None = None,
) -> torch.Tensor:
    """GRAM volume contrastive loss: (CE_eps(-V/T, arange) + CE_eps(-V^T/T, arange)) / 2.

    Observed only: an instance takes part when it observes the anchor and at least one other modality; column j
    then spans its observed modalities only. Raises if no instance qualifies (on every process). `gather_fn`
    (as `pmrl_loss`'s): the instances of every process are the negatives; the loss is this process's share.
    """
    _check(embeddings, modality_mask)
    return _gram_loss(embeddings, modality_mask, temperature, label_smoothing, anchor, gather_fn)


@_full_precision
def _gram_loss(embeddings, modality_mask, temperature, label_smoothing: float, anchor: int,
               gather_fn: GatherFn | None, host_mask: HostMask | None = None) -> torch.Tensor:
    """`gram_loss` on a batch validated before (`host_mask`: the mask's host copy, nothing read back)."""
    mask = _observed(embeddings, modality_mask)
    host = _on_host(mask, modality_mask, host_mask)
    anchor = _anchor_index(anchor, mask.shape[1])
    temperature, label_smoothing = clamp_temperature(temperature), _label_smoothing(label_smoothing)
    if mask.shape[1] < 2:
        raise ValueError(f"gram_loss needs at least two modalities, got k={mask.shape[1]}.")
    others = [m for m in range(mask.shape[1]) if m != anchor]
    keep = host.column(anchor) & host.columns(others).any_per_row()
    columns = _masked(embeddings, modality_mask)[keep.rows()]  # [n, k, d]
    kept_mask = mask[keep.rows()]
    packed = torch.cat([columns, kept_mask.unsqueeze(-1).to(columns.dtype)], dim=-1)  # the mask travels along

    def unpack(gathered):  # [N, k, d], [N, k]
        return gathered[..., :-1], gathered[..., -1].detach() > 0.5

    def volumes(anchors_of, columns_of):
        return _volume_between(anchors_of[0][:, anchor], columns_of[0], columns_of[1], anchor)

    return _anchor_contrast((columns, kept_mask), packed, unpack, volumes, temperature=temperature,
                            label_smoothing=label_smoothing, gather_fn=gather_fn,
                            nobody=f"gram_loss: no instance observes the anchor modality {anchor} together with "
                                   f"another modality.")


def _area_between(a: torch.Tensor, p: torch.Tensor, r: torch.Tensor, true_area: bool) -> torch.Tensor:
    """A [n, m] between row anchors a [n, d] and the columns' vertices p, r [m, d].

    With u = a_i - p_j, w = a_i - r_j: (|u|^2 |w|^2 - <u, w>^2) / 2 as in the authors' training code (2 area^2),
    or the true area sqrt(|u|^2 |w|^2 - <u, w>^2) / 2.
    """
    aa = (a * a).sum(-1).unsqueeze(1)  # |a_i|^2  [n, 1]
    ap, ar = a @ p.T, a @ r.T  # <a_i, p_j>, <a_i, r_j>  [n, m]
    pp, rr, pr = (p * p).sum(-1), (r * r).sum(-1), (p * r).sum(-1)  # [m]
    uu = aa - 2 * ap + pp  # |u|^2
    ww = aa - 2 * ar + rr  # |w|^2
    uw = aa - ap - ar + pr  # <u, w>
    squared = (uu * ww - uw**2).clamp_min(0.0)  # |u|^2 |w|^2 - <u, w>^2 >= 0 (Cauchy-Schwarz; rounding clipped)
    if true_area:
        return squared.clamp_min(_TINY).sqrt() / 2  # sqrt guarded at zero area
    return squared / 2


def _triangle_modalities(k: int, anchor: int, modalities: list[int] | None) -> tuple[list[int], int, int]:
    """The three modalities (all k when k == 3), checked, and the two that are not the anchor."""
    if modalities is None:
        if k != 3:
            raise ValueError(f"triangle_loss needs exactly three modalities, got k={k}: pass modalities=[a, b, c] "
                             f"to choose three.")
        modalities = [0, 1, 2]
    modalities = list(modalities)
    if len(modalities) != 3 or len(set(modalities)) != 3 or not all(0 <= m < k for m in modalities):
        raise ValueError(f"modalities must be three distinct indices in [0, {k}), got {modalities}.")
    if anchor not in modalities:
        raise ValueError(f"anchor {anchor} must be one of the triangle's modalities {modalities}.")
    first, second = [m for m in modalities if m != anchor]
    return modalities, first, second


def triangle_loss(
    embeddings: torch.Tensor,
    modality_mask: torch.Tensor | None = None,
    *,
    temperature=0.07,
    label_smoothing: float = 0.1,
    anchor: int = 0,
    modalities: list[int] | None = None,
    true_area: bool = False,
    gather_fn: GatherFn | None = None,
) -> torch.Tensor:
    """TRIANGLE area contrastive loss over three modalities (`modalities`, or all k when k == 3):
    (CE_eps(-A/T, arange) + CE_eps(-A^T/T, arange)) / 2, A_ij the area of the triangle of the anchor of row i and
    the two other modalities of column j (`true_area=False`: 2 area^2, as the authors' training code).

    Observed only: the instances observing all three modalities take part (a triangle needs its three
    vertices); raises if none does (on every process). `gather_fn` (as `pmrl_loss`'s): the instances of every
    process are the negatives; the loss is this process's share.
    """
    _check(embeddings, modality_mask)
    return _triangle_loss(embeddings, modality_mask, temperature, label_smoothing, anchor, modalities, true_area,
                          gather_fn)


@_full_precision
def _triangle_loss(embeddings, modality_mask, temperature, label_smoothing: float, anchor: int,
                   modalities: list[int] | None, true_area: bool, gather_fn: GatherFn | None,
                   host_mask: HostMask | None = None) -> torch.Tensor:
    """`triangle_loss` on a batch validated before (`host_mask`: the mask's host copy, nothing read back)."""
    mask = _observed(embeddings, modality_mask)
    host = _on_host(mask, modality_mask, host_mask)
    temperature, label_smoothing = clamp_temperature(temperature), _label_smoothing(label_smoothing)
    modalities, first, second = _triangle_modalities(mask.shape[1], anchor, modalities)
    keep = host.columns(modalities).all_per_row()
    local = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))[keep.rows()][:, [anchor, first, second]]

    def areas(anchors_of, columns_of):  # instances [n, 3, d]: anchor, first, second
        return _area_between(anchors_of[:, 0], columns_of[:, 1], columns_of[:, 2], true_area)

    return _anchor_contrast(local, local, lambda gathered: gathered, areas, temperature=temperature,
                            label_smoothing=label_smoothing, gather_fn=gather_fn,
                            nobody=f"triangle_loss: no instance observes all three modalities {modalities}.")


# ---------------------------------------------------------------------------- InfoNCE baselines
def _pair_infonce(columns, mask: HostMask, pairs, temperature, gather_fn: GatherFn | None = None) -> torch.Tensor:
    """Mean over pairs (a, b) with >= 2 rows observing both (of every process, with `gather_fn`) of the symmetric
    CLIP loss on those rows; every process gathers every pair, whatever its own rows."""
    losses = []
    for a, b in pairs:
        both = mask.column(a) & mask.column(b)
        local = columns[both.rows()][:, [a, b]]  # [n, 2, d]
        gathered, offset, world = _gather(gather_fn, local)  # [N, 2, d]
        if gathered.shape[0] < 2:  # no negative: the pair carries no contrast
            continue
        row_logits = local[:, 0] @ gathered[:, 1].T / temperature  # <z_i^a, z_j^b> / T  [n, N]
        column_logits = local[:, 1] @ gathered[:, 0].T / temperature  # <z_j^b, z_i^a> / T  [n, N]
        losses.append(_local_symmetric_cross_entropy(row_logits, column_logits, offset, world, 0.0))
    if not losses:
        raise ValueError(f"No pair of modalities among {pairs} is observed together in at least two rows.")
    return torch.stack(losses).mean()


def anchor_infonce_loss(embeddings: torch.Tensor, modality_mask: torch.Tensor | None = None, *, anchor: int,
                        temperature=0.07, gather_fn: GatherFn | None = None) -> torch.Tensor:
    """ImageBind-style: symmetric InfoNCE between the anchor and each other modality m, over the rows observing
    both (modalities with fewer than two such rows are skipped), averaged over the modalities that remain.
    `gather_fn` (as `pmrl_loss`'s): the rows of every process are the negatives; the loss is this process's share."""
    _check(embeddings, modality_mask)
    return _anchor_infonce_loss(embeddings, modality_mask, anchor, temperature, gather_fn)


@_full_precision
def _anchor_infonce_loss(embeddings, modality_mask, anchor: int, temperature, gather_fn: GatherFn | None,
                         host_mask: HostMask | None = None) -> torch.Tensor:
    """`anchor_infonce_loss` on a batch validated before (`host_mask`: the mask's host copy, nothing read back)."""
    mask = _observed(embeddings, modality_mask)
    anchor = _anchor_index(anchor, mask.shape[1])
    pairs = [(anchor, m) for m in range(mask.shape[1]) if m != anchor]
    return _pair_infonce(_masked(embeddings, modality_mask), _on_host(mask, modality_mask, host_mask), pairs,
                         clamp_temperature(temperature), gather_fn)


def pairwise_infonce_loss(embeddings: torch.Tensor, modality_mask: torch.Tensor | None = None, *,
                          temperature=0.07, gather_fn: GatherFn | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over every pair of modalities a < b, each over the rows observing both (pairs with fewer
    than two such rows are skipped), averaged over the pairs that remain. `gather_fn` as `anchor_infonce_loss`'s."""
    _check(embeddings, modality_mask)
    return _pairwise_infonce_loss(embeddings, modality_mask, temperature, gather_fn)


@_full_precision
def _pairwise_infonce_loss(embeddings, modality_mask, temperature, gather_fn: GatherFn | None,
                           host_mask: HostMask | None = None) -> torch.Tensor:
    """`pairwise_infonce_loss` on a batch validated before (`host_mask`: the mask's host copy, nothing read back)."""
    mask = _observed(embeddings, modality_mask)
    k = mask.shape[1]
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    return _pair_infonce(_masked(embeddings, modality_mask), _on_host(mask, modality_mask, host_mask), pairs,
                         clamp_temperature(temperature), gather_fn)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, modality_mask: torch.Tensor | None = None, *,
                      temperature=0.07, gather_fn: GatherFn | None = None) -> torch.Tensor:
    """Contrastive distillation: for each modality, the symmetric InfoNCE between the student's embeddings z_i^m
    and the teacher's t_j^m of the rows observing m (positive: the same row), averaged over the modalities with at
    least two such rows. `student`, `teacher` [B, k, D] (the teacher's detached), `modality_mask` [B, k].

        loss_m = CLIP(z^m, t^m) = mean_i [ -log softmax_j(<z_i^m, t_j^m> / T)_i ] / 2 + (the same with t as rows)
    """
    _check(student, modality_mask, "student")
    _check(teacher, modality_mask, "teacher")
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher embeddings must have the same shape [B, k, D], got "
                         f"{list(student.shape)} and {list(teacher.shape)}.")
    return _distillation_loss(student, teacher, modality_mask, temperature, gather_fn)


@_full_precision
def _distillation_loss(student, teacher, modality_mask, temperature, gather_fn: GatherFn | None) -> torch.Tensor:
    """`distillation_loss` on embeddings validated before."""
    mask = _observed(student, modality_mask)
    k = mask.shape[1]
    columns = torch.cat([_masked(student, modality_mask), _masked(teacher.detach().to(student.dtype), modality_mask)],
                        dim=1)  # [B, 2k, D]: column m the student's, column k + m the teacher's
    pairs = [(m, k + m) for m in range(k)]
    host = _on_host(mask, modality_mask, None)
    return _pair_infonce(columns, HostMask.cat([host, host], dim=1), pairs, clamp_temperature(temperature), gather_fn)


# ---------------------------------------------------------------------------- anchor shift (Theorem 1)
def _aligned(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """`other` with its sign flipped where it points away from `reference` (singular vectors have no sign)."""
    return other * torch.where((reference * other).sum(-1, keepdim=True) >= 0, 1.0, -1.0).to(other.dtype)


@torch.no_grad()
@_full_precision
def anchor_shift(embeddings: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
    """||u1 - u1^Omega|| [B]: shift of the leading left singular vector of the full Z (`embeddings`, every column
    given) when only the columns of `modality_mask` are observed; u1^Omega sign-aligned to u1."""
    _check(embeddings, modality_mask)
    _, full = _gram_singular_values(embeddings, None)
    _, observed = _gram_singular_values(embeddings, modality_mask)
    return (full - _aligned(full, observed)).norm(dim=-1)


@torch.no_grad()
@_full_precision
def calibrated_anchor_shift(true_embeddings: torch.Tensor, calibrated_embeddings: torch.Tensor) -> torch.Tensor:
    """||u1(true full Z) - u1(calibrated Z)|| [B]: the anchor shift left after imputing the missing columns."""
    _check(true_embeddings, None, "true_embeddings")
    _check(calibrated_embeddings, None, "calibrated_embeddings")
    if true_embeddings.shape != calibrated_embeddings.shape:
        raise ValueError(f"true_embeddings and calibrated_embeddings must have the same shape [B, k, d], got "
                         f"{list(true_embeddings.shape)} and {list(calibrated_embeddings.shape)}.")
    _, true_u = _gram_singular_values(true_embeddings, None)
    _, calibrated_u = _gram_singular_values(calibrated_embeddings, None)
    calibrated_u = calibrated_u.to(true_u.dtype)
    return (true_u - _aligned(true_u, calibrated_u)).norm(dim=-1)


# ---------------------------------------------------------------------------- the objective registry
@dataclass(frozen=True)
class Objective:
    """An entry of `OBJECTIVES`: `loss(embeddings, modality_mask, config, temperature, host_mask=None)` is the
    objective with its settings read from a `CalMRLConfig` (the fields named in `config_keys`); `temperature` is the
    model's (learnable) contrastive temperature, clamped inside the loss; `host_mask` the mask's `HostMask` (the
    objectives that select rows then read nothing back). The batch is not validated again: the model validated it
    where it entered (the public `*_loss` functions check theirs)."""

    loss: Callable[..., torch.Tensor]
    config_keys: tuple[str, ...]


def _anchor_of(config) -> int:
    return config.modality_index(config.anchor_modality)


def _gather_fn(config) -> GatherFn | None:
    """Negatives from every process where asked (and there is more than one): `collective.gather_with_grad`."""
    return gather_with_grad if config.gather_across_processes and world_size() > 1 else None


def _pmrl_objective(embeddings, modality_mask, config, temperature, host_mask=None):
    return _pmrl_loss(embeddings, modality_mask, config.pmrl_tau1, config.pmrl_tau2, _gather_fn(config))


def _gram_objective(embeddings, modality_mask, config, temperature, host_mask=None):
    return _gram_loss(embeddings, modality_mask, temperature, config.label_smoothing, _anchor_of(config),
                      _gather_fn(config), host_mask)


def _triangle_objective(embeddings, modality_mask, config, temperature, host_mask=None):
    anchor, modalities = _anchor_of(config), None
    if config.triangle_modalities is not None:  # the three named modalities, the first one the anchor
        modalities = [config.modality_index(m) for m in config.triangle_modalities]
        anchor = modalities[0]
    return _triangle_loss(embeddings, modality_mask, temperature, config.label_smoothing, anchor, modalities,
                          False, _gather_fn(config), host_mask)


def _anchor_infonce_objective(embeddings, modality_mask, config, temperature, host_mask=None):
    return _anchor_infonce_loss(embeddings, modality_mask, _anchor_of(config), temperature, _gather_fn(config),
                                host_mask)


def _pairwise_infonce_objective(embeddings, modality_mask, config, temperature, host_mask=None):
    return _pairwise_infonce_loss(embeddings, modality_mask, temperature, _gather_fn(config), host_mask)


_CONTRASTIVE_KEYS = ("temperature", "learnable_temperature")
# `CalMRLConfig.alignment_objective` -> the objective (the config accepts exactly these names).
OBJECTIVES: dict[str, Objective] = {
    "pmrl": Objective(_pmrl_objective, ("pmrl_tau1", "pmrl_tau2", "gather_across_processes")),
    "gram": Objective(_gram_objective,
                      (*_CONTRASTIVE_KEYS, "label_smoothing", "anchor_modality", "gather_across_processes")),
    "triangle": Objective(_triangle_objective, (*_CONTRASTIVE_KEYS, "label_smoothing", "anchor_modality",
                                                "triangle_modalities", "gather_across_processes")),
    "anchor_infonce": Objective(_anchor_infonce_objective,
                                (*_CONTRASTIVE_KEYS, "anchor_modality", "gather_across_processes")),
    "pairwise_infonce": Objective(_pairwise_infonce_objective, (*_CONTRASTIVE_KEYS, "gather_across_processes")),
}


__all__ = [
    "MIN_TEMPERATURE",
    "OBJECTIVES",
    "Objective",
    "anchor_infonce_loss",
    "anchor_shift",
    "calibrated_anchor_shift",
    "clamp_temperature",
    "distillation_loss",
    "gram_loss",
    "gram_singular_values",
    "gram_volume",
    "pairwise_infonce_loss",
    "pmrl_loss",
    "triangle_loss",
]
