"""A hierarchy as the trainer and evaluation see it, checked on a small batch.

:func:`inspect_hierarchy` runs the model and guide once on a couple of data points and
returns a :class:`Hierarchy`: the protocol's names (see :mod:`pyro_hvae.models.base`)
with the defaults filled in from the traces. A hierarchy that does not follow the
protocol raises :class:`HierarchyError` with one line saying what to change.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from torch import nn

from pyro_hvae.infer.iw import _check_per_datum, _find_frame, _max_plate_nesting, get_traces
from pyro_hvae.models.base import HierarchicalVAE

__all__ = ["Hierarchy", "HierarchyError", "check_interface", "inspect_hierarchy", "prior_means", "reconstruction_means"]


class HierarchyError(ValueError):
    """An object that does not follow the hierarchy protocol; one line says why."""


@dataclass(frozen=True)
class Hierarchy:
    """What the trainer and evaluation read from a hierarchy."""

    #: The plate over data points.
    data_plate: str
    #: The site observing ``x``.
    observed_site: str
    #: The per-layer latent sites, bottom first.
    latent_sites: tuple[str, ...]
    #: Whether the closed-form KL of each latent site is valid for the guide.
    analytic_kl: bool
    #: The number of plates (and batch dimensions) the sites nest in: at least 1.
    max_plate_nesting: int


#: The protocol's defaults, for objects that are not :class:`HierarchicalVAE` s.
_DEFAULTS = {
    "data_plate": HierarchicalVAE.data_plate,
    "observed_site": HierarchicalVAE.observed_site,
    "analytic_kl": HierarchicalVAE.analytic_kl,
    "latent_sites": None,
}


def _attribute(vae: nn.Module, name: str):
    """The protocol attribute ``name`` of ``vae``, else the default."""
    return getattr(vae, name, _DEFAULTS[name])


def check_interface(vae: object) -> None:
    """Raise :class:`HierarchyError` unless ``vae`` is an ``nn.Module`` with callable
    ``model`` and ``guide``."""
    if not isinstance(vae, nn.Module):
        raise HierarchyError(
            f"returned a {type(vae).__name__}, not a torch.nn.Module holding the parameters; "
            "return an nn.Module (e.g. a pyro_hvae.HierarchicalVAE subclass) with model(x) and guide(x)"
        )
    missing = [name for name in ("model", "guide") if not callable(getattr(vae, name, None))]
    if missing:
        raise HierarchyError(
            f"returned a {type(vae).__name__} without a callable {' or '.join(missing)}; "
            "give it model(x) and guide(x) methods or submodules"
        )


def inspect_hierarchy(vae: nn.Module, x: torch.Tensor) -> Hierarchy:
    """Run ``vae.guide(x)`` and ``vae.model(x)`` once (with Pyro's validation, in eval mode,
    without changing the random state or any weights) and read the protocol from them.

    :param vae: an object that passes :func:`check_interface`.
    :param x: a small batch of data points, on the device of ``vae``.
    :raises HierarchyError: when the programs fail, when a sample site lies outside the
        data plate, when the observed site is missing, or when a declared latent site
        is not one of the model's.
    """
    check_interface(vae)
    data_plate, observed = _attribute(vae, "data_plate"), _attribute(vae, "observed_site")
    was_training = vae.training
    devices = [x.device] if x.device.type == "cuda" else []
    vae.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), pyro.validation_enabled(True), \
                pyro.settings.context(module_local_params=True):
            model_trace, guide_trace = get_traces(vae.model, vae.guide, x)
    except Exception as err:  # the user's code: report any failure as one line
        problem = (str(err).strip().splitlines() or ["no message"])[0][:300]  # Pyro appends shape tables
        raise HierarchyError(
            f"its model/guide failed on a batch of shape {list(x.shape)}: {type(err).__name__}: {problem}"
        ) from None
    finally:
        vae.train(was_training)
    site = model_trace.nodes.get(observed)
    if site is None or site["type"] != "sample" or not site["is_observed"]:
        raise HierarchyError(
            f"its model has no site {observed!r} observing x; name the observed site {observed!r} "
            "(pyro.sample(..., obs=x)) or set the attribute observed_site"
        )
    if not any(_find_frame(s, data_plate) for s in model_trace.nodes.values() if s["type"] == "sample"):
        raise HierarchyError(
            f"no sample site of its model lies in a plate named {data_plate!r}; wrap them in "
            f"`with pyro.plate({data_plate!r}, len(x)):`, or set the attribute data_plate to your plate's name"
        )
    try:
        _check_per_datum(model_trace, guide_trace, data_plate)
    except ValueError as err:
        raise HierarchyError(str(err)) from None
    latents = [name for name, s in model_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]]
    declared = _attribute(vae, "latent_sites")
    if declared is not None:
        unknown = [name for name in declared if name not in latents]
        if unknown:
            raise HierarchyError(f"latent_sites names {unknown}, which are not latent sites of its model ({latents})")
    analytic = _attribute(vae, "analytic_kl")
    if analytic is None:
        guide_order = [name for name in guide_trace.nodes if name in latents]
        analytic = guide_order == latents
    return Hierarchy(
        data_plate=data_plate,
        observed_site=observed,
        latent_sites=tuple(declared if declared is not None else reversed(latents)),
        analytic_kl=bool(analytic),
        max_plate_nesting=max(1, _max_plate_nesting(model_trace, guide_trace)),
    )


@torch.no_grad()
def reconstruction_means(vae: nn.Module, hierarchy: Hierarchy, x: torch.Tensor) -> torch.Tensor:
    """``E[x' | z]`` with ``z ~ q(z | x)``: the mean of the observed site's distribution."""
    model_trace, _ = get_traces(vae.model, vae.guide, x)
    return model_trace.nodes[hierarchy.observed_site]["fn"].mean


@torch.no_grad()
def prior_means(vae: nn.Module, hierarchy: Hierarchy, x: torch.Tensor) -> torch.Tensor:
    """``E[x | z]`` with ``z ~ p(z)``, one per data point of ``x``: the model runs with its
    observation unconditioned, so ``x`` only sets the batch size."""
    trace = poutine.trace(poutine.uncondition(vae.model)).get_trace(x)
    return trace.nodes[hierarchy.observed_site]["fn"].mean
