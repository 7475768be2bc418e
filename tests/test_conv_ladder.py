import math
import weakref

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import Normal, kl_divergence

from pyro_hvae import Categorical, ConvLadderVAE, CoupledLogisticMixture, HierarchicalELBO, log_likelihood
from pyro_hvae.cells import (
    BottleneckBlock,
    DecoderCell,
    Downsample,
    EncoderCell,
    PointwiseConv,
    Upsample,
)
from pyro_hvae.models.conv_ladder import TOP_DOWN_STATE, OutputHead
from pyro_hvae.spatial_latents import (
    ResidualNormalDistribution,
    SpatialPrior,
    SpatialResidualPosterior,
    spatial_residual_normal_kl,
)


def binary_images(n, shape):
    return (torch.rand(n, *shape) < 0.3).float()


def tiny(data_shape=(1, 8, 8), scales=(4, 2), **kwargs):
    kwargs = dict(groups_per_scale=2, latent_channels=2, widths=8) | kwargs
    return ConvLadderVAE(data_shape, list(scales), **kwargs)


def perturb_posteriors(vae, std=0.3):
    """Move the zero-initialized posterior heads off zero, so q differs from p."""
    for head in vae.guide.posteriors:
        torch.nn.init.normal_(head.net.net[-1].weight, std=std)


@pytest.mark.parametrize(
    "data_shape, scales, groups, channels, widths",
    [
        ((1, 28, 28), [14, 7], [1, 2], [3, 2], [8, 12]),
        ((1, 28, 28), [28, 14, 7], 1, 2, 8),
        ((3, 32, 32), [32, 16, 8], [1, 1, 2], 2, [8, 8, 16]),
        ((3, 32, 32), [16, 8, 4], 2, [4, 3, 2], 8),
    ],
)
def test_sites_have_spatial_events_at_their_scale(data_shape, scales, groups, channels, widths):
    vae = ConvLadderVAE(data_shape, scales, groups_per_scale=groups, latent_channels=channels, widths=widths)
    groups = groups if isinstance(groups, list) else [groups] * len(scales)
    channels = channels if isinstance(channels, list) else [channels] * len(scales)
    # bottom first: z_1 .. z_L with the scale and channels of each
    expected = [(c, s, s) for s, c, g in zip(scales, channels, groups) for _ in range(g)]
    x = binary_images(4, data_shape)
    samples = vae.guide(x)
    L = len(expected)
    assert list(samples) == [f"z_{layer}" for layer in range(L, 0, -1)] + ["x"]
    assert vae.latent_sites == [f"z_{layer}" for layer in range(1, L + 1)]
    model_trace, guide_trace = vae.guide.get_traces()
    for layer, event in enumerate(expected, start=1):
        site = guide_trace.nodes[f"z_{layer}"]
        assert samples[f"z_{layer}"].shape == (4, *event)
        assert site["fn"].batch_shape == (4,) and site["fn"].event_shape == event
        assert model_trace.nodes[f"z_{layer}"]["fn"].event_shape == event
    assert model_trace.nodes["x"]["fn"].event_shape == data_shape
    draws = vae.sample(3, mean=False)
    assert draws.shape == (3, *data_shape)
    vae.model.likelihood.check_support(draws)
    assert vae.reconstruct(x).shape == x.shape
    elbo = HierarchicalELBO()
    elbo.loss(vae.model, vae.guide, x)
    # zero-initialized posterior heads: every posterior starts at its prior
    assert all(kl == 0 for kl in elbo.terms["kl"].values())
    assert math.isfinite(elbo.terms["elbo"])


def test_output_head_channels_reach_the_likelihood_value_by_value(monkeypatch):
    # channel c * k + j of the head is feature j of colour channel c at every pixel
    vae = tiny(data_shape=(2, 8, 8), likelihood=Categorical(3))
    c, h, w = torch.meshgrid(torch.arange(2), torch.arange(8), torch.arange(8), indexing="ij")
    best = (c + h + w) % 3  # the level each value should favour
    head_out = torch.nn.functional.one_hot(best, 3).movedim(-1, 1).reshape(6, 8, 8).float()
    monkeypatch.setattr(vae.model.head, "forward", lambda state: head_out.expand(*state.shape[:-3], 6, 8, 8))
    observation = vae.model.observation(torch.zeros(5, 8, 4, 4))
    assert observation.batch_shape == (5,) and observation.event_shape == (2, 8, 8)
    assert torch.equal(observation.base_dist.logits.argmax(-1), best.expand(5, 2, 8, 8))


