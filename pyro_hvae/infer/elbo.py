"""The training objective of a hierarchy, term by term.

Pyro's ``Trace_ELBO`` and ``TraceMeanField_ELBO`` work with every model here. This
module adds what training a deep hierarchy needs on top of them: the KL of each
layer kept apart (for free bits, warm-up and logging), computed in a single pass,
for any model/guide pair that ``Trace_ELBO`` accepts: discrete latents, guide-only
sites, global latents and subsampled data plates included.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import ELBO
from pyro.infer.util import MultiFrameTensor, is_validation_enabled
from torch.distributions import Distribution, kl_divergence

from pyro_hvae.infer.iw import _find_frame, _per_data_point, get_traces


def _analytic_kl(q: Distribution, p: Distribution) -> torch.Tensor | None:
    """``kl_divergence(q, p)``, or None where torch has no formula for the pair."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


def site_kl(guide_site: dict, model_site: dict, analytic: bool = True) -> torch.Tensor:
    """``KL(q || p)`` at one latent site, one value per batch element (data point and particle).

    Analytic ``kl_divergence(q, p)`` where torch has it registered and ``analytic``;
    otherwise the single-sample Monte Carlo estimate ``log q(z) - log p(z)`` at the
    site's value. Neither scaled nor masked; keeps gradients.
    """
    q, p = guide_site["fn"], model_site["fn"]
    kl = _analytic_kl(q, p) if analytic else None
    if kl is None:
        z = guide_site["value"]
        kl = q.log_prob(z) - p.log_prob(z)
    return kl


