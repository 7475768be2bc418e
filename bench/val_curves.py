"""Validation ELBO against training step or wall clock for one or more runs, as one figure.

Reads each run folder's ``metrics.jsonl`` (the ``eval`` records the Trainer writes every
``train.eval_every`` steps, with the training seconds spent so far) and draws the
validation ELBO per image against the step (``--against step``) or the minutes of
training (``--against minutes``), one line per run, with an optional horizontal line at a
target (drawn as ``-target``, since the ELBO is a lower bound on ``-NLL``):

    python bench/val_curves.py seed0=runs/a seed1=runs/b --target 230 \
        --title "examples/fashion_mnist.yaml" --out docs/figures/fashion_val_elbo.png

With two runs and ``--against minutes`` it also prints where the second run's curve
first rises above the first's (both curves linear between their evaluations), or that
it does not within the minutes both cover: the crossing point of an equal-budget
comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.figure import Figure

from pyro_hvae.run import read_metrics


def eval_records(run_dir: Path) -> list[dict]:
    """The validation records of a run, in step order."""
    records = read_metrics(run_dir / "metrics.jsonl")
    return sorted((r for r in records if r.get("kind") == "eval"), key=lambda r: r["step"])


def first_crossing(
    times_a: list[float], values_a: list[float], times_b: list[float], values_b: list[float]
) -> Optional[float]:
    """The first time at which curve b, below curve a where they start to overlap, rises
    above it; None if it never does within the times both cover. Both curves are linear
    between their points (times ascending)."""
    start, end = max(times_a[0], times_b[0]), min(times_a[-1], times_b[-1])
    grid = np.unique([t for t in (*times_a, *times_b) if start <= t <= end])
    if len(grid) < 2:
        return None
    gap = np.interp(grid, times_b, values_b) - np.interp(grid, times_a, values_a)
    if gap[0] >= 0:
        return None  # b is not below a to begin with: nothing to cross
    above = np.flatnonzero(gap > 0)
    if len(above) == 0:
        return None
    i = above[0]  # the gap changes sign between grid[i - 1] and grid[i]: where the line crosses 0
    return float(grid[i - 1] + (grid[i] - grid[i - 1]) * -gap[i - 1] / (gap[i] - gap[i - 1]))


def labelled(spec: str) -> tuple[str, Path]:
    """``LABEL=RUN`` (split at the first ``=``) or ``RUN`` (labelled by its folder name)."""
    label, sep, path = spec.partition("=")
    if not sep:
        label, path = "", label
    path = Path(path)
    return label or path.name, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=labelled, help="LABEL=RUN_DIR or RUN_DIR")
    parser.add_argument("--target", type=float, help="an NLL target in nats, drawn at -target")
    parser.add_argument("--title", default="")
    parser.add_argument("--ymin", type=float, help="lower limit of the ELBO axis (hides the first evaluations)")
    parser.add_argument("--against", choices=["step", "minutes"], default="step", help="the x axis (default: step)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    figure = Figure(figsize=(6.5, 4))
    axes = figure.add_subplot()
    curves = []
    for label, run_dir in args.runs:
        records = eval_records(run_dir)
        x = [r["step"] if args.against == "step" else r["elapsed_s"] / 60 for r in records]
        curves.append((label, x, [r["val_elbo"] for r in records]))
        axes.plot(*curves[-1][1:], marker=".", label=label)
    if args.target is not None:
        axes.axhline(-args.target, color="grey", linestyle="--", label=f"-{args.target:g} (NLL target)")
    if args.ymin is not None:
        axes.set_ylim(bottom=args.ymin)
    axes.set_xlabel("training step" if args.against == "step" else "minutes of training (wall clock)")
    axes.set_ylabel("validation ELBO (nats per image)")
    axes.set_title(args.title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    print(args.out)
    if args.against == "minutes" and len(curves) == 2:
        (label_a, *a), (label_b, *b) = curves
        when = first_crossing(*a, *b)
        overlap = min(a[0][-1], b[0][-1])
        print(f"{label_b} rises above {label_a} after {when:.1f} minutes" if when is not None
              else f"{label_b} does not rise above {label_a} within the {overlap:.1f} minutes both curves cover")


if __name__ == "__main__":
    main()
