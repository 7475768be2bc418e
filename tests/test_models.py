import math
import re
from pathlib import Path

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO

from exact import N, AffineGuide, LinearGaussian
from pyro_hvae import DELTA_LOG_SCALE_BOUNDS, LOG_SCALE_BOUNDS, BottomUpVAE, LadderVAE, bounded, get_traces
from pyro_hvae.infer.elbo import HierarchicalELBO
from pyro_hvae.likelihoods import Bernoulli, Categorical, LogisticMixture

SHAPE = (1, 6, 6)


def binary_batch(n=8, shape=SHAPE):
    return (torch.rand(n, *shape) > 0.5).float()


def small_ladder(latent_dims=(6, 4, 2), **kwargs):
    return LadderVAE(SHAPE, list(latent_dims), [16, 12], **kwargs)


@pytest.mark.parametrize("num_layers", [1, 2, 5])
@pytest.mark.parametrize(
    "likelihood, batch",
    [
        (Bernoulli(), lambda: binary_batch()),
        (Categorical(17), lambda: torch.randint(0, 17, (8, *SHAPE)) / 16.0),
        (LogisticMixture(2), lambda: torch.randint(0, 256, (8, *SHAPE)) / 255.0),
    ],
)
def test_shapes_and_sampling_for_every_depth_and_likelihood(num_layers, likelihood, batch):
    dims = [2 + num_layers - layer for layer in range(num_layers)]
    vae = small_ladder(dims, likelihood=likelihood)
    x = batch()
    samples = vae.guide(x)
    assert list(samples) == [f"z_{layer}" for layer in range(num_layers, 0, -1)] + ["x"]
    for layer, dim in enumerate(dims, start=1):
        assert samples[f"z_{layer}"].shape == (8, dim)
    # every residual posterior starts at its prior: the ELBO is E_q log p(x | z_1), KL = 0 per layer
    elbo = HierarchicalELBO()
    loss = elbo.loss(vae.model, vae.guide, x)
    model_trace, _ = vae.guide.get_traces()
    log_px_given_z = model_trace.nodes["x"]["fn"].log_prob(x)
    assert log_px_given_z.shape == (8,)
    assert loss == pytest.approx(-float(log_px_given_z.sum()), rel=1e-5)
    assert all(float(kl) == pytest.approx(0.0, abs=1e-6) for kl in elbo.terms["kl"].values())
    prior_draws = vae.sample(5, mean=False)
    assert prior_draws.shape == (5, *SHAPE)
    likelihood.check_support(prior_draws)
    assert vae.sample(5).shape == (5, *SHAPE)
    assert vae.reconstruct(x).shape == x.shape
    assert vae.latent_sites == [f"z_{layer}" for layer in range(1, num_layers + 1)]


def test_model_and_guide_share_the_top_down_networks():
    vae = small_ladder()
    model_params = {id(p) for p in vae.model.parameters()}
    guide_params = {id(p) for p in vae.guide.parameters()}
    assert model_params.isdisjoint(guide_params)  # the guide reuses the model's priors, owns no copy
    assert {id(p) for p in vae.parameters()} == model_params | guide_params
    loss = Trace_ELBO()(vae.model, vae.guide)
    assert {id(p) for p in loss.parameters()} == model_params | guide_params
    # q(z_l | z_{l+1}, x) = N(mu_l + dmu_l, sigma_l dsigma_l) around the model's own prior
    # p(z_l | z_{l+1}) = N(mu_l, sigma_l): changing the model's prior network moves the posterior
    heads = vae.guide.heads
    for head in heads:
        torch.nn.init.normal_(head.net[-1].weight, std=0.3)
    x = binary_batch(5)
    for _ in range(2):
        _, guide_trace = get_traces(vae.model, vae.guide, x)
        z_2 = guide_trace.nodes["z_2"]["value"]
        prior = vae.model.prior(1, z_2).base_dist
        dmu, raw = heads[0].net(vae.guide.bottom_up(x)[0]).chunk(2, -1)
        posterior = guide_trace.nodes["z_1"]["fn"].base_dist
        torch.testing.assert_close(posterior.loc, prior.loc + dmu)
        torch.testing.assert_close(posterior.scale, prior.scale * bounded(raw, *DELTA_LOG_SCALE_BOUNDS).exp())
        with torch.no_grad():
            vae.model.priors[0].net[-1].bias.add_(1.0)  # the second pass sees the moved prior


