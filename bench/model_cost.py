"""Cost per image of the example configs: parameters, FLOPs and measured milliseconds.

For each config (default: the conv ladder and the MLP ladder, each on Fashion-MNIST and
on MNIST) the script builds the library's :class:`~pyro_hvae.train.Trainer` on the
config's own data and reports

* **parameters** of the VAE (model and guide);
* **FLOPs per image** of one training step's forward pass: the trainer's ELBO loss on a
  training batch (bottom-up pass, top-down pass, KL terms and likelihood), counted by
  :class:`torch.utils.flop_counter.FlopCounterMode`, which counts matrix products and
  convolutions (``2 * multiply-adds``) and no elementwise work. The backward pass is
  not counted: the counter's formula for ``convolution_backward`` leaves out the
  groups of a grouped convolution (torch 2.15: a depthwise 5x5 conv over 64 channels
  counts 65x its forward instead of 2x), and the decoder cells are depthwise; the
  usual rule, backward = 2 x forward, puts a step at about 3x the forward figure;
* **FLOPs per image x sample** of importance-weighted evaluation:
  :func:`~pyro_hvae.log_likelihood` on ``--eval-images`` test images with ``-K`` samples,
  the chunk size chosen as ``pyro-hvae evaluate`` chooses it, divided by images x K;
* **ms per image** of a training step (``Trainer.take_step``: ELBO, backward, clipping,
  update skipping, the optimizer, EMA and the spectral penalty; after warm-up, beta = 1)
  and **ms per image x sample** of that evaluation.

Timings are interleaved: each of ``--repeats`` rounds times a block of training steps of
every config in turn, then a block of evaluations of every config in turn, each block
sized (after two warm-up calls) to last about ``--block-seconds``; each figure is the
median over rounds, and each ratio (conv / MLP on the same data set) the median of the
per-round ratios, so that both sides of a ratio saw the same machine. On the CPU the
figures are this process's CPU time (``time.process_time``; run it with one torch
thread), which leaves out the time spent waiting for a core on a shared machine; the
wall-clock figures are in the JSON too. On a GPU they are wall clock.
Writes ``OUT/model_cost.json`` and prints a markdown table.

    PYRO_HVAE_DATA=../shared/data OMP_NUM_THREADS=1 python bench/model_cost.py --out /tmp/cost
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pyro
import torch
from torch.utils.flop_counter import FlopCounterMode

from pyro_hvae.config import load_config
from pyro_hvae.evaluate import default_memory_budget, fitting_chunk_size
from pyro_hvae.infer.iw import log_likelihood
from pyro_hvae.train import Trainer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
#: the configs compared by default (names of examples/*.yaml): each conv ladder beside the MLP ladder of its data set
DEFAULT_CONFIGS = ("fashion_mnist_conv_8bit", "fashion_mnist", "mnist_conv", "mnist")


def count_flops(run) -> int:
    """FLOPs of the matrix products and convolutions that ``run()`` executes."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def elbo_forward_flops(vae: torch.nn.Module, elbo, x: torch.Tensor) -> int:
    """FLOPs of the ELBO loss's forward pass on the batch ``x`` (``vae`` in training mode)."""
    vae.train()
    return count_flops(lambda: elbo.differentiable_loss(vae.model, vae.guide, x))


def iw_flops(vae: torch.nn.Module, x: torch.Tensor, num_samples: int, chunk_size: int, data_plate: str) -> int:
    """FLOPs of ``log_likelihood`` with ``num_samples`` samples of every image of ``x``.

    The parameters stop requiring gradients meanwhile: the counter's module tracker
    fails on views of them made under ``torch.no_grad`` (torch 2.15)."""
    vae.eval()
    requires = [p.requires_grad for p in vae.parameters()]
    vae.requires_grad_(False)
    try:
        return count_flops(lambda: log_likelihood(vae.model, vae.guide, x, num_samples=num_samples,
                                                  chunk_size=chunk_size, data_plate=data_plate))
    finally:
        for p, flag in zip(vae.parameters(), requires):
            p.requires_grad_(flag)


