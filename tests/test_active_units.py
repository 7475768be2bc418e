"""Active units by each unit's own KL, by its marginal mean, and the collapse report."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_hvae.infer.diagnostics import (
    active_units,
    active_units_marginal,
    collapsed_layers,
    kl_per_site,
    kl_per_unit,
    posterior_moments,
)
from pyro_hvae.infer.iw import get_traces
from pyro_hvae.latents import IAF

WEIGHT = torch.tensor([[1.0, -2.0], [0.5, 1.0]])
SCALE = torch.tensor([0.3, 1.0])


def model(x):
    """z2 ~ N(0, I); z1 | z2 ~ N(W z2, 0.5); x | z1 ~ N(z1, 1)."""
    with pyro.plate("data", x.shape[0]):
        z2 = pyro.sample("z2", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
        z1 = pyro.sample("z1", dist.Normal(z2 @ WEIGHT.T, 0.5).to_event(1))
        pyro.sample("x", dist.Normal(z1, 1.0).to_event(1), obs=x)


def guide(x):
    """z2 | x informative in its first unit only (the second is its prior N(0, 1));
    z1 | z2, x is exactly its prior."""
    with pyro.plate("data", x.shape[0]):
        loc = torch.stack([x[:, 0], torch.zeros_like(x[:, 0])], -1)
        z2 = pyro.sample("z2", dist.Normal(loc, SCALE).to_event(1))
        pyro.sample("z1", dist.Normal(z2 @ WEIGHT.T, 0.5).to_event(1))


@pytest.fixture
def x():
    return 2 * torch.randn(400, 2)


def test_a_layer_that_copies_its_prior_has_no_own_units_though_its_marginal_mean_moves(x):
    unit_kl = kl_per_unit(*get_traces(model, guide, x))
    assert unit_kl["z1"].shape == (400, 2) and unit_kl["z2"].shape == (400, 2)
    assert torch.equal(unit_kl["z1"], torch.zeros(400, 2))
    own = {name: active_units(kl)[0] for name, kl in unit_kl.items()}
    assert own == {"z1": 0, "z2": 1}  
    moments = posterior_moments(model, guide, [x], num_samples=100)
    marginal = {name: active_units_marginal(mean, mc_variance=noise)[0] for name, (mean, noise) in moments.items()}
    assert marginal == {"z1": 2, "z2": 1}  # E_q[z1 | x] = W E_q[z2 | x] moves with x[:, 0]

    layer_kl = {name: float(kl.sum(-1).mean()) for name, kl in unit_kl.items()}
    report = collapsed_layers(
        layer_kl, {n: (own[n], 2) for n in own}, {n: (marginal[n], 2) for n in marginal}
    )
    assert [r["layer"] for r in report] == ["z1"]
    assert report[0]["kl"] == 0.0 and report[0]["active_units"] == 0 and report[0]["active_units_marginal"] == 2
    assert "vary only with the layers above" in report[0]["reason"]


def test_unit_kl_sums_to_the_layer_kl_and_matches_the_normal_kl(x):
    model_trace, guide_trace = get_traces(model, guide, x)
    unit_kl = kl_per_unit(model_trace, guide_trace)
    for name, kl in kl_per_site(model_trace, guide_trace).items():
        torch.testing.assert_close(unit_kl[name].sum(-1), kl)
    # KL(N(x0, 0.3) || N(0, 1)) = (0.09 + x0^2) / 2 - log 0.3 - 1/2 for z2's first unit
    expected = (0.09 + x[:, 0] ** 2) / 2 - torch.log(torch.tensor(0.3)) - 0.5
    torch.testing.assert_close(unit_kl["z2"][:, 0], expected)
    mc = kl_per_unit(model_trace, guide_trace, analytic=False)["z2"]
    value = guide_trace.nodes["z2"]["value"]
    q = dist.Normal(guide_trace.nodes["z2"]["fn"].base_dist.loc, SCALE)
    torch.testing.assert_close(mc, q.log_prob(value) - dist.Normal(0.0, 1.0).log_prob(value))
    assert torch.equal(unit_kl["z2"][:, 1], torch.zeros(400))


def test_flowed_layers_have_no_unit_kl_and_are_judged_by_their_layer_kl(x):
    iaf = IAF(2, 0, 1)

    def flowed_guide(x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", iaf(dist.Normal(x, 0.3).to_event(1), x.new_zeros(x.shape[0], 0)))
            pyro.sample("z1", dist.Normal(z2 @ WEIGHT.T, 0.5).to_event(1))

    assert set(kl_per_unit(*get_traces(model, flowed_guide, x))) == {"z1"}
    report = collapsed_layers(
        {"z2": 0.004, "z1": 3.0, "z0": 0.02}, {"z2": (None, 2), "z1": (None, 2), "z0": (None, 2)},
        {"z2": (0, 2), "z1": (2, 2), "z0": (1, 2)},
    )
    assert [r["layer"] for r in report] == ["z2"] and "below 0.01 nats" in report[0]["reason"]


def test_evaluation_reports_a_layer_that_only_follows_the_one_above(data_root, tmp_path):
    """A two-layer ladder whose z_1 posterior is its prior (zero head) while z_2 reads the
    image: results.json counts no own unit in z_1 and flags it, though its marginal mean
    moves with z_2; z_2's units are active."""
    from pyro_hvae.config import dump_config, load_config
    from pyro_hvae.data import load_splits
    from pyro_hvae.evaluate import evaluate_checkpoint
    from pyro_hvae.run import save_checkpoint
    from pyro_hvae.models.build import build_model

    cfg = load_config(None, [
        f"data.root={data_root}", "data.val_size=100", "model.latent_dims=[6,3]", "model.hidden_dims=[32]",
        "model.batch_norm=false", "eval.split=val", "eval.num_samples=2",
    ])
    splits = load_splits(cfg.data)
    vae = build_model(cfg.model, splits.data_shape)
    torch.nn.init.normal_(vae.guide.heads[1].net[-1].weight, std=3.0)  # z_2 = heads[1]; z_1's head stays zero
    checkpoint = tmp_path / "best.pt"
    save_checkpoint(checkpoint, {"kind": "best", "config": dump_config(cfg), "step": 0, "model": vae.state_dict(),
                                 "ema": False, "val": {}, "data": splits.describe()})
    results = evaluate_checkpoint(checkpoint, out=tmp_path / "results.json")

    assert results["kl_per_layer"]["z_1"] == 0.0 and results["kl_per_layer"]["z_2"] > 1.0
    assert results["active_units"] == {"z_1": [0, 6], "z_2": [3, 3]}
    assert results["active_units_marginal"]["z_1"][0] > 0
    assert results["active_unit_threshold"] == 0.01
    [collapsed] = results["collapsed_layers"]
    assert collapsed["layer"] == "z_1" and collapsed["active_units"] == 0
    assert collapsed["active_units_marginal"] == results["active_units_marginal"]["z_1"][0]
