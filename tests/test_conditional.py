"""Conditional hierarchies: shapes, the context in the prior, the border as what a fill reads."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyro_hvae import HierarchicalELBO, log_likelihood, make_mask
from pyro_hvae.context import BorderEncoder, LabelEncoder
from pyro_hvae.models.conditional import BorderLadderVAE, ConditionalLadderVAE
from pyro_hvae.models.protocol import inspect_hierarchy

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 8, 8)


def border_vae(**kwargs):
    return BorderLadderVAE(SHAPE, [6, 3], [32], context_channels=(4, 8), **kwargs)


def images(n, seed=0):
    return torch.bernoulli(torch.full((n, *SHAPE), 0.5), generator=torch.Generator().manual_seed(seed))


def test_shapes_of_the_border_model():
    vae = border_vae()
    x = images(5)
    hierarchy = inspect_hierarchy(vae, x)
    assert hierarchy.latent_sites == ("z_1", "z_2") and hierarchy.analytic_kl
    trace = poutine.trace(vae.model).get_trace(None, x)
    assert trace.nodes["z_2"]["value"].shape == (5, 3) and trace.nodes["z_1"]["value"].shape == (5, 6)
    assert trace.nodes["x"]["value"].shape == (5, *SHAPE)
    features = vae.context_encoder(x)
    assert features.vector.shape == (5, 32)
    assert [tuple(m.shape) for m in features.maps] == [(5, 4, 8, 8), (5, 8, 4, 4)]
    # vectorized particles and importance samples run through the conv decoder
    elbo = HierarchicalELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    assert torch.isfinite(elbo.differentiable_loss(vae.model, vae.guide, x))
    vae.eval()
    assert log_likelihood(vae.model, vae.guide, x, num_samples=6, chunk_size=4).shape == (5,)


def test_the_likelihood_explains_the_hidden_pixels_only():
    vae = border_vae()
    x = images(4)
    hidden = ~vae.mask
    assert vae.observed_dims == int(hidden.sum()) == 16  # the centre 4x4 of 8x8
    site = poutine.trace(vae.model).get_trace(x).nodes["x"]
    per_pixel = torch.distributions.Bernoulli(logits=site["fn"].base.logits).log_prob(x)
    assert torch.allclose(site["fn"].log_prob(x), per_pixel[:, hidden].sum(1))
    # the border is known: means and draws keep it, the hidden pixels come from the model
    draws = site["fn"].sample((3,))
    assert draws.shape == (3, 4, *SHAPE) and torch.equal(draws[:, :, vae.mask], x[:, vae.mask].expand(3, -1, -1))
    assert torch.equal(site["fn"].mean[:, vae.mask], x[:, vae.mask])
    assert torch.allclose(site["fn"].mean[:, hidden], torch.sigmoid(site["fn"].base.logits)[:, hidden])


def test_different_borders_give_different_priors():
    vae = border_vae().eval()
    a, b = images(3, seed=1), images(3, seed=2)
    with torch.no_grad():
        top_a, top_b = vae.model.top_prior(vae.context_encoder(a).vector), vae.model.top_prior(vae.context_encoder(b).vector)
    assert (top_a.mean - top_b.mean).abs().min() > 0  # every image, every unit
    same_border = torch.where(vae.mask, a, b)  # a's border, b's centre
    with torch.no_grad():
        top_same = vae.model.top_prior(vae.context_encoder(same_border).vector)
    assert torch.equal(top_same.mean, top_a.mean) and torch.equal(top_same.stddev, top_a.stddev)


def test_the_fill_reads_only_the_border():
    vae = border_vae().eval()
    x = images(6, seed=3)
    other_centre = torch.where(vae.mask, x, 1 - x)
    pyro.set_rng_seed(7)
    first = vae.fill(x, num_samples=4)
    pyro.set_rng_seed(7)
    second = vae.fill(other_centre, num_samples=4)
    assert torch.equal(first.x[:, ~vae.mask], second.x[:, ~vae.mask])
    assert torch.equal(first.predictive_mean[:, ~vae.mask], second.predictive_mean[:, ~vae.mask])
    assert torch.equal(first.x[:, vae.mask], x[:, vae.mask]) and torch.equal(first.predictive_mean[:, vae.mask], x[:, vae.mask])
    # the log-likelihood is that of the truth each call is given
    assert not torch.allclose(first.missing_log_prob, second.missing_log_prob)
    assert first.missing_log_prob.shape == (6,) and first.acceptance_rate is None


def test_a_trained_border_model_fills_from_its_border():
    """Images are all 0 or all 1 (a few pixels flipped): the centre follows the border, which
    the model learns in a few hundred steps; the fill of a blank border stays blank and the
    fill of a full border is full."""
    torch.manual_seed(0)
    vae = border_vae()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    elbo = HierarchicalELBO()
    generator = torch.Generator().manual_seed(0)
    with pyro.settings.context(module_local_params=True):
        for _ in range(100):
            level = torch.randint(0, 2, (64, 1, 1, 1), generator=generator).float()
            flips = torch.rand(64, *SHAPE, generator=generator) < 0.05
            x = torch.where(flips, 1 - level, level.expand(64, *SHAPE))
            optimizer.zero_grad()
            elbo.differentiable_loss(vae.model, vae.guide, x).backward()
            optimizer.step()
        vae.eval()
        blank, full = torch.zeros(8, *SHAPE), torch.ones(8, *SHAPE)
        hidden = ~vae.mask
        blank_fill, full_fill = vae.fill(blank, num_samples=8), vae.fill(full, num_samples=8)
    assert blank_fill.predictive_mean[:, hidden].mean() < 0.2 < 0.8 < full_fill.predictive_mean[:, hidden].mean()
    # and the truth is likely: well above the 16 ln(1/2) of a coin
    assert blank_fill.missing_log_prob.mean() > 16 * math.log(0.5) + 5


def test_a_label_changes_the_prior():
    vae = ConditionalLadderVAE(SHAPE, [6, 3], LabelEncoder(4), [32]).eval()
    x = images(4)
    with torch.no_grad():
        h = vae.context_encoder(torch.tensor([0, 1, 2, 3])).vector
        top = vae.model.top_prior(h).mean
        z = torch.zeros(4, 3)
        below = vae.model.prior(1, z, h).mean
    assert (top[0] - top[1]).abs().min() > 0 and (below[2] - below[3]).abs().min() > 0
    y = torch.tensor([1, 1, 3, 0])
    assert log_likelihood(vae.model, vae.guide, x, y, num_samples=5).shape == (4,)
    trace = poutine.trace(vae.model).get_trace(context=y)
    assert trace.nodes["x"]["value"].shape == (4, *SHAPE)
    assert vae.observed_dims == 64


def test_bad_contexts_and_options_are_refused():
    label = ConditionalLadderVAE(SHAPE, [6, 3], LabelEncoder(4), [32])
    x = images(2)
    with pytest.raises(ValueError, match="context: this hierarchy's prior is conditioned"):
        label.model(x)
    with pytest.raises(ValueError, match="labels must lie in 0..3"):
        label.model(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="integer tensor"):
        label.model(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="3 contexts for 2 data points"):
        label.model(x, torch.tensor([0, 1, 2]))
    vae = border_vae()
    with pytest.raises(ValueError, match=r"context: expected images \[N, 1, 8, 8\]"):
        vae.model(x, torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="divisible by 16"):
        BorderLadderVAE(SHAPE, [4], [16], context_channels=(4, 4, 4, 4, 4))
    with pytest.raises(ValueError, match="must observe some pixels"):
        BorderEncoder(SHAPE, torch.ones(SHAPE, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        vae.fill(x, num_samples=0)


def test_the_default_mask_hides_the_centre_as_inpaint_does():
    assert torch.equal(border_vae().mask, make_mask("center", SHAPE))
