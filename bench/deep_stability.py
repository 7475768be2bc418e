"""What holds a 30-group conv ladder: update skipping, KL warm-up and spectral regularization.

Trains the conv ladder of ``examples/mnist_conv.yaml`` made 30 groups deep (scales
[14, 7], ``groups_per_scale: [6, 24]``, 4 latent channels, widths 16) on real MNIST
through the library's :class:`~pyro_hvae.train.Trainer`, in variants with the same
seed (the same initial weights and the same batches), steps and learning rate:

* ``all``: the three stabilizers of the config on;
* ``no_skip``: ``train.skip_factor=null`` (an update whose gradient norm is not finite
  is still never applied: the trainer skips it whatever the factor);
* ``no_spectral``: ``train.spectral_reg=null``;
* ``no_warmup``: ``train.kl_warmup_steps=0`` (KL weight 1 from the first step);
* ``none``: all three off;
* ``only_skip``, ``only_spectral``, ``only_warmup``: one of the three on, the other two
  off (run when named in ``--variants``; the first five are the default).

Gradient clipping (``train.grad_clip``, 200 nats per image in the config), the
learning-rate warm-up and the EMA of the weights stay on in every variant (``--set
train.grad_clip=null`` drops the clipping everywhere). The config's schedule is
compressed to ``--steps``: the KL warm-up, the spectral weight's decay and the
learning-rate warm-up each last the same fraction of the run as in the config (1000,
1000 and 100 of 5000 steps), then the cosine decay to ``optim.min_lr``.

``--no-depth-scaling`` runs every variant without the initialisation's depth scaling
(:func:`undo_depth_scaling`): the residual branches of the cells at full weight and the
layers that feed the top-down state at their default initial weights, so that the
model starts as it would without it and what the three stabilizers hold can show.

Every step is logged (``train.log_every=1``), and the validation split evaluated once,
at the end. Per variant, from the run folder's ``metrics.jsonl``: the first step whose
training loss is not finite, the largest gradient norm (of the per-image loss, before
clipping), the training loss per step, the final validation ELBO; the number of skipped
updates and, when the trainer stopped the run (a non-finite first loss, or
100 skipped updates in a row), the step and the reason. Prints a markdown table; with
``--out`` draws the negative training ELBO and the gradient norm per step, one line per
variant (the ELBO without the KL weight and the penalty, so that the variants compare):

    PYRO_HVAE_DATA=../shared/data OMP_NUM_THREADS=1 python bench/deep_stability.py \\
        --steps 200 --batch 32 --lr 1e-2 --out docs/figures/deep_stability.png

Variants can train in separate processes, one per core: give each the same ``--runs
RUNS`` and its own ``--variants`` name; then ``--from-runs RUNS --variants ...`` trains
nothing and prints the table and draws the figure from the kept folders. Runs of 500
steps or more are drawn per window of a 250th of the run.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from pyro_hvae.cells import DecoderCell, EncoderCell
from pyro_hvae.config import Config, load_config
from pyro_hvae.models.conv_ladder import ConvTopDownModel, LatentGroup
from pyro_hvae.run import read_metrics
from pyro_hvae.train import Trainer, TrainingError

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "mnist_conv.yaml"
DEFAULT_DATA = Path(os.environ.get("PYRO_HVAE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

#: the 30-group model: the config's scales [14, 7] and latent channels, 6 + 24 groups, narrower
DEEP_MODEL = ["model.groups_per_scale=[6,24]", "model.widths=16"]

#: variant -> the overrides that switch its stabilizers off
VARIANTS: dict[str, list[str]] = {
    "all": [],
    "no_skip": ["train.skip_factor=null"],
    "no_spectral": ["train.spectral_reg=null"],
    "no_warmup": ["train.kl_warmup_steps=0"],
    "none": ["train.skip_factor=null", "train.spectral_reg=null", "train.kl_warmup_steps=0"],
    "only_skip": ["train.spectral_reg=null", "train.kl_warmup_steps=0"],
    "only_spectral": ["train.skip_factor=null", "train.kl_warmup_steps=0"],
    "only_warmup": ["train.skip_factor=null", "train.spectral_reg=null"],
}
#: the variants run when ``--variants`` is not given: all three, each left out, none
DEFAULT_VARIANTS = ["all", "no_skip", "no_spectral", "no_warmup", "none"]


def compressed_schedule(base: Config, steps: int) -> list[str]:
    """Overrides that run ``base``'s warm-ups over the same fractions of ``steps`` steps."""
    train, optim = base.train, base.optim

    def scaled(n: int) -> int:
        return max(1, round(n * steps / train.steps)) if n else 0

    schedule = [f"train.steps={steps}", f"train.kl_warmup_steps={scaled(train.kl_warmup_steps)}",
                f"optim.warmup_steps={scaled(optim.warmup_steps)}"]
    if train.spectral_reg is not None:
        schedule.append(f"train.spectral_reg.steps={scaled(train.spectral_reg.steps)}")
    return schedule


