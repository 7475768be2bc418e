"""Validation ELBO against training step for one or more runs, as one figure.

Reads each run folder's ``metrics.jsonl`` (the ``eval`` records the Trainer writes every
``train.eval_every`` steps) and draws the validation ELBO per image against the step, one
line per run, with an optional horizontal line at a target (drawn as ``-target``, since
the ELBO is a lower bound on ``-NLL``):

    python bench/val_curves.py seed0=runs/a seed1=runs/b --target 230 \
        --title "examples/fashion_mnist.yaml" --out docs/figures/fashion_val_elbo.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure


def eval_records(run_dir: Path) -> list[dict]:
    """The validation records of a run, in step order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return sorted((r for r in records if r.get("kind") == "eval"), key=lambda r: r["step"])


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
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    figure = Figure(figsize=(6.5, 4))
    axes = figure.add_subplot()
    for label, run_dir in args.runs:
        records = eval_records(run_dir)
        axes.plot([r["step"] for r in records], [r["val_elbo"] for r in records], marker=".", label=label)
    if args.target is not None:
        axes.axhline(-args.target, color="grey", linestyle="--", label=f"-{args.target:g} (NLL target)")
    if args.ymin is not None:
        axes.set_ylim(bottom=args.ymin)
    axes.set_xlabel("training step")
    axes.set_ylabel("validation ELBO (nats per image)")
    axes.set_title(args.title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
