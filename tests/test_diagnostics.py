import math
import sys
import warnings

import numpy as np
import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.poutine.guide import GuideMessenger

from pyro_hvae.infer.diagnostics import (
    active_units_marginal,
    effective_sample_size,
    khat_threshold,
    kl_per_site,
    pareto_khat,
    posterior_means,
    psislw,
)
from pyro_hvae.infer.iw import get_traces


def heavy_and_light_log_weights(num_samples=2000, n=3, seed=0):
    rng = np.random.default_rng(seed)
    heavy = np.log(rng.pareto(0.5, size=(num_samples, n)) + 1.0)  # tail index 1/2: khat ~ 2
    light = 0.1 * rng.standard_normal((num_samples, n))
    return heavy, light


def direct_psis(log_weights, tail_size):
    """Pareto-smoothed importance sampling of one column of log weights, written from
    "Pareto Smoothed Importance Sampling" (Vehtari et al.) and the generalized Pareto fit of
    Zhang and Stephens (2009), independently of ArviZ: returns ``(smoothed, khat)``.

    The ``tail_size`` largest weights, less the next largest ``u``, are fitted by a
    generalized Pareto distribution (shape ``xi``, scale ``sigma``): the profile likelihood
    is averaged over a grid of ``theta = -xi / sigma``, ``xi`` gets the weakly informative
    prior ``(M xi + 10 * 0.5) / (M + 10)``, and the tail is replaced by ``u`` plus the fitted
    quantiles at ``(z - 1/2) / M``, capped at the largest raw weight.
    """
    lw = log_weights - log_weights.max()
    order = np.argsort(lw)
    tail = order[-tail_size:]
    u = np.exp(lw[order[-tail_size - 1]])
    x = np.exp(lw[tail]) - u  # the exceedances, ascending
    m = 30 + int(np.sqrt(tail_size))
    j = np.arange(1, m + 1)
    theta = 1 / x[-1] + (1 - np.sqrt(m / (j - 0.5))) / (3 * x[int(tail_size / 4 + 0.5) - 1])
    xi_of = lambda t: np.mean(np.log1p(-t * x))  # noqa: E731
    profile = np.array([tail_size * (np.log(-t / xi_of(t)) - xi_of(t) - 1) for t in theta])
    posterior = 1 / np.exp(profile[None, :] - profile[:, None]).sum(1)
    t = np.sum(posterior / posterior.sum() * theta)
    xi = xi_of(t)
    sigma = -xi / t
    khat = (tail_size * xi + 10 * 0.5) / (tail_size + 10)
    p = (np.arange(1, tail_size + 1) - 0.5) / tail_size
    smoothed = lw.copy()
    smoothed[tail] = np.log(u + sigma * np.expm1(-khat * np.log1p(-p)) / khat)
    smoothed = np.minimum(smoothed, 0.0)
    return smoothed - np.logaddexp.reduce(smoothed), khat


def mixed_log_weights(num_samples=1000):
    """Columns with heavy (k = 2), moderate (lognormal) and negligible tails: [K, 4]."""
    heavy, light = heavy_and_light_log_weights(num_samples=num_samples, n=2)
    moderate = 1.5 * np.random.default_rng(1).standard_normal((num_samples, 2))
    return np.concatenate([heavy, moderate[:, :1], light[:, :1]], axis=1)


def assert_matches_direct_psis(log_weights, tail_size):
    smoothed, khat = psislw(log_weights)
    for n in range(log_weights.shape[1]):
        expected_smoothed, expected_khat = direct_psis(log_weights[:, n], tail_size)
        assert float(khat[n]) == pytest.approx(expected_khat, abs=1e-9)
        np.testing.assert_allclose(smoothed[:, n].numpy(), expected_smoothed, atol=1e-9)


