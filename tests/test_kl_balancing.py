"""`train.kl_balancing`: during KL warm-up each group's KL term is weighted by
gamma_l = L (KL_l / n_l + eps) / sum_j (KL_j / n_j + eps); after it, the plain ELBO."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from click.testing import CliRunner

from pyro_hvae.cli import main
from pyro_hvae.infer.elbo import KL_BALANCING_EPS, HierarchicalELBO
from pyro_hvae.run import read_metrics

N, SIZES = 4, {"z1": 3, "z2": 5}
LOCS = {"z1": torch.full((N, 3), 0.1), "z2": torch.full((N, 5), 2.0)}  # z2 far from its prior: more KL per unit


def model(x):
    with pyro.plate("data", N):
        z1 = pyro.sample("z1", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        z2 = pyro.sample("z2", dist.Normal(torch.zeros(5), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z1.sum(-1) + z2.sum(-1), 1.0), obs=x)


def guide(x):
    with pyro.plate("data", N):
        for name in ("z1", "z2"):
            pyro.sample(name, dist.Normal(LOCS[name], 0.5).to_event(1))


def exact_kl(name):
    """Total analytic KL of a group over the batch: N * n * (log(1/0.5) + (0.5^2 + mu^2) / 2 - 1/2)."""
    mu = LOCS[name][0, 0].item()
    per_unit = torch.log(torch.tensor(2.0)).item() + (0.25 + mu**2) / 2 - 0.5
    return N * SIZES[name] * per_unit


def loss_and_terms(**kwargs):
    pyro.set_rng_seed(0)
    elbo = HierarchicalELBO(**kwargs)
    loss = elbo.differentiable_loss(model, guide, torch.ones(N))
    return loss.item(), elbo.terms


def test_the_loss_weights_each_group_kl_by_its_share_per_unit():
    beta = 0.3
    loss, terms = loss_and_terms(beta=beta, kl_balancing=True)
    per_unit = {name: exact_kl(name) / N / SIZES[name] + KL_BALANCING_EPS for name in SIZES}
    gamma = {name: 2 * per_unit[name] / sum(per_unit.values()) for name in SIZES}
    expected = beta * sum(gamma[name] * exact_kl(name) for name in SIZES) - N * terms["reconstruction"].item()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert {name: g.item() for name, g in terms["kl_balance"].items()} == pytest.approx(gamma, rel=1e-5)
    assert gamma["z1"] < 1 < gamma["z2"]  # the group with little KL per unit is penalised less


def test_the_coefficients_average_to_one():
    _, terms = loss_and_terms(beta=0.5, kl_balancing=True)
    assert sum(terms["kl_balance"].values()).item() / 2 == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("beta, balancing", [(1.0, True), (0.3, False)])
def test_no_effect_after_warm_up_or_when_off(beta, balancing):
    loss, terms = loss_and_terms(beta=beta, kl_balancing=balancing)
    plain = beta * sum(exact_kl(name) for name in SIZES) - N * terms["reconstruction"].item()
    assert loss == pytest.approx(plain, rel=1e-5)
    assert terms["kl_balance"] == {}


def test_the_reported_elbo_is_unaffected():
    _, balanced = loss_and_terms(beta=0.3, kl_balancing=True)
    _, plain = loss_and_terms(beta=0.3)
    torch.testing.assert_close(balanced["elbo"], plain["elbo"])
    for name in SIZES:
        torch.testing.assert_close(balanced["kl"][name], plain["kl"][name])


def test_free_bits_floor_is_balanced_too():
    beta, floor = 0.3, 10.0  # above z1's KL per data point, below z2's
    loss, terms = loss_and_terms(beta=beta, kl_balancing=True, free_bits=floor)
    gamma = {name: g.item() for name, g in terms["kl_balance"].items()}
    assert exact_kl("z1") / N < floor < exact_kl("z2") / N
    expected = beta * (gamma["z1"] * N * floor + gamma["z2"] * exact_kl("z2")) - N * terms["reconstruction"].item()
    assert loss == pytest.approx(expected, rel=1e-5)


def test_a_training_run_logs_the_coefficients_during_warm_up(data_root, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny\ndata:\n  root: {data_root}\n")
    out = tmp_path / "run"
    overrides = [
        "model.kind=conv_ladder", "model.scales=[7]", "model.groups_per_scale=2", "model.latent_channels=2",
        "model.widths=16", "data.batch_size=16", "data.val_size=20", "data.eval_batch_size=20",
        "train.steps=6", "train.log_every=3", "train.eval_every=6", "train.kl_warmup_steps=3",
        "optim.warmup_steps=2", "train.kl_balancing=true",
    ]
    result = CliRunner().invoke(main, ["train", str(config), *overrides, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    during, after = records  # steps 1-3 (beta < 1 at steps 1 and 2, 1 from step 3 on), steps 4-6
    assert sorted(during["kl_balance"]) == sorted(during["kl"])
    assert sum(during["kl_balance"].values()) / len(during["kl_balance"]) == pytest.approx(1.0, rel=1e-5)
    assert after["kl_balance"] == {}
