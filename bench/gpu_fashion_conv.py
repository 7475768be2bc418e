"""The GPU run: train the conv ladder on Fashion-MNIST for a wall-clock budget, then
evaluate it with K = 1000 importance samples on all 10,000 test images.

Prepared and tested on the CPU so that the lent device minutes go to training. What it does:

1. **Plan.** A throwaway :class:`~pyro_hvae.train.Trainer` of the same config times
   ``--calibration-steps`` training steps (after as many warm-up steps) and one
   importance-weighted estimate of an evaluation batch at ``-K`` (the chunk size chosen as
   ``pyro-hvae evaluate`` chooses it). From these: ``train.steps`` = steps/s x budget x
   ``STEP_FILL`` (so that the learning-rate schedule ends with the budget; ``--steps``
   sets it instead), ``train.eval_every`` at most a tenth of that (at least ten points on
   the curve), and an estimate of the evaluation's time. When the budget plus that
   estimate would not end within ``--total-minutes`` of the script's start (the device's
   10-minute limit per command, less a margin), the training budget shrinks to fit.
2. **Train** with ``train.max_minutes`` = the budget: the run stops cleanly once it is
   spent, after a last validation evaluation, and ``best.pt`` holds the weights with the
   best validation ELBO (selection on validation only).
3. **Evaluate** ``best.pt`` with :func:`~pyro_hvae.evaluate.evaluate_checkpoint` at ``-K``
   on the whole test split.

Into ``--out`` (default ``$OUT``) it writes, as soon as each exists (a command cut off
during the evaluation still returns the trained weights and the curve):
``results.json`` (plan, training summary, test NLL / ELBO / k-hat / KL per layer, the
target of 225 nats and whether it is met, device and versions), ``metrics.jsonl``,
``val_elbo_vs_time.png``, ``best.pt``, and the evaluation's ``per_example.npz`` and
``diagnostics.png``: six files, within the device's eight.

On the device it runs through ``bench/gpu_fashion_conv.sh run``, which installs the
carried wheels and data first. Here, once, ``bash bench/gpu_fashion_conv.sh prepare``
fills the git-ignored folder ``gpu_carry/``: the wheels the device's image lacks, for its
Python 3.12 (the device has torch, numpy, scipy, pandas, xarray, matplotlib, click,
PyYAML and tqdm), fetched with::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        --platform manylinux1_x86_64 -d gpu_carry/wheels \\
        pyro-ppl==1.9.2 pyro-api==0.1.2 arviz==0.23.4 xarray-einstats==0.9.1 h5netcdf==1.8.2 \\
        platformdirs==4.14.9 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \\
        typing-inspection==0.4.2 typing-extensions==4.15.0

and Fashion-MNIST's raw files as ``gpu_carry/FashionMNIST.tar.gz`` (the device reaches no
network). Then, with the device tool: ``run(command="bash bench/gpu_fashion_conv.sh run",
carry=["gpu_carry"], timeout_s=600)``.

Locally, e.g. a smoke run on the CPU::

    PYRO_HVAE_DATA=../shared/data python bench/gpu_fashion_conv.py --device cpu --minutes 0.2 \\
        -K 10 --out /tmp/gpu-smoke data.val_size=200
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyro
import torch

from pyro_hvae.config import ConfigError, dump_config, load_config
from pyro_hvae.data import DataError, load_splits
from pyro_hvae.evaluate import default_memory_budget, evaluate_checkpoint, fitting_chunk_size
from pyro_hvae.infer.diagnostics import posterior_moments
from pyro_hvae.infer.iw import log_likelihood
from pyro_hvae.run import RunError, prepare_run_dir, read_metrics, versions
from pyro_hvae.train import Trainer, TrainingError

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "fashion_mnist_conv.yaml"
#: The target for this run: test NLL at K = 1000, nats per image.
TARGET_NATS = 225.0
#: Fraction of the budget the planned steps fill: evaluations and logging take the rest.
STEP_FILL = 0.9
#: Samples per image of the evaluation's posterior means, besides the K of the estimate.
MOMENT_SAMPLES = inspect.signature(posterior_moments).parameters["num_samples"].default
#: Factor on the evaluation's passes for its k-hat fits and bookkeeping.
EVAL_OVERHEAD = 1.2
#: Evaluations of the validation split at least, for the curve.
MIN_EVALUATIONS = 10


class PlanError(ValueError):
    """The run cannot fit its limits; the message says which and what to change."""


@dataclass
class Plan:
    steps_per_second: float
    eval_seconds_estimate: float
    train_minutes: float
    steps: int
    eval_every: int
    note: str


def training_minutes(requested: float, total: float, spent_seconds: float, eval_seconds: float) -> tuple[float, str]:
    """The training budget: ``requested``, shrunk so that training plus the estimated
    evaluation end within ``total`` minutes of the start (``spent_seconds`` already gone)."""
    left = total - spent_seconds / 60 - eval_seconds / 60
    if left <= 0:
        raise PlanError(
            f"the evaluation alone is estimated at {eval_seconds / 60:.1f} min, which with {spent_seconds / 60:.1f} min "
            f"of set-up leaves no training time within --total-minutes {total:g}; lower -K or raise --total-minutes"
        )
    if left < requested:
        return left, f"training budget cut from {requested:g} to {left:.2f} min to end within {total:g} min"
    return requested, ""


def measure_speed(cfg, splits, device: torch.device, warmup: int, timed: int, K: int) -> tuple[float, float]:
    """Training steps per second of a throwaway trainer of ``cfg``, and the estimated
    seconds of evaluating the test split: one IW estimate of an evaluation batch
    (``eval.batch_size`` images, ``K`` samples) timed, scaled to the batches and to the
    samples the evaluation also draws (posterior means, an ELBO pass, the first
    unbatched particle), times :data:`EVAL_OVERHEAD`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), device=device, splits=splits)
        batches = trainer.loader.forever()
        with pyro.settings.context(module_local_params=True), pyro.validation_enabled(False):
            trainer.vae.train()
            for i in range(warmup + timed):
                if i == warmup:
                    sync()
                    start = time.perf_counter()
                trainer.take_step(next(batches).to(device))
            sync()
            steps_per_second = timed / (time.perf_counter() - start)
            vae = trainer.vae.eval()
            x = splits.test.batch(torch.arange(min(cfg.eval.batch_size, len(splits.test)))).to(device)
            with torch.no_grad():
                chunk = cfg.eval.chunk_size or fitting_chunk_size(vae, x, K, default_memory_budget(device))
                for _ in range(2):  # the first pass pays for allocations and kernel selection
                    sync()
                    start = time.perf_counter()
                    log_likelihood(vae.model, vae.guide, x, num_samples=K, chunk_size=chunk,
                                   data_plate=trainer.hierarchy.data_plate)
                    sync()
                    batch_seconds = time.perf_counter() - start
    del trainer, vae
    if device.type == "cuda":
        torch.cuda.empty_cache()
    passes = (K + MOMENT_SAMPLES + 2) / K
    return steps_per_second, batch_seconds * math.ceil(len(splits.test) / x.shape[0]) * passes * EVAL_OVERHEAD