def hide_arviz_stats(monkeypatch):
    """Make ``import arviz_stats`` fail (the ArviZ 0.x branch), even after an earlier import."""
    for name in [m for m in sys.modules if m == "arviz_stats" or m.startswith("arviz_stats.")] + ["arviz_stats"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_khat_heavy_and_light_tails():
    # Pareto weights with tail index 1/2 have a generalized Pareto tail of shape k = 2;
    # lognormal weights of log-scale 0.1 have all their moments (k <= 0 in the limit)
    heavy, light = heavy_and_light_log_weights()
    khat_heavy = pareto_khat(heavy)
    assert khat_heavy.shape == (3,)
    assert khat_heavy.dtype == torch.float64
    assert torch.allclose(khat_heavy, torch.full((3,), 2.0, dtype=torch.float64), atol=0.35)
    khat_light = pareto_khat(torch.as_tensor(light, dtype=torch.float32))
    assert khat_light.dtype == torch.float32
    assert (khat_light < 0.2).all()


def test_arviz_future_warning_is_silenced(monkeypatch, tmp_path):
    # ArviZ 0.2x warns once per day on import, keyed on a stamp in the user cache dir:
    # force a fresh import with an empty cache dir so the warning fires
    import arviz  # noqa: F401

    hide_arviz_stats(monkeypatch)  # the ArviZ 0.x branch
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delitem(sys.modules, "arviz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pareto_khat(np.random.default_rng(0).standard_normal((100, 2)))
    assert "arviz" in sys.modules
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]


def test_psislw_shapes_and_normalisation():
    _, light = heavy_and_light_log_weights(num_samples=500)
    smoothed, khat = psislw(torch.as_tensor(light))
    assert smoothed.shape == (500, 3) and khat.shape == (3,)
    assert torch.allclose(smoothed.logsumexp(0), torch.zeros(3, dtype=torch.float64), atol=1e-10)
    with pytest.raises(ValueError, match=r"shape \[K, N\]"):
        psislw(np.zeros(10))


def test_arviz_0x_branch_equals_a_direct_psis_computation(monkeypatch):
    """ArviZ < 1.0 (``arviz.psislw``) smooths the ``ceil(min(0.2 K, 3 sqrt(K)))`` largest weights."""
    hide_arviz_stats(monkeypatch)
    log_weights = mixed_log_weights(1000)
    assert_matches_direct_psis(log_weights, tail_size=math.ceil(min(0.2 * 1000, 3 * math.sqrt(1000))))
    # the heavy columns are flagged, the light one is not
    khat = pareto_khat(log_weights)
    assert (khat[:2] > 1.4).all() and khat[3] < 0.2


def test_arviz_1x_branch_equals_a_direct_psis_computation():
    """ArviZ >= 1.0 (``arviz_stats``, which takes log ratios of the opposite sign) smooths the
    ``floor(3 sqrt(K))`` largest weights: a wrong sign would fit the left tail instead."""
    pytest.importorskip("arviz_stats")
    log_weights = mixed_log_weights(1000)
    assert_matches_direct_psis(log_weights, tail_size=math.floor(3 * math.sqrt(1000)))


def test_khat_threshold():
    assert khat_threshold(10) == pytest.approx(0.0)
    assert khat_threshold(100) == pytest.approx(0.5)
    assert khat_threshold(1000) == pytest.approx(2 / 3)
    assert khat_threshold(10**6) == 0.7
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        khat_threshold(1)


def test_effective_sample_size():
    equal = torch.full((50, 2), -3.0, dtype=torch.float64)
    ess = effective_sample_size(equal)
    assert ess.dtype == torch.float64
    assert torch.allclose(ess, torch.full((2,), 50.0, dtype=torch.float64))

    dominant = torch.zeros(50, 2)
    dominant[7] = 100.0
    assert torch.allclose(effective_sample_size(dominant), torch.ones(2), atol=1e-6)

    # large log weights must not overflow
    assert torch.allclose(effective_sample_size(equal + 1e4), ess)


def test_active_units_marginal():
    g = torch.Generator().manual_seed(0)
    means = torch.zeros(200, 5)
    means[:, [0, 2, 4]] = torch.randn(200, 3, generator=g)
    means[:, 1] = 3.0
    count, variance = active_units_marginal(means)
    assert count == 3
    assert variance.shape == (5,)
    assert torch.equal(variance > 0.01, torch.tensor([True, False, True, False, True]))


def test_kl_per_site_normal_is_analytic():
    n = 4
    q_loc, q_scale = torch.randn(n, 3), torch.rand(n, 3) + 0.5
    q_loc.requires_grad_()

    def model():
        with pyro.plate("data", n):
            pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    def guide():
        with pyro.plate("data", n):
            pyro.sample("z", dist.Normal(q_loc, q_scale).to_event(1))

    kl = kl_per_site(*get_traces(model, guide))
    assert set(kl) == {"z"} and kl["z"].shape == (n,)
    closed_form = (0.5 * (q_scale**2 + q_loc**2 - 1) - q_scale.log()).sum(-1)
    assert torch.allclose(kl["z"], closed_form, atol=1e-6)
    assert kl["z"].requires_grad


def test_kl_per_site_flow_falls_back_to_an_unbiased_monte_carlo_estimate():
    """q = exp(0.5 + 2 eps) is LogNormal(0.5, 2), a flow with no registered KL; against
    p = LogNormal(0, 1) its KL is that of N(0.5, 2) to N(0, 1): log(1/2) + (4 + 0.25)/2 - 1/2
    per dimension. The one-sample estimates, one per data point, must average to it."""
    n = 20000
    flow = dist.transforms.AffineTransform(torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))

    def model():
        with pyro.plate("data", n):
            pyro.sample("z", dist.LogNormal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))

    def guide():
        with pyro.plate("data", n):
            base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0)
            transforms = [flow, dist.transforms.ExpTransform()]
            pyro.sample("z", dist.TransformedDistribution(base, transforms).to_event(1))

    model_trace, guide_trace = get_traces(model, guide)
    kl = kl_per_site(model_trace, guide_trace)["z"]
    assert kl.shape == (n,)
    exact = 2 * (math.log(0.5) + (4 + 0.25) / 2 - 0.5)
    assert abs(float(kl.mean()) - exact) < 4 * float(kl.std()) / math.sqrt(n)
    assert float(kl.std()) > 0.5  # per data point it is one draw, not the analytic value


