"""The FLOP counts of bench/model_cost.py: positive, and proportional to the number of images."""

import sys
from pathlib import Path

import pyro
import pytest
import torch

from pyro_hvae import ConvLadderVAE, HierarchicalELBO, LadderVAE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from model_cost import elbo_forward_flops, iw_flops  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def conv_ladder():
    return ConvLadderVAE((1, 8, 8), [4, 2], groups_per_scale=2, latent_channels=2, widths=8)


def mlp_ladder():
    return LadderVAE((1, 8, 8), [4, 2], [16])


def images(n):
    return (torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(n)) > 0.5).float()


@pytest.mark.parametrize("build", [conv_ladder, mlp_ladder])
def test_elbo_forward_flops_are_positive_and_scale_with_the_batch(build):
    vae, elbo = build(), HierarchicalELBO(analytic_kl=True)
    with pyro.settings.context(module_local_params=True):
        small, large = (elbo_forward_flops(vae, elbo, images(n)) for n in (4, 12))
    assert small > 0
    assert large == pytest.approx(3 * small, rel=0.01)


def test_iw_flops_scale_with_images_times_samples_and_leave_gradients_on():
    vae = conv_ladder()
    with pyro.settings.context(module_local_params=True):
        base = iw_flops(vae, images(2), 8, 8, "data")
        more = iw_flops(vae, images(4), 32, 32, "data")  # 8x the images x samples
    assert base > 0
    # the encoder runs once per chunk and the first particle once more: a little under 8x
    assert 7 * base < more <= 8 * base
    assert all(p.requires_grad for p in vae.parameters())
