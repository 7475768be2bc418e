"""Several processes under ``torchrun``: which one this is, and how they agree.

``torchrun --nproc_per_node N -m pyro_hvae train CONFIG`` starts N copies of the
command; each reads its place from the environment torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``). :func:`launch` joins the default process group only
when ``WORLD_SIZE`` is above 1 (``gloo`` for CPU tensors, and ``nccl`` for CUDA tensors
where CUDA is available); one process, the default, joins none, and every collective
of :class:`World` is then the identity.

Gradient averaging is PyTorch's own. The trainer wraps the module whose forward is the
negative ELBO of the hierarchy (:class:`~pyro_hvae.infer.step.HierarchyLoss`) in
:class:`~torch.nn.parallel.DistributedDataParallel`. That fits Pyro here because the
parameters do not live in Pyro's param store: training runs with
``module_local_params=True``, every parameter the optimizer updates is in the
hierarchy's ``nn.Module`` s, and ``HierarchyLoss`` holds the whole hierarchy, so DDP's
gradient hooks cover exactly the optimizer's parameters. Each rank's loss is the mean
over its ``B / N`` images of the global batch of ``B``; DDP's average of the N gradients
is then the gradient of the mean over all ``B``, the one process's gradient.

Everything else that must be the same on every rank is agreed through the collectives
of :class:`World`: the gradient norm that decides update skipping (and so the EMA), the
statistics that are logged and that decide divergence and early stopping, and the
expected errors (:meth:`World.agree`), so that a rank that fails stops every rank with
one message instead of leaving the others waiting. A rank that dies outright is
noticed by its peers' next collective and by ``torchrun``, which stops the others;
a rank that stops answering is given up after :data:`TIMEOUT` (a collective then
raises on the ranks that wait).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pyro_hvae.config import ConfigError
from pyro_hvae.data import DataError, derived_seed
from pyro_hvae.nn import BatchNorm, SyncBatchNorm
from pyro_hvae.run import RunError

__all__ = ["TIMEOUT", "RanksFailed", "World", "launch", "synchronize_batch_norm"]

#: How long a collective waits for the other ranks before it raises: longer than anything
#: rank 0 does alone between two collectives (writing checkpoints and image grids), short
#: enough that a rank that hangs stops the run within minutes. ``PYRO_HVAE_DIST_TIMEOUT``
#: (seconds) overrides it.
TIMEOUT = timedelta(seconds=float(os.environ.get("PYRO_HVAE_DIST_TIMEOUT", 600)))



class RanksFailed(RunError):
    """Raised on every rank when some rank failed: the message is the first failing rank's,
    prefixed with the ranks it failed on (none when it failed on all of them).
    ``on_main``: whether this is rank 0's copy, the one to print."""

    def __init__(self, message: str, *, on_main: bool):
        super().__init__(message)
        self.on_main = on_main


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run: ``rank`` of ``size``, and
    ``local_rank`` on its node. ``World()`` is the single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes the run folder and prints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    def batch_rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size``: ``B / N`` consecutive ones.

        Raises :class:`~pyro_hvae.config.ConfigError` when ``B`` does not split evenly."""
        if batch_size % self.size:
            lower = batch_size // self.size * self.size
            fix = f"e.g. {lower} or {lower + self.size}" if lower else f"e.g. {self.size}"
            raise ConfigError(
                [
                    f"data.batch_size: {batch_size} images do not split evenly over {self.size} processes "
                    f"(it is the global batch); use a multiple of {self.size} ({fix}) or another process count"
                ]
            )
        per_rank = batch_size // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def shard(self, count: int) -> range:
        """This rank's consecutive share of ``count`` items; the shares of ranks ``0..N-1``
        follow each other, cover every item once and differ in size by at most one."""
        return range(self.rank * count // self.size, (self.rank + 1) * count // self.size)

    def batches(self, count: int, size: int) -> list[tuple[int, range]]:
        """This rank's share (:meth:`shard`) of the batches of ``size`` consecutive items
        that ``count`` items make, the last one shorter: ``(batch number, its items)`` each."""
        total = -(-count // size)
        return [(b, range(b * size, min((b + 1) * size, count))) for b in self.shard(total)]

    def seed(self, seed: int) -> int:
        """The seed of this rank's random stream: ``seed`` itself on rank 0 (so that one
        process draws as before), a 32-bit seed derived from it and the rank elsewhere
        (NumPy's bound: :func:`pyro.set_rng_seed` seeds it too)."""
        return seed if self.rank == 0 else derived_seed(seed, f"rank {self.rank}") % 2**32

    # ------------------------------------------------------------ collectives

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over the ranks (a new tensor; NaN on any rank gives NaN)."""
        if not self.is_distributed:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.size

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks (a new tensor)."""
        if not self.is_distributed:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def min(self, value: int) -> int:
        """The smallest of the ranks' ``value`` s."""
        if not self.is_distributed:
            return value
        return min(self.gather(value))

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.is_distributed:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def share_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite each of ``tensors`` in place with rank 0's copy (a collective)."""
        if not self.is_distributed:
            return
        for tensor in tensors:
            dist.broadcast(tensor, src=0)

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` (picklable), on every rank."""
        if not self.is_distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def agree(self) -> Iterator[None]:
        """Run the block on every rank and fail on every rank if it fails on one.

        At the end of the block the ranks tell each other whether it raised. When some
        rank's block raised, every rank raises :class:`RanksFailed` with that rank's
        message (an unexpected error also keeps its traceback on the rank it happened on).
        The block must reach its collectives on every rank or on none, e.g. read files
        first and start collectives only once every rank has them. One process: the
        block runs as it is.
        """
        if not self.is_distributed:
            yield
            return
        failure: BaseException | None = None
        try:
            yield
        except Exception as err:  # every rank must reach the exchange below
            failure = err
        message = None if failure is None else _one_line(failure)
        messages = self.gather(message)
        failed = [rank for rank, m in enumerate(messages) if m is not None]
        if not failed:
            return
        first = messages[failed[0]]
        same = [rank for rank in failed if messages[rank] == first]
        where = "" if len(same) == self.size else f"rank{'s' if len(same) > 1 else ''} {', '.join(map(str, same))}: "
        if failure is not None and not isinstance(failure, _expected_errors()):
            raise failure
        raise RanksFailed(f"{where}{first}", on_main=self.is_main) from failure


def _expected_errors() -> tuple[type[Exception], ...]:
    """The errors that say what to fix (bad config, data, run folder, diverged training)."""
    from pyro_hvae.train import TrainingError  # train builds on this module

    return (ConfigError, DataError, RunError, TrainingError)


def _one_line(err: BaseException) -> str:
    """An error as the CLI prints it: its message for an expected one, else its type and
    message."""
    if isinstance(err, _expected_errors()):
        return str(err)
    return f"{type(err).__name__}: {err}".strip()


def world_from_env() -> World:
    """The :class:`World` that torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
    describe; ``World()`` without them."""
    try:
        size = int(os.environ.get("WORLD_SIZE", 1))
        rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    except ValueError as err:
        raise RunError(f"torchrun's environment is not readable ({err}); start the command with torchrun or without WORLD_SIZE/RANK set") from None
    if size < 1 or not 0 <= rank < size:
        raise RunError(f"RANK={rank} WORLD_SIZE={size} is not a process of the run; start the command with torchrun")
    return World(rank=rank, size=size, local_rank=local_rank)


@contextmanager
def launch() -> Iterator[World]:
    """This process's :class:`World`, in the default process group while the block runs
    when there are several (left afterwards); the single process joins none.

    The group uses ``gloo`` for CPU tensors and, where CUDA is available, ``nccl`` for
    CUDA tensors; torchrun's ``MASTER_ADDR``/``MASTER_PORT`` say where to meet, and every
    collective gives up after :data:`TIMEOUT`.
    """
    world = world_from_env()
    if not world.is_distributed:
        yield world
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=TIMEOUT)
    try:
        yield world
    finally:
        dist.destroy_process_group()


def synchronize_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with each batch-norm layer replaced by its synchronized twin, with its
    weights, running statistics and state-dict keys: :class:`~pyro_hvae.nn.BatchNorm` by
    :class:`~pyro_hvae.nn.SyncBatchNorm`, the others by :class:`torch.nn.SyncBatchNorm`
    (:meth:`~torch.nn.SyncBatchNorm.convert_sync_batchnorm`, which makes only that class)."""
    for name, child in module.named_children():
        if isinstance(child, BatchNorm):
            twin = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            twin.load_state_dict(child.state_dict())
            module.add_module(name, twin.train(child.training))
        elif isinstance(child, _BatchNorm):
            module.add_module(name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            synchronize_batch_norm(child)
    return module
