"""The plain-PyTorch baselines of bench/conv_step.py and bench/conv_iw_eval.py compute
what the library computes, so that their timings compare like with like."""

import sys
from pathlib import Path

import pyro
import pytest
import torch

from pyro_hvae import ConvLadderVAE, HierarchicalELBO, log_likelihood

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from conv_iw_eval import plain as plain_log_likelihood  # noqa: E402
from conv_step import plain_loss  # noqa: E402


@pytest.fixture
def vae():
    pyro.set_rng_seed(0)
    vae = ConvLadderVAE((1, 8, 8), [4, 2], groups_per_scale=2, latent_channels=2, widths=8)
    with torch.no_grad():
        for p in vae.parameters():  # off the zero-KL initialisation
            p.add_(0.1 * torch.randn_like(p))
    return vae


def binary_images(n):
    return (torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()


def test_plain_loss_is_the_negative_elbo_for_the_same_draws(vae):
    x = binary_images(5)
    with pyro.settings.context(module_local_params=True):
        pyro.set_rng_seed(3)
        ours = HierarchicalELBO()(vae.model, vae.guide)(x)
        pyro.set_rng_seed(3)
        plain = plain_loss(vae, x)
        pyro.set_rng_seed(4)
        other_draws = plain_loss(vae, x)
    torch.testing.assert_close(plain, ours)
    assert not torch.allclose(other_draws, ours)  # the check depends on the draws: it is not vacuous


def test_plain_importance_weights_agree_with_log_likelihood_in_distribution(vae):
    x = binary_images(3)
    vae.eval()
    pyro.set_rng_seed(5)
    with torch.no_grad():
        ours, log_w = log_likelihood(vae.model, vae.guide, x, num_samples=4000, chunk_size=1000, return_log_weights=True)
        plain = plain_log_likelihood(vae, x, 4000, 1000)
    # standard error of a log-mean-exp estimate from K weights: std(w) / (sqrt(K) mean(w))
    w = (log_w - log_w.max(0).values).exp()
    se = w.std(0) / (w.mean(0) * 4000**0.5)
    assert ours.dtype == plain.dtype == torch.float64
    assert ((ours - plain).abs() < 5 * se * 2**0.5 + 1e-6).all(), (ours, plain, se)
