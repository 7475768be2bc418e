"""The training objective of a hierarchy, term by term.

Pyro's ``Trace_ELBO`` and ``TraceMeanField_ELBO`` work with every model here. This
module adds what training a deep hierarchy needs on top of them: the KL of each
layer kept apart (for free bits, warm-up and logging), computed in a single pass.
"""

from __future__ import annotations

import warnings

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled
from torch.distributions import kl_divergence

from pyro_hvae.infer.iw import get_traces


def site_kl(guide_site: dict, model_site: dict, analytic: bool = True) -> torch.Tensor:
    """``KL(q || p)`` at one latent site, one value per batch element (data point and particle).

    Analytic ``kl_divergence(q, p)`` where torch has it registered and ``analytic``;
    otherwise the single-sample Monte Carlo estimate ``log q(z) - log p(z)`` at the
    site's value. Neither scaled nor masked; keeps gradients.
    """
    q, p = guide_site["fn"], model_site["fn"]
    kl = None
    if analytic:
        try:
            kl = kl_divergence(q, p)
        except NotImplementedError:
            pass
    if kl is None:
        z = guide_site["value"]
        kl = q.log_prob(z) - p.log_prob(z)
    return kl


def _check_site_order(model_trace, guide_trace) -> None:
    model_order = [n for n, s in model_trace.nodes.items() if s["type"] == "sample" and n in guide_trace.nodes]
    guide_order = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample"]
    if model_order != guide_order:
        warnings.warn(
            "analytic KL assumes the guide samples latents in the model's order "
            f"(model: {model_order}, guide: {guide_order}); with this guide it is biased: "
            "use analytic_kl=False (Monte Carlo KL)",
            stacklevel=4,
        )


class HierarchicalELBO(ELBO):
    """The ELBO with a separate, optionally warmed-up and floored KL per latent layer:

    .. math::

        \\mathcal{L}(x) = \\mathbb{E}_{q(z|x)}[\\log p(x \\mid z)]
            - \\beta \\sum_l \\max\\big(\\lambda,\\ \\overline{\\mathrm{KL}}_l\\big)

    where ``KL_l = KL(q(z_l | z_{l+1}, x) || p(z_l | z_{l+1}))`` is analytic when torch
    knows it (residual and independent normals) and Monte Carlo otherwise (IAF),
    ``bar KL_l`` is its mean over the batch, ``beta`` the KL warm-up weight and ``lambda``
    the free bits per layer in nats (from "Improved Variational Inference with Inverse
    Autoregressive Flow"). With ``beta = 1, lambda = 0`` and ``analytic_kl=True`` it is
    ``TraceMeanField_ELBO``; with ``analytic_kl=False``, ``Trace_ELBO``.

    ``beta`` and ``free_bits`` are plain attributes: a training loop changes them
    between steps. After each evaluation, ``terms`` holds detached per-data-point
    means: ``"reconstruction"`` (``E_q log p(x|z)``), ``"kl"`` (a dict over sites,
    in the order the model samples them, top first) and ``"elbo"`` (without warm-up or free bits).

    Use it like any Pyro ELBO: ``SVI(model, guide, optim, HierarchicalELBO())`` or
    ``HierarchicalELBO()(model, guide)`` as a differentiable ``nn.Module`` loss.
    Guides may be plain callables or ``GuideMessenger`` s.
    """

    def __init__(
        self,
        num_particles: int = 1,
        *,
        beta: float = 1.0,
        free_bits: float = 0.0,
        analytic_kl: bool = True,
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
        self.analytic_kl = analytic_kl
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

    def _particle(self, model_trace, guide_trace):
        """Sum of observed log-likelihoods and per-site KL tensors of one trace pair."""
        reconstruction = 0.0
        kls = {}
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                log_p = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
                reconstruction = reconstruction + log_p.sum()
            else:
                guide_site = guide_trace.nodes[name]
                kl = site_kl(guide_site, site, self.analytic_kl)
                kls[name] = scale_and_mask(kl, guide_site["scale"], guide_site["mask"])
        return reconstruction, kls

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """``-L(x)`` summed over the batch, averaged over particles."""
        traces = list(self._get_traces(model, guide, args, kwargs))
        vectorized = self.vectorize_particles and self.num_particles > 1
        per_trace = self.num_particles if vectorized else 1
        loss = 0.0
        reconstruction_total = 0.0
        kl_means: dict[str, torch.Tensor] = {}
        num_data = 1
        for model_trace, guide_trace in traces:
            reconstruction, kls = self._particle(model_trace, guide_trace)
            penalty = 0.0
            for name, kl in kls.items():
                num_data = kl.numel() // per_trace
                mean = kl.sum() / kl.numel()
                floored = mean.clamp(min=self.free_bits) if self.free_bits > 0 else mean
                penalty = penalty + self.beta * floored * num_data
                kl_means[name] = kl_means.get(name, 0.0) + mean.detach() / len(traces)
            loss = loss + (penalty - reconstruction / per_trace) / len(traces)
            reconstruction_total = reconstruction_total + reconstruction.detach() / per_trace / len(traces)
        reconstruction_mean = reconstruction_total / num_data
        self.terms = {
            "reconstruction": reconstruction_mean,
            "kl": kl_means,
            "elbo": reconstruction_mean - sum(kl_means.values()),
        }
        return loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward(retain_graph=self.retain_graph)
        return loss.item()
