import math

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.poutine.guide import GuideMessenger

from pyro_hvae.infer.iw import get_traces, log_likelihood

DZ2, DZ1, DX, N = 2, 3, 4, 5


class LinearGaussian:
    """
    z2 ~ N(0, I), z1 | z2 ~ N(A z2 + a, S1), x | z1 ~ N(B z1 + b, Sx) with
    diagonal S1, Sx, in float64, with its exact marginal and posterior.
    """

    def __init__(self, seed=0, noise=0.5):
        g = torch.Generator().manual_seed(seed)
        randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
        self.A, self.a = randn(DZ1, DZ2), randn(DZ1)
        self.B, self.b = randn(DX, DZ1), randn(DX)
        self.s1 = 0.5 + torch.rand(DZ1, generator=g, dtype=torch.float64)
        self.sx = noise * (0.5 + torch.rand(DX, generator=g, dtype=torch.float64))
        self.x = randn(N, DX) * 2

        # joint prior over z = [z2, z1] and the linear observation x = H z + b + noise
        cov_z1 = self.A @ self.A.T + torch.diag(self.s1**2)
        self.prior_mean = torch.cat([torch.zeros(DZ2, dtype=torch.float64), self.a])
        eye = torch.eye(DZ2, dtype=torch.float64)
        self.prior_cov = torch.cat([torch.cat([eye, self.A.T], 1), torch.cat([self.A, cov_z1], 1)])
        H = torch.cat([torch.zeros(DX, DZ2, dtype=torch.float64), self.B], 1)
        noise_prec = torch.diag(self.sx**-2)
        prior_prec = torch.linalg.inv(self.prior_cov)
        self.post_cov = torch.linalg.inv(prior_prec + H.T @ noise_prec @ H)
        natural = prior_prec @ self.prior_mean[:, None] + H.T @ noise_prec @ (self.x - self.b).T
        self.post_mean = (self.post_cov @ natural).T
        self.gain = self.post_cov[DZ2:, :DZ2] @ torch.linalg.inv(self.post_cov[:DZ2, :DZ2])
        self.cond_cov = self.post_cov[DZ2:, DZ2:] - self.gain @ self.post_cov[:DZ2, DZ2:]

        marginal = dist.MultivariateNormal(
            self.B @ self.a + self.b, self.B @ cov_z1 @ self.B.T + torch.diag(self.sx**2)
        )
        self.log_px = marginal.log_prob(self.x)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(DZ2, dtype=x.dtype), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(z2 @ self.A.T + self.a, self.s1).to_event(1))
            pyro.sample("x", dist.Normal(z1 @ self.B.T + self.b, self.sx).to_event(1), obs=x)

    def posterior_z2(self):
        return dist.MultivariateNormal(self.post_mean[:, :DZ2], self.post_cov[:DZ2, :DZ2])

    def posterior_z1(self, z2):
        loc = self.post_mean[:, DZ2:] + (z2 - self.post_mean[:, :DZ2]) @ self.gain.T
        return dist.MultivariateNormal(loc, self.cond_cov)

    def exact_guide(self, x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", self.posterior_z2())
            pyro.sample("z1", self.posterior_z1(z2))

    def prior_guide(self, x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(DZ2, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("z1", dist.Normal(z2 @ self.A.T + self.a, self.s1).to_event(1))


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
