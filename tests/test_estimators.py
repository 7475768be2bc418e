"""The estimators return the number they document, or refuse: subsampled data plates,
reduced-precision models, module modes, discrete latents in the ELBO, free bits per data
point with subsampling and global latents, and per-site KL under particle plates."""

import math
import warnings

import pytest
import torch
from torch import nn

import pyro
import pyro.distributions as dist
from pyro.poutine.guide import GuideMessenger

from pyro_hvae.infer.iw import get_traces, log_likelihood

# ---------------------------------------------------------------- log_likelihood


class Conjugate:
    """z_n ~ N(0, 1), x_n | z_n ~ N(z_n, 1): p(x_n) = N(x_n; 0, 2), q(z_n | x_n) = N(x_n / 2, 1/2)
    is exact, so every importance weight equals p(x_n). Data point n is x_n = n - 4, so a weight
    of another data point is a wrong number, never a close one. The model records the indices of
    each pass."""

    def __init__(self, num_data=10, subsample_size=4):
        self.x = torch.arange(num_data, dtype=torch.float64) - 4
        self.subsample_size = subsample_size
        self.seen = []

    def plate(self):
        return pyro.plate("data", len(self.x), subsample_size=self.subsample_size)

    def model(self, x):
        with self.plate() as index:
            self.seen.append(index.clone())
            z = pyro.sample("z", dist.Normal(torch.zeros(len(index), dtype=x.dtype), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[index])

    def guide(self, x):
        with self.plate() as index:
            pyro.sample("z", dist.Normal(x[index] / 2, 0.5**0.5))

    def log_px(self, index):
        return dist.Normal(0.0, torch.tensor(2.0, dtype=torch.float64).sqrt()).log_prob(self.x[index])


class ConjugateMessenger(GuideMessenger):
    def __init__(self, conjugate):
        super().__init__(conjugate.model)

    def get_posterior(self, name, prior):
        x = self.args_kwargs[0][0]
        index = self.trace.nodes["data"]["value"]
        return dist.Normal(x[index] / 2, 0.5**0.5)


@pytest.mark.parametrize("messenger", [False, True], ids=["callable", "messenger"])
def test_subsampled_data_plate_weighs_one_subsample_in_every_chunk(messenger):
    conjugate = Conjugate()
    guide = ConjugateMessenger(conjugate) if messenger else conjugate.guide
    estimate, log_weights = log_likelihood(
        conjugate.model, guide, conjugate.x, num_samples=7, chunk_size=3, return_log_weights=True
    )
    index = conjugate.seen[0]
    assert len(conjugate.seen) == 1 + 2  # the first sample, then 6 more in chunks of 3
    assert all(torch.equal(seen, index) for seen in conjugate.seen)
    assert log_weights.shape == (7, 4)
    expected = conjugate.log_px(index)
    assert torch.allclose(log_weights, expected.expand(7, 4), atol=1e-9, rtol=0)
    assert torch.allclose(estimate, expected, atol=1e-9, rtol=0)


def test_reduced_precision_model_is_summed_and_averaged_in_float64():
    """x_nd ~ N(z_n, 1) over 500 features in bfloat16: summed in bfloat16 (8 significant
    bits) the log density of a data point, about -700 nats, is off by several nats."""
    n, d = 3, 500
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    draws = []

    def model(x):
        with pyro.plate("data", n, dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros(n, 1, dtype=x.dtype), 1.0))
            draws.append(z)
            with pyro.plate("features", d, dim=-1):
                pyro.sample("x", dist.Normal(z - 1, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", n, dim=-2):
            pyro.sample("z", dist.Normal(torch.zeros(n, 1, dtype=x.dtype), 1.0))

    estimate, log_weights = log_likelihood(model, guide, x, num_samples=5, chunk_size=2, return_log_weights=True)
    # the prior guide cancels log p(z): the weight is log p(x | z), each term exact in float64
    z = torch.cat([draws[0].unsqueeze(0)] + draws[1:])  # [5, n, 1]
    exact = dist.Normal(z - 1, 1.0).log_prob(x).double().sum(-1)
    assert log_weights.dtype == estimate.dtype == torch.float64
    assert torch.allclose(log_weights, exact, atol=1e-9, rtol=0)
    assert torch.allclose(estimate, exact.logsumexp(0) - math.log(5), atol=1e-9, rtol=0)


class Net(nn.Module):
    """A model or guide with a batch-norm layer: z_n ~ N(0, 1), x_n | z_n ~ N(bn(x_n) + z_n, 1)."""

    def __init__(self, observe):
        super().__init__()
        self.bn = nn.BatchNorm1d(2)
        self.observe = observe
        self.calls = 0
        self.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def forward(self, x):
        shift = self.bn(x)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(shift.new_zeros(x.shape[0]), 1.0))
            if self.observe:
                pyro.sample("x", dist.Normal(shift + z.unsqueeze(-1), 1.0).to_event(1), obs=x)


@pytest.mark.parametrize("num_samples,chunk_size,passes", [(1, None, 1), (5, 2, 3), (5, None, 2), (4, 1, 4)])
def test_model_and_guide_run_once_per_chunk_and_the_first_sample_is_a_plain_pass(num_samples, chunk_size, passes):
    model, guide = Net(observe=True).eval(), Net(observe=False).eval()
    x = torch.randn(6, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval mode: no warning
        log_likelihood(model, guide, x, num_samples=num_samples, chunk_size=chunk_size)
    assert model.calls == guide.calls == passes


def test_a_module_in_training_mode_gets_one_warning():
    model, guide = Net(observe=True), Net(observe=False).eval()
    x = torch.randn(6, 2)
    with pytest.warns(UserWarning, match=r"evaluates Net in training mode.*call \.eval\(\)") as record:
        log_likelihood(model, guide.forward, x, num_samples=7, chunk_size=2)
    assert len([w for w in record if "training mode" in str(w.message)]) == 1
    # a bound method counts as its module
    guide.train()
    with pytest.warns(UserWarning, match="evaluates Net, Net in training mode"):
        log_likelihood(model.forward, guide.forward, x, num_samples=2)


# ---------------------------------------------------------------- kl_per_site


@pytest.mark.parametrize("particle_plate", ["_iw_particles", "num_particles_vectorized"])
def test_kl_per_site_averages_over_a_particle_plate_and_sums_other_plates(particle_plate):
    """z_2 ~ N(0, 1), z_1 | z_2 ~ N(z_2, 1) per feature (3); q(z_2) = N(m, s), q(z_1 | z_2) =
    N(z_2 + 1, 1). KL(z_1) is 3 * 1/2 nats for every particle; KL(z_2) does not depend on the
    draws. Under K particles each is the mean over particles, not K times it."""
    n, d, K = 4, 3, 5
    m, s = torch.linspace(-1, 1, n), torch.full((n,), 0.5)

    def model():
        with pyro.plate("data", n, dim=-2):
            z_2 = pyro.sample("z_2", dist.Normal(torch.zeros(n, 1), 1.0))
            with pyro.plate("features", d, dim=-1):
                pyro.sample("z_1", dist.Normal(z_2, 1.0))

    def guide():
        with pyro.plate("data", n, dim=-2):
            z_2 = pyro.sample("z_2", dist.Normal(m.unsqueeze(-1), s.unsqueeze(-1)))
            with pyro.plate("features", d, dim=-1):
                pyro.sample("z_1", dist.Normal(z_2 + 1, 1.0))

    from pyro_hvae.infer.diagnostics import kl_per_site

    with pyro.plate(particle_plate, K, dim=-3):
        kl = kl_per_site(*get_traces(model, guide))
    exact_z_2 = torch.distributions.kl_divergence(dist.Normal(m, s), dist.Normal(0.0, 1.0))
    assert kl["z_2"].shape == kl["z_1"].shape == (n,)
    assert torch.allclose(kl["z_2"], exact_z_2)
    assert torch.allclose(kl["z_1"], torch.full((n,), d * 0.5))
