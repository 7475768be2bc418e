"""Held-out evaluation of a trained run: ``evaluate_checkpoint(RUN_DIR)``.

Per image of the chosen split it computes

* the ELBO from one posterior sample, ``log p(x | z) - sum_l KL_l``, with the same
  per-layer KL as training's validation ELBO (analytic where
  :func:`~pyro_hvae.train.uses_analytic_kl` says it is valid, else Monte Carlo);
  the hierarchy, built-in or custom, is rebuilt from the checkpoint's stored config
  (:func:`~pyro_hvae.models.build.build_hierarchy`);
* the importance-weighted estimate of ``log p(x)`` with ``K`` samples
  (:func:`~pyro_hvae.infer.iw.log_likelihood`), with the Pareto ``k-hat`` and the
  Kish effective sample size of its ``K`` weights;
* the KL of each latent layer and of each of its units, and the posterior means
  behind the marginal active-unit counts, from ``marginal_samples`` guide samples per
  image (100; 0 skips them: for a conv ladder they cost more than ``K = 100``
  importance samples, and the counts are then null).

A unit is *active* when it carries information of its own: its conditional KL
``KL(q(z_l,d | z_>l, x) || p(z_l,d | z_>l))``, averaged over the images, exceeds
0.01 nats (:func:`~pyro_hvae.infer.diagnostics.active_units`; not defined for flowed
layers, whose count is null). ``active_units_marginal`` counts units whose marginal
posterior mean varies over the images by more than 0.01
(:func:`~pyro_hvae.infer.diagnostics.active_units_marginal`): in a hierarchy that
includes units that only follow the layers above. ``collapsed_layers`` lists the
layers with no active unit (flowed layers: a KL below 0.01 nats), each with its KL,
both counts and why (:func:`~pyro_hvae.infer.diagnostics.collapsed_layers`).

and writes, into one folder (default ``RUN_DIR/eval-<split>-K<K>/``)::

    results.json       summary: NLL in nats and bits/dim (``likelihood_of`` says of
                       what: ``log p(x)``, or for a border model
                       ``log p(x_missing | x_border)`` over its ``num_dims`` hidden
                       values), ELBO, k-hat, ESS, KL and
                       active units (own and marginal) per layer, collapsed layers,
                       chunk size, checkpoint, data and versions
    per_example.npz    the per-image values (elbo, log_likelihood, khat,
                       ess_fraction, kl_<site>, index = row in the data file)
    diagnostics.png    k-hat per image against its threshold; mean KL per layer

Under torchrun (:mod:`pyro_hvae.distributed`) the batches are shared out over the
processes, each a run of consecutive ones, and the per-image values gathered back in
file order; rank 0 writes the files. The samples of each batch are drawn from a seed
derived from ``seed`` and the batch's number (``seed`` itself for the first), so the values are exactly those of one
process, whatever the number of processes (on the same kind of device and thread count).

Summary values that are not finite are written as null: the k-hat mean and max for
``K = 1`` or when some image has too few samples for ArviZ's tail fit (about
``K < 25``, reported as an infinite k-hat). Each file is written atomically.
Unless given, the number of samples drawn per pass is the most that fit a memory
budget (:func:`fitting_chunk_size`). Progress goes to stderr: a bar on a terminal,
else a line every 5% of the images. Results are identical for the same seed, K, chunk
size and batch size; other chunk or batch sizes draw the samples in another order
and agree only in distribution.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from pyro_hvae.config import Config, CustomModelConfig, config_from_yaml
from pyro_hvae.data import batch_seed, load_splits
from pyro_hvae.distributed import World
from pyro_hvae.infer.diagnostics import (
    ACTIVE_UNIT_THRESHOLD,
    active_units,
    active_units_marginal,
    collapsed_layers,
    effective_sample_size,
    kl_per_site,
    kl_per_unit,
    khat_threshold,
    pareto_khat,
    posterior_moments,
)
from pyro_hvae.infer.elbo import site_kl
from pyro_hvae.infer.iw import _find_frame, _sum_except, get_traces, log_likelihood
from pyro_hvae.likelihoods import bits_per_dim
from pyro_hvae.models.build import build_hierarchy
from pyro_hvae.models.protocol import Hierarchy
from pyro_hvae.run import RunError, atomic_write, load_checkpoint, versions
from pyro_hvae.train import uses_analytic_kl

__all__ = ["default_memory_budget", "evaluate_checkpoint", "fitting_chunk_size", "particle_bytes"]

#: The files of one evaluation, beside (and including) ``results.json``.
COMPANIONS = ("per_example.npz", "diagnostics.png")


def evaluate_checkpoint(
    target: str | Path,
    *,
    num_samples: int | None = None,
    split: str | None = None,
    num_images: int | None = None,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    device: torch.device = torch.device("cpu"),
    force: bool = False,
    memory_budget: int | None = None,
    marginal_samples: int = 100,
    world: World = World(),
) -> dict[str, Any]:
    """Evaluate a run folder (its ``best.pt``, else ``last.pt``) or a ``.pt`` checkpoint.

    :param target: run folder or checkpoint file.
    :param num_samples: importance samples ``K >= 1`` per image (default ``eval.num_samples``).
    :param split: ``"test"`` or ``"val"`` (default ``eval.split``).
    :param num_images: evaluate only the first ``num_images`` images of the split, in file
        order (default: all), e.g. K = 1000 on the first 1,000 test images where K = 1000
        on all of them would take too long.
    :param batch_size: images per batch (default ``eval.batch_size``).
    :param chunk_size: importance samples per forward pass (default ``eval.chunk_size``;
        where that is null, the largest that fits ``memory_budget``, see
        :func:`fitting_chunk_size`).
    :param seed: seed of every random draw, set with :func:`pyro.set_rng_seed`.
    :param out: path of ``results.json`` (an existing folder means ``out/results.json``);
        the other files go beside it. Default ``RUN_DIR/eval-<split>-K<K>/results.json``.
    :param device: where the network runs.
    :param force: overwrite results already in the output folder.
    :param memory_budget: bytes the samples of one pass may take when the chunk size is
        chosen here (default :func:`default_memory_budget` of ``device``).
    :param marginal_samples: guide samples per image behind the marginal active-unit
        counts (at least 2), or 0 to skip them (``active_units_marginal`` is then null).
    :param world: this process's place under torchrun (default: the single process). Every
        rank returns the results; rank 0 writes them.
    :returns: the contents of ``results.json``; its ``"results"`` entry is its path.
    :raises RunError: for bad arguments, a missing or foreign checkpoint, or existing results.
    """
    with world.agree():  # files on every rank (results checked by the writer, rank 0)
        for flag, value in (
            ("--num-samples", num_samples), ("--images", num_images), ("--batch-size", batch_size), ("--chunk-size", chunk_size)
        ):
            if value is not None and value < 1:
                raise RunError(f"{flag} must be >= 1, got {value}; pass a positive number or leave it out for the run's eval default")
        if marginal_samples < 0 or marginal_samples == 1:
            raise RunError(f"--marginal-samples must be 0 (skip the marginal counts) or at least 2, got {marginal_samples}")
        if split not in (None, "test", "val"):
            raise RunError(f"--split must be 'test' or 'val', got {split!r}; the training split is never evaluated")
        path = _checkpoint_path(Path(target))
        state = load_checkpoint(path)
        cfg = config_from_yaml(state["config"], f"{path} (stored config)")
        K = num_samples or cfg.eval.num_samples
        split = split or cfg.eval.split
        batch_size = batch_size or cfg.eval.batch_size
        chunk_size = chunk_size or cfg.eval.chunk_size
        results_path = _results_path(out, path.parent, split, K, num_images, force or not world.is_main)

        splits = load_splits(cfg.data)
        dataset = getattr(splits, split)
        if num_images is not None:
            if num_images > len(dataset):
                raise RunError(
                    f"--images {num_images} is more than the {len(dataset)} images of the {split} split; "
                    f"pass at most {len(dataset)}, or leave it out to evaluate them all"
                )
            dataset = dataset.head(num_images)
        vae, hierarchy, ema = _load_vae(state, cfg, splits, path)
    vae.to(device).eval()
    with torch.no_grad(), pyro.validation_enabled(False), pyro.settings.context(module_local_params=True):
        if chunk_size is None:  # measured before seeding: the samples do not depend on it
            first = dataset.batch(torch.arange(min(batch_size, len(dataset)))).to(device)
            budget = default_memory_budget(device) if memory_budget is None else memory_budget
            chunk_size = world.min(fitting_chunk_size(vae, first, K, budget))  # the same on every rank
        per_image, means, unit_kl, units = _per_image(
            vae, hierarchy, dataset, K, chunk_size, batch_size, uses_analytic_kl(cfg, hierarchy), device, seed,
            marginal_samples, world,
        )

    sites = [name for name in per_image if name.startswith("kl_")]
    # a conditional hierarchy's likelihood may explain part of each image (a border model:
    # the hidden pixels given the border); bits per dimension count what it explains
    likelihood_of = getattr(vae, "likelihood_of", "log p(x)")
    num_dims = getattr(vae, "observed_dims", math.prod(splits.data_shape))
    elbo, ll = float(per_image["elbo"].mean()), float(per_image["log_likelihood"].mean())
    khat, ess = per_image["khat"], per_image["ess_fraction"]
    threshold = khat_threshold(K) if K > 1 else None
    kl_per_layer = {name[3:]: float(per_image[name].mean()) for name in sites}
    active = {
        name: [active_units(unit_kl[name])[0] if name in unit_kl else None, units[name]]
        for name in hierarchy.latent_sites
    }
    marginal = {
        name: [active_units_marginal(means[name][0], mc_variance=means[name][1])[0] if means else None, units[name]]
        for name in hierarchy.latent_sites
    }
    results = {
        "checkpoint": str(path),
        "checkpoint_kind": state.get("kind"),
        "step": state["step"],
        "ema": ema,
        "split": split,
        "num_images": len(dataset),
        "first_images_only": num_images is not None,
        "num_samples": K,
        "chunk_size": chunk_size,
        "batch_size": batch_size,
        "seed": seed,
        "marginal_samples": marginal_samples,
        "device": str(device),
        "processes": world.size,
        "data": splits.describe(),
        "likelihood_of": likelihood_of,
        "num_dims": num_dims,
        "elbo": elbo,
        "log_likelihood": ll,
        "nll_nats": -ll,
        "nll_bits_per_dim": bits_per_dim(-ll, num_dims),
        "elbo_bits_per_dim": bits_per_dim(-elbo, num_dims),
        "khat": {
            "mean": _finite(khat.mean()),
            "max": _finite(khat.max()),
            "threshold": threshold,
            "fraction_above": None if threshold is None else float((khat > threshold).mean()),
        },
        "ess_fraction": {"mean": float(ess.mean()), "min": float(ess.min())},
        "kl_per_layer": kl_per_layer,
        "active_units": active,
        "active_units_marginal": marginal,
        "active_unit_threshold": ACTIVE_UNIT_THRESHOLD,
        "collapsed_layers": collapsed_layers(kl_per_layer, active, marginal),
        "versions": versions(),
        "results": str(results_path),
    }
    if world.is_main:
        _write(results_path, results, per_image)
    return results


def _checkpoint_path(target: Path) -> Path:
    """``target`` itself, or the ``best.pt`` (else ``last.pt``) of a run folder."""
    if not target.exists():
        raise RunError(f"{target} does not exist; pass a run folder (holding best.pt or last.pt) or a .pt checkpoint")
    if target.is_file():
        return target
    for name in ("best.pt", "last.pt"):
        if (target / name).is_file():
            return target / name
    raise RunError(f"{target} holds no best.pt or last.pt; pass a run folder of pyro-hvae train that has saved a checkpoint")


def _results_path(out: str | Path | None, run_dir: Path, split: str, K: int, num_images: int | None, force: bool) -> Path:
    """Where ``results.json`` goes; refuses a folder that already holds results unless ``force``."""
    if out is None:
        first = "" if num_images is None else f"-first{num_images}"
        path = run_dir / f"eval-{split}-K{K}{first}" / "results.json"
    else:
        path = Path(out) / "results.json" if Path(out).is_dir() else Path(out)
    existing = [p.name for p in (path, *(path.parent / name for name in COMPANIONS)) if p.exists()]
    if existing and not force:
        raise RunError(
            f"{path.parent} already holds evaluation results ({', '.join(existing)}); "
            "pass --force to overwrite them or --out to write elsewhere"
        )
    return path


def _load_vae(state: dict[str, Any], cfg: Config, splits, path: Path) -> tuple[torch.nn.Module, Hierarchy, bool]:
    """The network of a checkpoint, with the weights training evaluated: the EMA when there is one."""
    if state.get("kind") == "last":
        ema = state["ema"] is not None
        weights = state["ema"] if ema else state["model"]
    else:
        ema, weights = bool(state.get("ema")), state.get("model")
    example = splits.train.batch(torch.arange(2), generator=torch.Generator().manual_seed(0))
    vae, hierarchy = build_hierarchy(cfg.model, splits.data_shape, example)
    try:
        vae.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        cause = "the class named by model.class_path changed since training" if isinstance(cfg.model, CustomModelConfig) else "the checkpoint is damaged"
        raise RunError(f"{path}: the weights do not fit the model its config describes ({reason[:200]}); {cause}") from None
    return vae, hierarchy, ema


def _per_image(
    vae: torch.nn.Module,
    hierarchy: Hierarchy,
    dataset,
    K: int,
    chunk_size: int,
    batch_size: int,
    analytic: bool,
    device: torch.device,
    seed: int,
    marginal_samples: int,
    world: World,
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, int]]:
    """Per-image arrays (see the module docstring) and, per latent site, the stacked
    ``[2, N, D]`` Monte Carlo posterior means and their noise variances from
    ``marginal_samples`` guide samples (none when 0), the ``[N, D]`` KL of each unit
    (sites with a per-unit KL only) and the number ``D`` of units. Batch ``b`` draws its
    samples from the seed derived from ``seed`` and ``b``; this rank computes its share
    of the batches, and every rank returns the values of all of them, in file order."""
    columns: dict[str, list[torch.Tensor]] = {}
    means: dict[str, list[torch.Tensor]] = {}
    unit_kl: dict[str, list[torch.Tensor]] = {}
    mine = world.batches(len(dataset), batch_size)
    with _Progress(sum(len(rows) for _, rows in mine), quiet=not world.is_main) as progress:
        for number, rows in mine:
            pyro.set_rng_seed(batch_seed(seed, number))
            x = dataset.batch(torch.arange(rows.start, rows.stop)).to(device)
            model_trace, guide_trace = get_traces(vae.model, vae.guide, x)
            observed = model_trace.nodes[hierarchy.observed_site]
            data_dim = _find_frame(observed, hierarchy.data_plate).dim
            reconstruction = _sum_except(observed["fn"].log_prob(x), (data_dim,))
            if analytic:
                kl = kl_per_site(model_trace, guide_trace, data_plate=hierarchy.data_plate)
            else:  # a guide that samples against the model's order: Monte Carlo KL
                kl = {
                    name: _sum_except(site_kl(guide_trace.nodes[name], site, analytic=False), (data_dim,))
                    for name, site in model_trace.nodes.items()
                    if site["type"] == "sample" and not site["is_observed"]
                }
            estimate, log_weights = log_likelihood(
                vae.model, vae.guide, x, num_samples=K, chunk_size=chunk_size, return_log_weights=True,
                data_plate=hierarchy.data_plate,
            )
            log_weights = log_weights.cpu()
            row = {
                "elbo": reconstruction - sum(kl.values()),
                "log_likelihood": estimate,
                "khat": _khat(log_weights),
                "ess_fraction": effective_sample_size(log_weights) / K,
                **{f"kl_{name}": kl[name] for name in hierarchy.latent_sites},
            }
            for key, value in row.items():
                columns.setdefault(key, []).append(value.detach().cpu())
            for name, kl_units in kl_per_unit(model_trace, guide_trace, analytic=analytic, data_plate=hierarchy.data_plate).items():
                unit_kl.setdefault(name, []).append(kl_units.cpu())
            if marginal_samples:
                moments = posterior_moments(
                    vae.model, vae.guide, [x], data_plate=hierarchy.data_plate, num_samples=marginal_samples
                )
                for name, (mean, noise) in moments.items():
                    means.setdefault(name, []).append(torch.stack([mean, noise]).cpu())
            progress.update(x.shape[0])
    if world.is_distributed:  # every rank's batches, in rank order: file order
        shares = world.gather((columns, means, unit_kl))
        columns, means, unit_kl = (_joined([share[part] for share in shares]) for part in range(3))
    per_image = {key: torch.cat(values).double().numpy() for key, values in columns.items()}
    per_image["index"] = dataset.indices.numpy()
    return (
        per_image,
        {name: torch.cat(values, dim=1) for name, values in means.items()},
        {name: torch.cat(values) for name, values in unit_kl.items()},
        _units(vae, hierarchy, dataset.batch(torch.arange(1)).to(device)),
    )


def _units(vae: torch.nn.Module, hierarchy: Hierarchy, x: torch.Tensor) -> dict[str, int]:
    """The units of each latent site per image (its event and non-data batch dims), from
    one guide pass on the single image ``x``; run after the seeded draws."""
    _, guide_trace = get_traces(vae.model, vae.guide, x)
    return {name: guide_trace.nodes[name]["value"].numel() for name in hierarchy.latent_sites}


def _joined(parts: list[dict[str, list]]) -> dict[str, list]:
    """Each key's lists, one part after the other (a rank without batches has an empty part)."""
    joined: dict[str, list] = {}
    for part in parts:
        for key, values in part.items():
            joined.setdefault(key, []).extend(values)
    return joined