@pytest.mark.parametrize("posterior, flows", [("residual", 0), ("independent", 0), ("residual", 2)])
def test_gradients_reach_every_parameter_of_model_and_guide(posterior, flows):
    vae = small_ladder(posterior=posterior, flows=flows, batch_norm=True)
    if posterior == "residual":  # zero-initialized heads: move off zero so every path carries gradient
        for head in vae.guide.heads:
            torch.nn.init.normal_(head.net[-1].weight, std=0.1)
    for iaf in vae.guide.flows or ():  # so are the flows' output layers (identity at init)
        for flow in iaf.flows:
            torch.nn.init.normal_(flow.nn.layers[-1].weight, std=0.1)
    loss = Trace_ELBO()(vae.model, vae.guide)(binary_batch())
    loss.backward()
    missing = [name for name, p in vae.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_trace_elbo_and_mean_field_elbo_agree_in_expectation():
    vae = small_ladder()
    for head in vae.guide.heads:
        torch.nn.init.normal_(head.net[-1].weight, std=0.3)
    x = binary_batch(4)
    mc = Trace_ELBO(num_particles=4000, vectorize_particles=True).loss(vae.model, vae.guide, x)
    analytic = TraceMeanField_ELBO(num_particles=4000, vectorize_particles=True).loss(vae.model, vae.guide, x)
    assert mc == pytest.approx(analytic, rel=2e-3)


def test_hierarchical_elbo_equals_mean_field_elbo_and_keeps_per_layer_kl():
    vae = small_ladder()
    for head in vae.guide.heads:
        torch.nn.init.normal_(head.net[-1].weight, std=0.3)
    x = binary_batch(6)
    pyro.set_rng_seed(1)
    reference = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(1)
    elbo = HierarchicalELBO()
    ours = elbo.loss(vae.model, vae.guide, x)
    assert ours == pytest.approx(reference, rel=1e-5)
    assert set(elbo.terms["kl"]) == {"z_1", "z_2", "z_3"}
    assert all(kl > 0 for kl in elbo.terms["kl"].values())
    per_image = elbo.terms["reconstruction"] - sum(elbo.terms["kl"].values())
    assert float(per_image) * 6 == pytest.approx(-ours, rel=1e-5)


def test_free_bits_and_warm_up_change_only_the_kl_terms():
    vae = small_ladder()
    x = binary_batch(6)
    # at initialization every residual posterior equals its prior: KL = 0 at each layer
    pyro.set_rng_seed(2)
    plain = HierarchicalELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(2)
    floored = HierarchicalELBO(free_bits=0.5).loss(vae.model, vae.guide, x)
    assert floored - plain == pytest.approx(3 * 0.5 * 6, rel=1e-5)  # 3 layers x 0.5 nats x 6 images
    pyro.set_rng_seed(2)
    warm = HierarchicalELBO(free_bits=0.5, beta=0.1).loss(vae.model, vae.guide, x)
    assert warm - plain == pytest.approx(0.1 * 3 * 0.5 * 6, rel=1e-5)
    with pytest.raises(ValueError, match="beta must be > 0"):
        HierarchicalELBO(beta=0.0)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "sequential"])
@pytest.mark.parametrize("analytic_kl", [True, False], ids=["analytic_kl", "mc_kl"])
def test_elbo_with_several_particles_is_unbiased_and_averages_them(vectorize, analytic_kl):
    """On a linear-Gaussian hierarchy with an affine-Gaussian guide the ELBO is known in closed
    form: the P-particle estimate must be centred on it and spread like one particle's / sqrt(P)."""
    lg = LinearGaussian(noise=2.0)
    guide = AffineGuide(lg)
    exact = float(guide.exact_elbo(lg.x).sum())
    assert exact < float(lg.log_px.sum()) - 1  # a guide well short of the posterior

    def estimate(num_particles, seed):
        pyro.set_rng_seed(seed)
        elbo = HierarchicalELBO(num_particles, analytic_kl=analytic_kl, vectorize_particles=vectorize, max_plate_nesting=1)
        value = -elbo.loss(lg.model, guide, lg.x)
        assert float(elbo.terms["elbo"]) * N == pytest.approx(value, rel=1e-9)
        return value

    singles = torch.tensor([estimate(1, seed) for seed in range(60)], dtype=torch.float64)
    P, R = 16, 12
    averages = torch.tensor([estimate(P, 1000 + seed) for seed in range(R)], dtype=torch.float64)
    assert abs(float(averages.mean()) - exact) < 4 * float(singles.std()) / math.sqrt(P * R)
    ratio = float(averages.std() / singles.std())
    assert 0.12 < ratio < 0.45, ratio  # 1 / sqrt(16) = 0.25; one particle alone would give 1


@pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "sequential"])
def test_several_particles_through_the_ladder_networks_agree_with_single_draws(vectorize):
    """With vectorized particles every network sees a leading particle dim: the P-particle
    value must agree with the mean of P separately drawn single-particle values."""
    vae = small_ladder()
    for head in vae.guide.heads:
        torch.nn.init.normal_(head.net[-1].weight, std=0.3)
    x = binary_batch(5)
    singles = torch.tensor([HierarchicalELBO().loss(vae.model, vae.guide, x) for _ in range(100)])
    value = HierarchicalELBO(num_particles=100, vectorize_particles=vectorize).loss(vae.model, vae.guide, x)
    assert abs(value - float(singles.mean())) < 4 * float(singles.std()) * math.sqrt(2 / 100)


def test_predictive_and_data_plate():
    vae = small_ladder()
    x = binary_batch(5)
    trace = pyro.poutine.trace(vae.model).get_trace(x)
    frames = {f.name for f in trace.nodes["z_1"]["cond_indep_stack"]}
    assert frames == {"data"}
    predictive = Predictive(vae.model, guide=vae.guide, num_samples=3, return_sites=["z_1", "z_3"])
    draws = predictive(x)
    assert draws["z_1"].shape == (3, 5, 6) and draws["z_3"].shape == (3, 5, 2)


def test_same_seed_same_losses_on_cpu():
    def run():
        pyro.clear_param_store()
        pyro.set_rng_seed(123)
        vae = small_ladder(batch_norm=True, flows=1)
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        x = binary_batch(8)
        return [svi.step(x) for _ in range(5)]

    first, second = run(), run()
    assert first == second
    assert len(set(first)) > 1


def prototypes_batch(n=32, num_patterns=4, seed=1):
    """``n`` copies of ``num_patterns`` random binary patterns: learnable, unlike coin flips."""
    g = torch.Generator().manual_seed(seed)
    patterns = (torch.rand(num_patterns, *SHAPE, generator=g) > 0.5).float()
    return patterns[torch.randint(0, num_patterns, (n,), generator=g)]


def factorized_bernoulli_log_likelihood(x):
    """Mean ``log p(x)`` under the best model that ignores the latents on ``x`` itself:
    independent pixels with their empirical means. An ELBO above it needs ``z``."""
    p = x.mean(0).clamp(1e-6, 1 - 1e-6)
    return float((x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1).mean())


def test_classic_svi_and_torch_optim_paths_take_the_same_steps_and_train():
    def train(module_local_params):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        pyro.settings.set(module_local_params=module_local_params)
        vae = small_ladder()
        x = prototypes_batch()
        if module_local_params:
            loss_fn = HierarchicalELBO()(vae.model, vae.guide)
            optim = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
            for _ in range(30):
                optim.zero_grad()
                loss_fn(x).backward()
                optim.step()
            assert len(pyro.get_param_store()) == 0
        else:
            svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), HierarchicalELBO())
            for _ in range(30):
                svi.step(x)
            assert len(pyro.get_param_store()) == len(list(vae.parameters()))
        pyro.settings.set(module_local_params=False)
        return vae

    classic, local = train(False), train(True)
    for (name, a), b in zip(classic.named_parameters(), local.parameters()):
        torch.testing.assert_close(a, b, msg=name)
    x = prototypes_batch()
    pyro.set_rng_seed(0)
    untrained = small_ladder()
    elbo = lambda vae: -HierarchicalELBO(num_particles=200).loss(vae.model, vae.guide, x) / len(x)  # noqa: E731
    before, after = elbo(untrained), elbo(local)
    # untrained: about -36 ln 2 = -25 nats; a model ignoring z cannot pass the factorized bound
    assert after > factorized_bernoulli_log_likelihood(x) + 3 > before, (before, after)


