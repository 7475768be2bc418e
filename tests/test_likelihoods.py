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


def test_discretized_logistic_extreme_parameters_stay_finite():
    # very sharp components far from the data: the log-probability must not be -inf or nan
    d = DiscretizedLogisticMixture(torch.zeros(3, 1), torch.tensor([[0.99], [-0.99], [0.0]]), torch.full((3, 1), -7.0))
    values = torch.tensor([0.0, 1.0, 0.5])
    assert torch.isfinite(d.log_prob(values)).all()


@pytest.mark.parametrize(
    "likelihood, good, bad",
    [
        (Bernoulli(), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.5])),
        (Categorical(17), torch.tensor([0.0, 1 / 16, 1.0]), torch.tensor([0.0, 0.1])),
        (LogisticMixture(2), torch.tensor([0.0, 3 / 255, 1.0]), torch.tensor([0.0, 1.5])),
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
