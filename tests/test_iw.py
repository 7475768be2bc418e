import math

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.poutine.guide import GuideMessenger

from exact import DX, DZ1, DZ2, N, AffineGuide, LinearGaussian, grid_log_marginal
from pyro_hvae import IAF, BottomUpVAE, ConvLadderVAE, LadderVAE
from pyro_hvae.infer.iw import get_traces, log_likelihood


class ExactPosteriorMessenger(GuideMessenger):
    def __init__(self, lg):
        super().__init__(lg.model)
        self.lg = lg

    def get_posterior(self, name, prior):
        if name == "z2":
            return self.lg.posterior_z2()
        return self.lg.posterior_z1(self.upstream_value("z2"))


@pytest.fixture
def lg():
    return LinearGaussian()


@pytest.mark.parametrize("num_samples", [1, 10, 100])
@pytest.mark.parametrize("messenger", [False, True], ids=["callable", "messenger"])
def test_exact_posterior_gives_exact_likelihood(lg, num_samples, messenger):
    guide = ExactPosteriorMessenger(lg) if messenger else lg.exact_guide
    pyro.set_rng_seed(0)
    estimate = log_likelihood(lg.model, guide, lg.x, num_samples=num_samples)
    assert estimate.shape == (N,)
    assert estimate.dtype == torch.float64
    assert torch.allclose(estimate, lg.log_px, atol=1e-6, rtol=0)


def test_messenger_traces_match_callable(lg):
    pyro.set_rng_seed(0)
    model_trace, guide_trace = get_traces(lg.model, ExactPosteriorMessenger(lg), lg.x)
    assert set(guide_trace.stochastic_nodes) == {"z2", "z1"}
    assert set(model_trace.observation_nodes) == {"x"}
    assert torch.equal(model_trace.nodes["z1"]["value"], guide_trace.nodes["z1"]["value"])


def test_prior_guide_bound_increases_with_num_samples():
    lg = LinearGaussian(noise=0.3)
    means = {}
    for num_samples in [1, 10, 1000]:
        estimates = []
        for seed in range(8):
            pyro.set_rng_seed(seed)
            estimate = log_likelihood(lg.model, lg.prior_guide, lg.x, num_samples=num_samples)
            estimates.append(estimate)
        means[num_samples] = torch.stack(estimates).mean()
    log_px = lg.log_px.mean()
    assert means[1] < means[10] < means[1000]
    assert means[1000] < log_px + 0.05
    assert means[1] < log_px


@pytest.mark.parametrize("chunk_size", [1, 7, 20])
def test_chunk_size_exact(lg, chunk_size):
    estimate = log_likelihood(lg.model, lg.exact_guide, lg.x, num_samples=20, chunk_size=chunk_size)
    assert torch.allclose(estimate, lg.log_px, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [3, None])
def test_fixed_seed_is_deterministic(lg, chunk_size):
    outputs = []
    for _ in range(2):
        pyro.set_rng_seed(123)
        outputs.append(
            log_likelihood(lg.model, lg.prior_guide, lg.x, num_samples=10, chunk_size=chunk_size)
        )
    assert torch.equal(outputs[0], outputs[1])


def test_return_log_weights(lg):
    estimate, log_weights = log_likelihood(
        lg.model, lg.prior_guide, lg.x, num_samples=13, chunk_size=5, return_log_weights=True
    )
    assert log_weights.shape == (13, N)
    assert torch.allclose(estimate, log_weights.logsumexp(0) - math.log(13))
    assert not estimate.requires_grad


def traced_log_weights(model, guide, x, num_samples, chunk_size):
    """``log_likelihood``'s log weights the long way, from whole traces (``get_traces``): a
    plain pass, then passes of ``chunk_size`` particles in a plate left of the data plate;
    every sample site's log density in float64, model sites then guide sites, in trace order."""

    def log_weights(model_trace, guide_trace):
        log_w = 0.0
        for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    log_w = log_w + sign * site["fn"].log_prob(site["value"]).double()
        return log_w.reshape(-1, x.shape[0])

    chunks = [log_weights(*get_traces(model, guide, x))]
    for start in range(1, num_samples, chunk_size):
        with pyro.plate("particles", min(chunk_size, num_samples - start), dim=-2):
            chunks.append(log_weights(*get_traces(model, guide, x)))
    return torch.cat(chunks)


