"""What the example configs achieve: train each, then evaluate it on the test set.

For every config, on the chosen data set: ``pyro-hvae train`` (the library's Trainer),
then ``pyro-hvae evaluate`` with K importance samples on the whole test set (binarized
once with the recorded seed). Adds the ELBO on 1,000 training images (binarized once
with a fixed seed) for the train-vs-test gap. Prints one markdown row per config and
writes every figure to ``OUT/quality-<dataset>.json``.

    PYRO_HVAE_DATA=../shared/data python bench/quality.py --dataset mnist \
        --configs mnist vae_1layer two_level two_level_bottom_up --out /tmp/quality
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch

from pyro_hvae.config import load_config
from pyro_hvae.data import ImageDataset, load_splits
from pyro_hvae.evaluate import evaluate_checkpoint
from pyro_hvae.run import load_checkpoint, prepare_run_dir
from pyro_hvae.models.build import build_hierarchy
from pyro_hvae.train import Trainer, evaluate_elbo

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def train_elbo(run_dir: Path, cfg, splits) -> float:
    """Mean ELBO per image on the first 1,000 training images, binarized once (seed 0)."""
    state = load_checkpoint(run_dir / "best.pt")
    train = splits.train
    rows = torch.arange(min(1000, len(train)))
    fixed = train.batch(rows, torch.Generator().manual_seed(0)) * train.levels
    vae, hierarchy = build_hierarchy(cfg.model, splits.data_shape, train.batch(rows[:2], torch.Generator().manual_seed(0)))
    vae.load_state_dict(state["model"])
    subset = ImageDataset(fixed.round().to(torch.uint8), train.indices[rows], train.levels, dynamic=False)
    pyro.set_rng_seed(0)
    with pyro.settings.context(module_local_params=True), pyro.validation_enabled(False):
        return evaluate_elbo(vae, hierarchy, subset, cfg, torch.device("cpu"))["val_elbo"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    parser.add_argument("--configs", nargs="+", default=["mnist", "vae_1layer", "two_level", "two_level_bottom_up"])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("quality"))
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides applied to every config")
    args = parser.parse_args()
    rows = []
    for name in args.configs:
        cfg = load_config(EXAMPLES / f"{name}.yaml", [f"data.dataset={args.dataset}", *args.overrides])
        splits = load_splits(cfg.data)
        run_dir = prepare_run_dir(args.out / f"{args.dataset}-{name}", force=True)
        start = time.perf_counter()
        summary = Trainer(cfg, run_dir, device=torch.device("cpu"), splits=splits).fit()
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        results = evaluate_checkpoint(run_dir, num_samples=args.num_samples, split="test", force=True)
        eval_seconds = time.perf_counter() - start
        row = {
            "config": name,
            "dataset": args.dataset,
            "seed": cfg.seed,
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "steps": summary["step"],
            "best_step": summary["best_step"],
            "stopped_early": summary["stopped_early"],
            "test_nll": results["nll_nats"],
            "test_bits_per_dim": results["nll_bits_per_dim"],
            "test_elbo": results["elbo"],
            "train_elbo": train_elbo(run_dir, cfg, splits),
            "active_units": results["active_units"],
            "kl_per_layer": results["kl_per_layer"],
            "khat": results["khat"],
            "num_images": results["num_images"],
            "K": args.num_samples,
        }
        rows.append(row)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"quality-{args.dataset}.json").write_text(json.dumps(rows, indent=2))
        print(markdown(row), flush=True)


def markdown(row: dict) -> str:
    units = ", ".join(f"{count}/{dim}" for count, dim in row["active_units"].values())
    khat = row["khat"]
    gap = row["train_elbo"] - row["test_elbo"]
    return (
        f"| {row['config']} | {row['test_nll']:.2f} | {row['test_elbo']:.2f} | {row['train_elbo']:.2f} | {gap:.2f} "
        f"| {units} | {khat['mean']:.2f} / {khat['max']:.2f} / {khat['fraction_above']:.3f} "
        f"| {row['steps']} ({row['best_step']}) | {row['train_seconds'] / 60:.1f} + {row['eval_seconds'] / 60:.1f} min |"
    )


if __name__ == "__main__":
    main()