def test_kl_per_site_sums_nested_plates_and_skips_observed():
    n, d = 3, 5

    def model(x):
        with pyro.plate("data", n, dim=-2), pyro.plate("pixels", d, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", n, dim=-2), pyro.plate("pixels", d, dim=-1):
            pyro.sample("z", dist.Normal(x, 2.0))

    x = torch.randn(n, d)
    kl = kl_per_site(*get_traces(model, guide, x))
    expected = torch.distributions.kl_divergence(dist.Normal(x, 2.0), dist.Normal(0.0, 1.0)).sum(-1)
    assert set(kl) == {"z"}
    assert torch.allclose(kl["z"], expected)


class TwoLayer:
    """z2 ~ N(0, I), z1 | z2 ~ N(W z2, I) per data point; the guide's means are slices of x."""

    def __init__(self):
        self.W = torch.randn(3, 2)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("z1", dist.Normal(z2 @ self.W.T, 1.0).to_event(1))

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z2", dist.Normal(x[:, :2], 0.1).to_event(1))
            pyro.sample("z1", dist.Normal(x[:, 2:], 0.1).to_event(1))


class FlowMessenger(GuideMessenger):
    def get_posterior(self, name, prior):
        (x,), _ = self.args_kwargs
        loc = x[:, :2] if name == "z2" else x[:, 2:]
        exp = dist.transforms.ExpTransform()
        return dist.TransformedDistribution(dist.Normal(loc, 0.01), [exp]).to_event(1)


def test_posterior_means_over_batches():
    tl = TwoLayer()
    batches = [torch.randn(4, 5), (torch.randn(3, 5),), [torch.randn(2, 5)]]
    means = posterior_means(tl.model, tl.guide, batches, num_samples=4)
    data = torch.cat([b if torch.is_tensor(b) else b[0] for b in batches])
    assert set(means) == {"z1", "z2"}
    assert torch.equal(means["z2"], data[:, :2])
    assert torch.equal(means["z1"], data[:, 2:])
    assert set(posterior_means(tl.model, tl.guide, batches, sites=["z1"])) == {"z1"}
    with pytest.raises(ValueError, match="not found"):
        posterior_means(tl.model, tl.guide, batches, sites=["z3"])


def test_posterior_means_flow_messenger_uses_monte_carlo():
    tl = TwoLayer()
    guide = FlowMessenger(tl.model)
    x = torch.randn(6, 5)
    means = posterior_means(None, guide, [x], num_samples=64)
    assert means["z2"].shape == (6, 2) and means["z1"].shape == (6, 3)
    assert torch.allclose(means["z2"], x[:, :2].exp(), rtol=0.01)
    assert torch.allclose(means["z1"], x[:, 2:].exp(), rtol=0.01)


def test_active_units_see_through_upstream_noise_in_a_hierarchy():
    """z2 | x ignores x (collapsed) and z1 | z2 copies z2: E_q[z1 | x] = 0 for every x,
    although each conditional mean of z1 varies with the sampled z2."""
    from pyro_hvae.infer.diagnostics import posterior_moments

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("z1", dist.Normal(z2, 0.01).to_event(1))
            pyro.sample("x", dist.Normal(torch.zeros(x.shape[0], 3), 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("z1", dist.Normal(torch.cat([z2[..., :1], x[..., :1].expand(z2[..., :1].shape)], -1), 0.01).to_event(1))

    pyro.set_rng_seed(0)
    x = torch.randn(500, 3)
    moments = posterior_moments(model, guide, [x], num_samples=200)
    mean, noise = moments["z1"]
    assert mean.shape == noise.shape == (500, 2)
    assert active_units_marginal(mean, mc_variance=noise)[0] == 1  # only the unit that copies x
    single_draw = mean + torch.randn_like(mean) * (noise * 200).sqrt()
    assert active_units_marginal(single_draw)[0] == 2  # one draw of the upstream latent would count both
    assert active_units_marginal(moments["z2"][0], mc_variance=moments["z2"][1])[0] == 0
