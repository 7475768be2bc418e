"""pyro_hvae.use: temperature, encode/decode, interpolation, varied details, batch norm at a temperature."""

import math
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_hvae import BottomUpVAE, LadderVAE, use

DATA_SHAPE = (1, 6, 6)


def bars(num: int, generator: torch.Generator) -> torch.Tensor:
    """Binary 6x6 images holding one horizontal or one vertical bar, with 5% pixel noise."""
    images = torch.zeros(num, 1, 6, 6)
    position = torch.randint(0, 6, (num,), generator=generator)
    vertical = torch.rand(num, generator=generator) < 0.5
    for i in range(num):
        if vertical[i]:
            images[i, 0, :, position[i]] = 1
        else:
            images[i, 0, position[i], :] = 1
    flips = torch.rand(images.shape, generator=generator) < 0.05
    return torch.where(flips, 1 - images, images)


def train(vae, data: torch.Tensor, steps: int, lr: float = 1e-2, batch_size: int = 128):
    """A few hundred Adam steps on the ELBO; returns ``vae`` in eval mode."""
    generator = torch.Generator().manual_seed(1)
    with pyro.settings.context(module_local_params=True):
        loss_fn = Trace_ELBO()(vae.model, vae.guide)
        loss_fn(data[:2])  # create the parameters
        optimizer = torch.optim.Adam(loss_fn.parameters(), lr=lr)
        for _ in range(steps):
            batch = data[torch.randint(0, len(data), (batch_size,), generator=generator)]
            optimizer.zero_grad()
            loss_fn(batch).backward()
            optimizer.step()
    return vae.eval()


@pytest.fixture(scope="module")
def images():
    return bars(512, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trained(images):
    """A three-layer ladder with batch norm, trained for 300 steps on bars."""
    pyro.set_rng_seed(0)
    return train(LadderVAE(DATA_SHAPE, [6, 4, 2], [32], batch_norm=True), images, 300)


def custom_hierarchy():
    """A hierarchy written by hand in the documented protocol (no HierarchicalVAE)."""
    decoder = torch.nn.Linear(3, 36)
    lift = torch.nn.Linear(2, 3)
    encoder = torch.nn.Linear(36, 10)

    def model(x=None, batch_size=None):
        n = len(x) if x is not None else batch_size
        with pyro.plate("data", n):
            top = pyro.sample("top", dist.Normal(torch.zeros(n, 2), 1.0).to_event(1))
            bottom = pyro.sample("bottom", dist.Normal(lift(top), 0.5).to_event(1))
            logits = decoder(bottom).reshape(n, *DATA_SHAPE)
            return pyro.sample("x", dist.Bernoulli(logits=logits).to_event(3), obs=x)

    def guide(x):
        h = encoder(x.flatten(1))
        with pyro.plate("data", len(x)):
            top = pyro.sample("top", dist.Normal(h[:, :2], h[:, 2:4].exp()).to_event(1))
            pyro.sample("bottom", dist.Normal(h[:, 4:7] + lift(top), h[:, 7:10].exp()).to_event(1))

    return SimpleNamespace(model=model, guide=guide, latent_sites=["bottom", "top"])


KINDS = {
    "ladder": lambda: LadderVAE(DATA_SHAPE, [5, 3, 2], [16]),
    "ladder_independent": lambda: LadderVAE(DATA_SHAPE, [5, 3], [16], posterior="independent"),
    "ladder_flows": lambda: LadderVAE(DATA_SHAPE, [5, 3], [16], flows=1),
    "ladder_batch_norm": lambda: LadderVAE(DATA_SHAPE, [5, 3], [16], batch_norm=True).eval(),
    "bottom_up": lambda: BottomUpVAE(DATA_SHAPE, [5, 3], [16]),
    "custom": custom_hierarchy,
}


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_round_trip_shapes(kind, images):
    vae = KINDS[kind]()
    x = images[:7]
    code = use.encode(vae, x)
    assert list(code) == vae.latent_sites
    assert all(z.shape[0] == 7 for z in code.values())
    assert use.decode(vae, code).shape == x.shape
    assert use.decode(vae, code, mean=False).shape == x.shape
    assert use.reconstruct(vae, x).shape == x.shape
    assert use.sample(vae, 3, temperature=0.7).shape == (3, *DATA_SHAPE)
    top = vae.latent_sites[-1]
    assert use.decode(vae, {top: code[top]}, temperature=0.5).shape == x.shape
    assert use.interpolate(vae, x[:2], x[2:4], 5, layers=[len(code)], mean=kind != "ladder_flows").shape == (5, 2, *DATA_SHAPE)
    assert use.vary_details(vae, x[:2], keep_top=1, num_samples=3).shape == (3, 2, *DATA_SHAPE)


def test_decoding_all_layers_depends_on_the_codes_only(trained, images):
    code = use.encode(trained, images[:4])
    first, second = use.decode(trained, code), use.decode(trained, code)
    assert torch.equal(first, second)
    assert torch.equal(trained.decode(code), first)


def test_temperature_zero_decoding_is_deterministic(trained, images):
    top = {"z_3": use.encode(trained, images[:4])["z_3"]}
    pyro.set_rng_seed(1)
    first = use.decode(trained, top, temperature=0)
    pyro.set_rng_seed(2)
    assert torch.equal(use.decode(trained, top, temperature=0), first)
    assert not torch.equal(use.decode(trained, top, temperature=1), first)
    samples = use.sample(trained, 3, temperature=0)
    assert torch.allclose(samples[0], samples[2]) and torch.equal(use.sample(trained, 3, temperature=0), samples)


def test_temperature_scales_each_prior():
    """z_L ~ N(0, t^2): the top layer's spread is the temperature."""
    vae = LadderVAE(DATA_SHAPE, [4, 3], [16])
    for t in (0.3, 1.0):
        model = use.tempered(vae.model, use.layer_temperatures(vae, [1.0, t]))
        z = pyro.poutine.trace(model).get_trace(batch_size=20000).nodes["z_2"]["value"]
        assert z.std().item() == pytest.approx(t, rel=0.03)


def test_posterior_mean_encoding_is_deterministic_and_central(trained, images):
    x = images[:3]
    means = use.encode(trained, x, mean=True)
    assert torch.equal(means["z_1"], use.encode(trained, x, mean=True)["z_1"])
    draws = torch.stack([use.encode(trained, x)["z_3"] for _ in range(2000)])
    assert torch.allclose(draws.mean(0), means["z_3"], atol=0.05)


def test_interpolation_ends_are_the_two_images_codes(trained, images):
    x_a, x_b = images[:2], images[2:4]
    path = trained.interpolate(x_a, x_b, 4)
    assert torch.allclose(path[0], use.decode(trained, use.encode(trained, x_a, mean=True)))
    assert torch.allclose(path[-1], use.decode(trained, use.encode(trained, x_b, mean=True)))
    assert not torch.allclose(path[1], path[0])


def test_varying_details_keeps_the_top_layer(trained, images):
    """With the top layers fixed, the samples vary less than free prior samples."""
    x = images[:1]
    varied = trained.vary_details(x, keep_top=2, num_samples=200)
    free = trained.sample(200)
    assert varied.var(0).mean() < free.var(0).mean()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda v, x: use.sample(v, 2, temperature=-0.5), "temperature must be a finite number >= 0"),
        (lambda v, x: use.sample(v, 2, temperature=math.nan), "temperature must be a finite number >= 0"),
        (lambda v, x: use.sample(v, 2, temperature=[1.0, 0.5]), "expected one number or 3"),
        (lambda v, x: use.sample(v, 0), "batch_size must be a positive integer"),
        (lambda v, x: use.decode(v, {"z_9": x}), r"\['z_9'\] are not latent sites"),
        (lambda v, x: use.decode(v, {}), "latents: give at least one layer"),
        (lambda v, x: use.interpolate(v, x, x, 3, layers=[0]), "layers: layer 0 does not exist"),
        (lambda v, x: use.interpolate(v, x, x, 3, layers=[4]), "layers: layer 4 does not exist"),
        (lambda v, x: use.interpolate(v, x, x, 1), "steps must be an integer >= 2"),
        (lambda v, x: use.interpolate(v, x, x[:1], 3), "x_b: expected the shape of x_a"),
        (lambda v, x: use.vary_details(v, x, keep_top=4, num_samples=2), "keep_top must be an integer in 1..3"),
        (lambda v, x: use.readjust_batch_norm(v, 0.0), "temperature must be > 0"),
    ],
)
def test_bad_arguments_name_themselves(call, message, trained, images):
    with pytest.raises(ValueError, match=message):
        call(trained, images[:2])


