"""
Importance-weighted estimates of the per-data-point marginal likelihood.

For a model :math:`p(x, z)` and an amortized guide :math:`q(z \\mid x)` the
importance-weighted bound of "Importance Weighted Autoencoders" is

.. math::

    \\log p(x_n) \\approx \\log \\frac{1}{K} \\sum_{k=1}^K w_{nk},
    \\qquad w_{nk} = \\frac{p(x_n, z_{nk})}{q(z_{nk} \\mid x_n)},
    \\qquad z_{nk} \\sim q(z \\mid x_n),

a lower bound in expectation that increases monotonically in :math:`K` and
converges to :math:`\\log p(x_n)` as :math:`K \\to \\infty`.
"""

import math
import warnings
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import pyro
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine import Trace
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

_PARTICLE_PLATE = "_iw_particles"
#: Plates over independent samples of the same data point: ours and the one of Pyro's ELBOs.
PARTICLE_PLATES = frozenset({_PARTICLE_PLATE, "num_particles_vectorized"})


def get_traces(model: Callable, guide: Callable, *args, **kwargs) -> Tuple[Trace, Trace]:
    """
    Draws one sample from ``guide`` and evaluates ``model`` at it, returning
    ``(model_trace, guide_trace)`` with subsample sites pruned.

    Ordinary guide callables are traced and the model is replayed against the
    guide trace. Guides that are :class:`~pyro.poutine.guide.GuideMessenger`
    instances (possibly wrapped in handlers) run the model themselves, so
    ``model`` is not called and the pair comes from
    :meth:`~pyro.poutine.guide.GuideMessenger.get_traces`.

    :param callable model: the model.
    :param callable guide: a guide callable or a ``GuideMessenger``.
    :returns: a pair ``(model_trace, guide_trace)``.
    :rtype: tuple
    """
    return _run(model, guide, *args, **kwargs)[:2]


def _run(model: Callable, guide: Callable, *args, **kwargs) -> Tuple[Trace, Trace, Trace]:
    """:func:`get_traces`, and a third trace of only the plates' subsample sites
    (the data points this run drew), to replay them in later runs."""
    unwrapped = poutine.unwrap(guide)
    if isinstance(unwrapped, poutine.messenger.Messenger):
        guide(*args, **kwargs)
        model_trace, guide_trace = unwrapped.get_traces()
        full = (unwrapped.trace,)
    else:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        full = (model_trace, guide_trace)
    subsamples = Trace()
    for trace in full:
        for name, site in trace.nodes.items():
            if site_is_subsample(site) and name not in subsamples.nodes:
                subsamples.add_node(name, **site)
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace), subsamples


def _warn_if_training(*programs: Callable) -> None:
    """One warning naming the modules (or owners of bound methods) left in training mode."""
    modules = [getattr(program, "__self__", program) for program in programs]
    training = [type(m).__name__ for m in modules if isinstance(m, nn.Module) and any(s.training for s in m.modules())]
    if training:
        warnings.warn(
            f"log_likelihood evaluates {', '.join(training)} in training mode: batch-norm layers use batch "
            "statistics and update their running averages, and dropout is active; call .eval() first",
            stacklevel=3,
        )


def _sample_sites(trace: Trace):
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["infer"].get("_deterministic"):
            yield name, site


def _find_frame(site: dict, plate: str) -> Optional[CondIndepStackFrame]:
    for frame in site["cond_indep_stack"]:
        if frame.name == plate:
            return frame
    return None


def _sum_except(tensor: Tensor, keep: Sequence[int]) -> Tensor:
    """
    Sums ``tensor`` over every dim except the (negative) dims in ``keep``,
    treating missing leftmost dims as broadcast dims of size one.
    """
    ndim = max(tensor.dim(), *(-d for d in keep))
    tensor = tensor.reshape((1,) * (ndim - tensor.dim()) + tensor.shape)
    dims = [d for d in range(-ndim, 0) if d not in keep]
    return tensor.sum(dims) if dims else tensor


def _per_data_point(tensor: Tensor, site: dict, data_plate: str) -> Tensor:
    """
    A tensor over ``site``'s batch dims, per data point: averaged over particle plates
    (:data:`PARTICLE_PLATES`) and summed over every other batch dim except the dim of
    ``data_plate``. ``[N]`` for a site inside ``data_plate``, 0-d for a global site.
    """
    frames = [f for f in site["cond_indep_stack"] if f.vectorized]
    ndim = max([tensor.dim()] + [-f.dim for f in frames])
    tensor = tensor.reshape((1,) * (ndim - tensor.dim()) + tensor.shape)
    particle_dims = [f.dim for f in frames if f.name in PARTICLE_PLATES]
    if particle_dims:
        tensor = tensor.mean(particle_dims, keepdim=True)
    data = _find_frame(site, data_plate)
    if data is None:
        return tensor.sum()
    if data.dim is None:
        raise ValueError(
            f"plate {data_plate!r} is sequential; use it as a context manager "
            "(`with pyro.plate(...)`) so that it is vectorized"
        )
    return _sum_except(tensor, (data.dim,)).reshape(-1).expand(data.size)


def _check_per_datum(model_trace: Trace, guide_trace: Trace, data_plate: str) -> None:
    sites = list(_sample_sites(model_trace)) + list(_sample_sites(guide_trace))
    frames = [f for _, site in sites if (f := _find_frame(site, data_plate)) is not None]
    if not frames:
        raise ValueError(
            f"no plate named {data_plate!r} found in the model or guide; wrap the "
            f"per-data-point sample sites in pyro.plate({data_plate!r}, N) or pass "
            "data_plate= the name of the plate over data points"
        )
    if frames[0].dim is None:
        raise ValueError(
            f"plate {data_plate!r} is sequential; use it as a context manager "
            "(`with pyro.plate(...)`) so that it is vectorized"
        )
    for name, site in sites:
        if _find_frame(site, data_plate) is None:
            raise ValueError(
                f"sample site {name!r} lies outside plate {data_plate!r}; per-data-point "
                "likelihoods require every site to be local to a data point, global "
                "latent variables are not supported"
            )
    for name, site in _sample_sites(model_trace):
        if not site["is_observed"] and name not in guide_trace.nodes:
            raise ValueError(f"latent site {name!r} of the model is not sampled by the guide")


