import math
import warnings

import pytest
import torch

from calmrl_hf import PPCAImputer, PPCAStatistics


K, D, Q = 4, 12, 3
PATTERNS = torch.tensor(
    [[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 1]],
    dtype=torch.bool,
)


def planted(seed=0, k=K, d=D, q=Q, dtype=torch.float64) -> PPCAImputer:
    generator = torch.Generator().manual_seed(seed)
    imputer = PPCAImputer(k, d, q)
    imputer.weight.copy_(torch.randn(k, d, q, generator=generator))
    imputer.mean.copy_(torch.randn(k, d, generator=generator))
    imputer.noise_var.copy_(0.2 + torch.rand(k, generator=generator))
    imputer.fitted.fill_(1.0)
    return imputer


def sample(imputer: PPCAImputer, n: int, seed=1, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, imputer.latent_dim, generator=generator, dtype=dtype)
    noise = torch.randn(n, imputer.num_modalities, imputer.dim, generator=generator, dtype=dtype)
    z = (torch.einsum("kdq,nq->nkd", imputer.weight.to(dtype), latent) + imputer.mean.to(dtype)
         + noise * imputer.noise_var.to(dtype).sqrt()[None, :, None])
    mask = PATTERNS[torch.arange(n) % len(PATTERNS)]
    return z, mask


def joint_gaussian(imputer: PPCAImputer, observed: list[int]):
    """Mean and covariance of the stacked observed entries, W W^T + diag(s2), built explicitly."""
    W = torch.cat([imputer.weight[m].double() for m in observed])
    mean = torch.cat([imputer.mean[m].double() for m in observed])
    noise = torch.cat([imputer.noise_var[m].double().repeat(imputer.dim) for m in observed])
    return W, mean, W @ W.T + torch.diag(noise)


def with_nan_in_missing(z, mask):
    z = z.clone()
    z[~mask] = float("nan")
    return z


def test_log_likelihood_equals_joint_gaussian_density():
    imputer = planted()
    z, mask = sample(imputer, 14)
    log_likelihood = imputer.log_likelihood(with_nan_in_missing(z, mask), mask)
    for i in range(z.shape[0]):
        observed = mask[i].nonzero().flatten().tolist()
        _, mu, C = joint_gaussian(imputer, observed)
        z_obs = torch.cat([z[i, m] for m in observed])
        expected = torch.distributions.MultivariateNormal(mu, C).log_prob(z_obs)
        torch.testing.assert_close(log_likelihood[i], expected)


def test_imputation_and_its_covariance_equal_the_conditional_gaussian():
    imputer = planted()
    z, mask = sample(imputer, 7)
    imputed, covariance = imputer.impute(with_nan_in_missing(z, mask), mask, return_covariance=True)
    assert torch.equal(imputed[mask], z[mask])  # observed slots bit-exact
    assert torch.all(covariance[mask] == 0)
    for i in range(z.shape[0]):
        observed = mask[i].nonzero().flatten().tolist()
        _, mu_o, C_oo = joint_gaussian(imputer, observed)
        z_obs = torch.cat([z[i, m] for m in observed])
        W_o = torch.cat([imputer.weight[m].double() for m in observed])
        for m in (~mask[i]).nonzero().flatten().tolist():
            W_m = imputer.weight[m].double()
            cross = W_m @ W_o.T  # Cov(z_m, z_obs)
            cond_mean = imputer.mean[m].double() + cross @ torch.linalg.solve(C_oo, z_obs - mu_o)
            cond_cov = (W_m @ W_m.T + imputer.noise_var[m].double() * torch.eye(D, dtype=torch.float64)
                        - cross @ torch.linalg.solve(C_oo, cross.T))
            torch.testing.assert_close(imputed[i, m], cond_mean)
            torch.testing.assert_close(covariance[i, m], cond_cov)


