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
from pyro.poutine.messenger import Messenger
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.trace_messenger import TraceMessenger
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


def _has_density(msg: dict) -> bool:
    """Whether a site enters the log weights: a sample site, neither a plate's subsample
    nor a ``pyro.deterministic`` one."""
    return msg["type"] == "sample" and not site_is_subsample(msg) and not msg["infer"].get("_deterministic")


def _sample_sites(trace: Trace):
    for name, site in trace.nodes.items():
        if _has_density(site):
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


def _site_log_density(fn, site: dict, particle_dim: int, data_plate: str) -> Tensor:
    """``fn.log_prob(site["value"])`` in float64, masked by the site's mask, summed over every
    dim but the particle dim and the dim of ``data_plate``."""
    log_prob = scale_and_mask(fn.log_prob(site["value"]).to(torch.float64), mask=site["mask"])
    return _sum_except(log_prob, (particle_dim, _find_frame(site, data_plate).dim))


def _weights_shape(site: dict, data_plate: str) -> Tuple[int, int]:
    """``(k, N)``: the particle plate's size (1 outside it) and the data plate's, at ``site``."""
    particles = _find_frame(site, _PARTICLE_PLATE)
    return 1 if particles is None else particles.size, _find_frame(site, data_plate).size


def _sum_log_densities(model_terms: Sequence[Tensor], guide_terms: Sequence[Tensor], shape: Tuple[int, int]) -> Tensor:
    """:math:`\\sum \\log p - \\sum \\log q` over the sites' terms, model sites first, each
    in the order its program ran them (one order for every path, so the sums agree bitwise)."""
    log_w = 0.0
    for sign, terms in ((1.0, model_terms), (-1.0, guide_terms)):
        for term in terms:
            log_w = log_w + sign * term
    return log_w.expand(shape)


def _log_weights(
    model_trace: Trace, guide_trace: Trace, particle_dim: int, data_plate: str
) -> Tensor:
    """
    :math:`\\log p(x_n, z_{nk}) - \\log q(z_{nk} \\mid x_n)` as a ``[k, N]`` float64
    tensor; ``k = 1`` for traces outside the particle plate. Each site's log density is
    converted to float64 before it is summed over plates and sites.
    """
    sites = [[site for _, site in _sample_sites(trace)] for trace in (model_trace, guide_trace)]
    terms = [[_site_log_density(site["fn"], site, particle_dim, data_plate) for site in each] for each in sites]
    return _sum_log_densities(*terms, _weights_shape((sites[1] or sites[0])[-1], data_plate))


class _LogDensities:
    """The log density terms of one vectorized pass, collected site by site as each site
    completes (:func:`_site_log_density`): all that is kept of a site's distribution."""

    def __init__(self, particle_dim: int, data_plate: str):
        self.particle_dim, self.data_plate = particle_dim, data_plate
        self.model_terms, self.guide_terms = [], []
        self.shape = None

    def add(self, terms: list, fn, msg: dict) -> None:
        terms.append(_site_log_density(fn, msg, self.particle_dim, self.data_plate))
        self.shape = _weights_shape(msg, self.data_plate)

    def log_weights(self) -> Tensor:
        return _sum_log_densities(self.model_terms, self.guide_terms, self.shape)


class _GuideMessengerDensities(Messenger):
    """Entered just outside a :class:`~pyro.poutine.guide.GuideMessenger`, so that it post-processes
    each site after the guide has chosen the posterior and before the guide's trace records
    the site: it adds the site's terms (the prior, ``infer["prior"]``, expanded as the guide
    would; the posterior, ``fn``) and then takes both out of the site. The guide's trace keeps
    each site's value (for :meth:`~pyro.poutine.guide.GuideMessenger.upstream_value`), not its
    distributions."""

    def __init__(self, densities: _LogDensities):
        super().__init__()
        self.densities = densities

    def _pyro_post_sample(self, msg) -> None:
        if not _has_density(msg):
            return
        fn = msg["fn"]
        if msg["is_observed"]:
            self.densities.add(self.densities.model_terms, fn, msg)
        else:
            prior = msg["infer"]["prior"]
            if prior.batch_shape != fn.batch_shape:
                prior = prior.expand(fn.batch_shape)
            self.densities.add(self.densities.model_terms, prior, msg)
            self.densities.add(self.densities.guide_terms, fn, msg)
            msg["infer"]["prior"] = None
        msg["fn"] = None


