"""Every example config validates, each conv example builds for its images, and the smoke
config trains its 20 steps."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pyro_hvae.cli import main
from pyro_hvae.config import ConvLadderConfig, load_config
from pyro_hvae.models.build import build_model
from pyro_hvae.run import read_metrics

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))
#: (channels, height, width) of the built-in data sets' images.
IMAGE_SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def test_there_are_examples():
    assert {"mnist_conv.yaml", "fashion_mnist_conv.yaml", "fashion_mnist_conv_8bit.yaml", "cifar10.yaml", "smoke_conv.yaml"} <= {c.name for c in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_example_validates(config):
    result = CliRunner().invoke(main, ["train", str(config), "--print-config"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert load_config(config).name in result.output
    first = config.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 20  # the comment line saying what it shows


@pytest.mark.parametrize("config", [c for c in CONFIGS if load_config(c).model.kind == "conv_ladder"], ids=lambda c: c.stem)
def test_every_conv_example_fits_its_images(config):
    cfg = load_config(config)
    assert isinstance(cfg.model, ConvLadderConfig)
    vae = build_model(cfg.model, IMAGE_SHAPES[cfg.data.dataset])  # scales that fit the images
    assert [h for h, _ in vae.layout.grids] == cfg.model.scales


def test_the_cifar10_example_is_nvae_scale():
    cfg = load_config(EXAMPLES / "cifar10.yaml")
    vae = build_model(cfg.model, IMAGE_SHAPES["cifar10"])
    assert vae.layout.num_groups == 30 and vae.layout.widths == [128, 128]
    assert sum(p.numel() for p in vae.parameters()) > 10_000_000


def test_the_smoke_config_trains(data_root, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["train", str(EXAMPLES / "smoke_conv.yaml"), f"data.root={data_root}", "--out", str(out)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["step"] == 20
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [10, 20] and all("spectral_reg" in r for r in train)
    assert train[1]["elbo"] > train[0]["elbo"]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 20