def test_em_log_likelihood_never_decreases():
    truth = planted(seed=3)
    z, mask = sample(truth, 600, seed=4)
    imputer = PPCAImputer(K, D, Q, seed=5)
    history = imputer.fit(with_nan_in_missing(z, mask), mask, max_iter=30, tol=0.0)
    assert len(history) == 31
    for before, after in zip(history, history[1:]):
        assert after >= before - 1e-9 * abs(before)
    assert history[-1] > history[0]


def test_em_from_prior_without_data_initialisation_is_monotone_too():
    truth = planted(seed=3)
    z, mask = sample(truth, 300, seed=4)
    imputer = PPCAImputer(K, D, Q, seed=5)
    history = imputer.fit(z, mask, max_iter=25, tol=0.0, init_from_data=False)
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(history, history[1:]))


def _imputation_mse(imputer, z, mask):
    imputed = imputer.impute(with_nan_in_missing(z, mask), mask)
    return float(((imputed - z)[~mask] ** 2).mean())


@pytest.mark.parametrize("train_patterns", ["all_four", "two_of_four"])
def test_fit_recovers_a_planted_model(train_patterns):
    truth = planted(seed=7, d=24, q=4)
    z_train, _ = sample(truth, 3000, seed=8)
    if train_patterns == "all_four":
        train_mask = torch.ones(3000, K, dtype=torch.bool)
    else:  # only pairs of modalities, never all four: the shared latent is learned through overlaps
        pairs = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]],
                             dtype=torch.bool)
        train_mask = pairs[torch.arange(3000) % len(pairs)]
    imputer = PPCAImputer(K, 24, 4, seed=9)
    imputer.fit(with_nan_in_missing(z_train, train_mask), train_mask, max_iter=200, tol=1e-9)

    z_test, test_mask = sample(truth, 1000, seed=10)
    fitted_mse = _imputation_mse(imputer, z_test, test_mask)
    planted_mse = _imputation_mse(truth, z_test, test_mask)
    observed_mean = torch.stack([z_train[train_mask[:, m], m].mean(0) for m in range(K)])
    mean_mse = float(((observed_mean.expand_as(z_test) - z_test)[~test_mask] ** 2).mean())
    assert fitted_mse <= 1.10 * planted_mse, (fitted_mse, planted_mse)
    assert fitted_mse < 0.5 * mean_mse, (fitted_mse, mean_mse)
    torch.testing.assert_close(imputer.noise_var.double(), truth.noise_var.double(), rtol=0.1, atol=0.0)


def test_statistics_are_additive_and_serialisable():
    imputer = planted()
    z, mask = sample(imputer, 40)
    whole = imputer.sufficient_statistics(z, mask)
    halves = imputer.sufficient_statistics(z[:17], mask[:17]) + imputer.sufficient_statistics(z[17:], mask[17:])
    for a, b in zip(whole.state_dict().values(), halves.state_dict().values()):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b)
    flat = whole.to_flat()
    assert flat.dim() == 1 and flat.dtype == torch.float64
    restored = PPCAStatistics.from_flat(flat, K, D, Q)
    for a, b in zip(whole.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)
    torch.testing.assert_close(whole.scale(0.5).to_flat(), 0.5 * flat)
    empty = PPCAStatistics.zeros(K, D, Q)
    empty.load_state_dict(whole.state_dict())
    assert torch.equal(empty.to_flat(), flat)
    with pytest.raises(ValueError, match="entries"):
        PPCAStatistics.from_flat(flat[:-1], K, D, Q)


def test_m_step_from_statistics_matches_fit_iteration():
    """m_step(sum of chunk statistics) == m_step(statistics of the whole): streaming EM is full EM."""
    truth = planted()
    z, mask = sample(truth, 90)
    a, b = PPCAImputer(K, D, Q, seed=1), PPCAImputer(K, D, Q, seed=1)
    a.m_step(a.sufficient_statistics(z, mask))
    chunks = [b.sufficient_statistics(z[i : i + 30], mask[i : i + 30]) for i in range(0, 90, 30)]
    b.m_step(chunks[0] + chunks[1] + chunks[2])
    for name, buffer in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], buffer)


