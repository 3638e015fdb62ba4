"""Multi-view probabilistic PCA with missing views: CalMRL's imputer of missing embeddings.

Model (Liu et al., ICML 2026, arXiv 2511.12034, Section 4). For instance i and
modalities m = 1..k, with a latent shared by all modalities:

    beta_i ~ N(0, I_q)
    z_i^m = W_m beta_i + mu_m + eps_i^m,      eps_i^m ~ N(0, noise_var_m I_d)

Parameters {W_m (d x q), mu_m (d), noise_var_m} are buffers fitted in closed form by EM, never by gradient
descent. Only the observed modalities Omega_i of a row enter its posterior:

    P_i = I_q + sum_{m in Omega_i} W_m^T W_m / noise_var_m               (posterior precision)
    V_i = P_i^{-1},   m_i = V_i sum_{m in Omega_i} W_m^T (z_i^m - mu_m) / noise_var_m

P_i depends on the pattern Omega_i only, so the E-step factors (Cholesky) once per pattern present, never
once per row. The M-step solves for [W_m, mu_m] jointly from additive sufficient statistics of the augmented
latent b~ = [beta; 1], which makes full-batch EM, mini-batch / streaming EM (moving averages of statistics)
and multi-process training (one all-reduce of the statistics) the same code. A missing modality m' is
imputed by its posterior mean W_{m'} m_i + mu_{m'}, with covariance W_{m'} V_i W_{m'}^T + noise_var_{m'} I.

References: Tipping & Bishop, "Probabilistic principal component analysis", JRSS-B 1999 (PPCA and its EM);
Liu et al., "Calibrated Multimodal Representation Learning with Missing Modalities", ICML 2026.
"""

from __future__ import annotations

import logging
import math
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .host_mask import HostMask, rows_where
from .validation import ValueCheck, check_embeddings, read_check


logger = logging.getLogger(__name__)

# Rows per chunk for the large products: float32 within a chunk, float64 across chunks.
_CHUNK_ROWS = 16384


@dataclass
class PPCAStatistics:
    """Additive sufficient statistics of the M-step (float64), with b~ = [beta; 1]:

    A_m = sum_i E[b~_i b~_i^T] ([k, q+1, q+1]),  B_m = sum_i z_i^m E[b~_i]^T ([k, d, q+1]),
    c_m = sum_i ||z_i^m||^2 ([k]),  N_m ([k]), each sum over the rows i that observe modality m.
    """

    latent_second_moment: torch.Tensor  # A [k, q+1, q+1]
    cross_moment: torch.Tensor  # B [k, d, q+1]
    sum_sq_norm: torch.Tensor  # c [k]
    count: torch.Tensor  # N_m [k]

    @classmethod
    def zeros(cls, num_modalities: int, dim: int, latent_dim: int, device=None) -> "PPCAStatistics":
        options = dict(dtype=torch.float64, device=device)
        return cls(
            torch.zeros(num_modalities, latent_dim + 1, latent_dim + 1, **options),
            torch.zeros(num_modalities, dim, latent_dim + 1, **options),
            torch.zeros(num_modalities, **options),
            torch.zeros(num_modalities, **options),
        )

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return (self.latent_second_moment, self.cross_moment, self.sum_sq_norm, self.count)

    def __add__(self, other: "PPCAStatistics") -> "PPCAStatistics":
        if not isinstance(other, PPCAStatistics):
            return NotImplemented
        for mine, theirs in zip(self._fields(), other._fields()):
            if mine.shape != theirs.shape:
                raise ValueError(f"Cannot add statistics of shapes {list(mine.shape)} and {list(theirs.shape)}.")
        return PPCAStatistics(*(a + b.to(a.device) for a, b in zip(self._fields(), other._fields())))

    def scale(self, factor: float) -> "PPCAStatistics":
        """Statistics times `factor` (a moving average's decay); a scalar or a per-modality [k] tensor."""
        if isinstance(factor, torch.Tensor) and factor.dim() == 1:
            A, B, c, n = self._fields()
            f = factor.to(torch.float64)
            return PPCAStatistics(A * f[:, None, None], B * f[:, None, None], c * f, n * f)
        return PPCAStatistics(*(field * factor for field in self._fields()))

    def to_flat(self) -> torch.Tensor:
        """One 1-D float64 tensor, so that processes can sum statistics with a single all-reduce."""
        return torch.cat([field.reshape(-1) for field in self._fields()])

    @classmethod
    def from_flat(cls, flat: torch.Tensor, num_modalities: int, dim: int, latent_dim: int) -> "PPCAStatistics":
        k, d, q1 = num_modalities, dim, latent_dim + 1
        sizes = [k * q1 * q1, k * d * q1, k, k]
        if flat.dim() != 1 or flat.numel() != sum(sizes):
            raise ValueError(f"A flat statistics vector for k={k}, d={d}, q={latent_dim} has {sum(sizes)} "
                             f"entries, got shape {list(flat.shape)}.")
        A, B, c, n = torch.split(flat.to(torch.float64), sizes)
        return cls(A.reshape(k, q1, q1), B.reshape(k, d, q1), c, n)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"latent_second_moment": self.latent_second_moment, "cross_moment": self.cross_moment,
                "sum_sq_norm": self.sum_sq_norm, "count": self.count}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            current = getattr(self, name)
            if current.shape != value.shape:
                raise ValueError(f"Statistics field {name}: expected shape {list(current.shape)}, got "
                                 f"{list(value.shape)}.")
            setattr(self, name, value.to(device=current.device, dtype=torch.float64).clone())


