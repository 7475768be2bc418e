"""Training-step time and peak memory of a 30-group ConvLadderVAE under Pyro vs the same
network's ELBO written in plain PyTorch.

Both sides are ``ConvLadderVAE((1, 28, 28), [14, 7], groups_per_scale=15, ...)`` with the
same weights, the same module classes and the same arithmetic; only the bookkeeping differs:

* **ours**: the trainer's path, ``HierarchicalELBO()(vae.model, vae.guide)`` as a
  differentiable loss, ``torch.optim.Adam`` over its parameters, under
  ``pyro.settings.context(module_local_params=True)``, validation off;
* **plain**: the model's own modules called by hand (:func:`plain_loss`): the encoder's
  bottom-up pass, then per group prior -> residual-normal posterior -> ``rsample`` ->
  analytic KL (:func:`~pyro_hvae.spatial_latents.spatial_residual_normal_kl`) -> project
  into the state -> decoder cell, then the Bernoulli log-likelihood; the same optimizer.

The weights are perturbed away from their initialisation (whose zero-output heads make
every posterior equal its prior, so every KL zero), then copied into both sides. Before
timing, both losses are computed from the same weights with the same seed and must agree
(``allclose``): the same random numbers are drawn in the same order. Steps run in
interleaved blocks (``--block`` steps of ours, then as many of plain, ``--repeats``
times); the figure is the median over blocks of ``plain time / our time`` (target >= 0.95).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed blocks of each
side. On CPU torch's allocator keeps no statistics, so each side also runs
``--memory-steps`` steps alone in a fresh subprocess (twice, alternating; Linux only):
the process resets its peak resident set just before the first step (``5`` written to
``/proc/self/clear_refs``) and reports how far the peak (``VmHWM``) rose above the
resident set at that moment: activations, gradients and Adam's state (target: within 5 %).

    python bench/conv_step.py [--batch 32] [--width 32] [--repeats 10] [--block 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time

import pyro
import torch

from pyro_hvae import ConvLadderVAE, HierarchicalELBO
from pyro_hvae.spatial_latents import spatial_residual_normal_kl


def build(width: int, latent_channels: int, device: str, seed: int = 0) -> ConvLadderVAE:
    """The benchmarked network: 28x28 images, scales [14, 7], 15 groups each (L = 30),
    its weights moved off the initialisation by Gaussian noise of scale 0.02."""
    pyro.set_rng_seed(seed)
    vae = ConvLadderVAE(
        (1, 28, 28), [14, 7], groups_per_scale=15, latent_channels=latent_channels, widths=width
    ).to(device)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return vae


def plain_loss(vae: ConvLadderVAE, x: torch.Tensor) -> torch.Tensor:
    """The same negative ELBO (analytic residual KL per group), written directly in PyTorch."""
    model, guide = vae.model, vae.guide
    features = guide.encoder(x)
    scale_of = model.layout.scale_of_layers()
    state = model.top_input.expand(x.shape[0], *model.top_input.shape)
    layer, kl = model.num_layers, 0.0
    for scale in model.scales:
        state = scale.enter(state)
        for group in scale.groups:
            prior, state_from_prior = group.prior(state)
            posterior, _ = guide.posteriors[layer - 1](prior, state, features[scale_of[layer - 1]])
            z = posterior.rsample()
            q = posterior.base_dist
            kl = kl + spatial_residual_normal_kl(q.delta_loc, q.delta_log_scale, prior.base_dist.scale).sum()
            state = group.cell(state + state_from_prior + group.project(z))
            layer -= 1
    return kl - model.observation(state).log_prob(x).sum()


def data(batch: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return (torch.rand(batch, 1, 28, 28, generator=generator) > 0.5).float().to(device)


def sides(vae: ConvLadderVAE) -> dict:
    """``name -> (loss_fn, optimizer)`` for ours and plain, each on its own copy of ``vae``."""
    ours_vae, plain_vae = copy.deepcopy(vae), copy.deepcopy(vae)
    loss_ours = HierarchicalELBO()(ours_vae.model, ours_vae.guide)
    return {
        "ours": (loss_ours, torch.optim.Adam(loss_ours.parameters(), lr=1e-4)),
        "plain": (lambda x: plain_loss(plain_vae, x), torch.optim.Adam(plain_vae.parameters(), lr=1e-4)),
    }


def step(loss_fn, optimizer, x) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss_fn(x).backward()
    optimizer.step()


def check_same_loss(vae: ConvLadderVAE, x: torch.Tensor) -> float:
    """Both losses from the same weights and seed; raises unless they agree."""
    loss_ours = HierarchicalELBO()(vae.model, vae.guide)
    pyro.set_rng_seed(123)
    a = loss_ours(x)
    pyro.set_rng_seed(123)
    b = plain_loss(vae, x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
    return a.item()


def process_memory_kb(key: str) -> int:
    """``VmRSS`` (resident set) or ``VmHWM`` (its peak) of this process, from ``/proc/self/status``."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":"))