def _khat(log_weights: torch.Tensor) -> torch.Tensor:
    """Pareto k-hat per image, NaN for K = 1. On degenerate tails ArviZ's fit divides by
    zero on the way to a (correct) huge or infinite k-hat: numpy's warnings are silenced."""
    if log_weights.shape[0] == 1:
        return torch.full(log_weights.shape[1:], math.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        return pareto_khat(log_weights)


def _finite(value: float) -> float | None:
    """``value`` as a float, or None (JSON null) when it is NaN or infinite."""
    value = float(value)
    return value if math.isfinite(value) else None


def _write(results_path: Path, results: dict[str, Any], per_image: dict[str, np.ndarray]) -> None:
    """Write the three result files, each atomically; ``results.json`` last."""
    folder = results_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "per_example.npz", lambda f: np.savez(f, **per_image))
    atomic_write(folder / "diagnostics.png", lambda f: _figure(results, per_image).savefig(f, format="png", dpi=100))
    atomic_write(results_path, lambda f: f.write((json.dumps(results, indent=2) + "\n").encode()))


def _figure(results: dict[str, Any], per_image: dict[str, np.ndarray]):
    """Left: k-hat per image with its threshold; right: mean KL per layer."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    figure = Figure(figsize=(10, 3.6), layout="constrained")
    left, right = figure.subplots(1, 2)
    khat = per_image["khat"]
    left.plot(np.arange(len(khat)), khat, ".", markersize=3, alpha=0.6)
    threshold = results["khat"]["threshold"]
    if threshold is not None:
        left.axhline(threshold, color="C3", label=f"threshold {threshold:.2f} (K={results['num_samples']})")
        left.legend(loc="upper right")
    left.set(xlabel=f"image ({results['split']})", ylabel="Pareto k-hat", title="PSIS k-hat per image")
    layers = results["kl_per_layer"]
    right.bar(list(layers), list(layers.values()), color="C1")
    right.set(xlabel="latent layer", ylabel="KL (nats per image)", title="KL per layer")
    return figure


# ------------------------------------------------------------------ memory


#: Bytes one pass of importance samples may take on the CPU.
CPU_MEMORY_BUDGET = 1 << 30
#: Fraction of a CUDA device's free memory one pass of importance samples may take.
CUDA_MEMORY_FRACTION = 0.5


def default_memory_budget(device: torch.device) -> int:
    """Bytes one pass of importance samples may take: :data:`CPU_MEMORY_BUDGET` on the CPU,
    :data:`CUDA_MEMORY_FRACTION` of the free memory on a CUDA device."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_MEMORY_FRACTION)
    return CPU_MEMORY_BUDGET