def _max_plate_nesting(*traces: Trace) -> int:
    nesting = 0
    for trace in traces:
        for _, site in _sample_sites(trace):
            nesting = max(nesting, len(site["fn"].batch_shape))
            for frame in site["cond_indep_stack"]:
                if frame.vectorized:
                    nesting = max(nesting, -frame.dim)
    return nesting


def _log_weights(
    model_trace: Trace, guide_trace: Trace, particle_dim: int, data_plate: str
) -> Tensor:
    """
    :math:`\\log p(x_n, z_{nk}) - \\log q(z_{nk} \\mid x_n)` as a ``[k, N]`` float64
    tensor; ``k = 1`` for traces outside the particle plate. Each site's log density is
    converted to float64 before it is summed over plates and sites.
    """
    log_w = 0.0
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for _, site in _sample_sites(trace):
            data = _find_frame(site, data_plate)
            particles = _find_frame(site, _PARTICLE_PLATE)
            log_prob = site["fn"].log_prob(site["value"]).to(torch.float64)
            log_prob = scale_and_mask(log_prob, mask=site["mask"])
            log_w = log_w + sign * _sum_except(log_prob, (particle_dim, data.dim))
    return log_w.expand(1 if particles is None else particles.size, data.size)


def log_likelihood(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int,
    chunk_size: int | None = None,
    data_plate: str = "data",
    return_log_weights: bool = False,
    **kwargs,
) -> Tensor | tuple[Tensor, Tensor]:
    """
    Per-data-point importance-weighted estimate of :math:`\\log p(x_n)`:

    .. math::

        \\widehat{\\log p}(x_n) = \\operatorname{logsumexp}_{k=1}^K \\log w_{nk} - \\log K,
        \\qquad \\log w_{nk} = \\log p(x_n, z_{nk}) - \\log q(z_{nk} \\mid x_n),

    with :math:`z_{nk} \\sim q(z \\mid x_n)` and both densities evaluated at the
    same samples. :math:`\\log p(x_n, z)` sums every model site, observed ones
    included, and :math:`\\log q` every guide site, each with its own
    ``site["fn"].log_prob`` (so flows contribute their transformed densities).
    Subsampling scales are ignored; masked-out terms contribute zero.

    Unlike :func:`pyro.infer.importance.vectorized_importance_weights`, which
    sums log weights over the data plate and so weights whole batches, this
    returns one estimate per data point. Every sample site must live inside
    the plate named ``data_plate``; global latent variables are rejected.

    The first sample is drawn in a plain (unbatched) pass, which also reveals the
    program's plate structure; the other :math:`K - 1` are vectorized under an outer
    plate one dim left of its deepest batch dim, ``chunk_size`` of them per pass:
    model and guide run :math:`1 + \\lceil (K - 1) / \\text{chunk\\_size} \\rceil` times.
    A subsampled data plate (``pyro.plate("data", N, subsample_size=B)``) draws its
    ``B`` data points in the first pass and every later pass replays them, so the
    ``B`` estimates are of those data points, in the order of the plate's indices.

    Each site's log density is converted to float64 before it is summed over plates
    and sites, and the log weights and estimates are float64 whatever the model's
    dtype (sums over event dims happen inside the distributions, in their dtype).
    Results are deterministic for a fixed seed and ``chunk_size``; different chunk
    sizes consume the RNG stream differently and agree only in distribution.
    Runs under :func:`torch.no_grad`. Module modes are left to the caller, who
    should call ``.eval()`` first: a model or guide that is an ``nn.Module``, or a
    bound method of one, in training mode gets a warning (batch norm would use and
    update batch statistics, dropout would be active).

    :param callable model: a model with per-data-point sites in ``data_plate``.
    :param callable guide: a guide callable or a
        :class:`~pyro.poutine.guide.GuideMessenger`.
    :param int num_samples: number of importance samples :math:`K \\ge 1`.
    :param int chunk_size: particles per vectorized pass; defaults to ``num_samples``.
    :param str data_plate: name of the plate over data points.
    :param bool return_log_weights: also return the ``[K, N]`` log weights.
    :returns: the ``[N]`` estimates, or ``(estimates, log_weights)``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    chunk_size = num_samples if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _warn_if_training(model, guide)
    with torch.no_grad():
        model_trace, guide_trace, subsamples = _run(model, guide, *args, **kwargs)
        _check_per_datum(model_trace, guide_trace, data_plate)
        particle_dim = -1 - _max_plate_nesting(model_trace, guide_trace)
        chunks = [_log_weights(model_trace, guide_trace, particle_dim, data_plate)]
        with poutine.replay(trace=subsamples):
            for start in range(1, num_samples, chunk_size):
                size = min(chunk_size, num_samples - start)
                with pyro.plate(_PARTICLE_PLATE, size, dim=particle_dim):
                    model_trace, guide_trace = get_traces(model, guide, *args, **kwargs)
                chunks.append(_log_weights(model_trace, guide_trace, particle_dim, data_plate))
        log_weights = torch.cat(chunks)
    estimate = log_weights.logsumexp(0) - math.log(num_samples)
    return (estimate, log_weights) if return_log_weights else estimate