def variant_overrides(variant: str, *, steps: int, batch: int, lr: float, data_root: Path,
                      extra: Sequence[str] = ()) -> list[str]:
    """The overrides of ``examples/mnist_conv.yaml`` that make one variant's config."""
    shared = [f"data.root={data_root}", f"data.batch_size={batch}", "device=cpu", *DEEP_MODEL,
              *compressed_schedule(load_config(CONFIG), steps), f"optim.lr={lr}",
              "train.log_every=1", f"train.eval_every={steps}", f"train.checkpoint_every={steps}", *extra]
    return [*shared, *VARIANTS[variant]]


def build_trainer(overrides: list[str], run_dir: Path, device: str = "cpu") -> Trainer:
    cfg = load_config(CONFIG, overrides)
    run_dir.mkdir(parents=True)
    return Trainer(cfg, run_dir, device=torch.device(device), overrides=overrides)


@torch.no_grad()
def undo_depth_scaling(vae: torch.nn.Module) -> None:
    """Undo the conv ladder's depth scaling of its initialisation, in place: every cell's
    residual branch at full weight (``residual_scale = 1``), and the layers whose initial
    weights were multiplied by ``sqrt(1 / L)`` (each group's projection of ``z``, the
    output layer of each up-sampling block) multiplied back by ``sqrt(L)``."""
    top_down = next(m for m in vae.modules() if isinstance(m, ConvTopDownModel))
    undo = math.sqrt(top_down.num_layers)
    for module in vae.modules():
        if isinstance(module, (EncoderCell, DecoderCell)):
            module.residual_scale = 1.0
        if isinstance(module, LatentGroup):
            module.project.conv.weight.mul_(undo)
    for scale in top_down.scales:
        if not isinstance(scale.enter, torch.nn.Identity):
            scale.enter[-1].net[-1].weight.mul_(undo)


def without_depth_scaling(trainer: Trainer) -> Trainer:
    """The trainer, its weights and their EMA (a copy of the initial weights) without the
    depth scaling of the initialisation."""
    undo_depth_scaling(trainer.vae)
    if trainer.ema is not None:
        undo_depth_scaling(trainer.ema.shadow)
    return trainer


class Stop(NamedTuple):
    """The trainer stopped the run: at which step, and its message."""

    step: int
    reason: str


def train(trainer: Trainer) -> Optional[Stop]:
    """Fit; ``None`` when all steps ran, else where and why the trainer stopped."""
    try:
        trainer.fit()
    except TrainingError as err:
        # a first step that fails Pyro's validation (on the first step only) stops it before the count moves
        return Stop(max(trainer.step, 1), str(err))
    return None


def summarize(variant: str, trainer: Trainer, stop: Optional[Stop]) -> dict:
    """One row of the table, from the run folder's ``metrics.jsonl``, and the skipped
    updates from the trainer (whose last step, when it stopped the run, has no record)."""
    records = read_metrics(trainer.run_dir / "metrics.jsonl")
    return row(variant, trainer.cfg, records, trainer.skipper.skipped, stop)


