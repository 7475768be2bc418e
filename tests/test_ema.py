"""The EMA of the weights: warm-up of its decay, and its update count across a resume."""

import math

import pytest
import torch

from pyro_hvae.config import load_config
from pyro_hvae.data import load_splits
from pyro_hvae.infer.step import EMA
from pyro_hvae.run import prepare_run_dir
from pyro_hvae.train import Trainer


def _follow(values, decay):
    """An EMA of a 1-d parameter that takes ``values`` in turn after its initial value ``values[0]``."""
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(values[0])
    ema = EMA(net, decay=decay)
    for value in values[1:]:
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update(net)
    return float(ema.shadow.weight), ema


def test_initial_weights_fade_out_within_the_warm_up():
    """A weight at 1 that drops to 0 for ``n`` updates: the shadow is the weight the
    initial value keeps, ``prod_t (1 + t) / (10 + t) = 1 / C(n + 9, 9)`` while every
    ``decay_t`` is below ``decay`` (for 0.999, ``t < 8990``)."""
    n = 500
    shadow, ema = _follow([1.0] + [0.0] * n, decay=0.999)
    assert ema.updates == n
    assert shadow == pytest.approx(1 / math.comb(n + 9, 9), rel=1e-4)
    assert shadow < 1e-15  # without warm-up: 0.999 ** 500 = 0.61


def test_linearly_moving_weight_is_followed_at_nine_tenths_of_the_run():
    """For ``theta_t = t`` the warm-up recursion has the exact solution ``0.9 t``:
    ``0.9 (t + 1) = d_t 0.9 t + (1 - d_t)(t + 1)`` with ``d_t = (t + 1) / (t + 10)``."""
    for n in (1, 7, 500):
        shadow, _ = _follow([float(t) for t in range(n + 1)], decay=0.999)
        assert shadow == pytest.approx(0.9 * n, rel=1e-5)


def test_decay_reaches_its_configured_value_after_the_warm_up():
    """Once ``(1 + t) / (10 + t) >= decay`` (t >= 81 for 0.9) the decay is the configured one."""
    _, ema = _follow([0.0] * 101, decay=0.9)
    with torch.no_grad():
        before = float(ema.shadow.weight)
        net = torch.nn.Linear(1, 1, bias=False)
        net.weight.fill_(1.0)
    ema.update(net)
    assert before == 0.0
    assert float(ema.shadow.weight) == pytest.approx(0.1)


def test_trainer_checkpoint_keeps_the_update_count(data_root, tmp_path):
    """A resumed run continues the decay's warm-up where it stopped, not from t = 0."""
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny\ndata:\n  root: {data_root}\n")
    cfg = load_config(config, [
        "model.latent_dims=[4,2]", "model.hidden_dims=[16,8]", "data.batch_size=32", "data.val_size=64",
        "data.eval_batch_size=64", "train.steps=5", "train.eval_every=5", "train.log_every=5",
        "train.ema_decay=0.99",
    ])
    splits = load_splits(cfg.data)
    trainer = Trainer(cfg, prepare_run_dir(tmp_path / "a"), device=torch.device("cpu"), splits=splits)
    trainer.fit()
    state = trainer.state_dict()
    assert state["ema_updates"] == trainer.ema.updates == 5 - trainer.skipper.skipped
    resumed = Trainer(cfg, prepare_run_dir(tmp_path / "b"), device=torch.device("cpu"), splits=splits)
    resumed.load_state_dict(state)
    assert resumed.ema.updates == trainer.ema.updates
    del state["ema_updates"]  # a last.pt from before the count: resumes, counting its steps
    resumed.load_state_dict(state)
    assert resumed.ema.updates == 5
