"""Two models' evaluations of the same test images, compared image by image.

Reads the ``per_example.npz`` and ``results.json`` that ``pyro-hvae evaluate`` wrote for
a baseline ``A`` and a model ``B`` and prints one markdown row: each model's mean test
NLL, the mean and standard error of the per-image differences ``B - A`` of the NLL and
of the negative ELBO (negative: ``B`` is better), the share of images where ``B``'s NLL is
lower, and each model's mean PSIS k-hat with the share of images above its threshold:

    python bench/paired_eval.py runs/mlp/eval-test-K1000-first1000 \\
        runs/conv/eval-test-K1000-first1000

Several ``A B`` pairs (one per seed) add a last row: the mean ± standard deviation over
the pairs of the paired NLL difference. The two evaluations of a pair must cover the
same images in the same order; otherwise the pairing would be meaningless, and this
exits with an error naming both folders.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Evaluation:
    """One evaluation folder's per-image NLL, ELBO and k-hat, and its k-hat threshold."""

    folder: Path
    index: np.ndarray
    nll: np.ndarray
    elbo: np.ndarray
    khat: np.ndarray
    khat_threshold: float

    @classmethod
    def read(cls, folder: Path) -> "Evaluation":
        results = json.loads((folder / "results.json").read_text())
        with np.load(folder / "per_example.npz") as per_image:
            return cls(
                folder,
                per_image["index"],
                -per_image["log_likelihood"],
                per_image["elbo"],
                per_image["khat"],
                results["khat"]["threshold"],
            )

    def khat_summary(self) -> str:
        """Mean k-hat and, in brackets, the share of images above the threshold."""
        return f"{self.khat.mean():.2f} ({100 * (self.khat > self.khat_threshold).mean():.1f} %)"


def mean_and_error(values: np.ndarray) -> str:
    """``mean ± standard error`` of per-image values."""
    return f"{values.mean():+.2f} ± {values.std(ddof=1) / np.sqrt(len(values)):.2f}"


def paired_nll_difference(a: Evaluation, b: Evaluation) -> np.ndarray:
    """Per-image ``NLL_B - NLL_A``, after checking that both evaluated the same images."""
    if not np.array_equal(a.index, b.index):
        raise ValueError(
            f"{a.folder} and {b.folder} evaluated different images; evaluate both with the same split and --images"
        )
    return b.nll - a.nll


def row(a: Evaluation, b: Evaluation) -> str:
    """The markdown row comparing ``b`` with the baseline ``a``."""
    nll = paired_nll_difference(a, b)
    return (
        f"| {len(nll)} | {a.nll.mean():.2f} | {b.nll.mean():.2f} | {mean_and_error(nll)} "
        f"| {mean_and_error(a.elbo - b.elbo)} | {100 * (nll < 0).mean():.0f} % "
        f"| {a.khat_summary()} | {b.khat_summary()} |"
    )


HEADER = (
    "| images | NLL A | NLL B | NLL B − A | −ELBO B − A | images where B is lower | k-hat A | k-hat B |\n"
    "|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="evaluation folders: A B [A B ...]")
    args = parser.parse_args(argv)
    if len(args.folders) % 2:
        parser.error("give the evaluation folders in pairs: baseline A, then model B")
    pairs = [(Evaluation.read(a), Evaluation.read(b)) for a, b in zip(args.folders[::2], args.folders[1::2])]
    try:
        rows = [row(a, b) for a, b in pairs]
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(HEADER)
    print("\n".join(rows))
    if len(pairs) > 1:
        differences = [paired_nll_difference(a, b).mean() for a, b in pairs]
        print(
            f"\nNLL B − A over {len(pairs)} pairs: {statistics.fmean(differences):+.2f} "
            f"± {statistics.stdev(differences):.2f} (mean ± sd)"
        )


if __name__ == "__main__":
    main()