def summarize_folder(variant: str, run_dir: Path) -> dict:
    """One row of the table from a kept run folder alone (a variant trained by another
    process): its ``config.yaml`` and ``metrics.jsonl``. The skipped updates are those of
    its last logged step, and a run whose records end before its schedule does is reported
    stopped at the step after its last record (the trainer's reason is not in the folder)."""
    cfg = load_config(run_dir / "config.yaml")
    metrics = run_dir / "metrics.jsonl"  # none when the trainer stopped the first step
    records = read_metrics(metrics) if metrics.is_file() else []
    steps = [r for r in records if r["kind"] == "train"]
    last = steps[-1]["step"] if steps else 0
    stop = None if last == cfg.train.steps else Stop(last + 1, "the records end before the schedule")
    return row(variant, cfg, records, steps[-1]["skipped_updates"] if steps else 0, stop)


def row(variant: str, cfg: Config, records: list[dict], skipped: int, stop: Optional[Stop]) -> dict:
    """One row of the table: the variant's switches, what its records say, and its curves."""
    steps = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    nonfinite = [r["step"] for r in steps if not math.isfinite(r["loss"])]
    if stop is not None and stop.step == 1:
        nonfinite = [1]  # the trainer stops on a non-finite (or invalid) first step before logging it
    norms = [r["grad_norm"] for r in steps if not math.isnan(r["grad_norm"])]
    return {
        "variant": variant,
        "skip_factor": cfg.train.skip_factor,
        "spectral_reg": cfg.train.spectral_reg is not None and cfg.train.spectral_reg.enabled,
        "kl_warmup_steps": cfg.train.kl_warmup_steps,
        "first_nonfinite": nonfinite[0] if nonfinite else None,
        "skipped": skipped,
        "max_grad_norm": max(norms) if norms else None,
        "val_elbo": evals[-1]["val_elbo"] if stop is None and evals else None,
        "stop": stop,
        "step": [r["step"] for r in steps],
        "neg_elbo": [-r["elbo"] for r in steps],
        "grad_norm": [r["grad_norm"] for r in steps],
    }


def table(rows: list[dict]) -> str:
    """The markdown table of the rows."""

    def value(x, fmt: str = "{}") -> str:
        return "—" if x is None else fmt.format(x)

    lines = ["| variant | update skipping | spectral reg. | KL warm-up | first non-finite loss | skipped updates "
             "| largest grad norm | final val ELBO | stopped |", "|" + "---|" * 9]
    for r in rows:
        skip = "off" if r["skip_factor"] is None else f"×{r['skip_factor']:g}"
        warmup = f"{r['kl_warmup_steps']} steps" if r["kl_warmup_steps"] else "off"
        stop = "—" if r["stop"] is None else f"step {r['stop'].step}"
        lines.append(f"| {r['variant']} | {skip} | {'on' if r['spectral_reg'] else 'off'} | {warmup} "
                     f"| {value(r['first_nonfinite'], 'step {}')} | {r['skipped']} "
                     f"| {value(r['max_grad_norm'], '{:.3g}')} | {value(r['val_elbo'], '{:.2f}')} | {stop} |")
    return "\n".join(lines)


def windowed(row: dict, width: int) -> tuple[list, list, list]:
    """A row's curves per window of ``width`` steps, at each window's last step: the mean
    of its losses and the largest of its gradient norms (the row's own curves for 1)."""
    if width == 1:
        return row["step"], row["neg_elbo"], row["grad_norm"]
    ends = range(width, len(row["step"]) + 1, width)
    loss, norm = np.asarray(row["neg_elbo"]), np.asarray(row["grad_norm"])
    return ([row["step"][end - 1] for end in ends], [loss[end - width:end].mean() for end in ends],
            [np.fmax.reduce(norm[end - width:end]) for end in ends])