@pytest.mark.parametrize("vae_class", [LadderVAE, BottomUpVAE])
def test_both_hierarchies_train_on_real_mnist(vae_class, mnist_binary):
    pyro.set_rng_seed(0)
    vae = vae_class((1, 28, 28), [16, 8], [128, 64], batch_norm=True)
    analytic = vae_class is LadderVAE  # the bottom-up guide breaks the mean-field order
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 2e-3}), HierarchicalELBO(analytic_kl=analytic))
    x = mnist_binary[:256]
    check = HierarchicalELBO(num_particles=10, analytic_kl=analytic)
    evaluate = lambda: check.loss(vae.model, vae.guide, x) / len(x)  # noqa: E731
    vae.eval()
    start = evaluate()
    vae.train()
    for _ in range(3):
        for batch in x.split(64):
            for _ in range(25):
                svi.step(batch)
    vae.eval()
    end = evaluate()
    # untrained: about 544 nats (784 ln 2). The best model that ignores z (independent pixels at
    # their empirical means on these very images) reaches about -198 nats; the ELBO must beat it
    assert -end > factorized_bernoulli_log_likelihood(x) + 30, (start, end)
    assert all(float(kl) > 1 for kl in check.terms["kl"].values())  # every layer carries information


def test_bottom_up_elbo_is_log_p_minus_log_q_of_its_conditionals():
    """The bottom-up guide ``q(z_1 | x) q(z_2 | z_1)`` against ``p(z_2) p(z_1 | z_2) p(x | z_1)``,
    assembled by hand from the networks at the guide's own sample; Pyro's ``Trace_ELBO``
    must give the same number."""
    vae = BottomUpVAE(SHAPE, [4, 2], [16, 12])
    x = binary_batch(5)
    pyro.set_rng_seed(3)
    value = -HierarchicalELBO(analytic_kl=False).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(3)
    pyro_value = -Trace_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(3)
    _, guide_trace = get_traces(vae.model, vae.guide, x)
    z_1, z_2 = guide_trace.nodes["z_1"]["value"], guide_trace.nodes["z_2"]["value"]

    def normal(conditional, inputs):  # [mu, raw log sigma] = MLP(inputs), log sigma kept inside its bounds
        loc, raw = conditional.net(inputs).chunk(2, -1)
        return torch.distributions.Normal(loc, bounded(raw, *LOG_SCALE_BOUNDS).exp())

    with torch.no_grad():
        log_q = normal(vae.guide.posteriors[0], x.flatten(1)).log_prob(z_1).sum(-1)
        log_q += normal(vae.guide.posteriors[1], z_1).log_prob(z_2).sum(-1)
        log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z_2).sum(-1)
        log_p += normal(vae.model.priors[0], z_2).log_prob(z_1).sum(-1)
        log_p += torch.distributions.Bernoulli(logits=vae.model.decoder(z_1)).log_prob(x.flatten(1)).sum(-1)
    expected = float((log_p - log_q).sum())
    assert value == pytest.approx(expected, rel=1e-5)
    assert pyro_value == pytest.approx(expected, rel=1e-5)


def test_bottom_up_vae_order_warns_under_analytic_kl():
    vae = BottomUpVAE(SHAPE, [4, 2], [8])
    with pytest.warns(UserWarning, match="analytic KL assumes the guide samples latents in the model's order"):
        HierarchicalELBO().loss(vae.model, vae.guide, binary_batch())


