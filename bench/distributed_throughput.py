"""Training throughput of one process against several under torchrun.

Each configuration trains the model of ``examples/mnist.yaml`` (global batch 128) with
``torchrun --standalone --nproc_per_node N -m pyro_hvae train`` for ``--steps`` steps,
evaluation and checkpoints pushed past them, and reads the images per second that the
run logs every ``--log-every`` steps (global images over rank 0's wall time, the first
window left out as warm-up); the median of the rest is printed beside its ratio to the
first configuration. ``--threads`` sets the torch threads of each process, so 1 process
x 2 threads and 2 processes x 1 thread use the same cores.

    PYRO_HVAE_DATA=../shared/data python bench/distributed_throughput.py \\
        [--steps 60] [--configs 1x1 1x2 2x1] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "mnist.yaml"


def images_per_s(processes: int, threads: int, steps: int, log_every: int, device: str) -> float:
    """Median images/s of the logged windows after the first, of one torchrun training run."""
    from pyro_hvae.run import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "pyro_hvae", "train", str(EXAMPLE), f"train.steps={steps}", f"train.log_every={log_every}",
            f"train.eval_every={10 * steps}", f"train.checkpoint_every={10 * steps}", "train.early_stopping_patience=null",
            "data.val_size=100", "--out", str(Path(tmp) / "run"), "--device", device,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        records = [r for r in read_metrics(Path(tmp) / "run" / "metrics.jsonl") if r["kind"] == "train"]
    return statistics.median(r["images_per_s"] for r in records[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--configs", nargs="+", default=["1x1", "1x2", "2x1"], help="PROCESSESxTHREADS each")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"| processes x threads | images/s | vs {args.configs[0]} |")
    print("|---|---|---|")
    first = None
    for config in args.configs:
        processes, threads = (int(n) for n in config.split("x"))
        rate = images_per_s(processes, threads, args.steps, args.log_every, args.device)
        first = first or rate
        print(f"| {processes} x {threads} | {rate:.0f} | {rate / first:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
