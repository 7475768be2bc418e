"""kl_per_layer.png: one panel per latent layer, written into every run folder at each evaluation."""

import pytest

from pyro_hvae.plots import KL_PLOT, kl_per_layer_figure, write_kl_plot
from pyro_hvae.run import read_metrics
from clirun import run

pytestmark = pytest.mark.usefixtures("one_thread")


def records(sites):
    train = [{"kind": "train", "step": s, "kl": {n: float(i + s) for i, n in enumerate(sites)}} for s in (10, 20, 30)]
    val = [{"kind": "eval", "step": s, "val_elbo": -1.0, "val_kl": {n: 2.0 * i for i, n in enumerate(sites)}} for s in (15, 30)]
    return train + val


def test_one_panel_per_layer_in_natural_order():
    figure = kl_per_layer_figure(records(["z_10", "z_2", "z_1"]))
    assert [ax.get_title() for ax in figure.axes] == ["z_1", "z_2", "z_10"]
    for ax in figure.axes:
        (train_line, val_line) = ax.get_lines()
        assert list(train_line.get_xdata()) == [10, 20, 30] and list(val_line.get_xdata()) == [15, 30]
    z_2 = figure.axes[1].get_lines()
    assert list(z_2[0].get_ydata()) == [11.0, 21.0, 31.0] and list(z_2[1].get_ydata()) == [2.0, 2.0]
    assert len(kl_per_layer_figure(records([f"z_{i}" for i in range(1, 7)])).axes) == 6  # 2 rows, 2 empty cells removed


def test_records_without_kl_and_folders_without_metrics_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no per-layer KL"):
        kl_per_layer_figure([{"kind": "eval", "step": 1}])
    with pytest.raises(ValueError, match="holds no metrics.jsonl"):
        write_kl_plot(tmp_path)


def test_training_writes_the_plot_at_each_evaluation(tiny, tmp_path):
    out = tmp_path / "run"
    result = run(
        "train", tiny, "model.latent_dims=[8,6,4]", "model.hidden_dims=[32]", "data.batch_size=50",
        "data.val_size=100", "train.steps=20", "train.log_every=5", "train.eval_every=10", "--out", out, "--device", "cpu",
    )
    assert result.exit_code == 0, result.output
    plot = out / KL_PLOT
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = kl_per_layer_figure(read_metrics(out / "metrics.jsonl"))
    assert [ax.get_title() for ax in figure.axes] == ["z_1", "z_2", "z_3"]
    assert all(len(ax.get_lines()) == 2 for ax in figure.axes)  # training and validation
    first = plot.stat().st_mtime_ns
    assert write_kl_plot(out) == plot and plot.stat().st_mtime_ns >= first