def test_coupled_colour_likelihood_gets_its_per_pixel_feature_maps():
    # 8-bit RGB: 10 * M feature maps per pixel, read whole by the coupled mixture
    likelihood = CoupledLogisticMixture(num_mixtures=2)
    vae = tiny(data_shape=(3, 8, 8), likelihood=likelihood)
    assert vae.model.head.out[-1].out_channels == likelihood.features_per_pixel(3) == 20
    x = torch.randint(0, 256, (4, 3, 8, 8)).float() / 255
    loss = HierarchicalELBO()(vae.model, vae.guide)(x)
    assert torch.isfinite(loss)
    observation = vae.model.observation(torch.zeros(4, 8, 4, 4))
    assert observation.batch_shape == (4,) and observation.event_shape == (3, 8, 8)


def random_residual_pair(shape=(2, 3, 4, 4), seed=0, delta_std=0.5):
    g = torch.Generator().manual_seed(seed)
    prior = pyro.distributions.Normal(torch.randn(shape, generator=g), torch.rand(shape, generator=g) + 0.1)
    delta_loc = delta_std * torch.randn(shape, generator=g)
    delta_log_scale = delta_std * torch.randn(shape, generator=g)
    return prior, ResidualNormalDistribution(prior, delta_loc, delta_log_scale)


def test_group_kl_is_the_closed_form_of_torch_and_matches_monte_carlo():
    prior, q = random_residual_pair()
    p, q3 = prior.to_event(3), q.to_event(3)
    reference = kl_divergence(Normal(q.loc, q.scale), Normal(prior.loc, prior.scale)).sum((-3, -2, -1))
    residual = spatial_residual_normal_kl(q.delta_loc, q.delta_log_scale, prior.scale)
    assert torch.allclose(kl_divergence(q3, p), reference, rtol=1e-5)
    assert torch.allclose(residual, reference, rtol=1e-5)
    z = q3.sample((20000,))
    log_ratio = q3.log_prob(z) - p.log_prob(z)
    monte_carlo, stderr = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(len(z))
    assert ((monte_carlo - reference).abs() < 4 * stderr).all()


def test_residual_kl_stays_accurate_where_the_posterior_is_close_to_its_prior():
    # float32, the posterior a hair away from a prior with a large mean: mu_q - mu_p and
    # sigma_q / sigma_p lose most digits; the residual form keeps them
    shape = (1, 2, 3, 3)
    prior = pyro.distributions.Normal(torch.full(shape, 4.9), torch.full(shape, 0.05))
    delta_loc, delta_log_scale = torch.full(shape, 1e-5), torch.full(shape, 1e-4)
    q = ResidualNormalDistribution(prior, delta_loc, delta_log_scale).to_event(3)
    exact = spatial_residual_normal_kl(delta_loc.double(), delta_log_scale.double(), prior.scale.double())
    assert kl_divergence(q, prior.to_event(3)).item() == pytest.approx(exact.item(), rel=1e-3)


def test_kl_against_another_normal_is_the_usual_closed_form():
    prior, q = random_residual_pair()
    other = pyro.distributions.Normal(prior.loc + 0.3, prior.scale * 2)
    reference = kl_divergence(Normal(q.loc, q.scale), Normal(other.loc, other.scale))
    assert torch.allclose(kl_divergence(q, other), reference, rtol=1e-5)
    expanded = q.expand((5, *q.batch_shape))  # as a particle plate does
    assert isinstance(expanded, ResidualNormalDistribution)
    assert torch.allclose(kl_divergence(expanded, prior.expand(expanded.batch_shape)), kl_divergence(q, prior).expand(5, -1, -1, -1, -1))


def test_posteriors_are_soft_bounded_with_a_scale_floor():
    prior_net, posterior_net = SpatialPrior(8, 2), SpatialResidualPosterior(8, 8, 2)
    for net in (prior_net.net, posterior_net.net):
        torch.nn.init.normal_(net.net[-1].weight, std=100.0)  # absurd raw outputs
    state, features = 10 * torch.randn(3, 8, 4, 4), 10 * torch.randn(3, 8, 4, 4)
    prior, _ = prior_net(state)
    q, context = posterior_net(prior, state, features)
    base = q.base_dist
    assert prior.base_dist.loc.abs().max() <= 5 and prior.base_dist.scale.min() >= 1e-2
    assert prior.base_dist.scale.max() <= 1e-2 + math.exp(5)
    assert base.delta_loc.abs().max() <= 5 and base.delta_log_scale.abs().max() <= 5
    assert context.shape == (3, 16, 4, 4)
    assert torch.isfinite(kl_divergence(q, prior)).all()


def test_mean_field_elbo_and_hierarchical_elbo_give_the_same_analytic_loss():
    vae = tiny()
    perturb_posteriors(vae)
    x = binary_images(4, (1, 8, 8))
    pyro.set_rng_seed(1)
    mean_field = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(1)
    hierarchical = HierarchicalELBO().loss(vae.model, vae.guide, x)
    assert hierarchical == pytest.approx(mean_field, rel=1e-5)