def _log_q(guide_site: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(log q(z), score)`` at a guide site. For a site with ``rsample``, ``log q`` keeps its
    gradient and ``score`` is None. Otherwise (Pyro's score parts) ``log q`` keeps only the
    gradient of its pathwise part, and ``score``, the score function, carries the rest."""
    fn, z = guide_site["fn"], guide_site["value"]
    if fn.has_rsample:
        return fn.log_prob(z), None
    parts: ScoreParts = fn.score_parts(z)
    entropy = parts.entropy_term
    log_q = parts.log_prob.detach()
    if not is_identically_zero(entropy):
        log_q = log_q + entropy - entropy.detach()
    return log_q, parts.score_function


@dataclass
class _Term:
    """One site's term in one trace pair: ``value`` over the site's batch dims, masked
    but not scaled, with the gradients the estimator needs."""

    site: dict
    value: torch.Tensor

    def scaled(self) -> torch.Tensor:
        return scale_and_mask(self.value, self.site["scale"])

    def total(self, data_plate: str) -> torch.Tensor:
        """Scaled, averaged over particle plates, summed over the rest."""
        return _per_data_point(self.scaled(), self.site, data_plate).sum()

    def local(self, data_plate: str) -> bool:
        return _find_frame(self.site, data_plate) is not None

    def active(self, data_plate: str) -> torch.Tensor:
        """The number of data points not masked out entirely."""
        mask = self.site["mask"]
        if mask is None:
            size = _find_frame(self.site, data_plate).size
            return torch.tensor(size, dtype=self.value.dtype, device=self.value.device)
        mask = torch.as_tensor(mask, device=self.value.device).expand(self.value.shape)
        return (_per_data_point(mask.to(self.value.dtype), self.site, data_plate) > 0).sum()

    def units(self, data_plate: str) -> int:
        """``n_l``: the number of latent dimensions per data point (event dims times the
        batch elements of one data point, over plates other than the data and particle plates)."""
        ones = torch.ones(self.value.shape, dtype=self.value.dtype, device=self.value.device)
        per_datum = _per_data_point(ones, self.site, data_plate)
        return int(per_datum.reshape(-1)[0]) * self.site["fn"].event_shape.numel()

    def data_scale(self) -> torch.Tensor | float:
        """The site's scale, which must be one number for a per-data-point floor."""
        scale = self.site["scale"]
        if torch.is_tensor(scale) and scale.numel() != 1:
            raise ValueError(
                f"free bits need one scale per site, but site {self.site['name']!r} is scaled "
                f"elementwise (shape {tuple(scale.shape)}); use free_bits=0 or a scalar poutine.scale"
            )
        return scale


@dataclass
class _TracePair:
    """The terms of one model/guide trace pair, by kind."""

    reconstruction: dict[str, _Term] = field(default_factory=dict)  # log p(x | z), observed sites
    kl: dict[str, _Term] = field(default_factory=dict)  # KL(q || p), latent sites in model order
    guide_only: dict[str, _Term] = field(default_factory=dict)  # log q(w), guide sites the model lacks
    scores: dict[str, _Term] = field(default_factory=dict)  # score functions, sites without rsample


def _check_site_order(model_trace, guide_trace) -> None:
    model_order = [n for n, s in model_trace.nodes.items() if s["type"] == "sample" and n in guide_trace.nodes]
    guide_order = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and n in model_trace.nodes]
    if model_order != guide_order:
        warnings.warn(
            "analytic KL assumes the guide samples latents in the model's order "
            f"(model: {model_order}, guide: {guide_order}); with this guide it is biased: "
            "use analytic_kl=False (Monte Carlo KL)",
            stacklevel=4,
        )


KL_BALANCING_EPS = 1e-2  # nats per latent unit added to every layer's KL when balancing


class HierarchicalELBO(ELBO):
    """The ELBO with a separate, optionally warmed-up and floored KL per latent layer:

    .. math::

        \\mathcal{L}(x_{1:N}) = \\sum_n \\mathbb{E}_{q(z|x_n)}[\\log p(x_n \\mid z)]
            - \\beta \\sum_l N \\max\\big(\\lambda,\\ \\overline{\\mathrm{KL}}_l\\big)
            - \\beta \\sum_g \\mathrm{KL}_g

    where ``KL_l = KL(q(z_l | z_{l+1}, x) || p(z_l | z_{l+1}))`` is analytic when torch
    knows it (residual and independent normals) and Monte Carlo otherwise (IAF),
    ``KL_g`` that of a global latent (outside the data plate; the built-in hierarchies
    have none), ``bar KL_l`` is the mean of ``KL_l`` per data point (unscaled, summed over event dims and plates
    other than the data plate, averaged over the ``N`` data points of the batch and over
    particles), ``beta`` the KL warm-up weight and ``lambda`` the free bits per layer in
    nats per data point (from "Improved Variational Inference with Inverse
    Autoregressive Flow"). ``N`` is the number of data points the batch stands for: a
    subsampled plate ``pyro.plate("data", size, subsample_size=B)`` scales by ``size / B``,
    and masked-out data points do not count. With ``beta = 1, lambda = 0`` and
    ``analytic_kl=True`` it is ``TraceMeanField_ELBO``; with ``analytic_kl=False``,
    ``Trace_ELBO``.

    Any Pyro model/guide pair is handled as ``Trace_ELBO`` handles it. A guide site
    without ``rsample`` (a Bernoulli or Categorical latent) adds the score-function term
    ``log q(z) * stop_grad(cost)``, where the cost is the ELBO term by term, kept to the
    plates of the site, each KL weighted by ``beta``, by its KL balancing coefficient
    (below; 1 when off) and by the slope of its floor (0 below it). A guide site the model lacks adds ``-log q`` (also to the cost, which
    ``Trace_ELBO`` leaves out). A global latent (outside the data plate) is not floored:
    its KL, a single number for the whole data set, costs ``beta * KL``.

    With ``kl_balancing=True`` and while ``beta < 1`` (KL warm-up), each local layer's
    KL term (floored or not) is further weighted by a coefficient (NVAE's KL balancing)

    .. math::

        \\gamma_l = L \\frac{\\overline{\\mathrm{KL}}_l / n_l + \\epsilon}
            {\\sum_{j=1}^{L} \\big(\\overline{\\mathrm{KL}}_j / n_j + \\epsilon\\big)}

    over the ``L`` layers in the data plate, where ``n_l`` is the number of latent
    dimensions of layer ``l`` per data point, ``bar KL_l`` its scaled batch-mean KL
    per data point (detached: ``gamma`` carries no gradient) and ``epsilon = 1e-2``
    nats per unit. The ``gamma_l`` average to 1, so the KL keeps its scale; a layer
    with little KL per unit is penalised less, which keeps it from collapsing while
    ``beta`` is small. At ``beta = 1`` every ``gamma_l = 1``: the plain objective.

    ``beta``, ``free_bits`` and ``kl_balancing`` are plain attributes: a training loop
    changes them between steps. After each evaluation, ``terms`` holds detached per-data-point
    values, totals divided by ``N``: ``"reconstruction"`` (``E_q log p(x|z)``),
    ``"kl"`` (a dict over sites, in the order the model samples them, top first; a
    global latent's entry is its share ``KL / N``), ``"kl_balance"`` (the ``gamma_l`` by
    site, an empty dict when balancing is off or ``beta = 1``) and ``"elbo"`` (reconstruction less
    the KLs and any guide-only ``log q``, without warm-up or free bits).

    Use it like any Pyro ELBO: ``SVI(model, guide, optim, HierarchicalELBO())`` or
    ``HierarchicalELBO()(model, guide)`` as a differentiable ``nn.Module`` loss.
    Guides may be plain callables or ``GuideMessenger`` s.

    :param str data_plate: name of the plate over data points.
    """

    def __init__(
        self,
        num_particles: int = 1,
        *,
        beta: float = 1.0,
        free_bits: float = 0.0,
        kl_balancing: bool = False,
        analytic_kl: bool = True,
        data_plate: str = "data",
        vectorize_particles: bool = True,
        max_plate_nesting: float = float("inf"),
    ):
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
        )
        if beta <= 0:
            raise ValueError(f"beta must be > 0 (a KL weight of 0 gives an unbounded objective), got {beta}")
        if free_bits < 0:
            raise ValueError(f"free_bits must be >= 0 nats, got {free_bits}")
        self.beta = beta
        self.free_bits = free_bits
        self.kl_balancing = kl_balancing
        self.analytic_kl = analytic_kl
        self.data_plate = data_plate
        self.terms: dict = {}

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = get_traces(model, guide, *args, **kwargs)
        if self.analytic_kl and is_validation_enabled():
            _check_site_order(model_trace, guide_trace)
        return model_trace, guide_trace

    def _get_traces(self, model, guide, args, kwargs):
        if self.num_particles == 1:  # no particle plate, hence no plate nesting to guess
            yield self._get_trace(model, guide, args, kwargs)
        else:
            yield from super()._get_traces(model, guide, args, kwargs)

    def _kl(self, guide_site: dict, model_site: dict) -> torch.Tensor:
        """:func:`site_kl`, with a Monte Carlo ``log q`` that leaves the gradient of a site
        without ``rsample`` to its score function."""
        kl = _analytic_kl(guide_site["fn"], model_site["fn"]) if self.analytic_kl else None
        if kl is None:
            kl = _log_q(guide_site)[0] - model_site["fn"].log_prob(guide_site["value"])
        return kl

    def _pair(self, model_trace, guide_trace) -> _TracePair:
        pair = _TracePair()
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                log_p = site["fn"].log_prob(site["value"])
                pair.reconstruction[name] = _Term(site, scale_and_mask(log_p, mask=site["mask"]))
            elif name not in guide_trace.nodes:
                raise ValueError(f"latent site {name!r} of the model is not sampled by the guide")
            else:
                guide_site = guide_trace.nodes[name]
                kl = self._kl(guide_site, site)
                pair.kl[name] = _Term(guide_site, scale_and_mask(kl, mask=guide_site["mask"]))
        for name, site in guide_trace.nodes.items():
            guide_only = name not in model_trace.nodes
            if site["type"] != "sample" or (site["fn"].has_rsample and not guide_only):
                continue  # a reparameterized latent of the model: its KL term holds it all
            log_q, score = _log_q(site)
            if guide_only:
                pair.guide_only[name] = _Term(site, scale_and_mask(log_q, mask=site["mask"]))
            if score is not None and not is_identically_zero(score):
                pair.scores[name] = _Term(site, scale_and_mask(score, mask=site["mask"]))
        return pair

    def _num_data(self, pair: _TracePair) -> torch.Tensor:
        """How many data points the batch stands for: scale times unmasked data points
        of the first observed site in the data plate (or else the first latent)."""
        for term in (*pair.reconstruction.values(), *pair.kl.values()):
            if term.local(self.data_plate):
                return term.data_scale() * term.active(self.data_plate)
        raise ValueError(
            f"no sample site lies in a plate named {self.data_plate!r}; wrap the per-data-point "
            f"sites in pyro.plate({self.data_plate!r}, N) or pass HierarchicalELBO(data_plate=...) "
            "the name of the plate over data points"
        )

    def _balance(self, pair: _TracePair, kls: dict, num_data: torch.Tensor) -> dict[str, torch.Tensor]:
        """The KL balancing coefficients ``gamma_l`` of the local layers (class docstring),
        or an empty dict when balancing is off or the warm-up is over."""
        if not self.kl_balancing or self.beta >= 1:
            return {}
        local = [name for name, term in pair.kl.items() if term.local(self.data_plate)]
        if not local:
            return {}
        per_unit = torch.stack(
            [_detach(kls[name]) / num_data / pair.kl[name].units(self.data_plate) + KL_BALANCING_EPS for name in local]
        )
        gammas = len(local) * per_unit / per_unit.sum()
        return dict(zip(local, gammas))

    def _score_term(self, pair: _TracePair, slopes: dict) -> torch.Tensor | float:
        """``sum_sites log q(z) * stop_grad(cost)`` over the score functions of ``pair``,
        where ``cost`` is the ELBO integrand with each KL weighted by ``beta`` times
        ``slopes`` (balancing coefficient times the slope of its floor), summed to the
        plates of the site (Rao-Blackwellization over plates, as in ``Trace_ELBO``)."""
        if not pair.scores:
            return 0.0
        cost = MultiFrameTensor()
        for term in pair.reconstruction.values():
            cost.add((term.site["cond_indep_stack"], term.scaled().detach()))
        for name, term in pair.kl.items():
            cost.add((term.site["cond_indep_stack"], -self.beta * slopes[name] * term.scaled().detach()))
        for term in pair.guide_only.values():
            cost.add((term.site["cond_indep_stack"], -term.scaled().detach()))
        total = 0.0
        for term in pair.scores.values():
            downstream = cost.sum_to(term.site["cond_indep_stack"])
            total = total + _per_data_point(term.scaled() * downstream, term.site, self.data_plate).sum()
        return total

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """``-L(x)`` summed over the batch, averaged over particles."""
        pairs = [self._pair(*traces) for traces in self._get_traces(model, guide, args, kwargs)]

        def mean(term_of):  # over sequential particles; vectorized ones average in _per_data_point
            return sum(term_of(pair) for pair in pairs) / len(pairs)

        data = self.data_plate
        num_data = self._num_data(pairs[0])
        reconstruction = mean(lambda pair: sum(t.total(data) for t in pair.reconstruction.values()))
        guide_only = mean(lambda pair: sum(t.total(data) for t in pair.guide_only.values()))
        kls = {name: mean(lambda pair: pair.kl[name].total(data)) for name in pairs[0].kl}
        gammas = self._balance(pairs[0], kls, num_data)
        slopes, penalty = {}, 0.0
        for name, term in pairs[0].kl.items():
            gamma = gammas.get(name, 1.0)
            slopes[name] = gamma
            if self.free_bits > 0 and term.local(data):
                # the floor is in nats per data point: unscaled, particle-averaged KL of each point
                per_datum = mean(lambda pair: _per_data_point(pair.kl[name].value, pair.kl[name].site, data))
                active = term.active(data)
                kl_mean = per_datum.sum() / active.clamp(min=1)
                floored = term.data_scale() * active * kl_mean.clamp(min=self.free_bits)
                penalty = penalty + self.beta * gamma * floored
                slopes[name] = gamma * (kl_mean > self.free_bits).to(kl_mean.dtype).detach()
            else:
                penalty = penalty + self.beta * gamma * kls[name]
        loss = penalty - reconstruction + guide_only
        score = mean(lambda pair: self._score_term(pair, slopes))
        if torch.is_tensor(score):
            loss = loss - (score - score.detach())
        elbo = reconstruction - sum(kls.values()) - guide_only
        self.terms = {
            "reconstruction": _detach(reconstruction) / num_data,
            "kl": {name: kl.detach() / num_data for name, kl in kls.items()},
            "kl_balance": gammas,
            "elbo": _detach(elbo) / num_data,
        }
        return loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward(retain_graph=self.retain_graph)
        return loss.item()


def _detach(value):
    return value.detach() if torch.is_tensor(value) else torch.tensor(value)
