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
        self.shapes = []  # of z, pass by pass

    def forward(self, x):
        shift = self.bn(x)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(shift.new_zeros(x.shape[0]), 1.0))
            self.shapes.append(tuple(z.shape))
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


# ---------------------------------------------------------------- HierarchicalELBO: any latent


class Mixture:
    """c_n ~ Bernoulli(0.3), z_n | c_n ~ N(2 c_n - 1, 1), x_n | z_n ~ N(z_n, 1/2); the guide
    q(c_n | x_n) = Bernoulli(sigmoid(a x_n + b)), q(z_n | c_n, x_n) = N(w x_n + u c_n, softplus(s)),
    and optionally a guide-only w_n ~ N(x_n, 1 + c_n), has a closed-form ELBO: sum over c,
    then Gaussian expectations."""

    def __init__(self, aux=False):
        self.x = torch.tensor([-1.5, 0.2, 1.8], dtype=torch.float64)
        self.params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in
                       dict(a=1.2, b=-0.3, w=0.6, u=0.4, s=-0.5).items()}
        self.aux = aux

    def model(self, x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(torch.full_like(x, 0.3)))
            z = pyro.sample("z", dist.Normal(2 * c - 1, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(self, x):
        p = self.params
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(logits=p["a"] * x + p["b"]))
            pyro.sample("z", dist.Normal(p["w"] * x + p["u"] * c, nn.functional.softplus(p["s"])))
            if self.aux:
                pyro.sample("w", dist.Normal(x, 1.0 + c), infer={"is_auxiliary": True})

    def exact_elbo(self):
        p, x = self.params, self.x
        q_c = torch.sigmoid(p["a"] * x + p["b"])
        scale = nn.functional.softplus(p["s"])
        elbo = 0.0
        for c, weight in ((1.0, q_c), (0.0, 1 - q_c)):
            loc = p["w"] * x + p["u"] * c
            kl_z = torch.distributions.kl_divergence(dist.Normal(loc, scale), dist.Normal(2 * c - 1, 1.0))
            expected_log_px = dist.Normal(loc, 0.5).log_prob(x) - scale**2 / (2 * 0.25)
            log_ratio_c = dist.Bernoulli(torch.tensor(0.3)).log_prob(torch.tensor(c)) - torch.log(weight)
            entropy_w = 0.5 * math.log(2 * math.pi * math.e) + math.log(1 + c) if self.aux else 0.0
            elbo = elbo + weight * (log_ratio_c + expected_log_px - kl_z + entropy_w)
        return elbo.sum()

    def grads(self, loss):
        return torch.stack(torch.autograd.grad(loss, list(self.params.values())))


@pytest.mark.parametrize("num_particles", [1, 4])
@pytest.mark.parametrize("aux", [False, True], ids=["", "guide_only_site"])
def test_discrete_latent_and_guide_only_site_match_trace_elbo(num_particles, aux):
    """Same value and gradients as Trace_ELBO with the same draws; except that the cost of the
    score function of c includes the guide-only -log q(w | c), which Trace_ELBO leaves out
    (biased, see the next test), so the gradients of c's parameters a and b then differ."""
    from pyro.infer import Trace_ELBO

    from pyro_hvae.infer.elbo import HierarchicalELBO

    mixture = Mixture(aux=aux)
    options = dict(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(3)
    reference = Trace_ELBO(**options).differentiable_loss(mixture.model, mixture.guide, mixture.x)
    pyro.set_rng_seed(3)
    ours = HierarchicalELBO(analytic_kl=False, **options).differentiable_loss(mixture.model, mixture.guide, mixture.x)
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-10)
    compared = slice(2, None) if aux else slice(None)
    assert torch.allclose(mixture.grads(ours)[compared], mixture.grads(reference)[compared], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("analytic,aux", [(True, False), (False, False), (True, True)], ids=["analytic_kl", "monte_carlo_kl", "guide_only_site"])
def test_discrete_latent_gradient_is_unbiased(analytic, aux):
    """Over 20000 particles the gradient is that of the closed-form ELBO, within 4 standard
    errors estimated from the particles themselves (20 batches of 1000)."""
    from pyro_hvae.infer.elbo import HierarchicalELBO

    mixture = Mixture(aux=aux)
    exact = mixture.grads(-mixture.exact_elbo())
    elbo = HierarchicalELBO(num_particles=1000, analytic_kl=analytic, max_plate_nesting=1)
    batches = torch.stack([mixture.grads(elbo.differentiable_loss(mixture.model, mixture.guide, mixture.x)) for _ in range(20)])
    error = (batches.mean(0) - exact).abs()
    standard_error = batches.std(0) / 20**0.5
    assert (error < 4 * standard_error + 1e-6).all(), (error, standard_error)
    assert float(elbo.terms["elbo"]) * 3 == pytest.approx(float(mixture.exact_elbo().detach()), abs=0.05)


# ---------------------------------------------------------------- HierarchicalELBO: free bits

FLOOR, BETA = 0.5, 0.7


class Layers:
    """Latents independent of the data, so that the loss is exact (analytic KLs, a fixed
    log p(x)): a_n ~ N(0, 1) in a nested plate of 3 features, KL 3 m_a^2 / 2 = 0.54 nats per
    data point, above the floor; b_n ~ N(0, I_2) with KL |m_b|^2 / 2 = 0.125, below it;
    optionally a global g ~ N(0, 1) with KL m_g^2 / 2 = 0.045. x_n ~ N(0, 1) is observed.
    The data plate holds ``size`` points, ``subsample_size`` of them per batch."""

    def __init__(self, size=4, subsample_size=None, global_latent=False, mask=None):
        self.m = {"a": torch.tensor(0.6, requires_grad=True), "b": torch.tensor([0.3, 0.4], requires_grad=True),
                  "g": torch.tensor(0.3, requires_grad=True)}
        self.size, self.subsample_size, self.global_latent = size, subsample_size, global_latent
        self.mask = True if mask is None else mask.unsqueeze(-1)
        self.x = torch.linspace(-1, 1, size)

    def program(self, x, guide):
        if self.global_latent:
            pyro.sample("g", dist.Normal(self.m["g"] if guide else torch.tensor(0.0), 1.0))
        plate = pyro.plate("data", self.size, subsample_size=self.subsample_size, dim=-2)
        with plate as index, pyro.poutine.mask(mask=self.mask):
            n = len(index)
            loc_a, loc_b = (self.m["a"], self.m["b"]) if guide else (torch.tensor(0.0), torch.zeros(2))
            with pyro.plate("features", 3, dim=-1):
                pyro.sample("a", dist.Normal(loc_a.expand(n, 3), 1.0))
            pyro.sample("b", dist.Normal(loc_b.expand(n, 1, 2), 1.0).to_event(1))
            if not guide:
                pyro.sample("x", dist.Normal(0.0, 1.0).expand([n, 1]), obs=x[index].unsqueeze(-1))

    def model(self, x):
        self.program(x, guide=False)

    def guide(self, x):
        self.program(x, guide=True)

    def log_px(self):
        """log p(x) of every data point: the same for all, as x_n is not subsampled below."""
        return dist.Normal(0.0, 1.0).log_prob(self.x)


def loss_and_grads(layers, **options):
    from pyro_hvae.infer.elbo import HierarchicalELBO

    elbo = HierarchicalELBO(beta=BETA, free_bits=FLOOR, max_plate_nesting=2, **options)
    loss = elbo.differentiable_loss(layers.model, layers.guide, layers.x)
    grads = torch.autograd.grad(loss, [layers.m[k] for k in ("a", "b", "g")], allow_unused=True)
    return float(loss.detach()), dict(zip("abg", grads)), elbo.terms


def test_free_bits_floor_each_layer_per_data_point():
    layers = Layers()
    loss, grads, terms = loss_and_grads(layers)
    kl_a, kl_b = 3 * 0.6**2 / 2, (0.3**2 + 0.4**2) / 2
    assert kl_a > FLOOR > kl_b
    assert loss == pytest.approx(-float(layers.log_px().sum()) + BETA * 4 * (kl_a + FLOOR), rel=1e-6)
    assert torch.allclose(grads["a"], torch.tensor(BETA * 4 * 3 * 0.6))  # d/dm of 4 * 3 m^2 / 2
    assert torch.equal(grads["b"], torch.zeros(2))  # below the floor: no pull towards the prior
    assert float(terms["kl"]["a"]) == pytest.approx(kl_a) and float(terms["kl"]["b"]) == pytest.approx(kl_b)
    assert float(terms["reconstruction"]) == pytest.approx(float(layers.log_px().mean()))


def test_free_bits_compare_the_unscaled_kl_of_a_subsampled_plate():
    """100 data points, 4 per batch: the loss stands for all 100; the floor compares the KL
    per data point, not 25 times it (which would lift b above the floor)."""
    layers = Layers(size=100, subsample_size=4)
    layers.x = torch.zeros(100)
    loss, grads, terms = loss_and_grads(layers)
    kl_a, kl_b = 3 * 0.6**2 / 2, (0.3**2 + 0.4**2) / 2
    log_px = float(dist.Normal(0.0, 1.0).log_prob(torch.tensor(0.0)))
    assert loss == pytest.approx(-100 * log_px + BETA * 100 * (kl_a + FLOOR), rel=1e-6)
    assert torch.allclose(grads["a"], torch.tensor(BETA * 100 * 3 * 0.6))
    assert torch.equal(grads["b"], torch.zeros(2))
    assert float(terms["reconstruction"]) == pytest.approx(log_px)
    assert float(terms["kl"]["a"]) == pytest.approx(kl_a) and float(terms["kl"]["b"]) == pytest.approx(kl_b)
    assert float(terms["elbo"]) == pytest.approx(log_px - kl_a - kl_b)


def test_free_bits_average_over_the_data_points_not_masked_out():
    mask = torch.tensor([True, False, True, False])
    layers = Layers(mask=mask)
    loss, grads, terms = loss_and_grads(layers)
    kl_a, kl_b = 3 * 0.6**2 / 2, (0.3**2 + 0.4**2) / 2
    log_px = layers.log_px()[mask]
    assert loss == pytest.approx(-float(log_px.sum()) + BETA * 2 * (kl_a + FLOOR), rel=1e-6)
    assert torch.equal(grads["b"], torch.zeros(2))
    assert float(terms["reconstruction"]) == pytest.approx(float(log_px.mean()))
    assert float(terms["kl"]["a"]) == pytest.approx(kl_a)


@pytest.mark.parametrize("subsample_size", [None, 2])
def test_a_global_latent_is_not_floored_nor_divided_among_data_points(subsample_size):
    """g's KL (0.045 nats, below the floor) costs beta * KL once for the whole data set; its
    share per data point in ``terms`` is KL / N."""
    layers = Layers(subsample_size=subsample_size, global_latent=True)
    layers.x = torch.zeros(4)
    loss, grads, terms = loss_and_grads(layers)
    kl_a, kl_b, kl_g = 3 * 0.6**2 / 2, (0.3**2 + 0.4**2) / 2, 0.3**2 / 2
    log_px = float(dist.Normal(0.0, 1.0).log_prob(torch.tensor(0.0)))
    assert loss == pytest.approx(-4 * log_px + BETA * (4 * (kl_a + FLOOR) + kl_g), rel=1e-6)
    assert torch.allclose(grads["g"], torch.tensor(BETA * 0.3))
    assert torch.equal(grads["b"], torch.zeros(2))
    assert list(terms["kl"]) == ["g", "a", "b"]
    assert float(terms["kl"]["g"]) == pytest.approx(kl_g / 4)
    assert float(terms["kl"]["a"]) == pytest.approx(kl_a)
    assert float(terms["reconstruction"]) == pytest.approx(log_px)
    assert float(terms["elbo"]) == pytest.approx(log_px - kl_a - kl_b - kl_g / 4)


def test_elbo_needs_the_data_plate():
    from pyro_hvae.infer.elbo import HierarchicalELBO

    layers = Layers()
    with pytest.raises(ValueError, match=r"no sample site lies in a plate named 'batch'.*data_plate="):
        HierarchicalELBO(data_plate="batch").loss(layers.model, layers.guide, layers.x)


def test_posterior_moments_draw_the_first_sample_in_the_structure_pass():
    from pyro_hvae.infer.diagnostics import posterior_moments

    model, guide = Net(observe=True).eval(), Net(observe=False).eval()
    moments = posterior_moments(model, guide, [torch.randn(6, 2)], num_samples=10)
    assert guide.shapes == [(6,), (9, 6)]  # a plain pass, then 9 draws in one vectorized pass
    mean, noise = moments["z"]
    assert mean.shape == noise.shape == (6, 1)
    assert torch.allclose(mean, torch.zeros(6, 1))  # q(z) = N(0, 1): its mean, exactly


def test_posterior_moments_of_a_subsampled_plate_keep_one_subsample():
    from pyro_hvae.infer.diagnostics import posterior_moments

    conjugate = Conjugate()
    mean, noise = posterior_moments(conjugate.model, conjugate.guide, [conjugate.x], num_samples=5)["z"]
    index = conjugate.seen[0]
    assert all(torch.equal(seen, index) for seen in conjugate.seen)
    assert torch.allclose(mean, conjugate.x[index].unsqueeze(-1) / 2)  # the exact posterior mean


def test_elbo_refuses_a_sequential_data_plate():
    from pyro_hvae.infer.elbo import HierarchicalELBO

    def model(x):
        for n in pyro.plate("data", len(x)):
            pyro.sample(f"x_{n}", dist.Normal(0.0, 1.0), obs=x[n])

    with pytest.raises(ValueError, match=r"plate 'data' is sequential.*with pyro\.plate"):
        HierarchicalELBO().loss(model, lambda x: None, torch.zeros(2))
