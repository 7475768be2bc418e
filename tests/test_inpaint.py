"""pyro_hvae.inpaint: masks, pseudo-Gibbs, and Metropolis-within-Gibbs against an enumerated conditional."""

import itertools

import pyro
import pytest
import torch

from pyro_hvae import LadderVAE, inpaint, log_likelihood, make_mask
from test_use import DATA_SHAPE, bars, custom_hierarchy, train


@pytest.fixture(scope="module")
def images():
    return bars(256, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trained(images):
    pyro.set_rng_seed(0)
    return train(LadderVAE(DATA_SHAPE, [6, 3], [32]), images, 300)


@pytest.fixture(scope="module")
def four_pixels():
    """A two-layer ladder over 4 binary pixels, trained on two noisy patterns 1100 / 0011."""
    generator = torch.Generator().manual_seed(0)
    patterns = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]])
    data = patterns[torch.randint(0, 2, (2048,), generator=generator)]
    data = torch.where(torch.rand(data.shape, generator=generator) < 0.15, 1 - data, data)
    pyro.set_rng_seed(0)
    return train(LadderVAE((4,), [2, 1], [32]), data, 400, batch_size=256)


@pytest.mark.parametrize("method", ["pseudo_gibbs", "mwg"])
@pytest.mark.parametrize("kind", ["center", "left", "right", "top", "bottom", "random"])
def test_observed_pixels_are_never_changed(method, kind, trained, images):
    x = images[:8]
    mask = make_mask(kind, DATA_SHAPE, generator=torch.Generator().manual_seed(0))
    filled = inpaint(trained, x, mask, method=method, num_steps=3).x
    assert torch.equal(filled[:, mask], x[:, mask])
    assert not torch.equal(filled, x)  # something was filled in
    assert set(filled.unique().tolist()) <= {0.0, 1.0}


def test_masks_hide_the_named_region():
    mask = make_mask("center", (1, 8, 8))
    assert not mask[0, 2:6, 2:6].any() and mask.sum() == 64 - 16
    assert not make_mask("left", (1, 8, 8))[..., :4].any() and make_mask("left", (1, 8, 8))[..., 4:].all()
    assert not make_mask("bottom", (3, 8, 8))[:, 4:].any() and make_mask("bottom", (3, 8, 8))[:, :4].all()
    random = make_mask("random", (3, 8, 8), fraction=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(random[0], random[2])  # all channels of a pixel together


def test_a_per_image_mask_is_used_per_image(trained, images):
    x = images[:2]
    mask = torch.stack([make_mask("left", DATA_SHAPE), make_mask("right", DATA_SHAPE)])
    filled = inpaint(trained, x, mask, method="pseudo_gibbs", num_steps=2).x
    assert torch.equal(filled[mask], x[mask])


@pytest.mark.parametrize("method", ["pseudo_gibbs", "mwg"])
def test_an_all_observed_mask_returns_the_input(method, trained, images):
    x = images[:4]
    result = inpaint(trained, x, torch.ones(DATA_SHAPE, dtype=torch.bool), method=method)
    assert torch.equal(result.x, x)


def test_mwg_acceptance_rate_is_strictly_between_zero_and_one(trained, images):
    result = inpaint(trained, images[:32], make_mask("center", DATA_SHAPE), method="mwg", num_steps=20)
    assert result.acceptance_rate.shape == (32,)
    rate = result.acceptance_rate.mean().item()
    assert 0 < rate < 1
    assert inpaint(trained, images[:2], make_mask("top", DATA_SHAPE), method="pseudo_gibbs").acceptance_rate is None


def test_custom_hierarchy_inpaints():
    vae = custom_hierarchy()
    x = bars(4, torch.Generator().manual_seed(3))
    mask = make_mask("center", DATA_SHAPE)
    result = inpaint(vae, x, mask, method="mwg", num_steps=3)
    assert torch.equal(result.x[:, mask], x[:, mask]) and result.acceptance_rate.shape == (4,)


def test_mwg_samples_the_enumerated_conditional(four_pixels):
    """Pixels 0 and 3 observed (1, 0); p(x_1, x_2 | x_0, x_3) by enumerating the four completions,
    each p(x) estimated with 20000 importance samples. The final states of 4000 independent MwG
    chains must match it (4 standard errors of the frequencies is about 0.03)."""
    completions = list(itertools.product([0.0, 1.0], repeat=2))
    full = torch.tensor([[1.0, a, b, 0.0] for a, b in completions])
    log_p = log_likelihood(four_pixels.model, four_pixels.guide, full, num_samples=20000, chunk_size=5000)
    exact = torch.softmax(log_p, 0)
    assert exact.max() < 0.97  # not a trivial conditional

    num_chains = 4000
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(num_chains, 4)
    mask = torch.tensor([True, False, False, True])

    filled = inpaint(four_pixels, x, mask, method="mwg", num_steps=40).x
    mwg = torch.bincount((filled[:, 1] * 2 + filled[:, 2]).long(), minlength=4).float() / num_chains
    assert (mwg - exact).abs().max() < 0.035, (mwg, exact)


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(1, 5, 5, dtype=torch.bool), r"mask: expected shape \[2, 1, 6, 6\] or \[1, 6, 6\]"),
        (torch.ones(1, 6, 6), "mask must be a boolean tensor"),
        ([[True]], "mask must be a boolean tensor"),
        (torch.zeros(1, 6, 6, dtype=torch.bool), "mask observes no pixel"),
    ],
)
def test_bad_masks_name_the_mask(mask, message, trained, images):
    with pytest.raises(ValueError, match=message):
        inpaint(trained, images[:2], mask)


def test_bad_method_and_steps(trained, images):
    mask = make_mask("center", DATA_SHAPE)
    with pytest.raises(ValueError, match="method: unknown 'gibbs'"):
        inpaint(trained, images[:2], mask, method="gibbs")
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        inpaint(trained, images[:2], mask, num_steps=0)
    with pytest.raises(ValueError, match="mask: unknown kind 'middle'"):
        make_mask("middle", DATA_SHAPE)
