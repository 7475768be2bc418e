import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

from pyro_hvae.latents import (
    IAF,
    ConditionalNormal,
    ResidualNormal,
    diagonal_normal,
    residual_normal,
    residual_normal_kl,
)
from pyro_hvae.nn import bounded


def test_residual_normal_kl_matches_torch_and_the_seed_formula():
    torch.manual_seed(3)
    mu, log_sigma = torch.randn(10, 6), torch.randn(10, 6)
    dmu, dlog_sigma = torch.randn(10, 6), torch.randn(10, 6).clamp(-3.5, 1)
    prior = diagonal_normal(mu, log_sigma)
    q = residual_normal(prior, dmu, dlog_sigma)
    assert torch.allclose(q.base_dist.loc, mu + dmu)
    assert torch.allclose(q.base_dist.scale, log_sigma.exp() * dlog_sigma.exp())
    torch_kl = kl_divergence(q, prior)
    ours = residual_normal_kl(dmu, dlog_sigma, log_sigma.exp())
    # seed 001: 0.5 * (dmu^2 / sigma^2 + dsigma^2 - log dsigma^2 - 1), with dsigma^2 = exp(2 log dsigma)
    dvar = torch.exp(2 * dlog_sigma)
    seed = 0.5 * (dmu**2 / torch.exp(2 * log_sigma) + dvar - torch.log(dvar) - 1).sum(-1)
    assert torch.allclose(torch_kl, ours, rtol=1e-4, atol=1e-4)
    assert torch.allclose(seed, ours, rtol=1e-5, atol=1e-5)


def test_bounded_log_scale_maps_zero_to_zero_and_stays_inside():
    raw = torch.linspace(-50, 50, 101)
    out = bounded(raw, -3.5, 1.0)
    assert bounded(torch.zeros(()), -3.5, 1.0).abs() < 1e-6
    assert out.min() >= -3.5 and out.max() <= 1.0
    assert (out[1:] >= out[:-1]).all()
    raw.requires_grad_(True)
    bounded(raw, -3.5, 1.0).sum().backward()
    assert (raw.grad[40:60] > 0).all()


def test_residual_head_starts_at_its_prior():
    head = ResidualNormal(feature_dim=8, latent_dim=3)
    prior = ConditionalNormal(2, [5], 3)(torch.randn(4, 2))
    q, context = head(prior, torch.randn(4, 8))
    assert context.shape == (4, 0)
    assert torch.allclose(kl_divergence(q, prior), torch.zeros(4), atol=1e-6)


def test_iaf_density_is_base_density_minus_independent_log_determinant():
    torch.manual_seed(0)
    iaf = IAF(latent_dim=4, context_dim=3, num_flows=2)
    for p in iaf.parameters():  # leave the identity-like start so the test sees a real flow
        torch.nn.init.normal_(p, std=0.3)
    base = dist.Normal(torch.randn(5, 4), torch.rand(5, 4) + 0.5).to_event(1)
    context = torch.randn(5, 3)
    q = iaf(base, context)
    z0 = base.sample()
    transforms = q.transforms

    def flow(v):
        for t in transforms:
            v = t(v)
        return v

    zk = flow(z0)
    for n in range(5):
        # the Jacobian of the whole stack for data point n, by autograd, not by the transforms' own log-det
        jac = torch.autograd.functional.jacobian(lambda v: flow(v.expand(5, 4))[n], z0[n])
        log_det = torch.linalg.slogdet(jac).logabsdet
        expected = base.log_prob(z0)[n] - log_det
        assert torch.allclose(q.log_prob(zk)[n], expected, atol=1e-4)
    # the flow is really autoregressive: its Jacobian is triangular in some order, not diagonal
    assert not torch.allclose(jac, torch.diag(torch.diagonal(jac)), atol=1e-4)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_iaf_needs_a_positive_number_of_flows(bad):
    with pytest.raises(ValueError, match="flows must be a positive integer"):
        IAF(3, 2, bad)