def tiny_conv_ladder():
    vae = ConvLadderVAE((1, 8, 8), [4, 2], groups_per_scale=2, latent_channels=2, widths=8)
    for head in vae.guide.posteriors:  # move q off the prior
        torch.nn.init.normal_(head.net.net[-1].weight, std=0.3)
    return vae.eval()


@pytest.mark.parametrize("program", ["callable", "messenger", "ladder_iaf", "conv_ladder"])
def test_log_weights_equal_those_of_whole_traces_exactly(lg, program):
    # the vectorized passes keep no traces, only each site's log densities as it completes:
    # the same draws must give the same log weights, bit for bit
    if program in ("callable", "messenger"):
        model, guide, x = lg.model, AffineGuide(lg) if program == "callable" else ExactPosteriorMessenger(lg), lg.x
    else:
        vae = perturbed(LadderVAE((1, 6, 6), [2], [16, 12], flows=2)) if program == "ladder_iaf" else tiny_conv_ladder()
        model, guide = vae.model, vae.guide
        x = (torch.rand(3, *vae.model.data_shape) > 0.5).float()
    pyro.set_rng_seed(7)
    _, log_weights = log_likelihood(model, guide, x, num_samples=10, chunk_size=4, return_log_weights=True)
    pyro.set_rng_seed(7)
    with torch.no_grad():
        expected = traced_log_weights(model, guide, x, num_samples=10, chunk_size=4)
    assert log_weights.shape == expected.shape == (10, x.shape[0])
    assert torch.equal(log_weights, expected)


def test_nested_plate_and_data_at_dim_minus_two():
    """x_nd ~ N(z_n, 1) under a feature plate inside the data plate; z_n | x_n is conjugate."""
    n, d = 4, 6
    x = torch.randn(n, d, dtype=torch.float64)

    def model(x):
        with pyro.plate("data", n, dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros(1, 1, dtype=x.dtype), 1.0))
            with pyro.plate("features", d, dim=-1):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", n, dim=-2):
            post_mean = x.sum(-1, keepdim=True) / (d + 1)
            pyro.sample("z", dist.Normal(post_mean, (d + 1) ** -0.5))

    exact = dist.MultivariateNormal(
        torch.zeros(d, dtype=x.dtype), torch.eye(d, dtype=x.dtype) + torch.ones(d, d, dtype=x.dtype)
    ).log_prob(x)
    estimate = log_likelihood(model, guide, x, num_samples=3, chunk_size=2)
    assert torch.allclose(estimate, exact, atol=1e-6, rtol=0)


def test_mask_is_respected(lg):
    mask = torch.tensor([True, False, True, True, False])

    def masked_model(x):
        with pyro.poutine.mask(mask=mask):
            lg.model(x)

    def masked_guide(x):
        with pyro.poutine.mask(mask=mask):
            lg.exact_guide(x)

    estimate = log_likelihood(masked_model, masked_guide, lg.x, num_samples=4)
    assert torch.allclose(estimate[mask], lg.log_px[mask], atol=1e-6, rtol=0)
    assert torch.equal(estimate[~mask], torch.zeros(2, dtype=torch.float64))


def test_custom_data_plate_name():
    def model(x):
        with pyro.plate("batch", x.shape[0]):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    x = torch.randn(3)
    estimate = log_likelihood(model, lambda x: None, x, num_samples=2, data_plate="batch")
    assert estimate.dtype == torch.float64  # float32 model, float64 estimate
    assert torch.allclose(estimate, dist.Normal(0.0, 1.0).log_prob(x).double())


def test_num_samples_must_be_positive(lg):
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        log_likelihood(lg.model, lg.exact_guide, lg.x, num_samples=0)


def test_missing_data_plate_is_an_error():
    def model(x):
        with pyro.plate("batch", x.shape[0]):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    message = r"no plate named 'data'.*pyro\.plate\('data', N\).*data_plate="
    with pytest.raises(ValueError, match=message):
        log_likelihood(model, lambda x: None, torch.randn(3), num_samples=2)


def test_global_latent_is_an_error():
    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        pyro.sample("loc", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"site 'loc' lies outside plate 'data'.*global latent"):
        log_likelihood(model, guide, torch.randn(3), num_samples=2)


# --- guides with flows, and the bottom-up guide, against exact marginals --------------------


