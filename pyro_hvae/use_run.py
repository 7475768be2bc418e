"""The use verbs on a run folder: ``sample_run``, ``reconstruct_run``, ``inpaint_run``.

Each loads the run's evaluation weights (``best.pt``, else the EMA of ``last.pt``, as
:func:`~pyro_hvae.evaluate.evaluate_checkpoint` does), calls :mod:`pyro_hvae.use` or
:func:`~pyro_hvae.inpaint.inpaint`, and writes one folder (default inside the run)::

    RUN/sample-T0.8/              samples.png      the images, 8 per row
                                  samples.npz      images (and the temperature)
    RUN/reconstruct-test/         reconstruct.png  original | reconstruction pairs, 4 per row
                                  reconstruct.npz  original, reconstruction, index
    RUN/inpaint-center-mwg/       inpaint.png      original | masked (grey) | filled triples, 4 per row
                                  inpaint.npz      original, mask, filled, predictive_mean,
                                                   missing_log_prob, acceptance_rate, index

Arguments are checked before anything is computed; a bad one raises :class:`RunError`
naming it, and an existing output folder is kept unless ``force``. Sampling at a temperature
other than 1 from a model with batch norm uses statistics readjusted for that temperature
(:func:`~pyro_hvae.use.readjust_batch_norm`), cached as ``RUN/bn_stats_T<t>.pt`` on first use
and read from there afterwards; delete the file after training the run further.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from torchvision.utils import save_image

from pyro_hvae.config import Config, config_from_yaml
from pyro_hvae.data import Splits, load_splits
from pyro_hvae.evaluate import _checkpoint_path, _load_vae
from pyro_hvae.inpaint import MASKS, METHODS, conditioned_on_border, inpaint, make_mask
from pyro_hvae.models import HierarchicalVAE
from pyro_hvae.run import RunError, atomic_write, load_checkpoint
from pyro_hvae.use import batch_norm_layers, readjust_batch_norm
from pyro_hvae.use import sample as sample_images

__all__ = ["Run", "inpaint_run", "load_run", "reconstruct_run", "sample_run"]


@dataclass
class Run:
    """A trained run, loaded: its network (in eval mode, on ``device``), config, data and folder."""

    vae: HierarchicalVAE
    cfg: Config
    splits: Splits
    folder: Path
    checkpoint: Path


def load_run(target: str | Path, device: torch.device = torch.device("cpu")) -> Run:
    """The run folder (or ``.pt`` checkpoint) ``target`` with its evaluation weights."""
    path = _checkpoint_path(Path(target))
    state = load_checkpoint(path)
    cfg = config_from_yaml(state["config"], f"{path} (stored config)")
    splits = load_splits(cfg.data)
    vae, _, _ = _load_vae(state, cfg, splits, path)
    return Run(vae.to(device).eval(), cfg, splits, path.parent, path)


def _positive(flag: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RunError(f"{flag} must be a positive integer, got {value!r}")


def _output(out: str | Path | None, default: Path, names: tuple[str, ...], force: bool) -> Path:
    """The output folder; refuses one that already holds these outputs unless ``force``."""
    folder = Path(out) if out is not None else default
    if folder.exists() and not folder.is_dir():
        raise RunError(f"--out {folder} is a file; pass a folder")
    existing = [name for name in names if (folder / name).exists()]
    if existing and not force:
        raise RunError(f"{folder} already holds {', '.join(existing)}; pass --force to overwrite or --out to write elsewhere")
    return folder


def _write(folder: Path, name: str, grid: torch.Tensor, nrow: int, arrays: dict[str, Any]) -> None:
    """``name.png`` (a grid of ``grid``'s images, values clamped to [0, 1]) and ``name.npz``, atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    images = grid.detach().cpu().clamp(0, 1)
    atomic_write(folder / f"{name}.png", lambda f: save_image(images, f, nrow=nrow, format="png"))
    atomic_write(folder / f"{name}.npz", lambda f: np.savez(f, **arrays))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _unconditional(run: Run, verb: str) -> None:
    """Refuse a run conditioned on the border: its model needs a border to draw from."""
    if conditioned_on_border(run.vae):
        raise RunError(
            f"{verb}: {run.folder} holds a hierarchy conditioned on the border (model.kind: conditional_ladder), "
            "which draws only given a border; use pyro-hvae inpaint RUN --method conditional"
        )


def _check_split(split: str) -> None:
    if split not in ("test", "val"):
        raise RunError(f"--split must be 'test' or 'val', got {split!r}; the training split is not used")


def _images(run: Run, split: str, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num`` images of ``split`` and their indices in the data file."""
    dataset = getattr(run.splits, split)
    if len(dataset) == 0:
        raise RunError(f"--split {split}: the run's data config holds no {split} images; choose the other split")
    index = torch.arange(min(num, len(dataset)))
    device = next(run.vae.parameters()).device
    return dataset.batch(index).to(device), dataset.indices[index]


def sample_run(
    target: str | Path,
    *,
    num: int = 64,
    temperature: float = 1.0,
    mean: bool = True,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    device: torch.device = torch.device("cpu"),
) -> Path:
    """Write ``num`` prior samples at ``temperature`` (``> 0``); returns the output folder."""
    _positive("--num", num)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise RunError(f"--temperature must be a number > 0, got {temperature!r}")
    run = load_run(target, device)
    _unconditional(run, "sample")
    folder = _output(out, run.folder / f"sample-T{temperature:g}", ("samples.png", "samples.npz"), force)
    stats = None
    if temperature != 1 and batch_norm_layers(run.vae):
        pyro.set_rng_seed(seed)
        stats = readjust_batch_norm(run.vae, temperature, run_dir=run.folder)
    pyro.set_rng_seed(seed)
    images = sample_images(run.vae, num, temperature=temperature, mean=mean, batch_norm=stats)
    arrays = {"images": _numpy(images), "temperature": np.array(temperature)}
    _write(folder, "samples", images, 8, arrays)
    return folder


def reconstruct_run(
    target: str | Path,
    *,
    num: int = 32,
    split: str = "test",
    mean: bool = True,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    device: torch.device = torch.device("cpu"),
) -> Path:
    """Write the first ``num`` images of ``split`` beside their reconstructions."""
    _positive("--num", num)
    _check_split(split)
    run = load_run(target, device)
    _unconditional(run, "reconstruct")
    folder = _output(out, run.folder / f"reconstruct-{split}", ("reconstruct.png", "reconstruct.npz"), force)
    pyro.set_rng_seed(seed)
    x, index = _images(run, split, num)
    with torch.no_grad():
        recon = run.vae.reconstruct(x, mean=mean)
    arrays = {"original": _numpy(x), "reconstruction": _numpy(recon), "index": _numpy(index)}
    _write(folder, "reconstruct", torch.stack([x, recon], 1).flatten(0, 1), 2 * 4, arrays)
    return folder


def _mask(spec: str | Path, data_shape: tuple[int, ...], seed: int) -> tuple[str, torch.Tensor]:
    """A mask kind (:data:`~pyro_hvae.inpaint.MASKS`) or a ``.npy`` file of booleans of shape ``data_shape``."""
    if str(spec) in MASKS:
        return str(spec), make_mask(str(spec), data_shape, generator=torch.Generator().manual_seed(seed))
    path = Path(spec)
    if path.suffix != ".npy" or not path.is_file():
        raise RunError(f"--mask must be one of {', '.join(MASKS)} or an existing .npy file of booleans, got {str(spec)!r}")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise RunError(f"--mask {path}: cannot be read as a .npy array ({err})") from None
    if array.dtype != np.bool_:
        raise RunError(f"--mask {path}: expected booleans (True where observed), got dtype {array.dtype}")
    if tuple(array.shape) != tuple(data_shape):
        raise RunError(f"--mask {path}: expected shape {list(data_shape)} (one image), got {list(array.shape)}")
    mask = torch.from_numpy(array)
    if mask.all():
        raise RunError(f"--mask {path} hides no pixel: there is nothing to inpaint")
    if not mask.any():
        raise RunError(f"--mask {path} observes no pixel: that is sampling, use pyro-hvae sample")
    return path.stem, mask


def inpaint_run(
    target: str | Path,
    *,
    mask: str | Path = "center",
    method: str = "mwg",
    num: int = 16,
    num_steps: int = 100,
    split: str = "test",
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    device: torch.device = torch.device("cpu"),
) -> Path:
    """Inpaint the first ``num`` images of ``split`` under ``mask``; writes original | masked | filled."""
    _positive("--num", num)
    _positive("--steps", num_steps)
    if method not in METHODS:
        raise RunError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    _check_split(split)
    run = load_run(target, device)
    name, observed = _mask(mask, run.splits.data_shape, seed)
    if conditioned_on_border(run.vae) != (method == "conditional"):
        fix = "the run is conditioned on the border: use --method conditional" if method != "conditional" else (
            "only a run of model.kind: conditional_ladder has it: use --method mwg or pseudo_gibbs")
        raise RunError(f"--method {method}: {fix}")
    if method == "conditional" and not torch.equal(observed, run.vae.mask.cpu()):
        raise RunError(f"--mask {mask}: the run fills the region of its model.mask ({run.cfg.model.mask}); pass --mask {run.cfg.model.mask}")
    folder = _output(out, run.folder / f"inpaint-{name}-{method}", ("inpaint.png", "inpaint.npz"), force)
    pyro.set_rng_seed(seed)
    x, index = _images(run, split, num)
    observed = observed.to(x.device)
    result = inpaint(run.vae, x, observed, method=method, num_steps=num_steps)
    masked = torch.where(observed, x, torch.full_like(x, 0.5))
    arrays = {"original": _numpy(x), "mask": _numpy(observed), "filled": _numpy(result.x), "index": _numpy(index),
              "predictive_mean": _numpy(result.predictive_mean)}
    for optional in ("missing_log_prob", "acceptance_rate"):
        if getattr(result, optional) is not None:
            arrays[optional] = _numpy(getattr(result, optional))
    _write(folder, "inpaint", torch.stack([x, masked, result.x], 1).flatten(0, 1), 3 * 4, arrays)
    return folder


