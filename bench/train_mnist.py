"""Training throughput of ``pyro-hvae train`` on the MNIST example vs a plain PyTorch loop.

Both sides train the model of ``examples/mnist.yaml`` (same modules, batches, optimizer,
learning-rate schedule and gradient clipping) for the same number of steps:

* ours: the library's :class:`~pyro_hvae.train.Trainer` (what the CLI runs), with
  evaluation and checkpoints pushed past the timed steps;
* plain: a hand-written loop computing the same negative ELBO in PyTorch.

Each side runs in its own process (so peak memory is its own), alternating, ``--repeats``
times; the medians are printed with the ratio. Peak memory is the process's maximum
resident set size on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.

    PYRO_HVAE_DATA=../shared/data python bench/train_mnist.py [--steps 300] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mnist.yaml"


def run_ours(steps: int, device: torch.device) -> float:
    from pyro_hvae.config import load_config
    from pyro_hvae.run import prepare_run_dir
    from pyro_hvae.train import Trainer

    cfg = load_config(EXAMPLE, [f"train.steps={10 * steps}", f"train.eval_every={10 * steps}",
                                f"train.checkpoint_every={10 * steps}", f"train.log_every={steps}"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, prepare_run_dir(Path(tmp) / "run"), device=device)
        trainer.fit(stop_at=10)  # warm-up steps, untimed
        start = time.perf_counter()
        trainer.fit(stop_at=10 + steps)
        return time.perf_counter() - start


def run_plain(steps: int, device: torch.device) -> float:
    import pyro

    from pyro_hvae.config import load_config
    from pyro_hvae.data import InMemoryLoader, load_splits
    from pyro_hvae.infer.step import warmup_cosine
    from pyro_hvae.models.build import build_model
    from pyro_hvae.train import OPTIMIZERS

    sys.path.insert(0, str(Path(__file__).parent))
    from step_overhead import plain_loss

    cfg = load_config(EXAMPLE, [f"train.steps={10 * steps}"])
    splits = load_splits(cfg.data)
    pyro.set_rng_seed(cfg.seed)
    vae = build_model(cfg.model, splits.data_shape).to(device)
    optimizer = OPTIMIZERS[cfg.optim.name](vae.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: warmup_cosine(s, warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.train.steps,
                                min_ratio=cfg.optim.min_lr / cfg.optim.lr),
    )
    batches = InMemoryLoader(splits.train, cfg.data.batch_size, shuffle=True, drop_last=True, seed=0).forever()

    def step():
        x = next(batches).to(device)
        optimizer.zero_grad(set_to_none=True)
        plain_loss(vae, x).backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.train.grad_clip)
        optimizer.step()
        schedule.step()

    for _ in range(10):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def child(side: str, steps: int, device_name: str) -> None:
    from pyro_hvae.config import load_config

    device = torch.device(device_name)
    seconds = (run_ours if side == "ours" else run_plain)(steps, device)
    batch = load_config(EXAMPLE).data.batch_size
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images_per_s": steps * batch / seconds, "peak_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=["ours", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.device)
        return
    results: dict[str, list[dict]] = {"ours": [], "plain": []}
    for _ in range(args.repeats):
        for side in ("ours", "plain"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", side, "--steps", str(args.steps), "--device", args.device],
                check=True, capture_output=True, text=True,
            ).stdout
            results[side].append(json.loads(out.strip().splitlines()[-1]))
    print(f"device={args.device} steps={args.steps} repeats={args.repeats} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} model=examples/mnist.yaml")
    summary = {
        side: {key: statistics.median(r[key] for r in runs) for key in ("images_per_s", "peak_mb")}
        for side, runs in results.items()
    }
    for side, s in summary.items():
        print(f"{side:>6}: {s['images_per_s']:8.0f} images/s   peak memory {s['peak_mb']:7.0f} MB")
    print(f"ours / plain throughput: {summary['ours']['images_per_s'] / summary['plain']['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
