"""What an inpainting chain predicts for the missing pixels: ``predictive_mean`` and ``missing_log_prob``."""

import itertools

import pytest
import torch

from pyro_hvae import inpaint, log_likelihood, make_mask
from test_inpaint import four_pixels, images, trained  # noqa: F401 (fixtures)
from test_use import DATA_SHAPE


def test_mwg_predicts_the_enumerated_conditional(four_pixels):  # noqa: F811
    """Pixels 0 and 3 observed (1, 0). For each completion (x_1, x_2), the chains' predictive
    probability exp(missing_log_prob), averaged over 2000 chains, estimates p(x_1, x_2 | x_0, x_3),
    enumerated with 20000 importance samples per completion; so does the predictive mean of x_1."""
    completions = list(itertools.product([0.0, 1.0], repeat=2))
    full = torch.tensor([[1.0, a, b, 0.0] for a, b in completions])
    log_p = log_likelihood(four_pixels.model, four_pixels.guide, full, num_samples=20000, chunk_size=5000)
    exact = torch.softmax(log_p, 0)
    mask = torch.tensor([True, False, False, True])
    num_chains = 2000
    for completion, probability in zip(full, exact):
        result = inpaint(four_pixels, completion.expand(num_chains, 4), mask, method="mwg", num_steps=40)
        predicted = result.missing_log_prob.exp().mean().item()
        assert predicted == pytest.approx(probability.item(), abs=0.03), (completion, predicted, probability)
    p_x1 = exact[2] + exact[3]  # completions (1, 0) and (1, 1)
    assert result.predictive_mean[:, 1].mean().item() == pytest.approx(p_x1.item(), abs=0.03)
    assert torch.equal(result.predictive_mean[:, mask], full[-1].expand(num_chains, 4)[:, mask])


@pytest.mark.parametrize("method", ["pseudo_gibbs", "mwg"])
def test_predictions_have_one_value_per_image_and_keep_observed_pixels(method, trained, images):  # noqa: F811
    x = images[:6]
    mask = make_mask("center", DATA_SHAPE)
    result = inpaint(trained, x, mask, method=method, num_steps=4)
    assert result.missing_log_prob.shape == (6,) and result.missing_log_prob.dtype == torch.float64
    assert (result.missing_log_prob < 0).all()  # a probability of several binary pixels
    assert torch.equal(result.predictive_mean[:, mask], x[:, mask])
    hidden = result.predictive_mean[:, ~mask]
    assert ((hidden > 0) & (hidden < 1)).all()  # Bernoulli means, not draws


def test_nothing_missing_has_log_probability_zero(trained, images):  # noqa: F811
    result = inpaint(trained, images[:3], torch.ones(DATA_SHAPE, dtype=torch.bool))
    assert torch.equal(result.missing_log_prob, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(result.predictive_mean, images[:3])
