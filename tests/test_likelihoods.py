import math

import pytest
import torch

from pyro_hvae.likelihoods import (
    Bernoulli,
    Categorical,
    DiscretizedLogisticMixture,
    LogisticMixture,
    QuantizedCategorical,
    bits_per_dim,
)


def test_quantized_categorical_is_normalized_over_its_grid():
    logits = torch.randn(3, 17)
    d = QuantizedCategorical(logits)
    grid = torch.linspace(0, 1, 17).reshape(17, 1)
    probs = d.log_prob(grid.expand(17, 3)).exp()
    assert torch.allclose(probs.sum(0), torch.ones(3), atol=1e-6)
    assert torch.allclose(probs.T, logits.softmax(-1), atol=1e-6)
    assert torch.allclose(d.mean, (logits.softmax(-1) * grid.T).sum(-1))
    samples = d.sample((1000,))
    assert samples.shape == (1000, 3)
    assert torch.allclose(samples * 16, (samples * 16).round())


@pytest.mark.parametrize("num_mixtures", [1, 3])
def test_discretized_logistic_mixture_sums_to_one_over_256_bins(num_mixtures):
    torch.manual_seed(1)
    shape = (4, num_mixtures)
    d = DiscretizedLogisticMixture(torch.randn(shape), torch.rand(shape) * 2.4 - 1.2, torch.randn(shape) - 2.0)
    grid = (torch.arange(256) / 255.0).reshape(256, 1).expand(256, 4)
    probs = d.log_prob(grid).exp()
    assert torch.allclose(probs.sum(0), torch.ones(4, dtype=probs.dtype), atol=1e-4)
    assert torch.isfinite(d.log_prob(grid)).all()
    samples = d.sample((200,))
    assert samples.min() >= 0 and samples.max() <= 1
    assert torch.allclose(samples * 255, (samples * 255).round(), atol=1e-4)


def logistic_mixture_reference(value, weights, locs, scales, num_bins=256):
    """``P(x = value)`` of a discretized logistic mixture in 1000-digit arithmetic, straight
    from its definition: each component's logistic CDF ``F`` over ``y = 2x - 1``, differenced
    over the bin ``[y - d, y + d]`` with ``d = 1 / (num_bins - 1)``, the edge bins reaching to
    infinity. Returns ``log P``."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(1000):  # enough to hold 1 - F when F is within exp(-2000) of 1
        y = 2 * mpmath.mpf(value) - 1
        d = mpmath.mpf(1) / (num_bins - 1)
        total = mpmath.mpf(0)
        for w, mu, s in zip(weights, locs, scales):
            cdf = lambda t: 1 / (1 + mpmath.exp(-(t - mpmath.mpf(mu)) / mpmath.mpf(s)))  # noqa: E731
            upper = mpmath.mpf(1) if value >= 1 else cdf(y + d)
            lower = mpmath.mpf(0) if value <= 0 else cdf(y - d)
            total += mpmath.mpf(w) * (upper - lower)
        return float(mpmath.log(total))


def test_discretized_logistic_mixture_log_prob_equals_its_definition():
    weights, locs, scales = [0.3, 0.7], [-0.4, 0.25], [0.05, 0.2]
    values = torch.tensor([0, 1, 2, 60, 77, 128, 159, 200, 254, 255], dtype=torch.float64) / 255
    d = DiscretizedLogisticMixture(
        torch.tensor(weights, dtype=torch.float64).log().expand(len(values), 2),
        torch.tensor(locs, dtype=torch.float64).expand(len(values), 2),
        torch.tensor(scales, dtype=torch.float64).log().expand(len(values), 2),
    )
    expected = [logistic_mixture_reference(float(v), weights, locs, scales) for v in values]
    torch.testing.assert_close(d.log_prob(values), torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_discretized_logistic_extreme_parameters_are_still_exact():
    # very sharp components (log-scale at its floor, -7) far from the data: the probability
    # is exp(-2000) or so, far below float range, yet its logarithm must be right
    locs = [0.99, -0.99, 0.0, 0.0]
    values = [0.0, 1.0, 128 / 255, 1 / 255]
    d = DiscretizedLogisticMixture(
        torch.zeros(4, 1, dtype=torch.float64),
        torch.tensor(locs, dtype=torch.float64).unsqueeze(-1),
        torch.full((4, 1), -7.0, dtype=torch.float64),
    )
    scale = math.exp(-7.0)
    expected = [logistic_mixture_reference(v, [1.0], [mu], [scale]) for v, mu in zip(values, locs)]
    assert expected[0] < -2000 and expected[1] < -2000  # the regime that underflows naively
    torch.testing.assert_close(d.log_prob(torch.tensor(values, dtype=torch.float64)), torch.tensor(expected, dtype=torch.float64), rtol=1e-7, atol=1e-7)


def test_logistic_mixture_likelihood_reads_weights_locations_and_scales_from_the_features():
    """Features per value are ``[logit weights (M), locations (M), log-scales (M)]``; a
    two-pixel image's probabilities over all 256^2 values sum to one."""
    likelihood = LogisticMixture(num_mixtures=2)
    pixels = [([0.3, 0.7], [-0.4, 0.25], [0.05, 0.2]), ([0.5, 0.5], [0.9, -0.9], [0.3, 0.01])]  # (weights, locs, scales)
    features = torch.tensor(
        [[math.log(w) for w in ws] + ls + [math.log(s) for s in ss] for ws, ls, ss in pixels], dtype=torch.float64
    ).reshape(1, 12)
    d = likelihood.distribution(features, (1, 1, 2))
    x = torch.tensor([[[[40, 250]]]], dtype=torch.float64) / 255
    expected = sum(logistic_mixture_reference(float(v), *params) for v, params in zip(x.flatten(), pixels))
    assert float(d.log_prob(x)) == pytest.approx(expected, abs=1e-8)
    grid = torch.arange(256, dtype=torch.float64) / 255
    every_image = torch.cartesian_prod(grid, grid).reshape(-1, 1, 1, 2)
    assert float(d.log_prob(every_image).logsumexp(0)) == pytest.approx(0.0, abs=1e-9)


