"""Figures of a run folder: the KL of each latent layer over training.

``kl_per_layer.png`` has one panel per latent layer, bottom (``z_1``) first, with the
layer's KL in nats per image on the training batches (the ``kl`` of every ``train`` record
of ``metrics.jsonl``, a mean over the steps since the record before) and on the
validation set (the ``val_kl`` of every ``eval`` record) against the step. A validation
KL that drifts away from the training KL in the lower layers is the overfitting of the
prior ``p(z_l | z_{l+1})`` to the posteriors of the training images. The trainer rewrites
the file at every evaluation; :func:`write_kl_plot` draws it for any run folder.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pyro_hvae.run import atomic_write, read_metrics

__all__ = ["KL_PLOT", "kl_per_layer_figure", "write_kl_plot"]

#: File name of the figure in a run folder.
KL_PLOT = "kl_per_layer.png"


def _natural(name: str) -> list:
    """Sort key that puts ``z_2`` before ``z_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def kl_per_layer_figure(records: Iterable[dict[str, Any]], sites: Sequence[str] | None = None, *, columns: int = 4):
    """A matplotlib ``Figure`` (no pyplot, no global backend state) with one panel per layer
    of the training ``kl`` and validation ``val_kl`` in ``records`` (those of ``metrics.jsonl``).

    :param sites: the layers, in panel order (default: every site found, in natural order,
        ``z_1`` first).
    :raises ValueError: when the records hold no per-layer KL.
    """
    from matplotlib.figure import Figure

    records = list(records)
    train = [(r["step"], r["kl"]) for r in records if r.get("kind") == "train" and r.get("kl")]
    val = [(r["step"], r["val_kl"]) for r in records if r.get("kind") == "eval" and r.get("val_kl")]
    found = {name for _, kl in train + val for name in kl}
    if not found:
        raise ValueError("the records hold no per-layer KL (train 'kl' or eval 'val_kl'); train for at least log_every steps")
    sites = list(sites) if sites is not None else sorted(found, key=_natural)
    columns = min(columns, len(sites))
    rows = math.ceil(len(sites) / columns)
    figure = Figure(figsize=(3.2 * columns, 2.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax, site in zip(axes, sites):
        for points, label, style in ((train, "training", "-"), (val, "validation", "o-")):
            xy = [(step, kl[site]) for step, kl in points if site in kl]
            if xy:
                ax.plot(*zip(*xy), style, label=label, markersize=3)
        ax.set(title=site, xlabel="step", ylabel="KL (nats per image)")
    for ax in axes[len(sites):]:  # the empty cells of the last row
        figure.delaxes(ax)
    axes[0].legend(loc="best", fontsize="small")
    return figure


def write_kl_plot(run_dir: str | Path, sites: Sequence[str] | None = None, out: str | Path | None = None) -> Path:
    """Draw ``kl_per_layer.png`` from ``run_dir/metrics.jsonl`` (atomically) into
    ``out`` (default ``run_dir/kl_per_layer.png``); returns its path."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{run_dir} holds no metrics.jsonl; pass the folder of a training run")
    figure = kl_per_layer_figure(read_metrics(metrics), sites)
    path = Path(out) if out is not None else run_dir / KL_PLOT
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=90))
    return path
