"""Training from a validated config: ``Trainer(cfg, run_dir).fit()``.

The loop: draw a batch, set the KL warm-up weight, take one :class:`TrainStep` (its
loss with the spectral penalty of ``train.spectral_reg`` when configured), step the
learning-rate schedule; every ``log_every`` steps append a record of the means
over those steps to ``metrics.jsonl``; every ``eval_every`` steps evaluate on the validation split (with
the EMA weights when configured), save image grids and, on a new best validation
ELBO, ``best.pt``, and redraw ``kl_per_layer.png`` (:mod:`pyro_hvae.plots`); every
``checkpoint_every`` steps save ``last.pt`` with everything a
resumed run needs to continue exactly as if never stopped. With ``train.max_minutes``
the loop also stops once that much wall-clock time has passed (``elapsed_s`` in every
record), after a last validation evaluation of the weights it ends with.

The posterior noise of the training steps is drawn per row of the global batch
(:class:`~pyro_hvae.infer.noise.RowNoise`, from a stream seeded from ``seed``), so that
under torchrun (:mod:`pyro_hvae.distributed`) a row gets the noise it gets in one
process. There each process trains on its rows of the global batch of
``data.batch_size`` images through :class:`~torch.nn.parallel.DistributedDataParallel`,
draws the noise of sites that ``RowNoise`` leaves alone from a stream of its own (rank 0
the one process's, the others streams derived from ``seed`` and their rank), evaluates
its share of the validation images, and logs and decides on the means over the
processes; only rank 0 writes the run folder, and rank 0's clock decides when
``train.max_minutes`` is spent.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.utils import save_image
from tqdm import tqdm

from pyro_hvae.config import Config, ConfigError, TrainConfig, dump_config
from pyro_hvae.data import InMemoryLoader, Splits, batch_seed, derived_seed, load_splits
from pyro_hvae.distributed import World, synchronize_batch_norm
from pyro_hvae.infer.elbo import HierarchicalELBO
from pyro_hvae.infer.iw import log_likelihood
from pyro_hvae.infer.noise import RowNoise
from pyro_hvae.infer.step import EMA, HierarchyLoss, TrainStep, UpdateSkipper, kl_weight, warmup_cosine
from pyro_hvae.models.build import build_hierarchy
from pyro_hvae.models.protocol import Hierarchy, prior_means, reconstruction_means
from pyro_hvae.plots import write_kl_plot
from pyro_hvae.run import MetricsLog, RunError, load_checkpoint, save_checkpoint, write_run_info
from pyro_hvae.spectral import RegularizationSchedule, SpectralRegularizer

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamax": torch.optim.Adamax,
    "adamw": torch.optim.AdamW,
}

#: Consecutive skipped updates after which training stops: the run has diverged.
MAX_CONSECUTIVE_SKIPS = 100


class TrainingError(RuntimeError):
    """Training cannot go on; the message names the likely cause."""


def uses_analytic_kl(cfg: Config, hierarchy: Hierarchy) -> bool:
    """Analytic KL when ``train.elbo`` asks for it and the hierarchy says it is valid for
    its guide (a bottom-up guide samples against the model's order: Monte Carlo KL)."""
    return cfg.train.elbo == "analytic" and hierarchy.analytic_kl


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (cuda when available); with ``local_rank`` (one of
    several processes on a node) the GPU of that index, made the current device."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available here; use --device cpu or --device auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        if local_rank >= torch.cuda.device_count():
            raise RunError(
                f"--device cuda: this process has LOCAL_RANK {local_rank} but the node shows "
                f"{torch.cuda.device_count()} GPUs; start at most that many processes per node (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def apply_speed_options(train: TrainConfig, vae: nn.Module, device: torch.device, world: World = World()) -> nn.Module:
    """``vae`` as ``train`` asks to train it on ``device`` in ``world`` (not yet moved
    there): with checkpointed cells (``train.gradient_checkpointing``) and, under torchrun,
    synchronized batch norm (``train.sync_batch_norm``, :func:`~pyro_hvae.distributed.synchronize_batch_norm`).
    Raises :class:`TrainingError` for an option that cannot act on this model or device."""
    if train.gradient_checkpointing and not hasattr(vae, "gradient_checkpointing"):
        raise TrainingError(
            f"train.gradient_checkpointing: {type(vae).__name__} has no checkpointed cells; "
            "use model.kind: conv_ladder or set train.gradient_checkpointing=false"
        )
    if train.bf16_autocast and device.type != "cuda":
        raise TrainingError(
            f"train.bf16_autocast needs a CUDA device, but training runs on {device.type}; "
            "use --device cuda or set train.bf16_autocast=false"
        )
    if train.sync_batch_norm and device.type != "cuda":
        raise TrainingError(
            "train.sync_batch_norm needs CUDA devices (PyTorch's SyncBatchNorm synchronizes no CPU "
            "tensors), but training runs on the CPU; use --device cuda or set train.sync_batch_norm=false"
        )
    if train.gradient_checkpointing:
        vae.gradient_checkpointing = True
    if train.sync_batch_norm and world.is_distributed:
        vae = synchronize_batch_norm(vae)
    return vae


class Trainer:
    """Trains the hierarchy of ``cfg`` and writes the run folder ``run_dir``.

    Build it, optionally :meth:`resume` from a checkpoint state, then :meth:`fit`.
    ``world`` is this process's place in a torchrun run (default: the single process);
    building the trainer of a distributed run is a collective (DDP shares rank 0's weights).
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        *,
        device: torch.device,
        splits: Splits | None = None,
        overrides: Sequence[str] = (),
        world: World = World(),
    ):
        self.cfg = cfg
        self.world = world
        self.overrides = list(overrides)
        self.run_dir = Path(run_dir)
        self.device = device
        self.splits = splits if splits is not None else load_splits(cfg.data)
        pyro.set_rng_seed(cfg.seed)  # before building: IAF networks draw their masks
        example = self.splits.train.batch(torch.arange(2), generator=torch.Generator().manual_seed(0))
        vae, self.hierarchy = build_hierarchy(cfg.model, self.splits.data_shape, example)
        if getattr(cfg.model, "output_bias", "default") == "data_mean":
            vae.model.start_at_data_mean(self.splits.train.mean())
        train, optim = cfg.train, cfg.optim
        vae = apply_speed_options(train, vae, device, world)
        rows = world.batch_rows(cfg.data.batch_size)  # refuses a global batch that does not split
        self.memory_format = torch.channels_last if train.channels_last else torch.preserve_format
        self.vae = vae.to(device, memory_format=self.memory_format)
        self.elbo = HierarchicalELBO(
            train.num_particles,
            free_bits=train.free_bits,
            kl_balancing=train.kl_balancing,
            analytic_kl=uses_analytic_kl(cfg, self.hierarchy),
            max_plate_nesting=self.hierarchy.max_plate_nesting,
        )
        self.optimizer = OPTIMIZERS[optim.name](
            self.vae.parameters(), lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay
        )
        self.scheduler = self._lr_schedule()
        self.ema = EMA(self.vae, train.ema_decay) if train.ema_decay else None
        self.skipper = UpdateSkipper(train.skip_factor)
        self.regularizer = self._spectral_regularizer()
        loss = None
        if world.is_distributed:  # gradients averaged over the ranks in the backward pass
            device_ids = [device.index] if device.type == "cuda" else None
            loss = DistributedDataParallel(HierarchyLoss(self.vae, self.elbo), device_ids=device_ids)
        self.take_step = TrainStep(
            self.vae.model, self.vae.guide, self.vae, self.elbo, self.optimizer,
            grad_clip=train.grad_clip, skipper=self.skipper, ema=self.ema,
            penalty=self._spectral_penalty if self.regularizer is not None else None,
            autocast=torch.bfloat16 if train.bf16_autocast else None,
            loss=loss, agree=world.mean,
        )
        self.loader = InMemoryLoader(self.splits.train, cfg.data.batch_size, shuffle=True, drop_last=True, seed=cfg.seed, rows=rows)
        # posterior noise per row of the global batch, the same stream on every rank
        noise = torch.Generator(device).manual_seed(derived_seed(cfg.seed, "posterior noise"))
        self.noise = RowNoise(noise, cfg.data.batch_size, rows, self.hierarchy.data_plate)
        if world.rank:  # for the sites RowNoise leaves alone; rank 0 goes on with the one process's stream
            pyro.set_rng_seed(world.seed(cfg.seed))
        self.step = 0
        self.best: dict[str, Any] = {"val_elbo": -math.inf, "step": None}
        self.stale_evaluations = 0
        #: wall-clock seconds of training so far, evaluations included, over resumes
        self.train_seconds = 0.0

    def _spectral_regularizer(self) -> SpectralRegularizer | None:
        """``train.spectral_reg`` over every convolution, linear and batch-norm layer of
        the hierarchy (model and guide), or ``None`` when off."""
        spectral = self.cfg.train.spectral_reg
        if spectral is None or not spectral.enabled:
            return None
        schedule = RegularizationSchedule(spectral.weight, initial=spectral.initial, steps=spectral.steps)
        try:
            return SpectralRegularizer(self.vae, schedule, iterations=spectral.iterations)
        except ValueError as err:  # e.g. a custom hierarchy without such layers
            raise ConfigError([f"train.spectral_reg: {err}; set train.spectral_reg: null"]) from None

    def _spectral_penalty(self) -> torch.Tensor:
        """The spectral penalty at the current step (added to the per-image loss)."""
        return self.regularizer.loss(self.step)

    def _lr_schedule(self, last_step: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
        """The warm-up and cosine decay of ``cfg.optim`` over ``train.steps``, where the
        rate after ``n`` steps is ``optim.lr * warmup_cosine(n)``; ``last_step`` >= 0 starts
        it after that many steps (the param groups then need their ``initial_lr``)."""
        optim = self.cfg.optim
        schedule = partial(
            warmup_cosine,
            warmup_steps=optim.warmup_steps,
            total_steps=self.cfg.train.steps,
            min_ratio=min(1.0, optim.min_lr / optim.lr),
        )
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule, last_epoch=last_step)

    @property
    def eval_vae(self) -> nn.Module:
        """The weights used for evaluation: the EMA when configured."""
        return self.ema.shadow if self.ema is not None else self.vae

    # ---------------------------------------------------------------- state

    def _rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"torch": torch.get_rng_state(), "posterior_noise": self.noise.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue as if never stopped. The
        learning-rate schedule is not stored: it follows from ``cfg`` and ``step``.

        The random state is rank 0's, with the other ranks' in ``rng["other_ranks"]``
        (a collective under torchrun: every rank calls it)."""
        rng = self._rng_state()
        if self.world.is_distributed:
            rng["other_ranks"] = self.world.gather(rng)[1:]
        return {
            "kind": "last",
            "config": dump_config(self.cfg),
            "step": self.step,
            "model": self.vae.state_dict(),
            "ema": self.ema.shadow.state_dict() if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "skipper": self.skipper.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": rng,
            "best": dict(self.best),
            "stale_evaluations": self.stale_evaluations,
            "train_seconds": self.train_seconds,
            "data": self.splits.describe(),
            "spectral": self.regularizer.state_dict() if self.regularizer is not None else None,
            "world_size": self.world.size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`.

        The optimizer keeps its moment estimates, but its hyperparameters are this
        trainer's ``cfg.optim`` (which a resume may have overridden): betas and weight
        decay as configured, and the learning rate of the schedule that ``optim.lr``,
        ``min_lr``, ``warmup_steps`` and ``train.steps`` describe, at the saved step.
        Without overrides these are the saved values, so the run goes on unchanged.
        """
        try:
            self.vae.load_state_dict(state["model"])
        except RuntimeError as err:  # e.g. a custom hierarchy's class changed since the checkpoint
            reason = " ".join(str(err).split())[:200]
            raise RunError(f"the checkpoint's weights do not fit the model its config builds ({reason}); resume with the code it was trained with") from None
        if self.ema is not None and state["ema"] is not None:
            self.ema.shadow.load_state_dict(state["ema"])
            # the decay's warm-up goes on where it stopped; a last.pt written before the count
            # was kept averaged without warm-up: continue it as if warmed up over its steps
            self.ema.updates = state.get("ema_updates", state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        optim = self.cfg.optim
        for group in self.optimizer.param_groups:
            group.update(initial_lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
        self.scheduler = self._lr_schedule(last_step=state["step"] - 1)
        self.skipper.load_state_dict(state["skipper"])
        if self.regularizer is not None and state.get("spectral") is not None:
            # the power iteration goes on from its vectors (a run that turns it on starts it afresh)
            self.regularizer.load_state_dict(state["spectral"])
        self.loader.load_state_dict(state["loader"])
        others = state["rng"].get("other_ranks", [])
        rng = state["rng"] if self.world.rank == 0 else others[self.world.rank - 1] if self.world.rank <= len(others) else None
        if "posterior_noise" in state["rng"]:  # the same on every rank: rank 0's
            self.noise.generator.set_state(state["rng"]["posterior_noise"])
        else:  # a last.pt from before the stream existed: a fresh one for the rest of the run
            self.noise.generator.manual_seed(derived_seed(self.cfg.seed, f"posterior noise after step {state['step']}"))
        if rng is None:  # a run saved by fewer processes: this rank starts a stream of its own
            pyro.set_rng_seed(self.world.seed(self.cfg.seed + state["step"]))
        else:
            torch.set_rng_state(rng["torch"].cpu())
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)
        self.step = state["step"]
        self.best = dict(state["best"])
        self.stale_evaluations = state["stale_evaluations"]
        self.train_seconds = state.get("train_seconds", 0.0)  # a last.pt from before the budget existed: 0

    def _share_buffers(self) -> None:
        """Give every rank rank 0's buffers (batch-norm running statistics), of the weights
        and of their EMA. DDP broadcasts the weights' buffers before each forward pass only,
        so after a step each rank's have moved with its own rows, and each rank's EMA has
        averaged those; evaluations and checkpoints use rank 0's, so that a resumed run,
        which loads rank 0's, goes on as the uninterrupted one (a collective under torchrun)."""
        modules = [self.vae] if self.ema is None else [self.vae, self.ema.shadow]
        self.world.share_(buffer for module in modules for buffer in module.buffers())

    def save_last(self) -> None:
        """``last.pt``, written by rank 0 (a collective under torchrun)."""
        self._share_buffers()
        state = self.state_dict()
        if self.world.is_main:
            save_checkpoint(self.run_dir / "last.pt", state)

    def save_best(self, metrics: dict[str, Any]) -> None:
        if not self.world.is_main:
            return
        save_checkpoint(
            self.run_dir / "best.pt",
            {
                "kind": "best",
                "config": dump_config(self.cfg),
                "step": self.step,
                "model": self.eval_vae.state_dict(),
                "ema": self.ema is not None,
                "val": metrics,
                "data": self.splits.describe(),
            },
        )

    # ---------------------------------------------------------------- loop

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train until ``train.steps`` (or ``stop_at``, early stopping, or the end of
        ``train.max_minutes``); return a summary."""
        train = self.cfg.train
        end = train.steps if stop_at is None else min(stop_at, train.steps)
        budget = None if train.max_minutes is None else 60.0 * train.max_minutes
        main = self.world.is_main
        if self.step == 0 and main:
            info = {"overrides": self.overrides, "device": str(self.device), "processes": self.world.size, "data": self.splits.describe()}
            write_run_info(self.run_dir, dump_config(self.cfg), info)
        # a resumed run drops the records a crashed run wrote after its last checkpoint
        log = MetricsLog(self.run_dir / "metrics.jsonl", self.run_dir / "tensorboard", start_step=self.step) if main else None
        progress = tqdm(total=train.steps, initial=self.step, disable=not (main and sys.stderr.isatty()), dynamic_ncols=True)
        batches = self.loader.forever()
        stopped_early = out_of_time = False
        window: list = []  # the StepStats since the last log line
        window_start, consecutive_skips = time.perf_counter(), 0
        clock_start, seconds_before = time.perf_counter(), self.train_seconds
        first_step = True
        self.vae.train()
        try:
            with pyro.settings.context(module_local_params=True):
                while self.step < end and not stopped_early and not out_of_time:
                    x = next(batches).to(self.device, non_blocking=True, memory_format=self.memory_format)
                    self.elbo.beta = kl_weight(self.step, train.kl_warmup_steps)
                    # Pyro's validation (shapes, supports) on the first step only: it costs time
                    with pyro.validation_enabled(first_step):
                        stats = self._first_step(x) if first_step else self._step(x)
                    first_step = False
                    self.scheduler.step()
                    self.step += 1
                    window.append(stats)
                    consecutive_skips = consecutive_skips + 1 if stats.skipped else 0
                    self._check_divergence(stats, consecutive_skips)
                    self.train_seconds = seconds_before + time.perf_counter() - clock_start
                    out_of_time = budget is not None and self.world.from_main(self.train_seconds >= budget)
                    if self.step % train.log_every == 0 or self.step == end or out_of_time:
                        elapsed = time.perf_counter() - window_start
                        record = self._train_record(window, len(window) * self.cfg.data.batch_size / max(elapsed, 1e-9))
                        if main:
                            log.write(record)
                            self._report(progress, record)
                        window, window_start = [], time.perf_counter()
                    if self.step % train.eval_every == 0 or self.step == train.steps or out_of_time:
                        stopped_early = self._evaluate_and_keep_best(log)
                    if self.step % train.checkpoint_every == 0 or self.step == end or stopped_early or out_of_time:
                        self.save_last()
        finally:
            progress.close()
            if log is not None:
                log.close()
        return {
            "run_dir": str(self.run_dir),
            "step": self.step,
            "best_val_elbo": self.best["val_elbo"],
            "best_step": self.best["step"],
            "stopped_early": stopped_early,
            "stopped_for_time": out_of_time,
            "train_seconds": self.train_seconds,
            "skipped_updates": self.skipper.skipped,
        }

    def _first_step(self, x: torch.Tensor):
        """The first step of a fit, whose validation errors become one clear message. Under
        torchrun every rank first checks a forward pass on its batch and the ranks agree on
        the outcome, so that a rank that fails leaves none waiting in the step's collectives;
        after the step rank 0 warns once about latent sites whose noise each rank draws itself."""
        if self.world.is_distributed:
            buffers = [b.detach().clone() for b in self.vae.buffers()]
            devices = [self.device] if self.device.type == "cuda" else []
            with self.world.agree(), torch.no_grad(), torch.random.fork_rng(devices=devices):
                try:
                    HierarchyLoss(self.vae, self.elbo)(x)
                except ValueError as err:
                    raise _first_step_error(err) from None
            with torch.no_grad():  # the check leaves no trace: no draw, no batch-norm statistics
                for buffer, saved in zip(self.vae.buffers(), buffers):
                    buffer.copy_(saved)
        try:
            stats = self._step(x)
        except ValueError as err:
            raise _first_step_error(err) from None
        if self.noise.own_draws and self.world.is_distributed and self.world.is_main:
            sites = ", ".join(sorted(self.noise.own_draws))
            warnings.warn(
                f"the posterior noise of latent site(s) {sites} is drawn by each process from its own stream "
                "(only a Normal, possibly Independent or under transforms that keep its shape, is drawn per row "
                f"of the global batch): there {self.world.size} processes agree with one in distribution, not draw for draw",
                stacklevel=2,
            )
        return stats

    def _step(self, x: torch.Tensor):
        """One training step, its posterior noise drawn per row of the global batch."""
        with self.noise:
            return self.take_step(x)

    def _check_divergence(self, stats, consecutive_skips: int) -> None:
        """Stop a run whose first loss (on any rank) is not finite, or whose updates have all
        been skipped for a while (every rank skips the same ones)."""
        if self.step == 1 and not bool(torch.isfinite(self.world.mean(stats.loss))):
            raise TrainingError(
                "the loss is NaN/inf at the first step: likely causes are data outside the likelihood's "
                "support or a learning rate far too high (optim.lr); no checkpoint was written"
            )
        if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise TrainingError(
                f"{consecutive_skips} updates in a row were skipped (non-finite or exploding gradients) "
                f"at step {self.step}: training diverged; lower optim.lr or raise train.kl_warmup_steps; "
                "last.pt holds the last good checkpoint"
            )

    def _train_record(self, window: list, images_per_s: float) -> dict[str, Any]:
        """Means over the steps since the last record (per image; skipped non-finite steps
        left out, and counted in ``skipped_updates``) and over the ranks, and the current
        state (a collective under torchrun)."""

        def mean(values) -> torch.Tensor:
            return torch.stack([torch.as_tensor(v, dtype=torch.float64).cpu() for v in values]).nanmean()

        kl, balanced = sorted(window[-1].kl), sorted(window[0].kl_balance)
        means = {
            "elbo": mean(s.elbo for s in window),
            "loss": mean(s.loss for s in window),
            "reconstruction": mean(s.reconstruction for s in window),
            **{f"kl/{name}": mean(s.kl[name] for s in window) for name in kl},
            # over the steps of the window during which KL balancing acted (warm-up comes first)
            **{f"kl_balance/{name}": mean(s.kl_balance[name] for s in window if s.kl_balance) for name in balanced},
            "grad_norm": mean(s.grad_norm for s in window),
        }
        if self.regularizer is not None:
            means["spectral_reg"] = mean(s.penalty for s in window)
        values = dict(zip(means, self.world.mean(torch.stack(list(means.values()))).tolist()))
        record = {
            "kind": "train",
            "step": self.step,
            "elbo": values["elbo"],
            "loss": values["loss"],
            "reconstruction": values["reconstruction"],
            "kl": {name: values[f"kl/{name}"] for name in kl},
            "beta": self.elbo.beta,
            "kl_balance": {name: values[f"kl_balance/{name}"] for name in balanced},
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": values["grad_norm"],
            "skipped_updates": self.skipper.skipped,
            "images_per_s": images_per_s,
            "elapsed_s": self.train_seconds,
        }
        if self.regularizer is not None:
            record["spectral_reg"] = values["spectral_reg"]
            record["spectral_lambda"] = self.regularizer.schedule(self.step - 1)
        return record

    def _report(self, progress: tqdm, record: dict[str, Any]) -> None:
        kl = sum(record["kl"].values())
        if progress.disable:
            print(
                f"step {record['step']}/{self.cfg.train.steps} elbo {record['elbo']:.2f} kl {kl:.2f} "
                f"beta {record['beta']:.3g} lr {record['lr']:.3g} img/s {record['images_per_s']:.0f} "
                f"skipped {record['skipped_updates']}",
                file=sys.stderr,
                flush=True,
            )
        else:
            progress.set_postfix(elbo=f"{record['elbo']:.2f}", kl=f"{kl:.2f}", img_s=f"{record['images_per_s']:.0f}")
            progress.update(record["step"] - progress.n)

    # ---------------------------------------------------------- evaluation

    def _evaluate_and_keep_best(self, log: MetricsLog | None) -> bool:
        """Evaluate (each rank its share of the validation images); rank 0 saves images and,
        when improved, best.pt. Returns whether to stop early, the same on every rank."""
        self._share_buffers()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            seed = self.cfg.seed + self.step
            metrics = evaluate_elbo(self.eval_vae, self.hierarchy, self.splits.val, self.cfg, self.device, self.world, seed)
            if self.world.is_main:
                torch.manual_seed(seed)
                self._save_images(self.splits.val if len(self.splits.val) else self.splits.train)
        # without a validation split (data.val_size: 0) the latest weights count as best
        improved = not metrics or metrics["val_elbo"] > self.best["val_elbo"]
        if improved:
            self.best = {"val_elbo": metrics.get("val_elbo"), "step": self.step}
            self.stale_evaluations = 0
            self.save_best(metrics)
        else:
            self.stale_evaluations += 1
        if log is not None:
            log.write({"kind": "eval", "step": self.step, "elapsed_s": self.train_seconds, **metrics, "best": improved})
            self._plot_kl()
        patience = self.cfg.train.early_stopping_patience
        return patience is not None and self.stale_evaluations >= patience

    def _plot_kl(self) -> None:
        """Redraw ``kl_per_layer.png`` from ``metrics.jsonl`` (once it holds a per-layer KL)."""
        try:
            write_kl_plot(self.run_dir, self.hierarchy.latent_sites)
        except ValueError:  # no KL logged yet: an evaluation before the first log line, without validation data
            pass

    @torch.no_grad()
    def _save_images(self, images) -> None:
        """Prior samples (8 x 8), and ``images`` beside their reconstructions."""
        vae = self.eval_vae
        was_training = vae.training
        vae.eval()
        folder = self.run_dir / "images"
        folder.mkdir(exist_ok=True)
        x = images.batch(torch.arange(min(32, len(images)))).to(self.device)
        samples = prior_means(vae, self.hierarchy, x[torch.arange(64) % len(x)])  # x sets only the batch size
        save_image(samples, folder / f"samples_{self.step:07d}.png", nrow=8)
        pairs = torch.stack([x, reconstruction_means(vae, self.hierarchy, x)], dim=1).flatten(0, 1)
        save_image(pairs, folder / f"reconstructions_{self.step:07d}.png", nrow=8)
        vae.train(was_training)


def _first_step_error(err: ValueError) -> TrainingError:
    """The error of a first step that Pyro's validation stopped."""
    problem = str(err).strip().splitlines()[0][:300]
    return TrainingError(
        f"the first training step failed: {problem}; likely causes are data outside the "
        "likelihood's support, NaN weights in a checkpoint, or a learning rate far too high (optim.lr)"
    )


@torch.no_grad()
def evaluate_elbo(
    vae: nn.Module, hierarchy: Hierarchy, dataset, cfg: Config, device: torch.device, world: World = World(), seed: int = 0
) -> dict[str, Any]:
    """Validation metrics per image: ELBO, reconstruction, KL per layer and, when
    ``train.val_num_samples > 0``, an importance-weighted bound with that many samples.
    Batch ``b`` of ``data.eval_batch_size`` images draws its noise from
    :func:`~pyro_hvae.data.batch_seed` ``(seed, b)``. Under torchrun each rank evaluates its
    share of the batches and every rank returns the metrics of them all (a collective):
    the same as one process's, up to the order of the sums."""
    if len(dataset) == 0:
        return {}
    was_training = vae.training
    vae.eval()
    elbo = HierarchicalELBO(analytic_kl=uses_analytic_kl(cfg, hierarchy), max_plate_nesting=hierarchy.max_plate_nesting)
    totals: dict[str, float] = {"elbo": 0.0, "reconstruction": 0.0, "iw": 0.0}
    K = cfg.train.val_num_samples
    for number, rows in world.batches(len(dataset), cfg.data.eval_batch_size):
        torch.manual_seed(batch_seed(seed, number))
        x = dataset.batch(torch.arange(rows.start, rows.stop)).to(device)
        elbo.differentiable_loss(vae.model, vae.guide, x)
        n = x.shape[0]
        totals["elbo"] += float(elbo.terms["elbo"]) * n
        totals["reconstruction"] += float(elbo.terms["reconstruction"]) * n
        for name, kl in elbo.terms["kl"].items():
            totals[f"kl/{name}"] = totals.get(f"kl/{name}", 0.0) + float(kl) * n
        if K:
            totals["iw"] += float(log_likelihood(vae.model, vae.guide, x, num_samples=K, data_plate=hierarchy.data_plate).sum())
    vae.train(was_training)
    names = sorted(set().union(*world.gather(list(totals))))  # a rank without images saw no KL sites
    summed = world.sum(torch.tensor([totals.get(name, 0.0) for name in names], dtype=torch.float64))
    totals = dict(zip(names, (float(v) for v in summed)))
    n = len(dataset)
    metrics = {
        "val_elbo": totals["elbo"] / n,
        "val_reconstruction": totals["reconstruction"] / n,
        "val_kl": {name[3:]: value / n for name, value in totals.items() if name.startswith("kl/")},
    }
    if K:
        metrics[f"val_iw_{K}"] = totals["iw"] / n
    return metrics


def load_for_resume(run_dir: Path) -> dict[str, Any]:
    """The ``last.pt`` state of ``run_dir``, with a clear error when there is none."""
    if not (run_dir / "last.pt").exists():
        raise RunError(f"--resume {run_dir}: no last.pt there; pass the folder of a run that has saved a checkpoint")
    return load_checkpoint(run_dir / "last.pt")
