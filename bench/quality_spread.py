"""Seed-to-seed spread of the figures of ``bench/quality.py``.

Reads the ``quality-<dataset>.json`` files that runs with different ``seed=`` overrides
wrote, groups their rows by dataset and config, and prints one markdown row per group:
mean ± standard deviation (n - 1 in the denominator) over the seeds, and each seed's
test NLL.

    for s in 0 1 2; do python bench/quality.py --dataset fashion_mnist \\
        --configs fashion_mnist --out q/s$s seed=$s; done
    python bench/quality_spread.py q/s*/quality-*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

FIGURES = ("test_nll", "test_elbo", "train_elbo")


def spread(values: list[float]) -> str:
    """``mean ± sd`` over seeds (sd 0 for one seed)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for path in args.files:
        for row in json.loads(path.read_text()):
            groups[row["dataset"], row["config"]].append(row)
    print("| dataset | config | seeds | test NLL | test ELBO | train ELBO | NLL per seed |")
    print("|---|---|---|---|---|---|---|")
    for (dataset, config), rows in sorted(groups.items()):
        cells = [spread([row[name] for row in rows]) for name in FIGURES]
        per_seed = ", ".join(f"{row['test_nll']:.2f}" for row in rows)
        print(f"| {dataset} | {config} | {len(rows)} | {' | '.join(cells)} | {per_seed} |")


if __name__ == "__main__":
    main()
