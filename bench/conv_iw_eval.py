"""Throughput and peak memory of the importance-weighted log-likelihood estimate of a
30-group ConvLadderVAE: :func:`~pyro_hvae.log_likelihood` vs the same network in plain
vectorized PyTorch.

The network is :func:`conv_step.build` (scales [14, 7], 15 groups each, weights moved off
their initialisation) in eval mode, on the first MNIST test images binarized at 0.5. Both
compute ``logsumexp_k log w_k - log K`` per image:

* **ours**: ``log_likelihood(vae.model, vae.guide, x, num_samples=K, chunk_size=C)``,
  particles vectorized under a Pyro plate (one plain pass, then chunks of ``C``);
* **plain**: the model's own modules driven by hand (:func:`plain`): the encoder once,
  then per chunk of ``C`` particles the particles flattened into the batch (``[C * N, ...]``)
  and the top-down loop, ``log w += log p(z_l) - log q(z_l)`` per group, plus the Bernoulli
  ``log p(x | z)``; every term summed in float64 as ours does.

The two run interleaved ``--repeats`` times; the figure is the median of the paired
ratios ``plain time / our time`` (target >= 0.9). The two use different random draws, so
they agree in distribution: the per-image estimates, averaged over repeats, must differ
by a few standard errors at most. Peak memory per side and chunk size: each runs one
estimate alone in a fresh subprocess (Linux; see :func:`conv_step.peak_memory_growth_mb`)
on CPU, ``torch.cuda.max_memory_allocated`` on CUDA; it should grow with the chunk, not
with ``K``.

    python bench/conv_iw_eval.py [--images 8] [-K 64] [--chunk-size 32] [--memory-chunks 8 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch

from conv_step import build, peak_memory_growth_mb
from pyro_hvae import ConvLadderVAE, log_likelihood
from pyro_hvae.config import DataConfig
from pyro_hvae.data import load_splits

DEFAULT_DATA = Path(os.environ.get("PYRO_HVAE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def ours(vae: ConvLadderVAE, x: torch.Tensor, K: int, chunk_size: int) -> torch.Tensor:
    return log_likelihood(vae.model, vae.guide, x, num_samples=K, chunk_size=chunk_size)


def plain(vae: ConvLadderVAE, x: torch.Tensor, K: int, chunk_size: int) -> torch.Tensor:
    """The same estimate in plain PyTorch, particles flattened into the batch."""
    model, guide = vae.model, vae.guide
    n = x.shape[0]
    features = guide.encoder(x)
    scale_of = model.layout.scale_of_layers()
    chunks = []
    for start in range(0, K, chunk_size):
        particles = min(chunk_size, K - start)
        batch = [f.repeat(particles, 1, 1, 1) for f in features]  # particle-major: row k * n + i
        state = model.top_input.expand(particles * n, *model.top_input.shape)
        layer, log_w = model.num_layers, 0.0
        for scale in model.scales:
            state = scale.enter(state)
            for group in scale.groups:
                prior, state_from_prior = group.prior(state)
                posterior, _ = guide.posteriors[layer - 1](prior, state, batch[scale_of[layer - 1]])
                z = posterior.sample()
                log_w = log_w + prior.log_prob(z).double() - posterior.log_prob(z).double()
                state = group.cell(state + state_from_prior + group.project(z))
                layer -= 1
        log_w = log_w + model.observation(state).log_prob(x.repeat(particles, 1, 1, 1)).double()
        chunks.append(log_w.view(particles, n))
    return torch.cat(chunks).logsumexp(0) - math.log(K)


METHODS = {"ours": ours, "plain": plain}


def setup(args) -> tuple[ConvLadderVAE, torch.Tensor]:
    test = load_splits(DataConfig(root=args.data, download=False)).test
    x = (test.batch(torch.arange(args.images)) > 0.5).float().to(args.device)
    return build(args.width, args.latent_channels, args.device).eval(), x


def memory_child(side: str, chunk_size: int, args) -> None:
    """One estimate by ``side`` alone; print the growth of the peak resident set, in MB."""
    vae, x = setup(args)
    with torch.no_grad():
        print(peak_memory_growth_mb(lambda: METHODS[side](vae, x, args.num_samples, chunk_size)))


def peak_memory(side: str, chunk_size: int, vae, x, args) -> float:
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(args.device)
        before = torch.cuda.memory_allocated(args.device)
        METHODS[side](vae, x, args.num_samples, chunk_size)
        return (torch.cuda.max_memory_allocated(args.device) - before) / 2**20
    command = [sys.executable, __file__, "--memory-of", side, str(chunk_size), "--images", str(args.images),
               "-K", str(args.num_samples), "--width", str(args.width), "--latent-channels", str(args.latent_channels),
               "--data", str(args.data)]
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="first N MNIST test images")
    parser.add_argument("--num-samples", "-K", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=32, help="particles per pass for the timing")
    parser.add_argument("--memory-chunks", type=int, nargs=2, default=[8, 32], help="chunk sizes for peak memory")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--latent-channels", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding MNIST/raw/")
    parser.add_argument("--memory-of", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    pyro.enable_validation(False)
    with pyro.settings.context(module_local_params=True):
        if args.memory_of:
            return memory_child(args.memory_of[0], int(args.memory_of[1]), args)
        run(args)


def run(args) -> None:
    K, chunk, device = args.num_samples, args.chunk_size, args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    vae, x = setup(args)
    times = {name: [] for name in METHODS}
    estimates = {name: [] for name in METHODS}
    with torch.no_grad():
        for fn in METHODS.values():  # warm-up
            fn(vae, x[:2], 4, 2)
        for _ in range(args.repeats):
            for name, fn in METHODS.items():
                sync()
                start = time.perf_counter()
                estimate = fn(vae, x, K, chunk)
                sync()
                times[name].append(time.perf_counter() - start)
                estimates[name].append(estimate.cpu())
        memory = {(name, c): peak_memory(name, c, vae, x, args) for c in args.memory_chunks for name in METHODS}

    ratio = statistics.median(p / o for p, o in zip(times["plain"], times["ours"]))
    print(f"device {device}, torch {torch.__version__}, pyro {pyro.__version__}, threads {torch.get_num_threads()}")
    print(f"ConvLadderVAE (1,28,28) scales [14,7] x 15 groups (L=30), width {args.width}, latent channels "
          f"{args.latent_channels}, eval; {args.images} MNIST test images, K={K}, chunk {chunk}, "
          f"{args.repeats} interleaved repeats, median")
    for name in METHODS:
        seconds = statistics.median(times[name])
        print(f"  {name:5s}: {seconds:7.2f} s -> {args.images * K / seconds:8.0f} images x samples / s")
    mean = {name: torch.stack(e).mean(0) for name, e in estimates.items()}  # per image, over repeats
    diff = mean["ours"] - mean["plain"]
    print(f"mean log p(x): ours {mean['ours'].mean():.3f}, plain {mean['plain'].mean():.3f} "
          f"(difference {diff.mean():+.3f} +- {diff.std() / math.sqrt(len(diff)):.3f} s.e. over images)")
    method = "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "peak RSS growth (VmHWM), fresh process"
    for c in args.memory_chunks:
        print(f"peak memory at chunk {c:4d}: ours {memory['ours', c]:7.1f} MB, plain {memory['plain', c]:7.1f} MB ({method})")
    print(f"plain/ours speed {ratio:.3f}x (target >= 0.9)")


if __name__ == "__main__":
    main()