def make_plan(cfg, splits, device, args, started: float) -> Plan:
    steps_per_second, eval_seconds = measure_speed(cfg, splits, device, args.calibration_steps,
                                                   args.calibration_steps, args.num_samples)
    minutes, note = training_minutes(args.minutes, args.total_minutes, time.perf_counter() - started, eval_seconds)
    steps = args.steps or max(1, int(steps_per_second * 60 * minutes * STEP_FILL))
    eval_every = max(1, min(cfg.train.eval_every, steps // MIN_EVALUATIONS))
    return Plan(steps_per_second, eval_seconds, minutes, steps, eval_every, note)


def val_elbo_figure(metrics: list[dict], path: Path, title: str) -> None:
    """Validation ELBO (EMA weights) and the training ELBO against wall-clock minutes."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    evals = [r for r in metrics if r["kind"] == "eval" and "val_elbo" in r]
    train = [r for r in metrics if r["kind"] == "train"]
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.subplots()
    axes.plot([r["elapsed_s"] / 60 for r in train], [r["elbo"] for r in train], color="C7", lw=0.8,
              label="training ELBO (batch means)")
    axes.plot([r["elapsed_s"] / 60 for r in evals], [r["val_elbo"] for r in evals], "o-", color="C0",
              label="validation ELBO")
    best = [r for r in evals if r["best"]]
    if best:
        axes.plot(best[-1]["elapsed_s"] / 60, best[-1]["val_elbo"], "*", color="C3", markersize=14, label="best.pt")
    if evals:  # the first minutes' ELBO is far below the rest: keep the curve's end readable
        values = [r["val_elbo"] for r in evals]
        low, high = min(values[len(values) // 4:]), max(values)
        axes.set_ylim(low - 0.5 * (high - low) - 1, high + 0.1 * (high - low) + 1)
    axes.set(xlabel="wall-clock minutes of training", ylabel="ELBO (nats per image)", title=title)
    axes.legend(loc="lower right")
    figure.savefig(path, dpi=100)


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run(args) -> dict:
    started = time.perf_counter()
    if args.minutes <= 0 or args.total_minutes <= 0:
        raise PlanError("--minutes and --total-minutes must be positive; pass e.g. --minutes 8")
    if args.num_samples < 1:
        raise PlanError(f"-K must be >= 1, got {args.num_samples}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PlanError("--device cuda: no CUDA device is available here; run on the lent GPU or pass --device cpu")
    cfg = load_config(args.config, [f"device={device.type}", *args.overrides])
    splits = load_splits(cfg.data)
    plan = make_plan(cfg, splits, device, args, started)
    print(f"plan: {plan.steps_per_second:.1f} steps/s, train {plan.train_minutes:.2f} min = {plan.steps} steps "
          f"(eval every {plan.eval_every}), test evaluation estimated at {plan.eval_seconds_estimate / 60:.1f} min"
          + (f"; {plan.note}" if plan.note else ""), file=sys.stderr, flush=True)
    overrides = [*args.overrides, f"train.steps={plan.steps}", f"train.eval_every={plan.eval_every}",
                 f"train.max_minutes={plan.train_minutes}"]
    cfg = load_config(args.config, [f"device={device.type}", *overrides])
    run_dir = prepare_run_dir(args.run_dir, force=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "config": str(args.config), "overrides": overrides, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": versions(), "plan": asdict(plan), "target_nats": TARGET_NATS, "status": "training",
    }
    write_json(out / "results.json", results)

    summary = Trainer(cfg, run_dir, device=device, splits=splits, overrides=overrides).fit()
    metrics = read_metrics(run_dir / "metrics.jsonl")
    shutil.copy(run_dir / "metrics.jsonl", out / "metrics.jsonl")
    shutil.copy(run_dir / "best.pt", out / "best.pt")
    val_elbo_figure(metrics, out / "val_elbo_vs_time.png",
                    f"{cfg.name} on {device.type}: {summary['step']} steps in {summary['train_seconds'] / 60:.1f} min")
    results.update(status="evaluating", train=summary,
                   val_curve=[[r["elapsed_s"], r["step"], r["val_elbo"]] for r in metrics if "val_elbo" in r])
    write_json(out / "results.json", results)
    print(f"trained: {summary['step']} steps in {summary['train_seconds'] / 60:.2f} min, best validation ELBO "
          f"{summary['best_val_elbo']:.2f} at step {summary['best_step']}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    (run_dir / "eval").mkdir(exist_ok=True)
    test = evaluate_checkpoint(run_dir, num_samples=args.num_samples, split="test", device=device,
                               out=run_dir / "eval", force=True)
    eval_seconds = time.perf_counter() - start
    for name in ("per_example.npz", "diagnostics.png"):
        shutil.copy(run_dir / "eval" / name, out / name)
    test.pop("results")
    results.update(status="done", eval_seconds=eval_seconds, total_seconds=time.perf_counter() - started, test=test,
                   meets_target=test["nll_nats"] <= TARGET_NATS)
    write_json(out / "results.json", results)
    print(f"test NLL {test['nll_nats']:.2f} nats ({test['nll_bits_per_dim']:.4f} bits/dim) at K = {args.num_samples} "
          f"on {test['num_images']} images in {eval_seconds / 60:.1f} min; target {TARGET_NATS:g}: "
          f"{'met' if results['meets_target'] else 'missed'}", file=sys.stderr, flush=True)
    return results


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="config file (default: examples/fashion_mnist_conv.yaml)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget, wall clock")
    parser.add_argument("--total-minutes", type=float, default=9.5,
                        help="the whole script must end within this (the device runs a command for 10 minutes at most)")
    parser.add_argument("-K", "--num-samples", type=int, default=1000, help="importance samples per test image")
    parser.add_argument("--steps", type=int, default=None, help="train.steps (default: what the budget fits, measured)")
    parser.add_argument("--calibration-steps", type=int, default=20, help="warm-up and timed steps of the speed measurement")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    parser.add_argument("--run-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpu_fashion_conv_run")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the config")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        return run(args)
    except (PlanError, ConfigError, DataError, RunError, TrainingError) as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