def test_monte_carlo_and_analytic_elbo_agree_in_expectation():
    vae = tiny()
    perturb_posteriors(vae)
    vae.eval()
    x = binary_images(2, (1, 8, 8))
    mc = Trace_ELBO(num_particles=2000, vectorize_particles=True).loss(vae.model, vae.guide, x)
    analytic = TraceMeanField_ELBO(num_particles=2000, vectorize_particles=True).loss(vae.model, vae.guide, x)
    assert mc == pytest.approx(analytic, rel=5e-3)


def test_model_and_guide_share_one_top_down_state_per_step():
    vae = tiny(data_shape=(1, 16, 16), scales=(8, 4, 2), groups_per_scale=[2, 1, 2])
    perturb_posteriors(vae)
    counted = (DecoderCell, SpatialPrior, BottleneckBlock, PointwiseConv, Upsample, Downsample, EncoderCell, OutputHead)
    calls = {}
    for name, module in vae.named_modules():
        if isinstance(module, counted):
            calls[name] = 0
            module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    states_seen, states_made = [], []  # in site order z_L .. z_1
    for head in vae.guide.posteriors:
        head.register_forward_hook(lambda m, inputs, o: states_seen.append(inputs[1]))
    for module in vae.model.modules():
        if isinstance(module, SpatialPrior):
            module.register_forward_hook(lambda m, inputs, o: states_made.append(inputs[0]))

    for num_particles in (1, 3):
        calls.update({name: 0 for name in calls})
        loss_fn = HierarchicalELBO(num_particles=num_particles, max_plate_nesting=1)(vae.model, vae.guide)
        loss_fn(binary_images(4, (1, 16, 16))).backward()
        assert calls and set(calls.values()) == {1}, {n: c for n, c in calls.items() if c != 1}
    assert len([name for name in calls if name.endswith(".cell")]) == vae.model.num_layers
    # the guide conditioned on exactly the state the model computed for each site's prior,
    # and took it out of the site, so that the traces do not keep it alive
    states_seen.clear(), states_made.clear()
    vae.guide(binary_images(4, (1, 16, 16)))
    model_trace, guide_trace = vae.guide.get_traces()
    assert len(states_seen) == len(states_made) == vae.model.num_layers
    assert all(seen is made for seen, made in zip(states_seen, states_made))
    for site in vae.latent_sites:
        assert TOP_DOWN_STATE not in model_trace.nodes[site]["infer"]
        # each posterior is built around the model's own prior: its KL takes the residual form
        assert guide_trace.nodes[site]["fn"].base_dist.prior is model_trace.nodes[site]["fn"].base_dist


def test_importance_sampling_frees_each_groups_prior_and_posterior_within_a_pass():
    # log_likelihood keeps each site's log densities, not its distributions: by the time the
    # output head runs, no prior or posterior of the pass is alive (full traces would hold
    # all 2 L), except in the plain first pass, whose traces are checked for the plates
    vae = tiny()
    perturb_posteriors(vae)
    vae.eval()
    made, alive = [], []
    for module in [*vae.model.modules(), *vae.guide.posteriors]:
        if isinstance(module, (SpatialPrior, SpatialResidualPosterior)):
            module.register_forward_hook(lambda m, i, out: made.append(weakref.ref(out[0].base_dist.loc)))

    def count_alive(module, inputs):
        alive.append(sum(ref() is not None for ref in made))
        made.clear()

    vae.model.head.register_forward_pre_hook(count_alive)
    log_likelihood(vae.model, vae.guide, binary_images(3, (1, 8, 8)), num_samples=9, chunk_size=4)
    assert alive == [2 * vae.model.num_layers, 0, 0]


@pytest.mark.parametrize("elbo", [Trace_ELBO(), TraceMeanField_ELBO()], ids=["trace", "mean_field"])
def test_one_svi_step_with_pyros_elbos_updates_model_and_guide(elbo):
    vae = tiny()
    perturb_posteriors(vae)
    before = {name: p.detach().clone() for name, p in vae.named_parameters()}
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    loss = svi.step(binary_images(4, (1, 8, 8)))
    assert math.isfinite(loss)
    changed = {name for name, p in vae.named_parameters() if not torch.equal(p, before[name])}
    assert "model.top_input" in changed
    assert any(name.startswith("guide.encoder.") for name in changed)
    assert any(name.startswith("guide.posteriors.") for name in changed)


def test_predictive_draws_posterior_latents_and_images():
    vae = tiny().eval()
    x = binary_images(3, (1, 8, 8))
    draws = Predictive(vae.model, guide=vae.guide, num_samples=2)(x)
    assert draws["z_1"].shape == (2, 3, 2, 4, 4)
    assert draws["z_4"].shape == (2, 3, 2, 2, 2)
    prior_draws = Predictive(vae.model, num_samples=2)(batch_size=5)
    assert prior_draws["x"].shape == (2, 5, 1, 8, 8)