def test_batch_norm_readjustment_is_cached_and_reused(trained, tmp_path):
    pyro.set_rng_seed(0)
    stats = trained.readjust_batch_norm(0.6, num_samples=512, run_dir=tmp_path)
    path = tmp_path / "bn_stats_T0.6.pt"
    assert path.is_file()
    trained_mean = trained.model.priors[0].net[0][1].running_mean.clone()
    assert not torch.allclose(stats["priors.0.net.0.1.running_mean"], trained_mean)
    pyro.set_rng_seed(1)
    fresh = use.readjust_batch_norm(trained, 0.6, num_samples=512)  # no run folder: recomputed
    assert not torch.equal(fresh["priors.0.net.0.1.running_mean"], stats["priors.0.net.0.1.running_mean"])
    pyro.set_rng_seed(1)
    again = use.readjust_batch_norm(trained, 0.6, num_samples=512, run_dir=tmp_path)
    assert all(torch.equal(again[key], stats[key]) for key in stats)
    assert torch.equal(trained.model.priors[0].net[0][1].running_mean, trained_mean)  # the trained stats stay


def test_sampling_with_readjusted_batch_norm(trained):
    stats = use.readjust_batch_norm(trained, 0.5, num_samples=256)
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    pyro.set_rng_seed(3)
    with_stats = trained.sample(64, temperature=0.5, batch_norm=stats)
    pyro.set_rng_seed(3)
    without = trained.sample(64, temperature=0.5)
    assert not torch.isnan(with_stats).any() and not torch.equal(with_stats, without)
    assert all(torch.equal(v, trained.model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="no batch norm"):
        use.readjust_batch_norm(LadderVAE(DATA_SHAPE, [3], [8]), 0.5)


def test_cache_of_another_model_is_refused(trained, tmp_path):
    torch.save({"running_mean": torch.zeros(3)}, tmp_path / "bn_stats_T0.7.pt")
    with pytest.raises(ValueError, match="another model; delete it"):
        use.readjust_batch_norm(trained, 0.7, run_dir=tmp_path)
