import itertools
import math

import numpy as np
import pyro
import pytest
import torch

from pyro_hvae.likelihoods import (
    CoupledLogisticMixture,
    DiscretizedCoupledLogisticMixture,
    DiscretizedLogisticMixture,
    bits_per_dim,
)


def random_params(batch, channels, mixtures, height, width, *, coupling=1.5, dtype=torch.float64):
    pairs = channels * (channels - 1) // 2
    return (
        torch.randn(batch + (mixtures, height, width), dtype=dtype),
        torch.rand(batch + (channels, mixtures, height, width), dtype=dtype) * 2.4 - 1.2,
        torch.rand(batch + (channels, mixtures, height, width), dtype=dtype) * 3 - 4,
        coupling * torch.randn(batch + (pairs, mixtures, height, width), dtype=dtype),
    )


def all_pixel_values(num_bins, channels, dtype=torch.float64):
    """Every joint value of one pixel, as images [num_bins^C, C, 1, 1]."""
    levels = range(num_bins)
    grid = torch.tensor(list(itertools.product(levels, repeat=channels)), dtype=dtype) / (num_bins - 1)
    return grid.reshape(-1, channels, 1, 1)


def numpy_log_prob(x, logit_weights, locs, log_scales, coeffs, num_bins):
    """The formula, one pixel, component and channel at a time. A bin right of the mean
    is measured with survival functions, 1 - F, where F is close to 1 (no cancellation)."""

    def sigmoid(t):
        return 1.0 / (1.0 + math.exp(-t)) if t >= 0 else math.exp(t) / (1.0 + math.exp(t))

    channels, mixtures, height, width = locs.shape
    delta = 1.0 / (num_bins - 1)
    total = 0.0
    for h, w in itertools.product(range(height), range(width)):
        y = 2 * x[:, h, w] - 1
        weights = np.exp(logit_weights[:, h, w]) / np.exp(logit_weights[:, h, w]).sum()
        pixel = 0.0
        for m in range(mixtures):
            prob = weights[m]
            pair = 0
            for c in range(channels):
                mean = locs[c, m, h, w]
                for j in range(c):
                    mean += math.tanh(coeffs[pair, m, h, w]) * y[j]
                    pair += 1
                s = math.exp(max(log_scales[c, m, h, w], -7.0))
                upper = math.inf if y[c] > 1 - delta / 2 else (y[c] + delta - mean) / s
                lower = -math.inf if y[c] < -1 + delta / 2 else (y[c] - delta - mean) / s
                if y[c] > mean:
                    prob *= sigmoid(-lower) - sigmoid(-upper)
                else:
                    prob *= sigmoid(upper) - sigmoid(lower)
            pixel += prob
        total += math.log(pixel)
    return total


@pytest.mark.parametrize("num_mixtures, channels", [(1, 3), (4, 3), (3, 2), (2, 1)])
def test_each_pixel_sums_to_one_over_all_joint_values(num_mixtures, channels):
    torch.manual_seed(0)
    num_bins = 8
    d = DiscretizedCoupledLogisticMixture(*random_params((5,), channels, num_mixtures, 1, 1), num_bins=num_bins)
    values = all_pixel_values(num_bins, channels).unsqueeze(1)  # [8^C, 1, C, 1, 1]
    probs = d.log_prob(values).exp()
    assert probs.shape == (num_bins**channels, 5)
    assert torch.allclose(probs.sum(0), torch.ones(5, dtype=probs.dtype), atol=1e-5)


