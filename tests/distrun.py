"""Several processes of one run, started as torchrun starts them, for tests:
``from distrun import run_ranks``.

The processes come from a fork server that has imported torch, Pyro and pyro-hvae once,
so each starts in a fraction of a second; each sees torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and runs on one thread.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]

#: Seconds a test waits for all of its processes before it kills them and fails: far more
#: than the few seconds the runs take, far less than a hang.
TIMEOUT_S = 120

multiprocessing.set_forkserver_preload(["torch", "pyro", "pyro_hvae.train", "pyro_hvae.evaluate", "pyro_hvae.cli"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn, per_rank_args, world_size: int, port: int, results: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    torch.save(fn(*per_rank_args[rank]), Path(results) / f"{rank}.pt")


def run_ranks(fn, *args, world_size: int = 2, per_rank_args=None, timeout_s: float = TIMEOUT_S) -> list:
    """``fn(*args)`` (or ``fn(*per_rank_args[rank])``) in ``world_size`` processes of one run;
    their return values (tensors and plain values), in rank order.

    Raises when a process raises or dies, and :class:`TimeoutError` when they are not all
    done within ``timeout_s`` seconds (they are killed then)."""
    per_rank_args = per_rank_args or [args] * world_size
    with tempfile.TemporaryDirectory() as results:
        context = mp.start_processes(
            _rank_main, args=(fn, per_rank_args, world_size, _free_port(), results),
            nprocs=world_size, join=False, start_method="forkserver",
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"the {world_size} processes were not done after {timeout_s} s")
        return [torch.load(Path(results) / f"{rank}.pt", weights_only=False) for rank in range(world_size)]


def cli(*args) -> tuple[int, str, str]:
    """``pyro-hvae ARGS...`` in this process: exit code, stdout and stderr."""
    from click.testing import CliRunner

    from pyro_hvae.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node NPROC -m pyro_hvae ARGS...`` with this
    checkout's package, one thread per process; killed after :data:`TIMEOUT_S` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "pyro_hvae", *args]
    return subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
