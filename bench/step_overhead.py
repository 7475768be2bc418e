"""Training-step time of LadderVAE under Pyro vs the same network with the ELBO in plain PyTorch.

Both sides use the very same modules (so the same arithmetic); only the bookkeeping
differs. Pyro's side is the path the trainer uses: ``HierarchicalELBO()(model, guide)``
as a differentiable loss, ``torch.optim.Adam`` over its parameters,
``module_local_params=True`` and validation off. Steps are interleaved (one of each per
repeat) and the reported figure is the median of the paired ratios
``plain time / our time`` (1.0 = no overhead; the target at L = 5 is >= 0.87).

    python bench/step_overhead.py [--batch 128] [--repeats 200] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
from torch.distributions import kl_divergence

from pyro_hvae import HierarchicalELBO, LadderVAE


def latent_dims(num_layers: int) -> list[int]:
    """64, 32, 16, 8, 4, 4, ...: bottom first, as in examples/mnist.yaml."""
    return [max(64 >> layer, 4) for layer in range(num_layers)]


def plain_loss(vae: LadderVAE, x: torch.Tensor) -> torch.Tensor:
    """The same negative ELBO (analytic KL per layer), written directly in PyTorch."""
    model, guide = vae.model, vae.guide
    features = guide.bottom_up(x)
    prior = model.top_prior(x.shape[0])
    z = None
    kl = 0.0
    for layer in range(model.num_layers, 0, -1):
        if layer < model.num_layers:
            prior = model.prior(layer, z)
        q, _ = guide.heads[layer - 1](prior, features[layer - 1], z)
        z = q.rsample()
        kl = kl + kl_divergence(q, prior).sum()
    return kl - model.observation(z).log_prob(x).sum()


def timed_step(loss_fn, optimizer, x, sync) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss_fn(x).backward()
    optimizer.step()
    sync()
    return time.perf_counter() - start


def measure(num_layers: int, batch: int, repeats: int, device: str) -> dict:
    pyro.set_rng_seed(0)
    x = (torch.rand(batch, 1, 28, 28, device=device) > 0.5).float()
    ours = LadderVAE((1, 28, 28), latent_dims(num_layers), [512, 256], batch_norm=True).to(device)
    plain = LadderVAE((1, 28, 28), latent_dims(num_layers), [512, 256], batch_norm=True).to(device)
    plain.load_state_dict(ours.state_dict())
    loss_ours = HierarchicalELBO(max_plate_nesting=1)(ours.model, ours.guide)
    opt_ours = torch.optim.Adam(loss_ours.parameters(), lr=1e-4)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(10):  # warm-up
        timed_step(loss_ours, opt_ours, x, sync)
        timed_step(lambda data: plain_loss(plain, data), opt_plain, x, sync)
    ratios, t_ours, t_plain = [], [], []
    for _ in range(repeats):
        a = timed_step(loss_ours, opt_ours, x, sync)
        b = timed_step(lambda data: plain_loss(plain, data), opt_plain, x, sync)
        t_ours.append(a)
        t_plain.append(b)
        ratios.append(b / a)
    return {
        "L": num_layers,
        "ours_ms": 1e3 * statistics.median(t_ours),
        "plain_ms": 1e3 * statistics.median(t_plain),
        "speed": statistics.median(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    pyro.settings.set(module_local_params=True)
    pyro.enable_validation(False)
    print(f"device={args.device} batch={args.batch} repeats={args.repeats} torch={torch.__version__} "
          f"pyro={pyro.__version__} threads={torch.get_num_threads()}")
    print(f"{'L':>3} {'ours ms':>9} {'plain ms':>9} {'plain/ours':>11}")
    for num_layers in args.layers:
        r = measure(num_layers, args.batch, args.repeats, args.device)
        print(f"{r['L']:>3} {r['ours_ms']:>9.2f} {r['plain_ms']:>9.2f} {r['speed']:>10.2f}x")


if __name__ == "__main__":
    main()
