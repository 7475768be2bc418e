"""The run folder: what a training run writes, and how it is read back.

::

    RUN_DIR/
      config.yaml      the resolved configuration (loads with ``load_config``)
      run.json         overrides, command line, versions, device, data description, resumes
      metrics.jsonl    one JSON record per log line or evaluation
      last.pt          full training state, for ``--resume``
      best.pt          the evaluation weights at the best validation ELBO
      kl_per_layer.png per-layer KL on training and validation data over the steps
                       (redrawn at each evaluation, :mod:`pyro_hvae.plots`)
      images/          prior samples and reconstructions at each evaluation
      tensorboard/     event files, when the ``tensorboard`` extra is installed

Checkpoints are written atomically (a temporary file, then a rename) and hold only
tensors and plain Python values, so ``torch.load(path, weights_only=True)`` reads them.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import IO, Any

import pyro
import torch

CHECKPOINT_FORMAT = "pyro-hvae-checkpoint"
#: 2: IAF flows start at the identity (a new parameterisation), last.pt holds the EMA
#: update count and no scheduler state; checkpoints of version 1 are refused.
CHECKPOINT_VERSION = 2


class RunError(ValueError):
    """A run folder or checkpoint that cannot be used; the message says why and what to do."""


def default_run_dir(name: str, root: Path = Path("runs")) -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>``."""
    return root / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def holds_run(path: Path) -> bool:
    """Whether ``path`` already holds (part of) a training run."""
    return any((path / name).exists() for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl"))


def prepare_run_dir(path: Path, *, force: bool = False) -> Path:
    """Create ``path`` for a new run; refuse a folder that already holds one unless ``force``."""
    if path.exists() and not path.is_dir():
        raise RunError(f"output folder {path} is a file; choose another --out")
    if holds_run(path) and not force:
        raise RunError(
            f"output folder {path} already holds a run; continue it with --resume {path}, "
            "choose another --out, or pass --force to overwrite it"
        )
    path.mkdir(parents=True, exist_ok=True)
    if force:
        for name in ("metrics.jsonl", "last.pt", "best.pt"):
            (path / name).unlink(missing_ok=True)
    return path


def versions() -> dict[str, str]:
    from pyro_hvae import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "pyro_hvae": __version__,
    }


def write_run_info(path: Path, config_yaml: str, info: dict[str, Any]) -> None:
    """Write ``config.yaml`` and ``run.json`` (with versions and the command line added)."""
    _atomic_write_text(path / "config.yaml", config_yaml)
    record = {"versions": versions(), "argv": sys.argv, **info}
    _atomic_write_text(path / "run.json", json.dumps(record, indent=2, default=str) + "\n")


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through a temporary file in its folder, then rename it into place:
    a crash leaves the old file or the new one, never half of one."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        try:
            write(f)
        except BaseException:
            f.close()
            os.unlink(f.name)
            raise
    os.replace(f.name, path)


def record_resume(path: Path, step: int, overrides: Sequence[str]) -> None:
    """Append a resume (its step, overrides, command line and versions) to ``run.json``."""
    info_path = path / "run.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.setdefault("resumes", []).append({"step": step, "overrides": list(overrides), "argv": sys.argv, "versions": versions()})
    _atomic_write_text(info_path, json.dumps(info, indent=2, default=str) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``; mirrors scalars to TensorBoard
    when it is installed.

    A log opened at ``start_step > 0`` continues a run from its checkpoint at that step:
    the records of later steps, written by a run that crashed before its next
    checkpoint and about to be written again, are dropped from ``metrics.jsonl`` (which
    is rewritten atomically), and TensorBoard purges its events from ``start_step + 1``
    on. The records at ``start_step`` itself came before the checkpoint and stay.
    """

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, *, start_step: int = 0):
        self.path = path
        if start_step > 0:
            truncate_metrics(path, start_step)
        self._file = path.open("a")
        self._tensorboard = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                purge = start_step + 1 if start_step > 0 else None
                self._tensorboard = SummaryWriter(str(tensorboard_dir), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            prefix = record.get("kind", "train")
            for key, value in _flatten(record).items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self._tensorboard.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the records of ``metrics.jsonl`` up to ``last_step`` (and drop a line a
    crash cut short); the file is rewritten atomically, and only when something goes."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line)
    if kept != lines:
        _atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors and plain values) to ``path`` atomically, tagged as ours."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``.

    Raises :class:`RunError` for a missing, truncated, corrupt or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} does not exist; pass a run folder or a .pt file written by pyro-hvae train")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(
            f"checkpoint {path} cannot be read ({reason[:200]}): it is truncated, corrupt or not a "
            "pyro-hvae checkpoint; use another checkpoint of the run (best.pt / last.pt) or train again"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a pyro-hvae checkpoint (no '{CHECKPOINT_FORMAT}' tag); pass a file written by pyro-hvae train")
    if state.get("version") != CHECKPOINT_VERSION:
        raise RunError(f"{path} is a pyro-hvae checkpoint of format version {state.get('version')}, this version reads {CHECKPOINT_VERSION}; train it again with this version")
    return state
