"""IAF flows start as the identity (the posterior starts where its base does) and then train."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_hvae import LadderVAE
from pyro_hvae.infer.elbo import HierarchicalELBO
from pyro_hvae.latents import IAF

SHAPE = (1, 6, 6)


def binary_batch(n=8):
    return (torch.rand(n, *SHAPE) < 0.4).float()


def test_flows_start_as_the_identity_with_zero_log_determinant():
    iaf = IAF(latent_dim=5, context_dim=3, num_flows=3)
    base = dist.Normal(torch.randn(7, 5), torch.rand(7, 5) + 0.5).to_event(1)
    q = iaf(base, torch.randn(7, 3))
    torch.manual_seed(1)
    flowed = q.rsample()
    torch.manual_seed(1)
    assert torch.equal(flowed, base.rsample())
    assert torch.equal(q.log_prob(flowed), base.log_prob(flowed))
    other = torch.randn(7, 5)  # a value the flows did not produce: scored through their inverse
    torch.testing.assert_close(q.log_prob(other), base.log_prob(other), rtol=0, atol=1e-6)
    for transform in q.transforms:
        z = torch.randn(7, 5)
        assert torch.equal(transform(z), z)
        assert torch.equal(transform.log_abs_det_jacobian(z, transform(z)), torch.zeros(7))


@pytest.mark.parametrize("flows", [1, 3])
def test_a_ladder_with_flows_starts_like_one_without(flows):
    """Same seed, same batch: the model's networks are built first, so both ladders have the
    same decoder; residual heads start at zero, so both posteriors are the prior, and the
    flows add nothing. Every layer's KL is zero and the ELBOs agree."""
    x = binary_batch()
    terms = {}
    for k in (0, flows):
        pyro.set_rng_seed(0)
        vae = LadderVAE(SHAPE, [6, 4, 2], [16, 12], flows=k)
        elbo = HierarchicalELBO(analytic_kl=k == 0)
        pyro.set_rng_seed(1)
        with pyro.settings.context(module_local_params=True):
            elbo(vae.model, vae.guide)(x)
        terms[k] = elbo.terms
    for site, kl in terms[flows]["kl"].items():
        assert torch.equal(kl, torch.zeros_like(kl)), site
        assert torch.equal(terms[0]["kl"][site], torch.zeros_like(kl))
    torch.testing.assert_close(terms[flows]["elbo"], terms[0]["elbo"])


def test_flow_parameters_train_from_the_first_step():
    pyro.set_rng_seed(0)
    vae = LadderVAE(SHAPE, [6, 4], [16, 12], flows=2)
    x = binary_batch(32)
    with pyro.settings.context(module_local_params=True):
        loss = HierarchicalELBO(analytic_kl=False)(vae.model, vae.guide)
        optimizer = torch.optim.Adam(loss.parameters(), lr=1e-2)
        loss(x).backward()
        for iaf in vae.guide.flows:
            for flow in iaf.flows:
                output = flow.nn.layers[-1]
                assert output.weight.grad.abs().sum() > 0 and output.bias.grad.abs().sum() > 0
        optimizer.step()
        for _ in range(3):  # once the output layer moved, the hidden layers get gradients too
            optimizer.zero_grad()
            loss(x).backward()
            optimizer.step()
    hidden = vae.guide.flows[0].flows[0].nn.layers[0]
    assert hidden.weight.grad.abs().sum() > 0
    z = torch.randn(4, 6)
    flow = vae.guide.flows[0].flows[0].condition(torch.randn(4, 12))
    assert not torch.allclose(flow(z), z)  # no longer the identity