def test_categorical_likelihood_is_a_softmax_per_pixel_over_its_levels():
    """``P(x_d = k / (L - 1)) = softmax(f_d)_k`` with pixel ``d``'s ``L`` features contiguous;
    a two-pixel image's probabilities over all ``L^2`` images sum to one."""
    L = 5
    likelihood = Categorical(L)
    features = torch.randn(3, 2 * L, dtype=torch.float64)
    d = likelihood.distribution(features, (1, 1, 2))
    levels = torch.tensor([[0, 4], [3, 3], [1, 2]])
    x = (levels / (L - 1)).to(torch.float64).reshape(3, 1, 1, 2)
    probs = features.reshape(3, 2, L).softmax(-1)
    expected = torch.log(probs[torch.arange(3), 0, levels[:, 0]] * probs[torch.arange(3), 1, levels[:, 1]])
    torch.testing.assert_close(d.log_prob(x), expected)
    grid = torch.arange(L, dtype=torch.float64) / (L - 1)
    every_image = torch.cartesian_prod(grid, grid).reshape(L * L, 1, 1, 1, 2)
    torch.testing.assert_close(d.log_prob(every_image).logsumexp(0), torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(d.mean.flatten(1), (probs * torch.linspace(0, 1, L, dtype=torch.float64)).sum(-1))


@pytest.mark.parametrize(
    "likelihood, good, bad",
    [
        (Bernoulli(), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.5])),
        (Bernoulli(), torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 1.0])),
        (Categorical(17), torch.tensor([0.0, 1 / 16, 1.0]), torch.tensor([0.0, 0.1])),
        (Categorical(17), torch.tensor([0.0, 1 / 16, 1.0]), torch.tensor([0.0, 17 / 16])),
        (Categorical(17), torch.tensor([0.0, 1 / 16, 1.0]), torch.tensor([-1 / 16, 0.5])),
        (LogisticMixture(2), torch.tensor([0.0, 3 / 255, 1.0]), torch.tensor([0.0, 1.5])),
        (LogisticMixture(2), torch.tensor([0.0, 3 / 255, 1.0]), torch.tensor([0.5 / 255, 1.0])),
    ],
)
def test_data_outside_the_support_is_rejected_with_a_clear_error(likelihood, good, bad):
    likelihood.check_support(good)
    with pytest.raises(ValueError, match=r"^x: .* likelihood needs"):
        likelihood.check_support(bad)


@pytest.mark.parametrize("likelihood", [Bernoulli(), Categorical(256), LogisticMixture(3)])
def test_distribution_covers_the_whole_image_as_its_event(likelihood):
    features = torch.randn(2, 5, 1 * 4 * 4 * likelihood.features_per_value)
    d = likelihood.distribution(features, (1, 4, 4))
    assert d.batch_shape == (2, 5) and d.event_shape == (1, 4, 4)
    x = d.sample()
    likelihood.check_support(x)
    assert d.log_prob(x).shape == (2, 5)


@pytest.mark.parametrize("bad", [0, 1, -3, 2.5, True])
def test_categorical_num_levels_is_checked(bad):
    with pytest.raises(ValueError, match="num_levels must be an integer >= 2"):
        Categorical(bad)


def test_bits_per_dim():
    assert bits_per_dim(784 * torch.log(torch.tensor(2.0)), 784) == pytest.approx(1.0)