def assert_iw_approaches_from_below(model, guide, x, exact, *, num_samples, grid_error=0.0):
    """From one draw of ``num_samples`` log weights ``[K, N]``: each row alone is a K = 1
    estimate (an ELBO sample), groups of ten give K = 10 estimates, all K give the final one.

    * the ELBO lies below ``log p(x)`` by more than four standard errors, per data point;
    * K = 10 tightens it on average;
    * all K reach ``log p(x)`` within four delta-method standard errors,
      ``sqrt((K / ESS - 1) / K)``, which are meaningful while the weights have light tails
      (checked: an effective sample size above a tenth of K).
    """
    pyro.set_rng_seed(0)
    _, log_weights = log_likelihood(model, guide, x, num_samples=num_samples, return_log_weights=True)
    log_weights = log_weights.double()
    K, n = log_weights.shape
    elbo = log_weights.mean(0)
    assert (exact - elbo > 4 * log_weights.std(0) / math.sqrt(K)).all(), exact - elbo
    ten = (log_weights.reshape(K // 10, 10, n).logsumexp(1) - math.log(10)).mean(0)
    assert (elbo < ten).all()
    estimate = log_weights.logsumexp(0) - math.log(K)
    ess = torch.exp(2 * log_weights.logsumexp(0) - (2 * log_weights).logsumexp(0))
    assert (ess > K / 10).all(), ess
    standard_error = ((K / ess - 1) / K).sqrt()
    assert (ten < estimate + 4 * standard_error).all()
    assert ((estimate - exact).abs() < 4 * standard_error + grid_error).all(), (estimate - exact, standard_error)


class IAFPosteriorMessenger(GuideMessenger):
    """The exact posterior conditionals of :class:`LinearGaussian` with their covariance
    doubled, each pushed through two IAF flows conditioned on ``x``: a guide unlike the
    posterior whose density is known only through the flows' log-determinants."""

    def __init__(self, lg):
        super().__init__(lg.model)
        self.lg = lg
        self.flows = {"z2": IAF(DZ2, DX, 2).double(), "z1": IAF(DZ1, DX, 2).double()}
        for flow in self.flows.values():
            for p in flow.parameters():  # off the start: the flows really transform
                torch.nn.init.normal_(p, std=0.05)

    def get_posterior(self, name, prior):
        (x,), _ = self.args_kwargs
        exact = self.lg.posterior_z2() if name == "z2" else self.lg.posterior_z1(self.upstream_value("z2"))
        base = dist.MultivariateNormal(exact.loc, 2 * exact.covariance_matrix)  # wider: light-tailed weights
        return self.flows[name](base, x)


def test_iw_with_iaf_flows_on_a_linear_gaussian_hierarchy_approaches_the_exact_marginal():
    torch.manual_seed(0)  # the flows' autoregressive masks and weights
    lg = LinearGaussian(noise=1.0)
    assert_iw_approaches_from_below(lg.model, IAFPosteriorMessenger(lg), lg.x, lg.log_px, num_samples=4000)


def perturbed(vae, flow_std=0.1):
    """Move the residual heads and any IAF off their zero / identity start, so that the guide
    differs from the prior and the flows really transform."""
    for head in vae.guide.heads:
        torch.nn.init.normal_(head.net[-1].weight, std=0.3)
    for flow in vae.guide.flows or ():
        for p in flow.parameters():
            torch.nn.init.normal_(p, std=flow_std)
    return vae.eval()


def test_iw_of_a_ladder_vae_with_iaf_flows_approaches_the_exact_marginal():
    torch.manual_seed(0)
    vae = perturbed(LadderVAE((1, 6, 6), [2], [16, 12], flows=2))
    x = (torch.rand(4, 1, 6, 6) > 0.5).float()
    exact = grid_log_marginal(vae.model, x)
    assert_iw_approaches_from_below(vae.model, vae.guide, x, exact, num_samples=5000, grid_error=0.01)


def test_iw_of_the_bottom_up_guide_approaches_the_exact_marginal():
    torch.manual_seed(0)
    vae = BottomUpVAE((1, 6, 6), [1, 1], [16, 12]).eval()
    with torch.no_grad():  # widen q(z_1 | x) and q(z_2 | z_1) by e^0.5 or so: light-tailed weights
        for posterior in vae.guide.posteriors:
            posterior.net[-1].bias[posterior.latent_dim :] += 0.5
    x = (torch.rand(4, 1, 6, 6) > 0.5).float()
    exact = grid_log_marginal(vae.model, x)
    assert_iw_approaches_from_below(vae.model, vae.guide, x, exact, num_samples=5000, grid_error=0.01)
