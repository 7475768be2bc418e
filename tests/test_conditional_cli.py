"""``model.kind: conditional_ladder`` through the config, ``pyro-hvae train``, ``evaluate`` and ``inpaint``."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_hvae.config import ConditionalLadderConfig, ConfigError, load_config
from pyro_hvae.models.build import build_model
from pyro_hvae.models.conditional import BorderLadderVAE
from pyro_hvae.plots import KL_PLOT
from clirun import run

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "model.kind=conditional_ladder", "model.latent_dims=[6,4]", "model.hidden_dims=[32]",
    "model.context_channels=[4,8,8]", "data.batch_size=50", "data.val_size=100", "device=cpu",
    "train.steps=20", "train.log_every=10", "train.eval_every=10", "optim.warmup_steps=5",
]


def config_error(*overrides) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(None, list(overrides))
    assert len(err.value.errors) == 1
    return err.value.errors[0]


def test_the_kind_builds_a_border_model():
    cfg = load_config(None, ["model={kind: conditional_ladder, mask: left, latent_dims: [4, 2], hidden_dims: [16]}"])
    assert isinstance(cfg.model, ConditionalLadderConfig) and cfg.model.context == "border"
    vae = build_model(cfg.model, (1, 28, 28))
    assert isinstance(vae, BorderLadderVAE)
    assert vae.mask[0, :, :14].logical_not().all() and vae.mask[0, :, 14:].all()  # the left half hidden


def test_bad_values_give_one_line_each():
    assert config_error("model={kind: conditional_ladder, context: label}").startswith(
        "model.context: 'label' needs class labels, which training does not load"
    )
    assert config_error("model={kind: conditional_ladder, mask: random}").startswith(
        "model.mask: Input should be 'center', 'left', 'right', 'top' or 'bottom', got 'random'"
    )
    assert config_error("model={kind: conditional_ladder, context_channels: []}").startswith("model.context_channels:")
    assert "unknown option of kind 'conditional_ladder'" in config_error("model={kind: conditional_ladder, posterior: residual}")
    with pytest.raises(ConfigError, match=r"^model.context_channels: 4 maps halve the image 3 times, which needs height and "
                                          r"width divisible by 8, got 28x28; give fewer entries \(the images are 1x28x28\)$"):
        build_model(load_config(None, ["model={kind: conditional_ladder, context_channels: [4, 4, 4, 4]}"]).model, (1, 28, 28))


def test_the_cli_refuses_maps_that_do_not_fit_and_writes_nothing(tiny, tmp_path):
    out = tmp_path / "run"
    result = run("train", tiny, *TINY, "model.context_channels=[4,4,4,4]", "--out", out)
    assert result.exit_code == 2
    assert result.output.startswith("error: model.context_channels: 4 maps halve the image 3 times")
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cond")
    config = folder / "tiny.yaml"
    config.write_text(f"name: tiny_inpaint\ndata:\n  root: {data_root}\n")
    out = folder / "run"
    result = run("train", config, *TINY, "model.output_bias=data_mean", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_train_and_evaluate_report_the_hidden_pixels_given_the_border(trained):
    assert (trained / KL_PLOT).is_file() and (trained / "best.pt").is_file()
    result = run("evaluate", trained, "--split", "val", "-K", "5", "--device", "cpu")
    assert result.exit_code == 0, result.output
    results = json.loads((trained / "eval-val-K5" / "results.json").read_text())
    assert results["likelihood_of"].startswith("log p(x_missing | x_border)")
    assert results["num_dims"] == 14 * 14
    assert results["nll_bits_per_dim"] == pytest.approx(results["nll_nats"] / (196 * math.log(2)))
    # the likelihood of 196 binary pixels, after 20 steps from the data mean: nowhere near 784 pixels' worth
    assert 0 < results["nll_nats"] < 196 * math.log(2)
    assert list(results["kl_per_layer"]) == ["z_1", "z_2"]


def test_inpaint_fills_from_the_border(trained):
    out = trained / "fill"
    result = run("inpaint", trained, "--method", "conditional", "--num", "4", "--steps", "3", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    with np.load(out / "inpaint.npz") as arrays:
        mask, original, filled = arrays["mask"], arrays["original"], arrays["filled"]
        assert filled.shape == (4, 1, 28, 28) and arrays["missing_log_prob"].shape == (4,)
        assert "acceptance_rate" not in arrays
    assert np.array_equal(filled[:, mask], original[:, mask])
    wrong = run("inpaint", trained, "--num", "2", "--out", trained / "mwg")
    assert wrong.exit_code == 2 and "use --method conditional" in wrong.output and not (trained / "mwg").exists()
    wrong = run("inpaint", trained, "--method", "conditional", "--mask", "left", "--out", trained / "left")
    assert wrong.exit_code == 2 and "pass --mask center" in wrong.output


def test_sample_and_reconstruct_refuse_it(trained):
    for verb in ("sample", "reconstruct"):
        result = run(verb, trained, "--out", trained / verb)
        assert result.exit_code == 2 and "use pyro-hvae inpaint RUN --method conditional" in result.output
        assert not (trained / verb).exists()


def test_the_fill_matches_the_inpaint_function(trained):
    from pyro_hvae import inpaint, make_mask
    from pyro_hvae.use_run import load_run

    loaded = load_run(trained)
    x = loaded.splits.val.batch(torch.arange(3))
    mask = make_mask("center", (1, 28, 28))
    with pytest.raises(ValueError, match="use method='conditional'"):
        inpaint(loaded.vae, x, mask, method="mwg")
    torch.manual_seed(1)
    via_inpaint = inpaint(loaded.vae, x, mask, method="conditional", num_steps=2)
    torch.manual_seed(1)
    direct = loaded.vae.fill(x, num_samples=2)
    assert torch.equal(via_inpaint.predictive_mean, direct.predictive_mean)


def test_the_inpainting_bench_has_a_row_for_it(trained, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import inpaint_quality
    finally:
        sys.path.pop(0)
    row = inpaint_quality.measure_conditional(trained, 5, 2, 0)
    assert row["method"] == "conditioned on the border" and row["images"] == 5 and row["acceptance_rate"] is None
    assert 0 <= row["mse"][0] <= 1 and row["missing_log_prob"][0] < 0
    assert "conditioned on the border: MSE" in capsys.readouterr().out
