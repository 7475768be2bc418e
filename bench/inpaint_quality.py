"""How well trained hierarchies fill the centre 14x14 square of MNIST test digits.

For each run, on the first ``--images`` test images (binarized once, generator seed 0), with
the centre square hidden (``make_mask("center")``), per method:

* **training mean**: the missing pixels predicted by the training set's mean image;
* **encode-decode once**: ``inpaint(..., method="pseudo_gibbs", num_steps=1)``: the missing
  pixels drawn from the model, one pass ``z ~ q(z | x)``, then ``p(x_m | z)``;
* **pseudo-Gibbs** and **Metropolis-within-Gibbs** with ``--steps`` steps, predicting from
  the second half of the chain;
* with ``--conditional RUN`` (a run of ``model.kind: conditional_ladder``, ``model.mask:
  center``), **conditioned on the border**: ``BorderLadderVAE.fill`` with ``--steps`` draws
  ``z ~ p(z | x_b)`` for the predictive mean, and the importance-weighted estimate of
  ``log p(x_m | x_b)`` with as many samples of its guide (a lower bound in expectation).

Two figures on the missing pixels: the mean squared error of the predictive mean
(``Inpainting.predictive_mean``; for binary pixels the Brier score), averaged over
pixels and images, and the predictive log-likelihood of the true pixels in nats per
image (``Inpainting.missing_log_prob``, ``log (1/T) sum_t p(x_m | z_t)``), mean ± standard
error over images; MwG's acceptance rate too. Writes ``OUT/inpaint-quality.json``.

    python bench/inpaint_quality.py RUN [RUN ...] [--conditional RUN] --images 1000 --steps 200 --out /tmp/inpaint
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pyro
import torch

from pyro_hvae import BorderLadderVAE, inpaint, make_mask
from pyro_hvae.use_run import load_run


def summary(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error over images."""
    values = values.double()
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item()


def test_images(run, num_images: int) -> torch.Tensor:
    """The first ``num_images`` test images of the run's data (binarized once, so the same for every run)."""
    test = run.splits.test
    return test.batch(torch.arange(min(num_images, len(test))), torch.Generator().manual_seed(0))


def make_row(run, x, missing, method: str, num_steps: int, predictive_mean, log_prob, seconds: float, acceptance=None) -> dict:
    """One row of the table, printed as it is made."""
    mse = (predictive_mean - x)[:, missing].pow(2).mean(1)
    row = {
        "run": run.cfg.name, "method": method, "images": len(x), "steps": num_steps,
        "mse": summary(mse), "missing_log_prob": summary(log_prob), "seconds": seconds,
        "acceptance_rate": None if acceptance is None else acceptance.mean().item(),
    }
    print(f"{run.cfg.name:>24} {method:>24}: MSE {row['mse'][0]:.4f}, "
          f"log p(x_m) {row['missing_log_prob'][0]:.2f} ± {row['missing_log_prob'][1]:.2f}"
          + ("" if acceptance is None else f", acceptance {row['acceptance_rate']:.4f}"), flush=True)
    return row


def measure(run_dir: Path, num_images: int, num_steps: int, seed: int) -> list[dict]:
    run = load_run(run_dir)
    x = test_images(run, num_images)
    mask = make_mask("center", run.splits.data_shape)
    missing = ~mask
    mean_image = run.splits.train.mean()
    rows = []

    def row(method: str, predictive_mean, log_prob, seconds: float, acceptance=None) -> None:
        rows.append(make_row(run, x, missing, method, num_steps, predictive_mean, log_prob, seconds, acceptance))

    start = time.perf_counter()
    fill = mean_image.expand_as(x)
    log_prob = torch.distributions.Bernoulli(probs=fill.clamp(1e-3, 1 - 1e-3)).log_prob(x)[:, missing].sum(1)
    row("training mean", torch.where(mask, x, fill), log_prob, time.perf_counter() - start)
    for method, steps, label in [("pseudo_gibbs", 1, "encode-decode once"), ("pseudo_gibbs", num_steps, "pseudo-Gibbs"),
                                 ("mwg", num_steps, "Metropolis-within-Gibbs")]:
        pyro.set_rng_seed(seed)
        start = time.perf_counter()
        result = inpaint(run.vae, x, mask, method=method, num_steps=steps)
        row(label, result.predictive_mean, result.missing_log_prob, time.perf_counter() - start, result.acceptance_rate)
    return rows


def measure_conditional(run_dir: Path, num_images: int, num_steps: int, seed: int) -> dict:
    """The row of a hierarchy conditioned on the border of the centre square."""
    run = load_run(run_dir)
    if not isinstance(run.vae, BorderLadderVAE) or run.cfg.model.mask != "center":
        raise SystemExit(f"--conditional {run_dir}: not a run of model.kind: conditional_ladder with model.mask: center")
    x = test_images(run, num_images)
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    result = run.vae.fill(x, num_samples=num_steps)  # samples in chunks that fit evaluate's memory budget
    return make_row(run, x, ~run.vae.mask, "conditioned on the border", num_steps, result.predictive_mean,
                    result.missing_log_prob, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="runs of unconditional hierarchies")
    parser.add_argument("--conditional", action="append", type=Path, default=[], metavar="RUN",
                        help="a run of model.kind: conditional_ladder (mask: center); may be repeated")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("inpaint-quality"))
    args = parser.parse_args()
    if not args.runs and not args.conditional:
        parser.error("give at least one RUN or --conditional RUN")
    rows = [row for run in args.runs for row in measure(run, args.images, args.steps, args.seed)]
    rows += [measure_conditional(run, args.images, args.steps, args.seed) for run in args.conditional]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inpaint-quality.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