class _GuideDensities(TraceMessenger):
    """Traces a guide callable for the model's replay, adding each site's ``log q`` term;
    the trace keeps the sites' values, not their distributions."""

    def __init__(self, densities: _LogDensities):
        super().__init__()
        self.densities = densities

    def _pyro_post_sample(self, msg) -> None:
        if _has_density(msg):
            self.densities.add(self.densities.guide_terms, msg["fn"], msg)
        super()._pyro_post_sample(msg)
        if msg["name"] in self.trace:
            self.trace.nodes[msg["name"]]["fn"] = None


class _ReplayedModelDensities(ReplayMessenger):
    """``poutine.replay`` of the model against a :class:`_GuideDensities` trace, adding each
    site's ``log p`` term; a guide value leaves the trace once the model has taken it."""

    def __init__(self, trace: Trace, densities: _LogDensities):
        super().__init__(trace=trace)
        self.densities = densities

    def _pyro_sample(self, msg) -> None:
        replayed = msg["name"] in self.trace and not msg["is_observed"]
        super()._pyro_sample(msg)
        if replayed:
            self.trace.remove_node(msg["name"])

    def _pyro_post_sample(self, msg) -> None:
        if _has_density(msg):
            self.densities.add(self.densities.model_terms, msg["fn"], msg)


def _pass_log_weights(model: Callable, guide: Callable, particle_dim: int, data_plate: str, *args, **kwargs) -> Tensor:
    """The ``[k, N]`` log weights of one pass of guide and model, as :func:`get_traces` then
    :func:`_log_weights` compute them (the same values, bitwise, for the same draws) but
    without holding whole traces: each site's distributions are dropped once its log
    densities are taken, so a vectorized pass keeps only the sampled values."""
    densities = _LogDensities(particle_dim, data_plate)
    unwrapped = poutine.unwrap(guide)
    if isinstance(unwrapped, poutine.messenger.Messenger):
        with _GuideMessengerDensities(densities):
            guide(*args, **kwargs)
    else:
        guide_densities = _GuideDensities(densities)
        with guide_densities:
            guide(*args, **kwargs)
        with _ReplayedModelDensities(guide_densities.trace, densities):
            model(*args, **kwargs)
    return densities.log_weights()


def _first_pass(model: Callable, guide: Callable, data_plate: str, *args, **kwargs) -> Tuple[Tensor, int, Trace]:
    """The plain (unbatched) first pass with whole traces, to check and read the programs'
    plates: its ``[1, N]`` log weights, the particle plate's dim and the subsample sites."""
    model_trace, guide_trace, subsamples = _run(model, guide, *args, **kwargs)
    _check_per_datum(model_trace, guide_trace, data_plate)
    particle_dim = -1 - _max_plate_nesting(model_trace, guide_trace)
    return _log_weights(model_trace, guide_trace, particle_dim, data_plate), particle_dim, subsamples


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
    Only the first pass keeps whole traces (its checks read them). The vectorized passes
    take each site's log densities as the site completes and drop its distributions, so
    a pass holds the networks' activations and the sampled values, not every site's
    prior and posterior: a :class:`~pyro.poutine.guide.GuideMessenger`'s trace keeps the
    values (for ``upstream_value``) but has ``fn`` and ``infer["prior"]`` set to ``None``,
    and a guide callable's values are let go once the model has taken them. The log
    weights are bitwise those of :func:`get_traces` run pass by pass.

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
        first, particle_dim, subsamples = _first_pass(model, guide, data_plate, *args, **kwargs)
        chunks = [first]
        with poutine.replay(trace=subsamples):
            for start in range(1, num_samples, chunk_size):
                size = min(chunk_size, num_samples - start)
                with pyro.plate(_PARTICLE_PLATE, size, dim=particle_dim):
                    chunks.append(_pass_log_weights(model, guide, particle_dim, data_plate, *args, **kwargs))
        log_weights = torch.cat(chunks)
    estimate = log_weights.logsumexp(0) - math.log(num_samples)
    return (estimate, log_weights) if return_log_weights else estimate