def test_each_pixel_sums_to_one_in_float32():
    torch.manual_seed(1)
    d = DiscretizedCoupledLogisticMixture(*random_params((3,), 3, 5, 1, 1, dtype=torch.float32), num_bins=8)
    probs = d.log_prob(all_pixel_values(8, 3, torch.float32).unsqueeze(1)).exp()
    assert torch.allclose(probs.sum(0), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("num_bins", [256, 5])
def test_log_prob_matches_the_formula_computed_directly(num_bins):
    torch.manual_seed(2)
    params = random_params((2,), 3, 3, 2, 3)
    d = DiscretizedCoupledLogisticMixture(*params, num_bins=num_bins)
    # include the edge bins, where the tails are taken
    x = torch.randint(0, num_bins, (2, 3, 2, 3)).double() / (num_bins - 1)
    x[0, :, 0, 0] = 0.0
    x[1, :, 1, 2] = 1.0
    expected = [numpy_log_prob(x[i].numpy(), *(p[i].numpy() for p in params), num_bins) for i in range(2)]
    assert d.log_prob(x).tolist() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("num_mixtures", [1, 3])
def test_without_coupling_it_is_a_mixture_of_independent_channel_logistics(num_mixtures):
    torch.manual_seed(3)
    logits, locs, log_scales, coeffs = random_params((4,), 3, num_mixtures, 2, 2)
    coupled = DiscretizedCoupledLogisticMixture(logits, locs, log_scales, torch.zeros_like(coeffs))
    x = torch.randint(0, 256, (4, 3, 2, 2)).double() / 255
    # per component m, the channels are independent one-component discretized logistics
    # (the existing DiscretizedLogisticMixture); the shared weight mixes their products
    per_component = torch.stack(
        [
            DiscretizedLogisticMixture(
                torch.zeros(locs.shape[:-3] + locs.shape[-2:] + (1,), dtype=locs.dtype),
                locs[..., m, :, :].unsqueeze(-1),
                log_scales[..., m, :, :].unsqueeze(-1),
            )
            .log_prob(x)
            .sum(-3)
            for m in range(num_mixtures)
        ],
        dim=-3,
    )
    expected = torch.logsumexp(logits.log_softmax(-3) + per_component, dim=-3).sum((-2, -1))
    assert torch.allclose(coupled.log_prob(x), expected, rtol=1e-10)
    if num_mixtures == 1:
        independent = DiscretizedLogisticMixture(torch.zeros(4, 3, 2, 2, 1), locs.squeeze(-3).unsqueeze(-1),
                                                 log_scales.squeeze(-3).unsqueeze(-1))
        assert torch.allclose(coupled.log_prob(x), independent.log_prob(x).sum((-3, -2, -1)).double(), rtol=1e-5)


def test_coupling_changes_the_distribution():
    torch.manual_seed(4)
    logits, locs, log_scales, coeffs = random_params((2,), 3, 2, 2, 2)
    x = torch.randint(0, 256, (2, 3, 2, 2)).double() / 255
    x[..., 0, :, :] = 1.0  # a bright red channel pulls the coupled green and blue means
    coupled = DiscretizedCoupledLogisticMixture(logits, locs, log_scales, coeffs).log_prob(x)
    uncoupled = DiscretizedCoupledLogisticMixture(logits, locs, log_scales, torch.zeros_like(coeffs)).log_prob(x)
    assert (coupled - uncoupled).abs().min() > 1e-2


def test_samples_follow_the_joint_probabilities():
    torch.manual_seed(5)
    num_bins = 4
    d = DiscretizedCoupledLogisticMixture(*random_params((), 3, 3, 1, 1, coupling=3.0), num_bins=num_bins)
    values = all_pixel_values(num_bins, 3)
    probs = d.log_prob(values).exp()
    samples = d.sample((40000,))
    assert samples.shape == (40000, 3, 1, 1)
    index = (samples.flatten(1) * (num_bins - 1)).round().long()
    joint = (index * torch.tensor([num_bins**2, num_bins, 1])).sum(-1)
    freq = torch.bincount(joint, minlength=num_bins**3).double() / len(joint)
    assert (freq - probs).abs().max() < 0.01


def test_likelihood_samples_lie_on_the_8_bit_grid_with_the_image_shape():
    torch.manual_seed(6)
    likelihood = CoupledLogisticMixture(num_mixtures=4)
    data_shape = (3, 4, 5)
    assert likelihood.features_per_pixel(3) == 40
    assert likelihood.num_features(data_shape) == 40 * 4 * 5
    d = likelihood.distribution(torch.randn(2, 6, likelihood.num_features(data_shape)), data_shape)
    assert d.batch_shape == (2, 6) and d.event_shape == data_shape
    x = d.sample()
    assert x.shape == (2, 6) + data_shape
    likelihood.check_support(x)
    assert d.log_prob(x).shape == (2, 6)
    assert d.sample((7,)).shape == (7, 2, 6) + data_shape
    expanded = d.expand((3, 2, 6))
    assert expanded.batch_shape == (3, 2, 6)
    assert torch.equal(expanded.log_prob(x), d.log_prob(x).expand(3, 2, 6))
    assert expanded.sample().shape == (3, 2, 6) + data_shape


def test_features_are_read_as_a_flattened_feature_map():
    torch.manual_seed(7)
    likelihood = CoupledLogisticMixture(num_mixtures=2)
    fmap = torch.randn(3, likelihood.features_per_pixel(3), 4, 4)  # what a conv decoder gives
    d = likelihood.distribution(fmap.flatten(-3), (3, 4, 4))
    logits, locs, log_scales, coeffs = fmap.split([2, 6, 6, 6], dim=1)
    assert torch.allclose(d.logit_weights, logits.log_softmax(1))
    assert torch.equal(d.locs[:, 1, 0], locs[:, 2])  # channel 1, component 0
    assert torch.equal(d.log_scales[:, 2, 1], log_scales[:, 5].clamp(min=-7))
    assert torch.allclose(d.coeffs[:, 2, 1], coeffs[:, 5].tanh())


def test_mean_follows_the_coupled_means_of_sharp_components():
    torch.manual_seed(8)
    logits, locs, log_scales, coeffs = random_params((3,), 3, 1, 2, 2, dtype=torch.float32)
    locs = locs.clamp(-0.4, 0.4)
    d = DiscretizedCoupledLogisticMixture(logits, locs, torch.full_like(log_scales, -7.0), coeffs)
    # sharp components: a sample is the coupled mean, up to rounding to the 8-bit grid
    assert (d.mean - d.sample()).abs().max() < 3 / 255
    assert (d.mean - (locs.squeeze(-3) + 1) / 2)[:, 1:].abs().max() > 0.05


def test_extreme_parameters_stay_finite_and_differentiable():
    locs = torch.tensor([0.99, -0.99, 0.0]).reshape(1, 3, 1, 1, 1).requires_grad_()
    d = DiscretizedCoupledLogisticMixture(
        torch.zeros(1, 1, 1, 1), locs, torch.full((1, 3, 1, 1, 1), -7.0), torch.full((1, 3, 1, 1, 1), 5.0)
    )
    lp = d.log_prob(torch.tensor([0.0, 1.0, 0.5]).reshape(1, 3, 1, 1))
    assert torch.isfinite(lp).all() and lp.item() < -100
    lp.sum().backward()
    assert torch.isfinite(locs.grad).all() and locs.grad.abs().sum() > 0


def test_works_as_an_observed_pyro_site_and_reports_bits_per_dim():
    torch.manual_seed(9)
    likelihood = CoupledLogisticMixture(num_mixtures=2)
    data_shape = (3, 2, 2)
    features = torch.randn(5, likelihood.num_features(data_shape))
    x = torch.randint(0, 256, (5,) + data_shape).float() / 255

    def model():
        with pyro.plate("data", 5):
            pyro.sample("x", likelihood.distribution(features, data_shape), obs=x)

    with pyro.validation_enabled():
        trace = pyro.poutine.trace(model).get_trace()
    trace.compute_log_prob()
    nll = -trace.nodes["x"]["log_prob"]
    assert nll.shape == (5,)
    assert torch.allclose(bits_per_dim(nll, math.prod(data_shape)), nll / (12 * math.log(2)))


@pytest.mark.parametrize(
    "bad",
    [torch.full((1, 3, 2, 2), 0.5), torch.full((1, 3, 2, 2), 1.2), torch.full((1, 3, 2, 2), -1 / 255)],
)
def test_data_off_the_8_bit_grid_is_rejected(bad):
    likelihood = CoupledLogisticMixture()
    likelihood.check_support(torch.full((1, 3, 2, 2), 128 / 255))
    with pytest.raises(ValueError, match=r"^x: the coupled logistic-mixture likelihood needs pixel values k/255"):
        likelihood.check_support(bad)


def test_shapes_and_sizes_are_checked():
    likelihood = CoupledLogisticMixture(num_mixtures=2)
    with pytest.raises(ValueError, match=r"^data_shape: .* models images \[C, H, W\]"):
        likelihood.num_features((784,))
    with pytest.raises(ValueError, match=r"^features: .* needs num_features\(\(3, 2, 2\)\) = 80 decoder outputs"):
        likelihood.distribution(torch.randn(4, 12 * 2), (3, 2, 2))
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="num_mixtures must be a positive integer"):
            CoupledLogisticMixture(num_mixtures=bad)
    with pytest.raises(ValueError, match="coeffs must hold C\\(C-1\\)/2 = 3 channel pairs"):
        DiscretizedCoupledLogisticMixture(torch.zeros(1, 1, 1), torch.zeros(3, 1, 1, 1), torch.zeros(3, 1, 1, 1),
                                          torch.zeros(2, 1, 1, 1))