class _TensorBytes(TorchFunctionMode):
    """Counts the bytes of every tensor storage that torch functions create, once each.

    The storages are held until the mode is left, so that freed memory cannot be reused
    and escape the count."""

    def __init__(self, inputs: Sequence[torch.Tensor]):
        super().__init__()
        self._storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in inputs}
        self._given = set(self._storages)
        self.bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in self._storages:
                    self._storages[storage.data_ptr()] = storage
                    self.bytes += storage.nbytes()
        return out


def particle_bytes(vae: HierarchicalVAE, x: torch.Tensor) -> int:
    """Bytes of the tensors one importance sample of every image of ``x`` creates: one run
    of the guide and the model on ``x``, counting each new tensor as if none were freed
    (an upper bound on what a sample keeps alive at once). Call it under the settings the
    samples are drawn with (evaluation runs with ``module_local_params=True``: otherwise
    the first call also counts the parameters Pyro's param store registers)."""
    with torch.no_grad(), _TensorBytes([x]) as counter:
        get_traces(vae.model, vae.guide, x)
    return counter.bytes


def fitting_chunk_size(vae: HierarchicalVAE, x: torch.Tensor, num_samples: int, budget: int) -> int:
    """The largest number of importance samples of the batch ``x`` per pass, at most
    ``num_samples`` and at least 1, whose tensors fit in ``budget`` bytes:
    ``min(K, max(1, budget // particle_bytes(vae, x)))``."""
    return min(num_samples, max(1, budget // max(1, particle_bytes(vae, x))))


# ---------------------------------------------------------------- progress


class _Progress:
    """Images done: a tqdm bar when stderr is a terminal, else a line on stderr each time
    another ``every`` of them is done (and at the end), e.g.
    ``evaluate: 500/10000 images (5%), 0:00:12 elapsed, ETA 0:03:48``; nothing when ``quiet``.
    Under torchrun rank 0 reports its own share of the images."""

    def __init__(self, total: int, every: float = 0.05, quiet: bool = False):
        self.total, self.done = total, 0
        self.quiet = quiet
        self.interval = max(1, math.ceil(total * every))
        self.next_line = self.interval
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, unit="img", dynamic_ncols=True) if sys.stderr.isatty() and not quiet else None

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and (self.done >= self.next_line or self.done == self.total):
            elapsed = time.perf_counter() - self.start
            eta = elapsed / self.done * (self.total - self.done)
            print(
                f"evaluate: {self.done}/{self.total} images ({100 * self.done / self.total:.0f}%), "
                f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}",
                file=sys.stderr,
                flush=True,
            )
            self.next_line = (self.done // self.interval + 1) * self.interval


def _clock(seconds: float) -> str:
    """``h:mm:ss``."""
    return str(datetime.timedelta(seconds=round(seconds)))