def plot(rows: list[dict], out: Path, title: str) -> None:
    """Negative training ELBO and gradient norm per step, one line per variant; a dotted
    vertical line marks a variant's first non-finite loss. Runs of 500 steps or more are
    drawn per window of a 250th of the run (the mean loss and largest norm of each)."""
    from matplotlib.figure import Figure

    width = max(1, max(len(r["step"]) for r in rows) // 250)
    figure = Figure(figsize=(7, 6))
    loss_axes, norm_axes = figure.subplots(2, 1, sharex=True)
    for r, style in zip(rows, itertools.cycle(["-", "--", "-.", ":"])):
        step, neg_elbo, grad_norm = windowed(r, width)
        (line,) = loss_axes.plot(step, neg_elbo, style, linewidth=0.9, label=r["variant"])
        norm_axes.plot(step, grad_norm, style, linewidth=0.9, color=line.get_color())
        if r["first_nonfinite"] is not None:
            loss_axes.axvline(r["first_nonfinite"], color=line.get_color(), linestyle=":")
    loss_axes.set_yscale("log")
    loss_axes.set_ylabel("−ELBO per image, training batch" + ("" if width == 1 else f",\nmean of {width} steps"))
    loss_axes.set_title(title, fontsize=9)
    loss_axes.legend(fontsize=8)
    norm_axes.set_yscale("log")
    norm_axes.set_ylabel("gradient norm (before clipping)" + ("" if width == 1 else f",\nlargest of {width} steps"))
    norm_axes.set_xlabel("training step")
    for axes in (loss_axes, norm_axes):
        axes.grid(alpha=0.3, which="both")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)


def describe(cfg: Config, no_depth_scaling: bool) -> tuple[str, str]:
    """The model and the training settings of a variant's config, for the table and figure."""
    model = cfg.model
    return (f"{sum(model.groups_per_scale)} latent groups (scales {model.scales} x {model.groups_per_scale}), "
            f"widths {model.widths}",
            f"batch {cfg.data.batch_size}, {cfg.train.steps} steps, {cfg.optim.name} lr {cfg.optim.lr:g}, "
            f"grad clip {cfg.train.grad_clip}, seed {cfg.seed}" + (", no depth scaling" if no_depth_scaling else ""))


def train_variants(args: argparse.Namespace) -> tuple[list[dict], Config]:
    """Train each variant of ``args`` in turn: the rows, and the last variant's config."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs or Path(tmp)
        rows = []
        for variant in args.variants:
            overrides = variant_overrides(variant, steps=args.steps, batch=args.batch, lr=args.lr,
                                          data_root=args.data, extra=args.set)
            start = time.perf_counter()
            trainer = build_trainer(overrides, runs / variant, args.device)
            if args.no_depth_scaling:
                without_depth_scaling(trainer)
            stop = train(trainer)
            rows.append(summarize(variant, trainer, stop))
            print(f"{variant}: {time.perf_counter() - start:.0f} s" + (f", stopped: {stop.reason}" if stop else ""),
                  flush=True)
    return rows, trainer.cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate of every variant")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides, every variant")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="data root (default $PYRO_HVAE_DATA)")
    parser.add_argument("--runs", type=Path, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-depth-scaling", action="store_true",
                        help="start every variant without the initialisation's depth scaling")
    parser.add_argument("--out", type=Path, help="the figure (PNG)")
    parser.add_argument("--from-runs", type=Path, metavar="RUNS",
                        help="train nothing: the table and figure of the variants' folders kept in RUNS by --runs")
    args = parser.parse_args()

    if args.from_runs:
        missing = [v for v in args.variants if not (args.from_runs / v / "config.yaml").is_file()]
        if missing:
            parser.error(f"--from-runs {args.from_runs}: no run folder of {', '.join(missing)} in it; "
                         "name the variants it holds with --variants")
        rows = [summarize_folder(variant, args.from_runs / variant) for variant in args.variants]
        cfg = load_config(args.from_runs / args.variants[0] / "config.yaml")
    else:
        rows, cfg = train_variants(args)
    settings = describe(cfg, args.no_depth_scaling)
    print(f"\n{'; '.join(settings)}\n\n{table(rows)}")
    if args.out:
        plot(rows, args.out, "\n".join(settings))
        print(f"\n{args.out}")


if __name__ == "__main__":
    main()
