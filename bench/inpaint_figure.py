"""One figure comparing inpainting methods on the same test images.

Reads the ``inpaint.npz`` files that ``pyro-hvae inpaint`` writes (one per method, on the
same images and mask) and draws the originals, the masked inputs and each method's
predictive mean (the hidden pixels filled, the rest as observed), one row each:

    pyro-hvae inpaint RUN --num 8 --method pseudo_gibbs --steps 500 --out /tmp/pg
    pyro-hvae inpaint RUN --num 8 --method mwg --steps 500 --out /tmp/mwg
    python bench/inpaint_figure.py "pseudo-Gibbs=/tmp/pg" "MwG=/tmp/mwg" --out inpaint.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def labelled(spec: str) -> tuple[str, Path]:
    """``LABEL=FOLDER`` (split at the first ``=``)."""
    label, sep, folder = spec.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{spec!r}: write LABEL=FOLDER")
    return label, Path(folder)


def strip(images: np.ndarray) -> np.ndarray:
    """Images ``[N, 1, H, W]`` side by side, one pixel of grey between them."""
    n, _, h, w = images.shape
    out = np.full((h, n * (w + 1) - 1), 0.5)
    for i, image in enumerate(images[:, 0]):
        out[:, i * (w + 1):i * (w + 1) + w] = image
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="+", type=labelled, help="LABEL=FOLDER holding inpaint.npz")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = [(label, np.load(folder / "inpaint.npz")) for label, folder in args.methods]
    first = results[0][1]
    for label, result in results[1:]:
        if not (np.array_equal(result["index"], first["index"]) and np.array_equal(result["mask"], first["mask"])):
            raise SystemExit(f"{label}: other images or another mask than {results[0][0]}")
    masked = np.where(first["mask"], first["original"], 0.5)
    rows = [("original", first["original"]), ("observed", masked)]
    rows += [(label, result["predictive_mean"]) for label, result in results]
    figure = Figure(figsize=(0.55 * len(first["index"]) + 2.5, 0.62 * len(rows)))
    for i, (label, images) in enumerate(rows):
        axes = figure.add_subplot(len(rows), 1, i + 1)
        axes.imshow(strip(np.clip(images, 0, 1)), cmap="gray", vmin=0, vmax=1)
        axes.set_axis_off()
        axes.text(-3, images.shape[-2] / 2, label, ha="right", va="center", fontsize=8)
    figure.subplots_adjust(left=0.33, right=0.99, top=0.99, bottom=0.01, hspace=0.08)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=130)
    print(args.out)


if __name__ == "__main__":
    main()
