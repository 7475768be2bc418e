import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_hvae.spatial_flows import (
    FLOW_LOG_SCALE_BOUNDS,
    ChannelAutoregressiveNet,
    ConditionalSpatialAffineAutoregressive,
    SpatialIAF,
)


def perturb(module: torch.nn.Module, size: float = 0.3) -> None:
    """Move every parameter (the zero output layer too) away from its initial value."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(size * torch.randn_like(param))


def jacobian_blocks(transform, z):
    """|dz'/dz| as [C, H*W, C, H*W] for one latent z [C, H, W]."""
    C, H, W = z.shape
    return torch.autograd.functional.jacobian(transform, z).reshape(C, H * W, C, H * W)


def test_the_flow_is_exactly_the_identity_at_initialisation():
    torch.manual_seed(0)
    flows = SpatialIAF(4, 6, num_flows=3, hidden_channels=[16, 16])
    z = torch.randn(5, 4, 3, 3)
    context = torch.randn(5, 6, 3, 3)
    for flow in flows.flows:
        transform = flow.condition(context)
        assert torch.equal(transform(z), z)
        assert torch.equal(transform.log_abs_det_jacobian(z, z), torch.zeros(5))
    base = dist.Normal(torch.randn(5, 4, 3, 3), torch.rand(5, 4, 3, 3) + 0.5).to_event(3)
    flowed = flows(base, context)
    assert torch.equal(flowed.log_prob(z), base.log_prob(z))


@pytest.mark.parametrize("kernel_size, hidden", [(1, [8]), (3, [8, 8])])
def test_log_det_equals_the_log_determinant_of_the_full_jacobian(kernel_size, hidden):
    torch.manual_seed(1)
    flow = ConditionalSpatialAffineAutoregressive(2, 3, hidden, kernel_size=kernel_size).double()
    perturb(flow)
    z = torch.randn(2, 2, 2, dtype=torch.float64)
    transform = flow.condition(torch.randn(3, 2, 2, dtype=torch.float64))
    jacobian = torch.autograd.functional.jacobian(transform, z).reshape(8, 8)
    sign, log_det = torch.linalg.slogdet(jacobian)
    assert sign != 0
    log_det_flow = transform.log_abs_det_jacobian(z, transform(z))
    assert log_det_flow.shape == ()
    assert log_det_flow.item() == pytest.approx(log_det.item(), abs=1e-10)
    assert abs(log_det.item()) > 0.1  # the perturbed flow is not volume preserving


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [1, 2, 0]])
def test_the_jacobian_is_triangular_in_the_channel_order(order):
    torch.manual_seed(2)
    flow = ConditionalSpatialAffineAutoregressive(3, 2, [12, 12], order=order).double()
    perturb(flow)
    z = torch.randn(3, 3, 3, dtype=torch.float64)
    transform = flow.condition(torch.randn(2, 3, 3, dtype=torch.float64))
    blocks = jacobian_blocks(transform, z)[order][:, :, order]  # channels in the flow's order
    for out in range(3):
        for inp in range(3):
            block = blocks[out, :, inp]
            if inp > out:
                assert torch.equal(block, torch.zeros_like(block))  # a later channel is never seen
            elif inp == out:
                assert torch.equal(block, torch.diag(block.diagonal()))  # only the value itself
                assert (block.diagonal() > 0).all()
            else:
                assert block.abs().max() > 1e-3  # earlier channels (all positions, 3x3 kernel) are


def test_alternate_flows_reverse_the_channel_order():
    flows = SpatialIAF(3, 2, num_flows=3)
    assert [flow.net.order for flow in flows.flows] == [[0, 1, 2], [2, 1, 0], [0, 1, 2]]


def test_the_inverse_undoes_the_flow():
    torch.manual_seed(3)
    flow = ConditionalSpatialAffineAutoregressive(4, 2, [16]).double()
    perturb(flow)
    transform = flow.condition(torch.randn(6, 2, 5, 5, dtype=torch.float64))
    z = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    y = transform(z)
    z_back = transform.inv(y.clone())  # a new tensor: not answered from the cache
    assert torch.allclose(z_back, z, atol=1e-9)
    assert torch.allclose(transform.log_abs_det_jacobian(z_back, y), transform.log_abs_det_jacobian(z, y))