def modality_name_codes(names: Sequence[str]) -> torch.Tensor:
    """A 24-bit code per modality name (its CRC-32's low bits: exact in float32), in order: what the imputer's
    rows were fitted for, saved with its parameters."""
    return torch.tensor([zlib.crc32(str(name).encode()) & 0xFFFFFF for name in names], dtype=torch.float32)


@dataclass
class _EStep:
    """Posterior of the shared latent, grouped by missingness pattern."""

    mean: torch.Tensor  # m_i [N, q]
    pattern_index: torch.Tensor  # [N] index into the pattern tensors
    pattern_masks: torch.Tensor  # [p, k] bool
    pattern_cov: torch.Tensor  # V_p [p, q, q]
    pattern_logdet_precision: torch.Tensor  # log det P_p [p]
    precision_times_mean: torch.Tensor  # b_i [N, q]
    observed: torch.Tensor  # z with 0 in missing slots [N, k, d] (compute dtype)


def _compute_dtype(z: torch.Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _patterns_on_device(codes: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.unique(codes, return_inverse=True)` of row codes [N] holding `count` distinct values, without reading
    that count back: (the distinct codes, increasing [count]; the index of each row's code [N])."""
    ordered = codes.sort().values
    first = torch.ones_like(ordered, dtype=torch.bool)  # the first row of each run of one code
    first[1:] = ordered[1:] != ordered[:-1]
    pattern_codes = ordered[rows_where(first, count)]
    return pattern_codes, torch.searchsorted(pattern_codes, codes)


def _posterior_by_pattern(z: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                          noise_var: torch.Tensor, host_mask: HostMask | None = None) -> _EStep:
    """The E-step: posterior of the shared latent of each row of z [N, k, d] given its observed modalities, with the
    parameters W [k, d, q], mu [k, d], s2 [k] in the compute dtype. With `host_mask` (`mask` and its host copy) the
    patterns and their rows are found without reading anything back."""
    dtype = weight.dtype
    n, k, d = z.shape
    # torch.where (not * 0) so that NaN in a missing slot cannot leak
    observed = torch.where(mask.unsqueeze(-1), z.to(dtype), torch.zeros((), dtype=dtype, device=z.device))
    scaled_weight = weight / noise_var[:, None, None]  # W_m / s2_m  [k, d, q]
    # b_i = sum_{m in Omega_i} W_m^T (z_i^m - mu_m) / s2_m
    #     = [z_i^1 .. z_i^k] @ [W_1 / s2_1; ..; W_k / s2_k] - sum_{m in Omega_i} W_m^T mu_m / s2_m
    mean_offset = torch.einsum("kd,kdq->kq", mean, scaled_weight)  # [k, q]
    precision_times_mean = observed.reshape(n, k * d) @ scaled_weight.reshape(k * d, -1)
    precision_times_mean = precision_times_mean - mask.to(dtype) @ mean_offset
    # one Cholesky per missingness pattern: P_p = I + sum_{m in p} W_m^T W_m / s2_m
    powers = 2 ** torch.arange(k, device=mask.device)
    codes = (mask.long() * powers).sum(dim=1)
    if host_mask is None:
        pattern_codes, pattern_index = torch.unique(codes, return_inverse=True)
        rows_per_pattern = None
    else:
        rows_per_pattern = [rows for _, rows in host_mask.pattern_counts()]
        pattern_codes, pattern_index = _patterns_on_device(codes, len(rows_per_pattern))
    pattern_masks = (pattern_codes.unsqueeze(1) & powers) > 0  # [p, k]
    gram = torch.einsum("kdq,kdr->kqr", weight, scaled_weight)  # W_m^T W_m / s2_m  [k, q, q]
    eye = torch.eye(weight.shape[-1], dtype=dtype, device=z.device)
    precision = eye + torch.einsum("pk,kqr->pqr", pattern_masks.to(dtype), gram)
    # P_p = I + a positive semi-definite sum (s2_m >= the noise floor > 0) cannot fail to factor: no error check (it
    # would read the factorisation's status back from the device)
    cholesky, _ = torch.linalg.cholesky_ex(precision)
    pattern_cov = torch.cholesky_inverse(cholesky)  # V_p  [p, q, q]
    logdet = 2.0 * cholesky.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    # m_i = V_p b_i, solved per pattern (rows of one pattern share V_p)
    if pattern_codes.numel() == 1:
        latent_mean = precision_times_mean @ pattern_cov[0]
    else:
        latent_mean = torch.empty_like(precision_times_mean)
        for p in range(pattern_codes.numel()):
            rows = ((pattern_index == p).nonzero().flatten() if rows_per_pattern is None
                    else rows_where(pattern_index == p, rows_per_pattern[p]))
            latent_mean = latent_mean.index_copy(0, rows, precision_times_mean[rows] @ pattern_cov[p])
    return _EStep(latent_mean, pattern_index, pattern_masks, pattern_cov, logdet, precision_times_mean, observed)


def _accumulate_statistics(e: _EStep, mask: torch.Tensor, dim: int) -> PPCAStatistics:
    """The M-step's sufficient statistics of the rows of an E-step, accumulated in float64."""
    device, k, q = e.observed.device, mask.shape[1], e.mean.shape[1]
    # A_m = sum_i [[V_i + m_i m_i^T, m_i], [m_i^T, 1]] over rows observing m: V_i summed per pattern
    pattern_counts = torch.zeros(e.pattern_cov.shape[0], k, dtype=torch.float64, device=device)
    pattern_counts.index_add_(0, e.pattern_index, mask.to(torch.float64))
    A = torch.zeros(k, q + 1, q + 1, dtype=torch.float64, device=device)
    A[:, :q, :q] = torch.einsum("pk,pqr->kqr", pattern_counts, e.pattern_cov.to(torch.float64))
    B = torch.zeros(k, dim, q + 1, dtype=torch.float64, device=device)
    sum_sq_norm = torch.zeros(k, dtype=torch.float64, device=device)
    maskf = mask.to(e.mean.dtype)
    for start in range(0, mask.shape[0], _CHUNK_ROWS):  # compute dtype within a chunk, float64 across
        rows = slice(start, start + _CHUNK_ROWS)
        latent, observed = e.mean[rows], e.observed[rows]  # [n, q], [n, k, d]
        for m in range(k):
            # rows missing m hold zeros in `observed`, so plain products sum over rows observing m only
            B[m, :, :q] += (observed[:, m].T @ latent).to(torch.float64)  # sum_i z_i^m m_i^T
            A[m, :q, :q] += ((latent * maskf[rows, m, None]).T @ latent).to(torch.float64)
        A[:, :q, q] += (maskf[rows].T @ latent).to(torch.float64)  # sum_i m_i
        B[:, :, q] += observed.sum(dim=0).to(torch.float64)  # sum_i z_i^m
        sum_sq_norm += observed.square().sum(dim=(0, 2)).to(torch.float64)
    A[:, q, :q] = A[:, :q, q]
    count = mask.sum(dim=0).to(torch.float64)
    A[:, q, q] = count
    return PPCAStatistics(A, B, sum_sq_norm, count)


def _solve_m_step(A: torch.Tensor, B: torch.Tensor, c: torch.Tensor, count: torch.Tensor, ridge: float,
                  noise_var_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form [W_m, mu_m] [a, d, q+1] and s2_m [a] of the modalities whose float64 statistics are given."""
    d, q1 = B.shape[1], B.shape[2]
    eye = torch.eye(q1, dtype=torch.float64, device=A.device)
    ridge = ridge * count.clamp_min(1.0)[:, None, None] * eye  # solve, don't invert; tiny relative ridge
    # [W_m, mu_m] = B_m A_m^{-1}  (A symmetric: solve A X = B^T, then transpose); A_m + ridge is positive definite,
    # so the solve needs no error check (it would read its status back from the device)
    loading = torch.linalg.solve_ex(A + ridge, B.transpose(1, 2))[0].transpose(1, 2)  # [a, d, q+1]
    # s2_m = (c_m - 2 <[W_m, mu_m], B_m> + tr([W_m, mu_m]^T [W_m, mu_m] A_m)) / (N_m d)
    cross = (loading * B).sum(dim=(1, 2))
    quadratic = torch.einsum("adq,adr,aqr->a", loading, loading, A)
    noise_var = ((c - 2.0 * cross + quadratic) / (count * d)).clamp_min(noise_var_floor)
    return loading, noise_var


def _joint_pca(z: torch.Tensor, mask: torch.Tensor, latent_dim: int, seed: int):
    """(W [k, d, q], mu [k, d], s2 [k], rows per modality [k]) in float64 from a PCA of the mean-filled
    concatenation of all modalities: every W_m in the same latent basis, s2_m the residual variance per coordinate
    (at least 10% of the modality's total)."""
    n, k, d = z.shape
    q = latent_dim
    data = torch.where(mask.unsqueeze(-1), z.detach(), torch.zeros((), dtype=z.dtype, device=z.device)).double()
    counts = mask.sum(dim=0).double()
    mean = data.sum(dim=0) / counts.clamp_min(1.0)[:, None]  # [k, d]
    centered = torch.where(mask.unsqueeze(-1), data - mean, torch.zeros((), dtype=data.dtype, device=z.device))
    flat = centered.reshape(n, k * d)
    rank = min(q, *flat.shape)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # pca_lowrank draws a random projection: keep fit deterministic
    try:
        _, singular, basis = torch.pca_lowrank(flat, q=min(rank + 8, *flat.shape), center=False, niter=6)
    finally:
        torch.random.set_rng_state(generator_state)
    eigenvalues = singular[:rank] ** 2 / max(n - 1, 1)
    total_var = (centered**2).sum(dim=0).sum(dim=-1) / counts.clamp_min(1.0)  # per modality, summed over d
    weight = torch.zeros(k, d, q, dtype=torch.float64, device=z.device)
    loading = basis[:, :rank] * eigenvalues.sqrt()  # [k d, rank]
    weight[:, :, :rank] = loading.reshape(k, d, rank)
    explained = (weight**2).sum(dim=(1, 2))
    # residual variance per coordinate, at least 10% of the total (the PCA may over-explain a modality)
    noise_var = torch.maximum(total_var - explained, 0.1 * total_var) / d
    return weight, mean, noise_var, counts


class PPCAImputer(nn.Module):
    """Multi-view PPCA imputer of missing modality embeddings (see the module docstring).

    Args:
        num_modalities: `k`, the number of modalities.
        dim: `d`, the embedding dimension.
        latent_dim: `q`, the dimension of the shared latent.
        noise_var_floor: lower bound of each noise variance (an M-step can otherwise collapse it to 0).
        ridge: relative ridge added to A_m before solving the M-step (A_m is ill-conditioned with few rows).
        init_noise_var: noise variance before any fit.
        seed: seed of the deterministic initial W.
        modality_names: the modality of each row, in order (default "0", "1", ...); recorded in `modality_codes`.

    Buffers (persistent, float32): `weight` [k, d, q], `mean` [k, d], `noise_var` [k], `fitted` [k] (1.0 once a
    modality has had an M-step with rows) and `modality_codes` [k] (`modality_name_codes(modality_names)`).
    """

    def __init__(self, num_modalities: int, dim: int, latent_dim: int, *, noise_var_floor: float = 1e-6,
                 ridge: float = 1e-6, init_noise_var: float = 1.0, seed: int = 0,
                 modality_names: Sequence[str] | None = None):
        super().__init__()
        if min(num_modalities, dim, latent_dim) < 1:
            raise ValueError(f"num_modalities, dim and latent_dim must be positive, got {num_modalities}, {dim}, "
                             f"{latent_dim}.")
        if noise_var_floor <= 0:
            raise ValueError(f"noise_var_floor must be positive, got {noise_var_floor}.")
        self.num_modalities, self.dim, self.latent_dim = num_modalities, dim, latent_dim
        self.noise_var_floor, self.ridge, self.init_noise_var, self.seed = noise_var_floor, ridge, init_noise_var, seed
        names = [str(m) for m in range(num_modalities)] if modality_names is None else list(modality_names)
        if len(names) != num_modalities:
            raise ValueError(f"modality_names has {len(names)} names for {num_modalities} modalities: {names}.")
        self.modality_names = names
        self.register_buffer("weight", torch.empty(num_modalities, dim, latent_dim))
        self.register_buffer("mean", torch.empty(num_modalities, dim))
        self.register_buffer("noise_var", torch.empty(num_modalities))
        # bookkeeping kept float on purpose: transformers' strict fp32 loading casts integer buffers
        self.register_buffer("fitted", torch.empty(num_modalities))
        # which modality each row models: a reordered config must not hand the rows to other modalities
        self.register_buffer("modality_codes", modality_name_codes(names))
        self._fitted_host: np.ndarray | None = None  # `fitted_modalities` on the host (`fitted_on_host`)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"num_modalities={self.num_modalities}, dim={self.dim}, latent_dim={self.latent_dim}"

    def _apply(self, fn, recurse: bool = True):
        """`module.to(device)` moves the buffers; a dtype change (`model.to(torch.bfloat16)`, `model.half()`) is
        ignored: closed-form statistics in bf16 lose the precision the imputation needs, so they stay float32."""

        def same_dtype(tensor: torch.Tensor) -> torch.Tensor:
            moved = fn(tensor)
            if moved.dtype != tensor.dtype and tensor.is_floating_point():
                return tensor.to(device=moved.device)  # from the original: no round trip through the new dtype
            return moved

        return super()._apply(same_dtype, recurse)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Prior state: small random W (seeded), zero mean, `init_noise_var`, nothing fitted."""
        generator = torch.Generator().manual_seed(self.seed)
        # drawn where the generator lives (also under `with torch.device("cuda")`), then copied to the buffer's device
        weight = torch.randn(self.num_modalities, self.dim, self.latent_dim, generator=generator,
                             device=generator.device) / self.dim
        self.weight.copy_(weight)
        self.mean.zero_()
        self.noise_var.fill_(self.init_noise_var)
        self.fitted.zero_()
        self._fitted_host = None

    def check_modality_order(self) -> None:
        """Refuse rows saved for another modality order than `modality_names` (a config edited after fitting)."""
        expected = modality_name_codes(self.modality_names).to(self.modality_codes)
        if torch.equal(expected, self.modality_codes):
            return
        by_code = {code: name for code, name in zip(expected.tolist(), self.modality_names)}
        saved = [by_code.get(code, "<unknown>") for code in self.modality_codes.tolist()]
        raise ValueError(f"The imputer was fitted for the modalities in the order {saved}, but the config lists "
                         f"{self.modality_names}: its rows would model other modalities. Restore the saved order "
                         f"in config.json's 'modalities'.")

    @property
    def fitted_modalities(self) -> torch.Tensor:
        """Bool [k]: modalities that have been fitted (the others keep their prior and are not imputed)."""
        return self.fitted > 0

    def remember_fitted(self, values) -> None:
        """Keep `fitted_modalities` as read on the host (by a door, with its checks: no read of its own)."""
        self._fitted_host = np.asarray(values, dtype=bool)

    def fitted_on_host(self, device: torch.device | None = None) -> HostMask:
        """`fitted_modalities` (on `device`) with its host copy: what the last door read (`remember_fitted`) as the
        M-steps since left it; read now (one sync) when no copy is known."""
        fitted = self.fitted_modalities
        if self._fitted_host is None:
            self.remember_fitted(fitted.cpu().numpy())
        return HostMask(fitted if device is None else fitted.to(device), self._fitted_host)

    def _load_from_state_dict(self, *args, **kwargs):
        self._fitted_host = None  # other buffers: the host copy of `fitted` is stale
        super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ validation
    def _validate(self, z: torch.Tensor, mask: torch.Tensor) -> None:
        """The door of every public method taking a batch: shapes, then `check_values`."""
        check_embeddings(z, mask, name="z", mask_name="mask", rows="N", num_modalities=self.num_modalities,
                         dim=self.dim, min_rows=0, mask_optional=False)
        self.check_values(z, mask)

    def check_values(self, z: torch.Tensor, mask: torch.Tensor) -> None:
        """Refuse NaN, inf, or entries too large for the statistics (`max_abs_value`) in the slots of z [N, k, d]
        that `mask` [N, k] observes (missing slots may hold anything)."""
        read_check(self.values_check(z, mask))

    def values_check(self, z: torch.Tensor, mask: torch.Tensor) -> ValueCheck:
        """`check_values`' check, not read yet (a door reads it with its other checks)."""
        limit = self.max_abs_value(z.dtype)
        low, high = torch.aminmax(z.detach(), dim=-1)  # one pass
        peak = torch.maximum(high, -low)  # the largest |entry| of each row and modality, NaN where one is  [N, k]

        def message(flags: list[int]) -> str | None:
            if not flags[0]:
                return None
            bad = (mask & ~torch.isfinite(peak)).nonzero()
            if bad.numel():
                row, modality = bad[0].tolist()
                return (f"z has NaN or inf in an observed entry (row {row}, modality {modality}; "
                        f"{bad.shape[0]} such entries).")
            row, modality = (mask & (peak > limit)).nonzero()[0].tolist()
            return (f"z has entries up to {float(peak[mask].max()):.3g} in observed slots (row {row}, modality "
                    f"{modality}); the imputer's {_compute_dtype(z)} statistics (sums of squares over {self.dim} "
                    f"coordinates and up to {_CHUNK_ROWS} rows) overflow beyond {limit:.3g}. Rescale the embeddings "
                    f"(CalMRL's are unit-norm) or pass float64.")

        return (mask & ~(peak <= limit)).any().reshape(1), message

    def max_abs_value(self, dtype: torch.dtype) -> float:
        """The largest |entry| of z whose statistics cannot overflow: each chunk of up to `_CHUNK_ROWS` rows sums
        squares of `dim` coordinates in the compute dtype (float32, or float64 for float64 input)."""
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        return math.sqrt(torch.finfo(compute).max / (self.dim * _CHUNK_ROWS))

    def _parameters_as(self, dtype: torch.dtype, device: torch.device):
        return (self.weight.to(device=device, dtype=dtype), self.mean.to(device=device, dtype=dtype),
                self.noise_var.to(device=device, dtype=dtype))

    def _e_step(self, z: torch.Tensor, mask: torch.Tensor, host_mask: HostMask | None = None) -> _EStep:
        return _posterior_by_pattern(z, mask, *self._parameters_as(_compute_dtype(z), z.device), host_mask)

    # ------------------------------------------------------------------ inference
    # Each public method validates its batch once and runs its unchecked `_` twin, which the model calls on the
    # embeddings it validated where they entered it, with the mask's host copy (`host_mask`: nothing read back).
    def impute(self, z: torch.Tensor, mask: torch.Tensor, *, return_covariance: bool = False):
        """Fill the missing slots of z [N, k, d] with their posterior mean W_{m'} m_i + mu_{m'}.

        Observed slots are returned unchanged. With `return_covariance`, also returns [N, k, d, d]: the posterior
        covariance W_{m'} V_i W_{m'}^T + noise_var_{m'} I of each imputed slot (zeros at observed slots); it is
        O(N k d^2) memory, so ask for it on small batches.
        """
        self._validate(z, mask)
        return self._impute(z, mask, return_covariance)

    def _impute(self, z: torch.Tensor, mask: torch.Tensor, return_covariance: bool = False,
                host_mask: HostMask | None = None):
        e = self._e_step(z, mask, host_mask)
        weight, mean, noise_var = self._parameters_as(e.mean.dtype, z.device)
        predicted = torch.einsum("nq,kdq->nkd", e.mean, weight) + mean  # [N, k, d]
        imputed = torch.where(mask.unsqueeze(-1), z, predicted.to(z.dtype))
        if not return_covariance:
            return imputed
        # per pattern: W_m V_p W_m^T + s2_m I, for every modality  [p, k, d, d]
        eye = torch.eye(self.dim, dtype=weight.dtype, device=z.device)
        pattern_cov = torch.einsum("kdq,pqr,ker->pkde", weight, e.pattern_cov, weight) + noise_var[None, :, None,
                                                                                                   None] * eye
        covariance = pattern_cov[e.pattern_index] * (~mask)[:, :, None, None].to(weight.dtype)
        return imputed, covariance.to(z.dtype)

    def imputation_variance(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Posterior variance per coordinate [N, k] of each imputed slot (0 at observed slots): the mean diagonal
        of W_{m'} V_i W_{m'}^T + noise_var_{m'} I, computed without forming the d x d matrices."""
        self._validate(z, mask)
        return self._imputation_variance(z, mask)

    def _imputation_variance(self, z: torch.Tensor, mask: torch.Tensor,
                             host_mask: HostMask | None = None) -> torch.Tensor:
        e = self._e_step(z, mask, host_mask)
        weight, _, noise_var = self._parameters_as(e.mean.dtype, z.device)
        # diag(W V W^T)_d = sum_{q,r} W_dq V_qr W_dr, per pattern and modality: [p, k]
        explained = torch.einsum("kdq,pqr,kdr->pk", weight, e.pattern_cov, weight) / self.dim
        variance = (explained + noise_var)[e.pattern_index]  # [N, k]
        return torch.where(mask, torch.zeros_like(variance), variance).to(z.dtype)

    def log_likelihood(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Marginal log-likelihood [N] of each row's observed entries (in float64 for float64 input)."""
        self._validate(z, mask)
        return self._log_likelihood(z, mask)

    def _log_likelihood(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        e = self._e_step(z, mask)
        _, _, noise_var = self._parameters_as(e.mean.dtype, z.device)
        _, mean, _ = self._parameters_as(e.mean.dtype, z.device)
        maskf = mask.to(e.mean.dtype)
        num_observed = maskf.sum(dim=1) * self.dim  # D = d |Omega_i|
        # log p = -1/2 [D log 2pi + sum_m d log s2_m + log det P_i + sum_m ||r_m||^2 / s2_m - b^T V_i b]
        log_noise = (maskf * noise_var.log()).sum(dim=1) * self.dim
        # ||r_m||^2 = ||z^m - mu_m||^2, on observed slots only
        residual_sq = (e.observed - mean).square().sum(dim=-1)  # [N, k]
        residual = (residual_sq / noise_var * maskf).sum(dim=1)
        quadratic = (e.precision_times_mean * e.mean).sum(dim=1)  # b^T V b = b . m
        logdet = e.pattern_logdet_precision[e.pattern_index]
        return -0.5 * (num_observed * math.log(2 * math.pi) + log_noise + logdet + residual - quadratic)

    # ------------------------------------------------------------------ M-step
    def sufficient_statistics(self, z: torch.Tensor, mask: torch.Tensor) -> PPCAStatistics:
        """E-step statistics of the rows of z (observed entries only), accumulated in float64."""
        self._validate(z, mask)
        return self._sufficient_statistics(z, mask)

    @torch.no_grad()
    def _sufficient_statistics(self, z: torch.Tensor, mask: torch.Tensor,
                               host_mask: HostMask | None = None) -> PPCAStatistics:
        return _accumulate_statistics(self._e_step(z.detach(), mask, host_mask), mask, self.dim)

    @torch.no_grad()
    def m_step(self, stats: PPCAStatistics, modalities: torch.Tensor | None = None) -> None:
        """Closed-form update of every modality that has rows in `stats`; the others keep their parameters.

        `modalities` (bool [k]) restricts the update to some modalities (a streaming caller waiting for enough
        rows); a selected modality without rows is reported.
        """
        self._check_statistics(stats)
        self._m_step(stats, modalities)

    def _check_statistics(self, stats: PPCAStatistics) -> None:
        k, d, q = self.num_modalities, self.dim, self.latent_dim
        expected = {"latent_second_moment": (k, q + 1, q + 1), "cross_moment": (k, d, q + 1), "sum_sq_norm": (k,),
                    "count": (k,)}
        for name, shape in expected.items():
            got = tuple(getattr(stats, name).shape)
            if got != shape:
                raise ValueError(f"stats.{name} has shape {list(got)}; this imputer (k={k}, d={d}, q={q}) expects "
                                 f"{list(shape)}.")
            finite = torch.isfinite(getattr(stats, name).reshape(k, -1)).all(dim=1)
            if not bool(finite.all()):
                raise ValueError(f"stats.{name} has NaN or inf (modalities {(~finite).nonzero().flatten().tolist()}); "
                                 f"the M-step would write non-finite parameters. The embeddings they were summed from "
                                 f"were not finite, or too large.")

    @torch.no_grad()
    def _m_step(self, stats: PPCAStatistics, modalities: torch.Tensor | None = None) -> None:
        device = self.weight.device
        count = stats.count.to(device=device, dtype=torch.float64)
        selected = torch.ones(self.num_modalities, dtype=torch.bool, device=device) if modalities is None else \
            modalities.to(device)
        active = (count > 0) & selected
        selected_host, active_host = torch.stack([selected, active]).cpu().numpy()  # one read
        unobserved = np.flatnonzero(selected_host & ~active_host).tolist()
        if unobserved:
            warnings.warn(f"PPCAImputer.m_step: modalities {unobserved} have no observed rows; they keep their "
                          f"current parameters and are not imputed until observed.", stacklevel=2)
        self._update_modalities(stats, HostMask(active, active_host))

    @torch.no_grad()
    def _update_modalities(self, stats: PPCAStatistics, modalities: HostMask, verify: bool = True) -> None:
        """The closed-form update of `modalities` (bool [k] flags with their host copy, each with rows in `stats`),
        nothing read back but, with `verify`, whether the new parameters fit the buffers."""
        if not modalities.any:
            return
        index = modalities.rows()
        A, B, c, count = (field.to(device=self.weight.device, dtype=torch.float64).index_select(0, index)
                          for field in stats._fields())
        loading, noise_var = _solve_m_step(A, B, c, count, self.ridge, self.noise_var_floor)
        q = self.latent_dim
        self._write_parameters(index, loading[:, :, :q], loading[:, :, q], noise_var, verify)
        self.fitted[index] = 1.0
        if self._fitted_host is not None:
            self._fitted_host = self._fitted_host | modalities.values

    # ------------------------------------------------------------------ full-batch EM
    @torch.no_grad()
    def initialize_from_data(self, z: torch.Tensor, mask: torch.Tensor, modalities=None) -> None:
        """Initialise unfitted modalities by PCA of the mean-filled concatenation of all modalities.

        Joint (not per-modality) PCA gives every modality's W_m the same latent basis, so the initial latent is
        already shared; each modality's noise variance starts at its residual variance per coordinate.
        """
        self._validate(z, mask)
        self._initialize_from_data(z, mask, modalities)

    def _initialize_from_data(self, z: torch.Tensor, mask: torch.Tensor, modalities=None) -> None:
        modalities = (~self.fitted_modalities).nonzero().flatten().tolist() if modalities is None else modalities
        if not modalities:
            return
        weight, mean, noise_var, counts = _joint_pca(z, mask, self.latent_dim, self.seed)
        index = torch.tensor([m for m in modalities if counts[m] > 0], dtype=torch.long, device=z.device)
        # shrink W: leave room for the noise
        self._write_parameters(index, weight[index] * 0.9, mean[index], noise_var[index].clamp_min(self.noise_var_floor))

    def _write_parameters(self, index: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                          noise_var: torch.Tensor, verify: bool = True) -> None:
        """Store the parameters of modalities `index` (float64 in), refusing (`verify`) values the buffers cannot
        hold."""
        cast = (weight.to(self.weight.dtype), mean.to(self.mean.dtype), noise_var.to(self.noise_var.dtype))
        if verify and not all(bool(torch.isfinite(value).all()) for value in cast):
            raise ValueError(f"The fitted parameters overflow the imputer's {self.weight.dtype} buffers (noise "
                             f"variance up to {float(noise_var.max()):.3g}): the embeddings are too large; rescale "
                             f"them (CalMRL's are unit-norm).")
        self.weight[index], self.mean[index], self.noise_var[index] = cast

    @torch.no_grad()
    def fit(self, z: torch.Tensor, mask: torch.Tensor, max_iter: int = 100, tol: float = 1e-6, *,
            init_from_data: bool = True) -> list[float]:
        """Full-batch EM. Returns the total log-likelihood of the observed entries before each M-step and after
        the last one (non-decreasing, Corollary 4); stops when the relative gain falls under `tol`."""
        self._validate(z, mask)
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}.")
        if init_from_data:
            self._initialize_from_data(z, mask)
        history = [float(self._log_likelihood(z, mask).sum())]
        for _ in range(max_iter):
            self._m_step(self._sufficient_statistics(z, mask))
            history.append(float(self._log_likelihood(z, mask).sum()))
            if abs(history[-1] - history[-2]) <= tol * abs(history[-2]):
                break
        logger.info("PPCA EM: %d iterations, log-likelihood %.4g -> %.4g", len(history) - 1, history[0], history[-1])
        return history


__all__ = ["PPCAImputer", "PPCAStatistics", "modality_name_codes"]
