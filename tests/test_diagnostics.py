import sys
import types
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


def test_khat_heavy_and_light_tails():
    heavy, light = heavy_and_light_log_weights()
    khat_heavy = pareto_khat(heavy)
    assert khat_heavy.shape == (3,)
    assert khat_heavy.dtype == torch.float64
    assert (khat_heavy > 1).all()
    assert (pareto_khat(torch.as_tensor(light, dtype=torch.float32)) < 0.5).all()


def test_arviz_future_warning_is_silenced(monkeypatch, tmp_path):
    # ArviZ 0.2x warns once per day on import, keyed on a stamp in the user cache dir:
    # force a fresh import with an empty cache dir so the warning fires
    import arviz  # noqa: F401

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


def test_arviz_1x_branch_negates_log_weights(monkeypatch):
    import arviz

    heavy, light = heavy_and_light_log_weights(num_samples=1000)
    log_weights = np.concatenate([heavy, light], axis=1)
    expected_smoothed, expected_khat = psislw(log_weights)

    calls = []

    def fake_psislw(ary, r_eff=1, axis=-1):
        # ArviZ >= 1.0 convention: takes log ratios with the opposite sign, samples along ``axis``
        calls.append(ary)
        return arviz.psislw(-np.moveaxis(ary, axis, -1), reff=r_eff)

    base = types.ModuleType("arviz_stats.base")
    base.array_stats = types.SimpleNamespace(psislw=fake_psislw)
    package = types.ModuleType("arviz_stats")
    package.base = base
    monkeypatch.setitem(sys.modules, "arviz_stats", package)
    monkeypatch.setitem(sys.modules, "arviz_stats.base", base)

    smoothed, khat = psislw(log_weights)
    assert len(calls) == 1
    np.testing.assert_allclose(calls[0], -log_weights.T)
    assert torch.allclose(khat, expected_khat)
    assert torch.allclose(smoothed, expected_smoothed)


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


def test_kl_per_site_flow_falls_back_to_monte_carlo():
    n = 4
    flow = dist.transforms.AffineTransform(torch.tensor(0.5), torch.tensor(2.0))

    def model():
        with pyro.plate("data", n):
            pyro.sample("z", dist.LogNormal(torch.zeros(2), 1.0).to_event(1))

    def guide():
        with pyro.plate("data", n):
            base = dist.Normal(torch.zeros(2), 1.0)
            transforms = [flow, dist.transforms.ExpTransform()]
            pyro.sample("z", dist.TransformedDistribution(base, transforms).to_event(1))

    model_trace, guide_trace = get_traces(model, guide)
    kl = kl_per_site(model_trace, guide_trace)
    q, p = guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"]
    z = guide_trace.nodes["z"]["value"]
    assert kl["z"].shape == (n,)
    assert torch.allclose(kl["z"], q.log_prob(z) - p.log_prob(z))


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
