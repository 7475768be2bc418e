"""
Diagnostics for amortized posteriors: Pareto-smoothed importance sampling,
effective sample sizes, active units (by each unit's own KL, and by the spread
of its marginal mean), collapsed layers and per-site KL divergences.

Log weights follow :func:`~pyro_hvae.infer.iw.log_likelihood`: shape
``[K, N]``, samples first, :math:`\\log w_{nk} = \\log p(x_n, z_{nk}) - \\log q(z_{nk} \\mid x_n)`.
"""

import math
import warnings
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyro
import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, kl_divergence

from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine import Trace

from .elbo import site_kl
from .iw import _PARTICLE_PLATE, _find_frame, _max_plate_nesting, _per_data_point, _run, get_traces

ArrayLike = Union[Tensor, np.ndarray]


def _psis_backend() -> Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]:
    """
    Returns ``f(log_weights [N, K]) -> (smoothed [N, K], khat [N])`` from
    whichever ArviZ is installed. ArviZ >= 1.0 provides it in ``arviz_stats``,
    whose ``psislw`` takes log *ratios* with the opposite sign (it negates its
    input); ArviZ < 1.0 provides ``arviz.psislw`` taking log weights.
    """
    try:
        from arviz_stats.base import array_stats
    except ImportError:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning
            )
            import arviz
        return lambda log_weights: arviz.psislw(log_weights, reff=1.0)
    return lambda log_weights: array_stats.psislw(-log_weights, r_eff=1.0, axis=-1)


def psislw(log_weights: ArrayLike) -> Tuple[Tensor, Tensor]:
    """
    Pareto-smoothed importance sampling ("Pareto Smoothed Importance
    Sampling"): fits a generalized Pareto distribution to the largest weights
    of each column and replaces them by its order statistics. The fitted
    shape :math:`\\hat k` estimates the number of finite moments of the weights,
    :math:`1 / \\hat k`; see :func:`khat_threshold` for how to read it.

    :param log_weights: ``[K, N]`` log weights (torch or numpy), samples first.
    :returns: ``(smoothed_log_weights [K, N], khat [N])`` as tensors in the
        input's dtype, the smoothed log weights normalised so that
        :math:`\\operatorname{logsumexp}_k = 0` per column.
    """
    like = torch.as_tensor(log_weights)
    if like.dim() != 2:
        raise ValueError(f"log_weights must have shape [K, N], got {tuple(like.shape)}")
    smoothed, khat = _psis_backend()(like.detach().cpu().numpy().T)
    smoothed = torch.as_tensor(np.asarray(smoothed).T).to(like)
    khat = torch.as_tensor(np.asarray(khat)).to(like)
    return smoothed - smoothed.logsumexp(0), khat


def pareto_khat(log_weights: ArrayLike) -> Tensor:
    """
    Pareto :math:`\\hat k` per data point of ``[K, N]`` log weights; see :func:`psislw`.
    """
    return psislw(log_weights)[1]