def peak_memory_growth_mb(run_steps) -> float:
    """How far the peak resident set rises above the current one while ``run_steps()`` runs."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current VmRSS
    before = process_memory_kb("VmRSS")
    run_steps()
    return (process_memory_kb("VmHWM") - before) / 1024


def memory_child(side: str, args) -> None:
    """Run ``side`` alone and print the growth of the peak resident set, in MB."""
    vae = build(args.width, args.latent_channels, args.device)
    x = data(args.batch, args.device)
    loss_fn, optimizer = sides(vae)[side]

    def run_steps():
        for _ in range(args.memory_steps):
            step(loss_fn, optimizer, x)

    print(peak_memory_growth_mb(run_steps))


def cpu_peak_memory(side: str, args) -> float:
    """``memory_child`` in a fresh Python process, so that neither side inherits the other's heap."""
    command = [sys.executable, __file__, "--memory-of", side, "--batch", str(args.batch), "--width", str(args.width),
               "--latent-channels", str(args.latent_channels), "--memory-steps", str(args.memory_steps)]
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=32, help="channels of state and features at both scales")
    parser.add_argument("--latent-channels", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10, help="interleaved blocks per side")
    parser.add_argument("--block", type=int, default=5, help="steps per block")
    parser.add_argument("--memory-steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-of", choices=["ours", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    pyro.enable_validation(False)
    with pyro.settings.context(module_local_params=True):
        if args.memory_of:
            return memory_child(args.memory_of, args)
        run(args)


def run(args) -> None:
    device, cuda = args.device, args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    vae = build(args.width, args.latent_channels, device)
    x = data(args.batch, device)
    loss = check_same_loss(vae, x)
    runs = sides(vae)
    for loss_fn, optimizer in runs.values():  # warm-up
        for _ in range(3):
            step(loss_fn, optimizer, x)
    times = {name: [] for name in runs}
    peak = {name: 0 for name in runs}
    for _ in range(args.repeats):
        for name, (loss_fn, optimizer) in runs.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            start = time.perf_counter()
            for _ in range(args.block):
                step(loss_fn, optimizer, x)
            sync()
            times[name].append((time.perf_counter() - start) / args.block)
            if cuda:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device) / 2**20)
    if not cuda:
        for _ in range(2):
            for name in runs:
                peak[name] = max(peak[name], cpu_peak_memory(name, args))
    method = "torch.cuda.max_memory_allocated" if cuda else "peak RSS growth over the steps (VmHWM), fresh process each"
    ratio = statistics.median(p / o for p, o in zip(times["plain"], times["ours"]))
    print(f"device {device}, torch {torch.__version__}, pyro {pyro.__version__}, threads {torch.get_num_threads()}")
    print(f"ConvLadderVAE (1,28,28) scales [14,7] x 15 groups (L=30), width {args.width}, "
          f"latent channels {args.latent_channels}, batch {args.batch}; {args.repeats} interleaved blocks "
          f"of {args.block} steps, median")
    print(f"same loss from the same weights and seed: {loss:.3f} (ours and plain, allclose)")
    for name in runs:
        print(f"  {name:5s}: {1e3 * statistics.median(times[name]):8.1f} ms/step, peak memory {peak[name]:7.1f} MB")
    print(f"plain/ours speed {ratio:.3f}x (target >= 0.95); memory ours/plain {peak['ours'] / peak['plain']:.3f} "
          f"(target <= 1.05; {method})")


if __name__ == "__main__":
    main()
