import pytest
import torch
from torch import nn

from pyro_hvae.nn import BatchNorm
from pyro_hvae.spectral import RegularizationSchedule, SpectralRegularizer, weight_matrix


def exact_sigma(layer: nn.Module) -> torch.Tensor:
    return torch.linalg.matrix_norm(layer.weight.reshape(layer.weight.shape[0], -1), ord=2)


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.SiLU(),
        nn.Conv2d(8, 4, 1),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6),
    )


def test_power_iteration_matches_the_exact_spectral_norm():
    net = small_net()
    layers = [net[0], net[3], net[5]]
    reg = SpectralRegularizer(net, 1.0, initial_iterations=300)
    assert reg._layers == layers
    estimate = reg.singular_values()
    exact = torch.stack([exact_sigma(layer) for layer in layers])
    assert torch.allclose(estimate, exact, rtol=1e-3)


def test_one_step_per_call_follows_the_weights_as_they_change():
    net = small_net()
    reg = SpectralRegularizer(net, 1.0, initial_iterations=300)
    reg.singular_values()
    with torch.no_grad():
        net[0].weight.mul_(3.0).add_(0.05 * torch.randn_like(net[0].weight))
    for _ in range(100):
        estimate = reg.singular_values()
    assert estimate[0].item() == pytest.approx(exact_sigma(net[0]).item(), rel=1e-3)
    assert int(reg.num_updates) == 101


def test_the_power_iteration_state_round_trips_through_state_dict():
    net = small_net()
    first = SpectralRegularizer(net, 1.0, initial_iterations=1)
    first.singular_values()
    state = first.state_dict()
    assert set(state) == {"num_updates", *(f"vectors.{i}.{uv}" for i in range(3) for uv in "uv")}
    second = SpectralRegularizer(net, 1.0, initial_iterations=1)
    assert not torch.equal(second.vectors[0].u, first.vectors[0].u)
    second.load_state_dict(state)
    # far from converged after one step: both must take exactly one more step, not a fresh start
    assert torch.equal(second.singular_values(), first.singular_values())
    assert torch.equal(second.vectors[2].v, first.vectors[2].v)


def test_the_loss_gradient_is_the_gradient_of_the_top_singular_value():
    net = small_net()
    reg = SpectralRegularizer(net, 0.3, layers=[net[0], net[5]], initial_iterations=300)
    reg.loss(step=0).backward()
    estimated = [net[0].weight.grad.clone(), net[5].weight.grad.clone()]
    net.zero_grad()
    (0.3 * (exact_sigma(net[0]) + exact_sigma(net[5]))).backward()
    for grad, layer in zip(estimated, [net[0], net[5]]):
        assert torch.allclose(grad, layer.weight.grad, atol=1e-3 * layer.weight.grad.abs().max())
    assert net[3].weight.grad is None  # not in the list


def test_the_batch_norm_penalty_is_the_l1_norm_of_the_scales():
    torch.manual_seed(1)
    bn2d, bn_features, bn_plain = nn.BatchNorm2d(3), BatchNorm(4), nn.BatchNorm1d(5, affine=False)
    with torch.no_grad():
        bn2d.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
        bn_features.weight.copy_(torch.tensor([-0.25, 0.25, 3.0, 0.0]))
    linear = nn.Linear(2, 2)
    net = nn.Sequential(linear, bn2d, bn_features, bn_plain)
    reg = SpectralRegularizer(net, 0.5, initial_iterations=200)
    assert reg.batch_norm_penalty().item() == pytest.approx(3.5 + 3.5)
    assert reg.loss(step=0).item() == pytest.approx(0.5 * (exact_sigma(linear).item() + 7.0), rel=1e-4)
    reg.loss(step=0).backward()
    assert torch.equal(bn2d.weight.grad, 0.5 * torch.tensor([1.0, -1.0, 1.0]))


def test_the_strength_follows_its_schedule():
    constant = RegularizationSchedule(0.1)
    assert constant(0) == constant(10**6) == 0.1
    decay = RegularizationSchedule(0.01, initial=1.0, steps=100)
    assert [decay(t) for t in (0, 50, 100, 500)] == pytest.approx([1.0, 0.505, 0.01, 0.01])
    warmup = RegularizationSchedule(1.0, initial=0.0, steps=10)
    assert warmup(5) == pytest.approx(0.5)
    net = nn.Linear(3, 3)
    reg = SpectralRegularizer(net, decay, initial_iterations=200)
    sigma = exact_sigma(net).item()
    assert reg.loss(step=0).item() == pytest.approx(sigma, rel=1e-4)
    assert reg.loss(step=50).item() == pytest.approx(0.505 * sigma, rel=1e-4)


def test_a_weight_normalized_layer_is_regularized_through_its_parametrization():
    torch.manual_seed(2)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(2, 3, 3))
    reg = SpectralRegularizer(conv, 1.0, initial_iterations=300)
    assert weight_matrix(conv).shape == (3, 18)
    loss = reg.loss(step=0)
    assert loss.item() == pytest.approx(exact_sigma(conv).item(), rel=1e-3)
    loss.backward()
    assert conv.parametrizations.weight.original1.grad.abs().sum() > 0


def test_bad_arguments_are_named():
    net = small_net()
    with pytest.raises(ValueError, match="^layers: SiLU has no weight matrix to regularize"):
        SpectralRegularizer(net, 1.0, layers=[net[0], net[2]])
    with pytest.raises(ValueError, match="^module: Sequential has no convolution, linear or batch-norm layer"):
        SpectralRegularizer(nn.Sequential(nn.ReLU()), 1.0)
    with pytest.raises(ValueError, match="iterations must be a positive integer"):
        SpectralRegularizer(net, 1.0, iterations=0)
    with pytest.raises(ValueError, match="final must be a non-negative regularization weight"):
        RegularizationSchedule(-0.1)
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        RegularizationSchedule(0.1, initial=1.0, steps=2.5)
