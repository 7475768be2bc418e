import math

import pytest
import torch

from pyro_hvae.infer.step import EMA, UpdateSkipper, kl_weight, warmup_cosine


def test_skipper_skips_spikes_and_non_finite_norms_relative_to_the_run():
    skipper = UpdateSkipper(factor=10.0, window=40)
    norms = [1.0 + 0.1 * (i % 5) for i in range(40)]
    assert not any(skipper.should_skip(n) for n in norms)
    assert skipper.should_skip(50.0)  # a spike 40x the median
    assert not skipper.should_skip(5.0)  # large but within 10x
    assert skipper.should_skip(math.nan) and skipper.should_skip(math.inf)
    assert skipper.skipped == 3


def test_skipper_follows_a_lasting_change_of_scale_instead_of_skipping_forever():
    skipper = UpdateSkipper(factor=10.0, window=40)
    for _ in range(40):
        skipper.should_skip(1.0)
    decisions = [skipper.should_skip(100.0) for _ in range(60)]
    assert decisions[0]  # the jump is skipped at first
    assert not any(decisions[-30:])  # but once it lasts, the level moves and updates resume
    assert skipper.skipped < 25


def test_skipper_state_round_trips():
    a = UpdateSkipper(factor=3.0, window=8)
    for n in [1, 2, 3, 40, 2]:
        a.should_skip(float(n))
    b = UpdateSkipper(factor=3.0, window=8)
    b.load_state_dict(a.state_dict())
    assert [a.should_skip(v) for v in (9.0, 1.0)] == [b.should_skip(v) for v in (9.0, 1.0)]


def test_learning_rate_warm_up_then_cosine_to_the_floor():
    f = lambda s: warmup_cosine(s, warmup_steps=10, total_steps=110, min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # half way through the decay
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_kl_weight_rises_linearly_and_is_never_zero():
    assert kl_weight(0, 0) == 1.0
    assert kl_weight(0, 100) == pytest.approx(0.01)
    assert kl_weight(49, 100) == pytest.approx(0.5)
    assert kl_weight(1000, 100) == 1.0


def test_ema_is_a_moving_average_of_the_weights():
    net = torch.nn.Linear(2, 1)
    ema = EMA(net, decay=0.9)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)  # the first update's decay is min(0.9, 1 / 10)
    assert torch.allclose(ema.shadow.weight, start + 0.9)
    assert not ema.shadow.weight.requires_grad
