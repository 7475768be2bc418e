"""RowNoise: a reparameterized normal site's value is ``T(loc + scale * eps)`` with ``eps``
the noise of its rows of the global batch, so a row gets the same value whatever share of
the batch computes it; other sites keep their own draw and are named."""


import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import AffineTransform

from pyro_hvae import ConvLadderVAE, LadderVAE
from pyro_hvae.config import load_config
from pyro_hvae.infer.noise import RowNoise
from pyro_hvae.run import load_checkpoint, prepare_run_dir
from pyro_hvae.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _generator(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _values(program, *args, noise: RowNoise) -> dict[str, torch.Tensor]:
    with noise:
        trace = pyro.poutine.trace(program).get_trace(*args)
    return {name: site["value"] for name, site in trace.nodes.items() if site["type"] == "sample"}


def test_values_are_loc_plus_scale_times_the_rows_of_the_global_noise():
    """Rows 2..5 of a global batch of 8: ``eps`` is the generator's ``[2, 8, 3]`` draw (a
    particle dim left of the data plate) narrowed to those rows; under an affine transform
    ``T(z) = 1 + 2 z`` the value is ``T(loc + scale * eps)``, its log-density that of the base at
    ``loc + scale * eps`` less ``3 log 2``."""
    loc, scale = torch.randn(2, 4, 3), torch.rand(2, 4, 3) + 0.5

    def program():
        with pyro.plate("particles", 2, dim=-2), pyro.plate("data", 4, dim=-1):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            pyro.sample("w", dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), [AffineTransform(1.0, 2.0, event_dim=1)]))

    noise = RowNoise(_generator(), 8, slice(2, 6))
    values = _values(program, noise=noise)
    expected = _generator()
    eps_z, eps_w = (torch.randn(2, 8, 3, generator=expected)[:, 2:6] for _ in range(2))
    torch.testing.assert_close(values["z"], loc + scale * eps_z, rtol=0, atol=0)
    torch.testing.assert_close(values["w"], 1 + 2 * (loc + scale * eps_w), rtol=1e-6, atol=1e-6)
    assert noise.own_draws == set()


def test_the_noise_is_standard_normal():
    """Rows 10,000..19,999 of a global batch of 20,000, 2 units each: ``(z - loc) / scale``
    has mean 0 and variance 1 within four standard errors, and no correlation between
    units or rows."""
    loc, scale = torch.full((10_000, 2), 3.0), torch.full((10_000, 2), 0.5)

    def program():
        with pyro.plate("data", 10_000):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    eps = (_values(program, noise=RowNoise(_generator(), 20_000, slice(10_000, 20_000)))["z"] - loc) / scale
    n = eps.numel()
    assert abs(float(eps.mean())) < 4 / n**0.5
    assert abs(float(eps.var()) - 1) < 4 * (2 / n) ** 0.5
    assert abs(float(np.corrcoef(eps[:, 0], eps[:, 1])[0, 1])) < 4 / (n / 2) ** 0.5
    assert abs(float(np.corrcoef(eps[:-1, 0], eps[1:, 0])[0, 1])) < 4 / (n / 2) ** 0.5


@pytest.mark.parametrize(
    "build",
    [lambda: LadderVAE((1, 4, 4), [3, 2], [8]), lambda: LadderVAE((1, 4, 4), [3, 2], [8], flows=1),
     lambda: ConvLadderVAE((1, 4, 4), [2, 1], groups_per_scale=1, latent_channels=2, widths=4).eval()],
    ids=["ladder_residual", "ladder_residual_iaf", "conv_ladder"],
)
def test_a_row_gets_its_value_whichever_share_of_the_batch_computes_it(build):
    """A built-in guide on 8 images, and on its halves as two processes would: the same latent
    values row for row, and the same log-densities (the flow's cached inverse). The conv
    ladder's batch norm runs in evaluation mode, where rows do not mix."""
    torch.manual_seed(0)
    vae = build()
    x = torch.bernoulli(torch.full((8, 1, 4, 4), 0.5))
    names = ("z_1", "z_2")

    def run(rows: slice):
        noise = RowNoise(_generator(), 8, rows)
        values = _values(vae.guide, x[rows], noise=noise)
        assert noise.own_draws == set()  # every latent site understood
        guide_trace = vae.guide.get_traces()[1]
        log_q = {n: guide_trace.nodes[n]["fn"].log_prob(values[n]) for n in names}
        return {n: values[n] for n in names}, log_q

    whole, halves = run(slice(0, 8)), [run(slice(0, 4)), run(slice(4, 8))]
    for part in (0, 1):
        for name in names:
            joined = torch.cat([halves[0][part][name], halves[1][part][name]])
            torch.testing.assert_close(joined, whole[part][name], rtol=1e-6, atol=1e-6)


def test_sites_it_does_not_understand_keep_their_own_draw_and_are_named():
    def program():
        with pyro.plate("data", 4):
            pyro.sample("gamma", dist.Gamma(torch.ones(4), 1.0))
            pyro.sample("point", dist.Delta(torch.zeros(4)))
            pyro.sample("x", dist.Normal(torch.zeros(4), 1.0), obs=torch.zeros(4))
            pyro.sample("masked", dist.Normal(torch.zeros(4), 1.0).mask(False))
        with pyro.plate("data_other", 6):
            pyro.sample("elsewhere", dist.Normal(torch.zeros(6), 1.0))  # not in the data plate: drawn whole
        pyro.sample("global", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    noise = RowNoise(_generator(), 8, slice(4, 8))
    values = _values(program, noise=noise)
    assert noise.own_draws == {"gamma", "masked"}
    expected = _generator()
    torch.testing.assert_close(values["elsewhere"], torch.randn(6, generator=expected), rtol=0, atol=0)
    torch.testing.assert_close(values["global"], torch.randn(2, generator=expected), rtol=0, atol=0)


def test_training_is_reproducible_and_last_pt_keeps_the_noise_stream(tmp_path):
    """Two runs from one seed end with the same weights, and the stream in last.pt is where
    the run left it: a resumed run draws what the uninterrupted one draws next."""
    generator = np.random.default_rng(0)
    np.savez(tmp_path / "images.npz", train=generator.integers(0, 256, (64, 8, 8), dtype=np.uint8),
             test=generator.integers(0, 256, (4, 8, 8), dtype=np.uint8))
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "name: noise\n"
        f"data: {{dataset: npz, path: {tmp_path / 'images.npz'}, val_size: 8, batch_size: 8}}\n"
        "model: {kind: ladder, latent_dims: [3], hidden_dims: [8]}\n"
        "train: {steps: 3, log_every: 1, eval_every: 3, checkpoint_every: 3}\n"
    )

    def fit(name: str) -> Trainer:
        trainer = Trainer(load_config(config), prepare_run_dir(tmp_path / name), device=torch.device("cpu"))
        trainer.fit()
        return trainer

    first, second = fit("a"), fit("b")
    for name, value in first.vae.state_dict().items():
        assert torch.equal(second.vae.state_dict()[name], value), name
    saved = load_checkpoint(tmp_path / "a" / "last.pt")["rng"]["posterior_noise"]
    assert torch.equal(saved, first.noise.generator.get_state())
    resumed = Trainer(load_config(config), tmp_path / "a", device=torch.device("cpu"))
    resumed.load_state_dict(load_checkpoint(tmp_path / "a" / "last.pt"))
    assert torch.equal(torch.randn(5, generator=resumed.noise.generator), torch.randn(5, generator=first.noise.generator))