def timed(run, reps: int, units: int, sync) -> tuple[float, float]:
    """``(wall ms, CPU ms)`` per unit of ``reps`` calls of ``run()`` that do ``units`` units each.
    CPU time is this process's (``time.process_time``): on a shared machine with one torch
    thread it leaves out the time spent waiting for a core."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(reps):
        run()
    sync()
    return 1e3 * (time.perf_counter() - wall) / (reps * units), 1e3 * (time.process_time() - cpu) / (reps * units)


class Subject:
    """One config's trainer, its training batches and its evaluation images."""

    def __init__(self, name: str, args, run_dir: Path):
        self.name = name
        self.cfg = load_config(EXAMPLES / f"{name}.yaml", args.overrides)
        self.device = torch.device(args.device)
        self.trainer = Trainer(self.cfg, run_dir, device=self.device)
        self.trainer.elbo.beta = 1.0  # after the KL warm-up
        batches = self.trainer.loader.forever()
        self.batches = [next(batches).to(self.device) for _ in range(4)]
        self.next_batch = 0
        test = self.trainer.splits.test
        self.eval_x = test.batch(torch.arange(args.eval_images)).to(self.device)
        self.K = args.num_samples
        vae = self.trainer.vae
        self.chunk_size = fitting_chunk_size(vae, self.eval_x, self.K, default_memory_budget(self.device))
        self.data_plate = self.trainer.hierarchy.data_plate
        self.train_reps = self.eval_reps = 1

    @property
    def batch_size(self) -> int:
        return self.batches[0].shape[0]

    def count(self) -> dict:
        trainer, vae, x = self.trainer, self.trainer.vae, self.batches[0]
        forward = elbo_forward_flops(vae, trainer.elbo, x)
        sample = iw_flops(vae, self.eval_x, self.K, self.chunk_size, self.data_plate)
        return {
            "parameters": sum(p.numel() for p in vae.parameters()),
            "train_forward_mflop_per_image": forward / x.shape[0] / 1e6,
            "iw_mflop_per_image_sample": sample / (self.eval_x.shape[0] * self.K) / 1e6,
        }

    def train_step(self) -> None:
        self.trainer.take_step(self.batches[self.next_batch])
        self.next_batch = (self.next_batch + 1) % len(self.batches)

    def estimate(self) -> None:
        with torch.no_grad():
            log_likelihood(self.trainer.vae.model, self.trainer.vae.guide, self.eval_x, num_samples=self.K,
                           chunk_size=self.chunk_size, data_plate=self.data_plate)

    def time_train(self, sync) -> tuple[float, float]:
        """ms per image of a block of training steps."""
        self.trainer.vae.train()
        return timed(self.train_step, self.train_reps, self.batch_size, sync)

    def time_eval(self, sync) -> tuple[float, float]:
        """ms per image x sample of a block of importance-weighted estimates of the evaluation images."""
        self.trainer.vae.eval()
        return timed(self.estimate, self.eval_reps, self.eval_x.shape[0] * self.K, sync)

    def size_blocks(self, seconds: float, sync, clock: int) -> None:
        """Warm up, then choose how many calls make a block of about ``seconds`` each (on
        ``clock``: 0 wall, 1 CPU), so that the configs' blocks are of similar length."""
        for _ in range(2):
            train_ms, eval_ms = self.time_train(sync)[clock], self.time_eval(sync)[clock]
        self.train_reps = max(1, round(seconds * 1e3 / (train_ms * self.batch_size)))
        self.eval_reps = max(1, round(seconds * 1e3 / (eval_ms * self.eval_x.shape[0] * self.K)))


