"""Throughput of the importance-weighted log-likelihood estimate, in images x samples per second.

Three ways to compute the same per-image estimate ``logsumexp_k log w_k - log K`` for a
5-layer ``LadderVAE((1, 28, 28), [64, 32, 16, 8, 4], [512, 256], batch_norm=True)`` in
eval mode (randomly initialised with seed 0: the arithmetic, hence the speed, is that of a
trained one) on the first MNIST test images:

* **ours**: :func:`pyro_hvae.log_likelihood`, particles vectorized under a Pyro plate,
  ``--chunk-size`` of them per pass;
* **loop**: ``K`` single-sample passes, each running the guide and the model through Pyro
  and summing per-image ``log p - log q`` from the traces (how NVAE-style code evaluates);
  it is slow, so it runs on the first ``--loop-images`` images only and its rate is given
  in the same units;
* **plain**: the same modules driven by hand in vectorized PyTorch: bottom-up features
  once, then the top-down loop with the particles as a leading dim.

The three run interleaved, ``--repeats`` times, and the median time of each is reported,
with the mean estimates (the three use different random draws, so they agree in
distribution, not bit for bit) and the ratios ours/loop (target >= 5) and ours/plain
(target >= 0.8).

    python bench/iw_eval.py [--images 100] [--num-samples 1000] [--chunk-size 250]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import pyro
import torch

from pyro_hvae import LadderVAE, get_traces, log_likelihood
from pyro_hvae.config import DataConfig
from pyro_hvae.data import load_splits

DEFAULT_DATA = Path(os.environ.get("PYRO_HVAE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def ours(vae: LadderVAE, x: torch.Tensor, K: int, chunk_size: int) -> torch.Tensor:
    return log_likelihood(vae.model, vae.guide, x, num_samples=K, chunk_size=chunk_size)


def loop(vae: LadderVAE, x: torch.Tensor, K: int, chunk_size: int) -> torch.Tensor:
    """K passes of one posterior sample each; ``chunk_size`` is unused."""
    log_w = []
    for _ in range(K):
        model_trace, guide_trace = get_traces(vae.model, vae.guide, x)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        log_p = sum(site["log_prob"] for site in model_trace.nodes.values() if site["type"] == "sample")
        log_q = sum(site["log_prob"] for site in guide_trace.nodes.values() if site["type"] == "sample")
        log_w.append(log_p - log_q)
    return torch.stack(log_w).logsumexp(0) - math.log(K)


def plain(vae: LadderVAE, x: torch.Tensor, K: int, chunk_size: int) -> torch.Tensor:
    """The same estimate written directly in PyTorch with the same modules."""
    model, guide = vae.model, vae.guide
    features = guide.bottom_up(x)
    chunks = []
    for start in range(0, K, chunk_size):
        particles = min(chunk_size, K - start)
        prior = model.top_prior(x.shape[0]).expand((particles, x.shape[0]))
        z, log_w = None, 0.0
        for layer in range(model.num_layers, 0, -1):
            if layer < model.num_layers:
                prior = model.prior(layer, z)
            posterior, _ = guide.heads[layer - 1](prior, features[layer - 1], z)
            z = posterior.sample()
            log_w = log_w + prior.log_prob(z) - posterior.log_prob(z)
        chunks.append(log_w + model.observation(z).log_prob(x))
    return torch.cat(chunks).logsumexp(0) - math.log(K)


def timed(fn, vae, x, K, chunk_size, sync) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    estimate = fn(vae, x, K, chunk_size)
    sync()
    return time.perf_counter() - start, estimate.cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="first N MNIST test images")
    parser.add_argument("--loop-images", type=int, default=10, help="first N images for the (slow) loop baseline")
    parser.add_argument("--num-samples", "-K", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding MNIST/raw/")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    K, chunk, device = args.num_samples, args.chunk_size, args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    test = load_splits(DataConfig(root=args.data, download=False)).test
    x = test.batch(torch.arange(args.images)).to(device)
    pyro.set_rng_seed(0)
    vae = LadderVAE((1, 28, 28), [64, 32, 16, 8, 4], [512, 256], batch_norm=True).to(device).eval()
    pyro.enable_validation(False)
    inputs = {"ours": x, "plain": x, "loop": x[: args.loop_images]}
    methods = {"ours": ours, "plain": plain, "loop": loop}
    times = {name: [] for name in methods}
    estimates = {name: [] for name in methods}
    with torch.no_grad(), pyro.settings.context(module_local_params=True):
        for name, fn in methods.items():  # warm-up
            timed(fn, vae, inputs[name][:2], 4, 2, sync)
        for _ in range(args.repeats):
            for name, fn in methods.items():
                seconds, estimate = timed(fn, vae, inputs[name], K, chunk, sync)
                times[name].append(seconds)
                estimates[name].append(estimate)

    rate = {name: inputs[name].shape[0] * K / statistics.median(t) for name, t in times.items()}
    print(f"device {device}, torch {torch.__version__}, pyro {pyro.__version__}, threads {torch.get_num_threads()}")
    print(f"LadderVAE [64,32,16,8,4] x [512,256] batch_norm eval, K={K}, chunk {chunk}, "
          f"{args.images} MNIST test images ({args.loop_images} for loop), {args.repeats} interleaved repeats, median")
    for name in methods:
        print(f"  {name:5s}: {statistics.median(times[name]):8.2f} s for {inputs[name].shape[0]:4d} images "
              f"-> {rate[name]:10.0f} images x samples / s")
    mean = {name: torch.stack(e).mean(0) for name, e in estimates.items()}  # per image, over repeats
    n = args.loop_images
    diff = mean["ours"] - mean["plain"]
    print(f"mean log p(x) over {args.images} images: ours {mean['ours'].mean():.3f}, plain {mean['plain'].mean():.3f} "
          f"(difference {diff.mean():+.3f} +- {diff.std() / math.sqrt(len(diff)):.3f} s.e.)")
    print(f"mean log p(x) over first {n} images: ours {mean['ours'][:n].mean():.3f}, loop {mean['loop'].mean():.3f}, "
          f"plain {mean['plain'][:n].mean():.3f}")
    print(f"ours/loop  {rate['ours'] / rate['loop']:6.2f}x (target >= 5)")
    print(f"ours/plain {rate['ours'] / rate['plain']:6.2f}x (target >= 0.8)")


if __name__ == "__main__":
    main()