def khat_threshold(num_samples: int) -> float:
    """
    Sample-size dependent reliability threshold of "Pareto Smoothed Importance
    Sampling",

    .. math::

        \\hat k < \\min(1 - 1 / \\log_{10} K,\\ 0.7).

    Above it the importance-sampling estimate is unreliable for ``K`` samples.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


def effective_sample_size(log_weights: ArrayLike) -> Tensor:
    """
    Kish effective sample size per data point,

    .. math::

        \\mathrm{ESS}_n = \\frac{(\\sum_k w_{nk})^2}{\\sum_k w_{nk}^2}
        = \\exp\\big(2 \\operatorname{logsumexp}_k \\log w_{nk}
        - \\operatorname{logsumexp}_k 2 \\log w_{nk}\\big),

    computed in log space. It lies in :math:`[1, K]`; divide by :math:`K` for
    the efficiency fraction.

    :param log_weights: ``[K, N]`` log weights, samples first.
    :returns: ``[N]`` tensor.
    """
    log_weights = torch.as_tensor(log_weights)
    return torch.exp(2 * log_weights.logsumexp(0) - (2 * log_weights).logsumexp(0))


#: Activity thresholds: 0.01 nats of a unit's own KL, or 0.01 of variance of its marginal mean.
ACTIVE_UNIT_THRESHOLD = 0.01


def active_units(unit_kl: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> Tuple[int, Tensor]:
    """
    Counts the units of a layer that carry information of their own: unit :math:`d`
    of layer :math:`l` is active when its conditional KL, averaged over the data,

    .. math::

        A_d = \\mathbb{E}_x\\, \\mathbb{E}_{q(z_{>l} \\mid x)}\\,
        \\mathrm{KL}\\big(q(z_{l,d} \\mid z_{>l}, x) \\,\\|\\, p(z_{l,d} \\mid z_{>l})\\big)
        > \\text{threshold},

    in nats (:func:`kl_per_unit`). Unlike :func:`active_units_marginal`, a unit whose
    posterior equals its prior counts as inactive even when its marginal mean moves
    with the layers above it.

    :param Tensor unit_kl: ``[N, D]`` per-unit KL of ``N`` data points.
    :param float threshold: activity threshold in nats.
    :returns: ``(count, activity [D])``, the activity being the mean KL of each unit.
    """
    activity = unit_kl.mean(0)
    return int((activity > threshold).sum()), activity


def active_units_marginal(
    posterior_means: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD, mc_variance: Optional[Tensor] = None
) -> Tuple[int, Tensor]:
    """
    Counts active latent units by the spread of their marginal posterior means
    ("Importance Weighted Autoencoders"): unit :math:`d` is active when

    .. math::

        A_d = \\operatorname{Cov}_x\\big(\\mathbb{E}_{q(z \\mid x)}[z_d]\\big) > \\text{threshold}.

    In a hierarchy the marginal mean of a layer moves with the layers above it, so a
    layer whose posterior equals its prior can count as fully active here; its own
    information is what :func:`active_units` counts.

    When the means are Monte Carlo estimates (:func:`posterior_moments`), their
    noise inflates the variance over ``x`` by the mean of ``mc_variance``; it is
    subtracted, which makes :math:`A_d` unbiased.

    :param Tensor posterior_means: ``[N, D]`` posterior means.
    :param float threshold: activity threshold, 0.01 in the paper.
    :param Tensor mc_variance: ``[N, D]`` variance of each Monte Carlo mean, or None.
    :returns: ``(count, activity [D])``, the activity being the population variance
        over the ``N`` data points, less the Monte Carlo noise.
    """
    activity = posterior_means.var(dim=0, correction=0)
    if mc_variance is not None:
        activity = activity - mc_variance.mean(0)
    return int((activity > threshold).sum()), activity


def kl_per_unit(
    model_trace: Trace, guide_trace: Trace, *, data_plate: str = "data", analytic: bool = True
) -> Dict[str, Tensor]:
    """
    Per-data-point, per-unit KL of each latent site whose guide and model
    distributions factorise over its units (diagonal normals),

    .. math::

        \\mathrm{KL}_{n,d} = \\mathrm{KL}\\big(q(z_d \\mid \\cdot) \\,\\|\\, p(z_d \\mid \\cdot)\\big),

    conditional on the upstream values in the traces. Analytic where
    :func:`torch.distributions.kl_divergence` is registered and ``analytic``,
    otherwise the single-sample Monte Carlo terms :math:`\\log q(z_d) - \\log p(z_d)`
    (use these for a guide that samples against the model's order). Summed over
    units they give the site's KL of :func:`kl_per_site`. Sites without a
    per-unit factorisation (flows) are left out. Every non-data batch and event
    dim is a unit, as in :func:`posterior_moments`; the model site's mask applies.

    :returns: dict mapping latent site name to an ``[N, D]`` tensor.
    """
    result = {}
    for name, site, model_site in _latent_sites(model_trace, guide_trace):
        q, p = _units(site["fn"]), _units(model_site["fn"])
        if q is None or p is None:
            continue
        kl = None
        if analytic:
            try:
                kl = kl_divergence(q, p)
            except NotImplementedError:
                pass
        if kl is None:
            kl = q.log_prob(site["value"]) - p.log_prob(site["value"])
        event_dims = len(site["fn"].event_shape)
        mask = model_site["mask"]
        if isinstance(mask, Tensor):
            kl = kl * mask.reshape(mask.shape + (1,) * event_dims)
        elif mask is False:
            kl = torch.zeros_like(kl)
        batch_dims = kl.dim() - event_dims
        kl = kl.movedim(batch_dims + _data_axis(site, data_plate), 0)
        result[name] = kl.reshape(kl.shape[0], -1)
    return result


def _units(fn: Distribution) -> Optional[Distribution]:
    """The univariate distribution of each unit of ``fn``, or None if it has none."""
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn if not fn.event_shape else None


def collapsed_layers(
    kl_per_layer: Dict[str, float],
    active: Dict[str, Sequence[Optional[int]]],
    marginal: Dict[str, Sequence[Optional[int]]],
    threshold: float = ACTIVE_UNIT_THRESHOLD,
) -> List[dict]:
    """
    The layers that carry no information of their own: no unit above ``threshold``
    nats of own KL (:func:`active_units`), or, for layers without per-unit KL
    (flows), a whole-layer KL below ``threshold``. Each record names the layer, its
    KL in nats per data point, both unit counts and why it is flagged.

    :param kl_per_layer: mean KL of each layer.
    :param active: ``(count or None, units)`` of :func:`active_units` per layer.
    :param marginal: ``(count, units)`` of :func:`active_units_marginal` per layer
        (count None: not computed).
    """
    report = []
    for name, kl in kl_per_layer.items():
        count, units = active[name]
        if count is None:
            if kl >= threshold:
                continue
            why = f"its KL of {kl:.3g} nats per data point is below {threshold:g} nats"
        elif count == 0:
            why = f"none of its {units} units carries {threshold:g} nats of KL of its own (layer KL {kl:.3g} nats)"
        else:
            continue
        if marginal[name][0]:
            why += f"; the marginal means of {marginal[name][0]} of them vary only with the layers above"
        report.append(
            {"layer": name, "kl": kl, "active_units": count, "active_units_marginal": marginal[name][0],
             "units": units, "reason": why}
        )
    return report


def posterior_moments(
    model: Callable,
    guide: Callable,
    batches: Iterable,
    sites: Optional[Sequence[str]] = None,
    *,
    data_plate: str = "data",
    num_samples: int = 100,
) -> Dict[str, Tuple[Tensor, Tensor]]:
    """
    Monte Carlo estimates of :math:`\\mathbb{E}_{q(z \\mid x_n)}[z]` per latent site,
    marginal over the upstream latents of a hierarchy, with their noise.

    In a hierarchy ``site["fn"].mean`` is only the conditional mean given the
    sampled upstream latents. This averages it over ``num_samples`` joint guide
    samples (the Rao-Blackwellized estimate: sites whose distribution has no
    closed-form mean, such as flows, average their samples instead), and returns
    the variance of that average. The first sample comes from a plain pass, which
    also finds the plates, the others from one vectorized pass that replays the
    first pass's data points when the data plate is subsampled.
    Event and non-data batch dims are flattened per data point. Runs under
    :func:`torch.no_grad`.

    :param callable model: the model (unused by ``GuideMessenger`` guides).
    :param callable guide: a guide callable or a
        :class:`~pyro.poutine.guide.GuideMessenger`.
    :param batches: iterable of batches; a tuple or list is unpacked as the
        model arguments, anything else is passed as the single argument.
    :param sites: names of latent sites to collect; defaults to all.
    :param str data_plate: name of the plate over data points.
    :param int num_samples: joint guide samples per data point, at least 2.
    :returns: dict mapping site name to ``(means [N, D], mc_variance [N, D])``.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to estimate the Monte Carlo noise, got {num_samples}")
    moments = defaultdict(list)
    with torch.no_grad():
        for batch in batches:
            args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
            # a plain first pass finds the plates and is the first draw; the others replay its subsample
            first_model_trace, first_guide_trace, subsamples = _run(model, guide, *args)
            particle_dim = -1 - _max_plate_nesting(first_model_trace, first_guide_trace)
            with poutine.replay(trace=subsamples), pyro.plate(_PARTICLE_PLATE, num_samples - 1, dim=particle_dim):
                model_trace, guide_trace = get_traces(model, guide, *args)
            for name, site, _ in _latent_sites(model_trace, guide_trace):
                if sites is not None and name not in sites:
                    continue
                first = _draws(first_guide_trace.nodes[name], particle_dim, data_plate)
                draws = torch.cat([first, _draws(site, particle_dim, data_plate)])
                moments[name].append((draws.mean(0), draws.var(0) / num_samples))
    missing = set(sites or ()) - set(moments)
    if missing:
        raise ValueError(f"latent sites not found in the guide: {sorted(missing)}")
    return {name: tuple(torch.cat(parts) for parts in zip(*values)) for name, values in moments.items()}


def posterior_means(
    model: Callable, guide: Callable, batches: Iterable, sites: Optional[Sequence[str]] = None, **kwargs
) -> Dict[str, Tensor]:
    """The means of :func:`posterior_moments` alone: ``{site: [N, D]}``."""
    return {name: mean for name, (mean, _) in posterior_moments(model, guide, batches, sites, **kwargs).items()}


def _draws(site: dict, particle_dim: int, data_plate: str) -> Tensor:
    """The conditional means of a guide site as ``[draws, N, D]``; one draw outside the particle plate."""
    fn = site["fn"]
    value = _conditional_mean(fn, site["value"]).expand(fn.batch_shape + fn.event_shape)
    event_dims = len(fn.event_shape)
    value = value.reshape((1,) * (event_dims - particle_dim - value.dim()) + value.shape)
    batch_dims = value.dim() - event_dims
    draws = value.movedim((batch_dims + particle_dim, batch_dims + _data_axis(site, data_plate)), (0, 1))
    return draws.reshape(draws.shape[0], draws.shape[1], -1)


def _conditional_mean(fn: Distribution, value: Tensor) -> Tensor:
    """``E[z | upstream]`` where the distribution has a closed form, else the sample itself."""
    try:
        return fn.mean
    except NotImplementedError:
        return value


def _data_axis(site: dict, data_plate: str) -> int:
    frame = _find_frame(site, data_plate)
    if frame is None or frame.dim is None:
        raise ValueError(
            f"sample site {site['name']!r} is not inside a vectorized plate {data_plate!r}; "
            "per-data-point diagnostics require local latent variables"
        )
    return frame.dim


def _latent_sites(model_trace: Trace, guide_trace: Trace):
    for name, site in guide_trace.nodes.items():
        model_site = model_trace.nodes.get(name)
        if site["type"] == "sample" and model_site is not None and not model_site["is_observed"]:
            yield name, site, model_site


def kl_per_site(
    model_trace: Trace, guide_trace: Trace, *, data_plate: str = "data"
) -> Dict[str, Tensor]:
    """
    Per-data-point KL divergence of each latent site,

    .. math::

        \\mathrm{KL}_n = \\mathrm{KL}\\big(q(z \\mid \\cdot) \\,\\|\\, p(z \\mid \\cdot)\\big),

    analytic via :func:`torch.distributions.kl_divergence` where registered,
    otherwise the single-sample Monte Carlo estimate
    :math:`\\log q(z) - \\log p(z)` at the trace's value. Both condition on the
    upstream values in the traces, so for hierarchies the terms are
    conditional KLs. Event dims and the batch dims of nested plates are summed,
    particle plates (:data:`~pyro_hvae.infer.iw.PARTICLE_PLATES`: the one of
    :func:`~pyro_hvae.infer.iw.log_likelihood` and Pyro's vectorized
    ``num_particles_vectorized``) are averaged; the model site's mask is applied.

    The result is not detached: it carries gradients to guide and model
    parameters so that training losses (e.g. free bits) can use it.

    :param Trace model_trace: model trace, e.g. from :func:`~pyro_hvae.infer.iw.get_traces`.
    :param Trace guide_trace: the matching guide trace.
    :param str data_plate: name of the plate over data points.
    :returns: dict mapping latent site name to an ``[N]`` tensor.
    """
    result = {}
    for name, site, model_site in _latent_sites(model_trace, guide_trace):
        _data_axis(site, data_plate)  # refuses global sites
        kl = scale_and_mask(site_kl(site, model_site), mask=model_site["mask"])
        result[name] = _per_data_point(kl, site, data_plate)
    return result