def test_nan_in_missing_slots_never_leaks():
    imputer = planted()
    z, mask = sample(imputer, 21)
    clean = torch.where(mask.unsqueeze(-1), z, torch.zeros_like(z))
    dirty = z.clone()
    dirty[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=z.dtype).repeat(D)[:D]
    for method in (imputer.log_likelihood, imputer.imputation_variance):
        assert torch.equal(method(clean, mask), method(dirty, mask)), method.__name__
    (clean_imputed, clean_covariance), (dirty_imputed, dirty_covariance) = (
        imputer.impute(z, mask, return_covariance=True) for z in (clean, dirty))
    assert torch.equal(clean_imputed[~mask], dirty_imputed[~mask]) and torch.equal(clean_covariance, dirty_covariance)
    stats_clean, stats_dirty = imputer.sufficient_statistics(clean, mask), imputer.sufficient_statistics(dirty, mask)
    assert torch.equal(stats_clean.to_flat(), stats_dirty.to_flat())
    dirty.requires_grad_(True)
    imputer.impute(dirty, mask).sum().backward()
    assert torch.isfinite(dirty.grad).all()
    assert torch.all(dirty.grad[~mask] == 0) and dirty.grad[mask].abs().sum() > 0


def test_rows_are_independent_of_their_batch():
    imputer = planted()
    z, mask = sample(imputer, 14)
    together = imputer.impute(z, mask)
    for i in range(z.shape[0]):
        torch.testing.assert_close(imputer.impute(z[i : i + 1], mask[i : i + 1])[0], together[i])


def test_float32_and_bfloat16_inputs_follow_their_dtype():
    imputer = planted()
    z, mask = sample(imputer, 14)
    reference = imputer.impute(z, mask)
    imputed32 = imputer.impute(z.float(), mask)
    assert imputed32.dtype == torch.float32
    torch.testing.assert_close(imputed32.double(), reference, rtol=1e-4, atol=1e-4)
    imputed16 = imputer.impute(z.bfloat16(), mask)
    assert imputed16.dtype == torch.bfloat16 and torch.isfinite(imputed16.float()).all()