def measure(args) -> dict:
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = 0 if cuda else 1  # the figures: wall clock on a GPU, this process's CPU time on the CPU
    with tempfile.TemporaryDirectory() as tmp, pyro.settings.context(module_local_params=True), \
            pyro.validation_enabled(False):
        subjects = [Subject(name, args, Path(tmp) / name) for name in args.configs]
        rows = {s.name: {"config": s.name, "dataset": s.cfg.data.dataset, "kind": s.cfg.model.kind,
                         "batch_size": s.batch_size, "eval_images": s.eval_x.shape[0], "K": s.K,
                         "chunk_size": s.chunk_size, **s.count()} for s in subjects}
        for s in subjects:
            s.size_blocks(args.block_seconds, sync, clock)
        train = {s.name: [] for s in subjects}
        iw = {s.name: [] for s in subjects}
        for _ in range(args.repeats):
            for s in subjects:
                train[s.name].append(s.time_train(sync))
            for s in subjects:
                iw[s.name].append(s.time_eval(sync))
        for s in subjects:
            rows[s.name].update(train_steps_per_block=s.train_reps, estimates_per_block=s.eval_reps)
    for name, row in rows.items():
        row["train_ms_per_image"] = statistics.median(t[clock] for t in train[name])
        row["iw_ms_per_image_sample"] = statistics.median(t[clock] for t in iw[name])
        row["wall_train_ms_per_image"] = statistics.median(t[0] for t in train[name])
        row["wall_iw_ms_per_image_sample"] = statistics.median(t[0] for t in iw[name])
    ratios = {}
    for conv in rows.values():
        mlps = [r for r in rows.values() if r["dataset"] == conv["dataset"] and r["kind"] != "conv_ladder"]
        if conv["kind"] != "conv_ladder" or not mlps:
            continue
        mlp = mlps[0]

        def paired(times):
            return statistics.median(c[clock] / m[clock] for c, m in zip(times[conv["config"]], times[mlp["config"]]))

        ratios[conv["dataset"]] = {
            "conv": conv["config"], "mlp": mlp["config"], "train_ms": paired(train), "iw_ms": paired(iw),
            "train_forward_flops": conv["train_forward_mflop_per_image"] / mlp["train_forward_mflop_per_image"],
            "iw_flops": conv["iw_mflop_per_image_sample"] / mlp["iw_mflop_per_image_sample"],
        }
    return {
        "device": args.device, "clock": "wall" if cuda else "process CPU time", "threads": torch.get_num_threads(),
        "repeats": args.repeats, "block_seconds": args.block_seconds, "torch": torch.__version__,
        "pyro": pyro.__version__, "rows": list(rows.values()), "conv_over_mlp": ratios,
    }


def markdown(result: dict) -> str:
    lines = [
        "| config | data | parameters | MFLOP / image, step forward "
        "| MFLOP / image x sample, IW | ms / image, step | ms / image x sample, IW |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| `{r['config']}.yaml` | {r['dataset']} | {r['parameters']:,} | {r['train_forward_mflop_per_image']:.1f} "
            f"| {r['iw_mflop_per_image_sample']:.1f} "
            f"| {r['train_ms_per_image']:.2f} | {r['iw_ms_per_image_sample']:.3f} |"
        )
    for dataset, q in result["conv_over_mlp"].items():
        lines.append(
            f"| conv / MLP on {dataset} | | | {q['train_forward_flops']:.1f}x | {q['iw_flops']:.1f}x "
            f"| **{q['train_ms']:.1f}x** | **{q['iw_ms']:.1f}x** |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="names of examples/*.yaml")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--block-seconds", type=float, default=1.0, help="length of each timed block")
    parser.add_argument("--eval-images", type=int, default=10, help="test images per timed evaluation")
    parser.add_argument("-K", "--num-samples", type=int, default=100, help="importance samples per image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="folder for model_cost.json")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides applied to every config")
    args = parser.parse_args(argv)
    result = measure(args)
    print(f"device {result['device']}, {result['threads']} torch threads, torch {result['torch']}, "
          f"pyro {result['pyro']}; {args.repeats} interleaved rounds, median; ms of {result['clock']}")
    print(markdown(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "model_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