def test_conv_layers_lists_every_convolution_of_model_and_guide():
    vae = tiny()
    listed = {id(layer.weight) for layer in vae.conv_layers()}
    kernels = {id(p) for p in vae.parameters() if p.dim() == 4}
    assert listed == kernels
    assert kernels & {id(p) for p in vae.model.parameters()} and kernels & {id(p) for p in vae.guide.parameters()}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scales=[10, 5]), r"^scales: 10 does not divide the image height 28"),
        (dict(scales=[14, 6]), r"^scales: 6 does not divide the scale below it, 14"),
        (dict(scales=[7, 14]), r"^scales must be strictly decreasing"),
        (dict(scales=[]), r"^scales must be a non-empty list"),
        (dict(groups_per_scale=0), r"^groups_per_scale must be positive integers, got 0; give every scale"),
        (dict(groups_per_scale=[2, 0]), r"^groups_per_scale must be positive integers"),
        (dict(groups_per_scale=[2, 2, 2]), r"^groups_per_scale has 3 entries but there are 2 scales"),
        (dict(widths=18), r"^widths: 18 is not divisible by 4 .*use multiples of 4"),
        (dict(widths=[16]), r"^widths has 1 entries but there are 2 scales"),
        (dict(latent_channels=0), r"^latent_channels must be positive integers"),
        (dict(encoder_cells=0), r"^encoder_cells must be a positive integer"),
        (dict(data_shape=(784,)), r"^data_shape must be \(channels, height, width\)"),
        (dict(data_shape=(1, 28, 30)), r"^scales: the image width 30 is not divisible by the down-sampling factor 4"),
    ],
)
def test_bad_arguments_raise_one_line_naming_the_argument_and_the_fix(kwargs, message):
    arguments = dict(data_shape=(1, 28, 28), scales=[14, 7], groups_per_scale=1, widths=8) | kwargs
    with pytest.raises(ValueError, match=message) as error:
        ConvLadderVAE(arguments.pop("data_shape"), arguments.pop("scales"), **arguments)
    assert "\n" not in str(error.value)


def test_wrong_data_shape_is_refused_by_model_and_guide():
    vae = tiny()
    with pytest.raises(ValueError, match=r"expected shape \[N, 1, 8, 8\]"):
        vae.guide(binary_images(2, (1, 8, 9)))


# --- a 30-group model on real MNIST -------------------------------------------------------

DEEP = dict(groups_per_scale=[6, 24], latent_channels=4, widths=16)


def eval_elbo(vae, x):
    """The ELBO per image in eval mode (batch norm on running statistics), fixed seed."""
    vae.eval()
    pyro.set_rng_seed(123)
    elbo = HierarchicalELBO()
    elbo.loss(vae.model, vae.guide, x)
    vae.train()
    return elbo.terms["elbo"].item()


@pytest.fixture(scope="module")
def trained_deep_vae(mnist_binary):
    """30 groups over 14x14 and 7x7, trained 50 steps of 16 real digits (cycling through 448
    of them); the ELBO on 64 other digits before and after."""
    pyro.set_rng_seed(0)
    with pyro.settings.context(module_local_params=True):
        vae = ConvLadderVAE((1, 28, 28), [14, 7], **DEEP)
        train, held_out = mnist_binary[:448], mnist_binary[448:]
        before = eval_elbo(vae, held_out)
        loss_fn = HierarchicalELBO()(vae.model, vae.guide)
        optimizer = torch.optim.Adamax(loss_fn.parameters(), lr=2e-3)
        losses = []
        for step in range(50):
            batch = train[16 * (step % 28) : 16 * (step % 28 + 1)]
            optimizer.zero_grad()
            loss = loss_fn(batch)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        after = eval_elbo(vae, held_out)
    return vae, losses, before, after, held_out


@pytest.mark.slow
def test_a_30_group_model_trains_on_mnist_without_nan(trained_deep_vae):
    vae, losses, before, after, _ = trained_deep_vae
    assert vae.model.num_layers == 30
    assert all(math.isfinite(loss) for loss in losses)
    print(f"held-out ELBO per image: {before:.1f} before, {after:.1f} after")
    assert math.isfinite(after) and after > before + 20  # nats per image


@pytest.mark.slow
def test_importance_weighted_estimate_rises_with_the_number_of_samples(trained_deep_vae):
    vae, _, _, _, held_out = trained_deep_vae
    vae.eval()
    x = held_out[:8]
    pyro.set_rng_seed(0)
    k1 = log_likelihood(vae.model, vae.guide, x, num_samples=1)
    pyro.set_rng_seed(0)
    k50 = log_likelihood(vae.model, vae.guide, x, num_samples=50)
    vae.train()
    assert k1.shape == k50.shape == (8,)
    assert k50.mean() > k1.mean()