def test_custom_three_level_hierarchy_from_public_blocks_trains_with_svi():
    from pyro_hvae import MLP, ConditionalNormal, FeatureNet, residual_normal
    from pyro_hvae import Bernoulli as BernoulliHead

    class ThreeLevel(torch.nn.Module):
        """p(z3) p(z2|z3) p(z1|z2) p(x|z1); q shifts each prior by bottom-up features."""

        def __init__(self):
            super().__init__()
            self.p_z2, self.p_z1 = ConditionalNormal(2, [16], 3), ConditionalNormal(3, [16], 4)
            self.decoder, self.likelihood = MLP(4, [16], 36), BernoulliHead()
            self.encoder = FeatureNet(36, [16])
            self.deltas = torch.nn.ModuleList(MLP(16, [], 2 * d) for d in (2, 3, 4))

        def model(self, x):
            pyro.module("three_level", self)
            with pyro.plate("data", x.shape[0]):
                z3 = pyro.sample("z3", pyro.distributions.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
                z2 = pyro.sample("z2", self.p_z2(z3))
                z1 = pyro.sample("z1", self.p_z1(z2))
                pyro.sample("x", self.likelihood.distribution(self.decoder(z1), SHAPE), obs=x)

        def guide(self, x):
            pyro.module("three_level", self)
            r = self.encoder(x.flatten(1))
            shifts = [d(r).chunk(2, -1) for d in self.deltas]
            with pyro.plate("data", x.shape[0]):
                top = pyro.distributions.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1)
                z3 = pyro.sample("z3", residual_normal(top, *shifts[0]))
                z2 = pyro.sample("z2", residual_normal(self.p_z2(z3), *shifts[1]))
                pyro.sample("z1", residual_normal(self.p_z1(z2), *shifts[2]))

    net = ThreeLevel()
    x = prototypes_batch(64)
    svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    for _ in range(150):
        svi.step(x)
    elbo = -TraceMeanField_ELBO(num_particles=200, vectorize_particles=True).loss(net.model, net.guide, x) / 64
    # four equally likely patterns: log p(x) <= log(1/4); ignoring z caps it at the factorized bound
    assert factorized_bernoulli_log_likelihood(x) + 3 < elbo < math.log(1 / 4), elbo


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: LadderVAE(SHAPE, []), r"latent_dims must be a non-empty list"),
        (lambda: LadderVAE(SHAPE, [4, -2]), r"latent_dims must contain positive integers"),
        (lambda: LadderVAE(SHAPE, [4], [16, 0]), r"hidden_dims must contain positive integers"),
        (lambda: LadderVAE((1, -6, 6), [4]), r"data_shape must contain positive integers"),
        (lambda: LadderVAE(SHAPE, [4], posterior="ladder"), r"posterior must be 'residual' or 'independent'"),
        (lambda: LadderVAE(SHAPE, [4], flows=-1), r"flows must be a non-negative integer"),
        (lambda: BottomUpVAE(SHAPE, []), r"latent_dims must be a non-empty list"),
    ],
)
def test_bad_construction_arguments_raise_value_errors_naming_them(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_inputs_raise_value_errors_naming_them():
    vae = small_ladder()
    with pytest.raises(ValueError, match=r"x: expected shape \[N, 1, 6, 6\].*got \[6, 6\]"):
        vae.guide(torch.zeros(6, 6))
    with pytest.raises(ValueError, match=r"x: the Bernoulli likelihood needs binary pixels"):
        vae.guide(torch.full((2, *SHAPE), 0.5))
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer"):
        vae.sample(0)


def test_nothing_in_the_package_hard_codes_cuda():
    package = Path(__file__).resolve().parents[1] / "pyro_hvae"
    offenders = [p.name for p in package.rglob("*.py") if re.search(r"\.cuda\(", p.read_text())]
    assert not offenders


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_moves_everything():
    vae = small_ladder(flows=1, batch_norm=True).to("cuda")
    x = binary_batch().to("cuda")
    loss = HierarchicalELBO(num_particles=2)(vae.model, vae.guide)(x)
    assert loss.device.type == "cuda"
    assert vae.sample(3).device.type == "cuda"


def test_per_layer_kl_of_the_last_run_is_available_without_re_running():
    from pyro_hvae.infer.diagnostics import kl_per_site

    vae = small_ladder()
    for head in vae.guide.heads:
        torch.nn.init.normal_(head.net[-1].weight, std=0.3)
    x = binary_batch(5)
    loss = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    model_trace, guide_trace = vae.guide.get_traces()  # the traces of that very loss evaluation
    kls = kl_per_site(model_trace, guide_trace)
    assert set(kls) == {"z_1", "z_2", "z_3"} and all(kl.shape == (5,) for kl in kls.values())
    log_px = model_trace.nodes["x"]["fn"].log_prob(x).sum()
    assert float((log_px - sum(kl.sum() for kl in kls.values())).detach()) == pytest.approx(-loss, rel=1e-5)