def test_never_observed_modality_keeps_its_prior_and_is_reported():
    truth = planted()
    z, _ = sample(truth, 50)
    mask = torch.ones(50, K, dtype=torch.bool)
    mask[:, 2] = False
    imputer = PPCAImputer(K, D, Q, seed=2)
    prior = {name: buffer.clone() for name, buffer in imputer.state_dict().items()}
    with pytest.warns(UserWarning, match=r"modalities \[2\] have no observed rows"):
        imputer.m_step(imputer.sufficient_statistics(z, mask))
    assert torch.equal(imputer.weight[2], prior["weight"][2]) and torch.equal(imputer.mean[2], prior["mean"][2])
    assert imputer.fitted_modalities.tolist() == [True, True, False, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # restricting the update to modalities with rows is silent
        imputer.m_step(imputer.sufficient_statistics(z, mask), modalities=torch.tensor([True, True, False, True]))


def test_noise_variance_has_a_floor():
    imputer = PPCAImputer(2, 3, 2, noise_var_floor=1e-4)
    latent = torch.randn(200, 2, dtype=torch.float64)
    z = torch.stack([latent @ torch.randn(2, 3, dtype=torch.float64)] * 2, dim=1)  # noiseless, rank 2 <= q
    imputer.fit(z, torch.ones(200, 2, dtype=torch.bool), max_iter=20)
    assert torch.all(imputer.noise_var >= 1e-4)
    assert torch.isfinite(imputer.weight).all()


def test_bad_inputs_raise_clear_errors():
    imputer = planted()
    z, mask = sample(imputer, 6)
    with pytest.raises(ValueError, match=r"shape \[N, 4, 12\]"):
        imputer.impute(z[:, :3], mask[:, :3])
    with pytest.raises(TypeError, match="bool"):
        imputer.impute(z, mask.long())
    with pytest.raises(ValueError, match=r"mask must have shape \[6, 4\]"):
        imputer.impute(z, mask[:5])
    with pytest.raises(TypeError, match="floating-point"):
        imputer.impute(z.long(), mask)
    empty = mask.clone()
    empty[3] = False
    with pytest.raises(ValueError, match=r"Rows \[3\] observe no modality"):
        imputer.impute(z, empty)
    bad = z.clone()
    bad[2, 1] = float("nan")
    assert mask[2, 1]
    with pytest.raises(ValueError, match=r"NaN or inf in an observed entry \(row 2, modality 1"):
        imputer.log_likelihood(bad, mask)
    with pytest.raises(ValueError, match="expects"):
        imputer.m_step(PPCAStatistics.zeros(K, D + 1, Q))
    with pytest.raises(ValueError, match="positive"):
        PPCAImputer(0, D, Q)


def test_inputs_too_large_for_the_statistics_are_refused_and_nothing_non_finite_is_written():
    """Values around 1e20 used to give NaN log-likelihoods and an infinite noise variance without a word."""
    imputer = planted()
    z, mask = sample(imputer, 40)
    before = {name: buffer.clone() for name, buffer in imputer.named_buffers()}
    huge = (z * 1e20).float()
    assert imputer.max_abs_value(torch.float32) < 1e20 < imputer.max_abs_value(torch.float64)
    for method in (imputer.fit, imputer.log_likelihood, imputer.sufficient_statistics, imputer.impute):
        with pytest.raises(ValueError, match=r"torch\.float32 statistics .* overflow beyond .*pass float64"):
            method(huge, mask)
    # float64 statistics hold them, the float32 parameters cannot: refused before anything is written
    with pytest.raises(ValueError, match=r"overflow the imputer's torch\.float32 buffers \(noise variance up to"):
        imputer.fit(z * 1e20, mask)
    nan_stats = imputer.sufficient_statistics(z, mask)
    nan_stats.cross_moment[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"stats\.cross_moment has NaN or inf \(modalities \[2\]\)"):
        imputer.m_step(nan_stats)
    for name, buffer in imputer.named_buffers():
        assert torch.equal(buffer, before[name]), name
    nan_in_missing = with_nan_in_missing(z, mask)  # the fast check's slow path: NaN where nothing is observed
    torch.testing.assert_close(imputer.log_likelihood(nan_in_missing, mask), imputer.log_likelihood(z, mask))


def test_log_likelihood_is_normalised_in_one_dimension():
    """Sanity of the constant: a 1-d, 1-modality model's density integrates to one."""
    imputer = PPCAImputer(1, 1, 1)
    imputer.weight.fill_(0.7)
    imputer.mean.fill_(0.3)
    imputer.noise_var.fill_(0.5)
    grid = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    density = imputer.log_likelihood(grid.view(-1, 1, 1), torch.ones(4001, 1, dtype=torch.bool)).exp()
    assert math.isclose(float(torch.trapezoid(density, grid)), 1.0, rel_tol=1e-6)


def test_imputation_variance_is_the_mean_diagonal_of_the_posterior_covariance():
    imputer = planted()
    z, mask = sample(imputer, 9)
    _, covariance = imputer.impute(z, mask, return_covariance=True)
    expected = covariance.diagonal(dim1=-2, dim2=-1).mean(dim=-1)  # [N, k], 0 where observed
    torch.testing.assert_close(imputer.imputation_variance(z, mask), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_imputer_built_under_a_cuda_default_device_has_the_cpu_built_prior():
    """The seeded prior W is drawn on its CPU generator whatever the default device is, so the same seed gives the
    same W on either device."""
    with torch.device("cuda"):
        on_cuda = PPCAImputer(num_modalities=3, dim=8, latent_dim=2, seed=5)
    assert on_cuda.weight.device.type == "cuda"
    torch.testing.assert_close(on_cuda.weight.cpu(), PPCAImputer(num_modalities=3, dim=8, latent_dim=2, seed=5).weight,
                               rtol=0, atol=0)