def test_transformed_log_prob_is_the_change_of_variables():
    torch.manual_seed(4)
    flows = SpatialIAF(2, 3, num_flows=2, hidden_channels=[8]).double()
    perturb(flows)
    context = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    base = dist.Normal(torch.zeros(4, 2, 2, 2, dtype=torch.float64), 1.0).to_event(3)
    flowed = flows(base, context)
    assert flowed.batch_shape == (4,) and flowed.event_shape == (2, 2, 2)
    y = torch.randn(4, 2, 2, 2, dtype=torch.float64)  # not a sample: log_prob must invert
    first, second = (flow.condition(context) for flow in flows.flows)
    z1 = second.inv(y.clone())
    z0 = first.inv(z1.clone())
    expected = base.log_prob(z0) - first.log_abs_det_jacobian(z0, z1) - second.log_abs_det_jacobian(z1, y)
    assert torch.allclose(flowed.log_prob(y), expected)


def test_a_leading_particle_dimension_broadcasts_against_the_context():
    torch.manual_seed(5)
    flow = ConditionalSpatialAffineAutoregressive(3, 2, [9])
    perturb(flow)
    context = torch.randn(4, 2, 3, 3)
    z = torch.randn(7, 4, 3, 3, 3)  # [particles, batch, C, H, W]
    transform = flow.condition(context)
    y = transform(z)
    log_det = transform.log_abs_det_jacobian(z, y)
    assert y.shape == z.shape and log_det.shape == (7, 4)
    for p in (0, 6):
        one = flow.condition(context)
        assert torch.allclose(one(z[p]), y[p], atol=1e-6)
        assert torch.allclose(one.log_abs_det_jacobian(z[p], one(z[p])), log_det[p], atol=1e-5)


def test_gradients_reach_the_flow_the_context_and_the_base():
    torch.manual_seed(6)
    flows = SpatialIAF(2, 3, num_flows=2, hidden_channels=[8])
    loc = torch.zeros(5, 2, 4, 4, requires_grad=True)
    context = torch.randn(5, 3, 4, 4, requires_grad=True)

    def loss():
        flowed = flows(dist.Normal(loc, 1.0).to_event(3), context)
        z = flowed.rsample()
        return (flowed.log_prob(z) + z.pow(2).sum((-3, -2, -1))).mean()

    loss().backward()
    # at initialisation only the zero output layers receive a gradient; it leaves zero
    for flow in flows.flows:
        assert flow.net.output.weight.grad.abs().sum() > 0
    assert loc.grad.abs().sum() > 0
    perturb(flows)
    flows.zero_grad()
    context.grad = None
    loss().backward()
    for name, param in flows.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert context.grad.abs().sum() > 0


def test_the_log_scale_stays_inside_its_bounds():
    torch.manual_seed(7)
    flow = ConditionalSpatialAffineAutoregressive(2, 1, [8])
    perturb(flow, size=50.0)
    z = torch.randn(3, 2, 4, 4)
    transform = flow.condition(torch.randn(3, 1, 4, 4))
    log_det = transform.log_abs_det_jacobian(z, transform(z))
    low, high = FLOW_LOG_SCALE_BOUNDS
    assert (log_det >= 32 * low).all() and (log_det <= 32 * high).all()
    assert torch.isfinite(transform(z)).all()


def test_a_flowed_posterior_is_a_pyro_site():
    torch.manual_seed(8)
    flows = SpatialIAF(2, 3, num_flows=2)
    perturb(flows)
    context = torch.randn(4, 3, 2, 2)

    def guide():
        with pyro.plate("data", 4):
            return pyro.sample("z", flows(dist.Normal(torch.zeros(4, 2, 2, 2), 1.0).to_event(3), context))

    with pyro.validation_enabled():
        trace = pyro.poutine.trace(guide).get_trace()
    trace.compute_log_prob()
    assert trace.nodes["z"]["value"].shape == (4, 2, 2, 2)
    assert trace.nodes["z"]["log_prob"].shape == (4,)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_flows must be a positive integer"):
        SpatialIAF(2, 3, num_flows=0)
    with pytest.raises(ValueError, match="order must be a permutation of range"):
        ChannelAutoregressiveNet(3, 1, [6], order=[0, 0, 1])
    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer"):
        ChannelAutoregressiveNet(3, 1, [6], kernel_size=2)
    transform = ConditionalSpatialAffineAutoregressive(2, 1).condition(torch.randn(1, 3, 3))
    with pytest.raises(ValueError, match=r"^context: a spatial flow needs a context map of the latent's size"):
        transform(torch.randn(2, 4, 4))
