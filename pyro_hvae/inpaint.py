"""Inpainting with a trained hierarchy: fill the pixels a mask hides, from the model and guide alone.

A mask is a boolean tensor, ``True`` where a pixel is **observed**. With ``x = (x_o, x_m)``:

* ``pseudo_gibbs`` repeats ``z ~ q(z | x)``, ``x_m ~ p(x_m | z)`` (observed pixels put back).
  Fast and often good-looking, but its stationary distribution is not ``p(x_m | x_o)``.
* ``mwg``, Metropolis-within-Gibbs (Mattei & Frellsen, 2018), targets the exact conditional
  ``p(x_m, z | x_o)``. Each step proposes all layers jointly, ``z' ~ q(z | x)``, accepts with
  probability

  .. math:: \\min\\Big(1, \\frac{p(x, z')\\, q(z \\mid x)}{p(x, z)\\, q(z' \\mid x)}\\Big)
            = \\min\\big(1, w(z') / w(z)\\big), \\qquad w(z) = p(x, z) / q(z \\mid x),

  then draws ``x_m ~ p(x_m | z)``; the acceptance rate is reported per image.

A hierarchy trained to fill the region from its border (:class:`~pyro_hvae.BorderLadderVAE`)
needs no chain: ``conditional`` draws from its own ``p(x_m | x_o)`` (:func:`conditional_fill`),
and the two samplers refuse it.

Both samplers start with the missing pixels drawn from the model (an ``x`` from the prior). Pixels are
independent given ``z`` in every likelihood of the package, so ``x_m ~ p(x_m | z)`` is a full
draw of ``x`` read at the missing pixels (mask a pixel's channels together for
:class:`~pyro_hvae.CoupledLogisticMixture`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import pyro.poutine as poutine
import torch

from pyro_hvae.use import decode, encode

MASKS = ("center", "left", "right", "top", "bottom", "random")


def make_mask(
    kind: Literal["center", "left", "right", "top", "bottom", "random"],
    data_shape: Sequence[int],
    *,
    fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A mask of shape ``data_shape`` (``[..., H, W]``), ``True`` where observed, hiding:
    ``center`` the central square of half the height and width; ``left``/``right``/``top``/``bottom``
    that half of the image; ``random`` each pixel (all its channels) with probability ``fraction``."""
    if kind not in MASKS:
        raise ValueError(f"mask: unknown kind {kind!r}; choose one of {', '.join(MASKS)} or pass a boolean tensor")
    if len(data_shape) < 2:
        raise ValueError(f"mask: {kind!r} needs images [..., H, W], got data_shape {tuple(data_shape)}; pass a boolean tensor")
    H, W = data_shape[-2:]
    hidden = torch.zeros(H, W, dtype=torch.bool)
    if kind == "center":
        hidden[H // 4 : H // 4 + (H + 1) // 2, W // 4 : W // 4 + (W + 1) // 2] = True
    elif kind == "left":
        hidden[:, : W // 2] = True
    elif kind == "right":
        hidden[:, W // 2 :] = True
    elif kind == "top":
        hidden[: H // 2] = True
    elif kind == "bottom":
        hidden[H // 2 :] = True
    else:
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be strictly between 0 and 1 (the share of hidden pixels), got {fraction!r}")
        hidden = torch.rand(H, W, generator=generator) < fraction
    return (~hidden).expand(tuple(data_shape)).clone()


def check_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mask`` broadcast to ``x.shape``; raises ``ValueError`` naming ``mask`` for a non-boolean
    tensor, a shape other than ``x.shape`` or ``x.shape[1:]``, or an image with nothing observed."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        kind = f"a {mask.dtype} tensor" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a boolean tensor (True where observed), got {kind}; convert it with mask.bool()")
    if tuple(mask.shape) not in (tuple(x.shape), tuple(x.shape[1:])):
        raise ValueError(f"mask: expected shape {list(x.shape)} or {list(x.shape[1:])} (that of x or of one image), got {list(mask.shape)}")
    mask = mask.to(x.device).expand(x.shape)
    empty = (~mask.flatten(start_dim=1).any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask observes no pixel of image(s) {empty[:5]}; nothing to condition on: use vae.sample() instead")
    return mask


@dataclass(frozen=True)
class Inpainting:
    """The filled images (observed pixels exactly those of ``x``); for ``mwg``, each image's
    acceptance rate over the steps; and what the chain predicts for the missing pixels, from
    the ``p(x | z_t)`` of its second half (the first is burn-in), per image:

    * ``predictive_mean``: ``(1/T) sum_t E[x | z_t]``, the chain's estimate of ``E[x_m | x_o]``
      (observed pixels are those of ``x``);
    * ``missing_log_prob``: ``log (1/T) sum_t p(x_m | z_t)`` at the values ``x`` holds at the
      missing pixels: when ``x`` is a complete image whose region was hidden (an evaluation),
      the chain's predictive log-likelihood of the truth. Needs a likelihood with one
      distribution per value (not :class:`~pyro_hvae.CoupledLogisticMixture`); else None.
    """

    x: torch.Tensor
    acceptance_rate: torch.Tensor | None = None
    predictive_mean: torch.Tensor | None = None
    missing_log_prob: torch.Tensor | None = None


def _model_trace(vae, x: torch.Tensor, z: Mapping[str, torch.Tensor]):
    return poutine.trace(poutine.condition(vae.model, data=dict(z))).get_trace(x)


def _log_joint(vae, x: torch.Tensor, z: Mapping[str, torch.Tensor]):
    """``log p(x, z)`` per image ``[N]``, and ``p(x | z)``."""
    trace = _model_trace(vae, x, z)
    observed = getattr(vae, "observed_site", "x")
    sites = [*vae.latent_sites, observed]
    return sum(trace.nodes[s]["fn"].log_prob(trace.nodes[s]["value"]) for s in sites), trace.nodes[observed]["fn"]


def _log_guide(vae, x: torch.Tensor, z: Mapping[str, torch.Tensor] | None = None):
    """``(z, log q(z | x))`` per image, ``z`` drawn from the guide unless given."""
    guide = vae.guide if z is None else poutine.condition(vae.guide, data=dict(z))
    trace = poutine.trace(guide).get_trace(x)
    z = {s: trace.nodes[s]["value"] for s in vae.latent_sites}
    return z, sum(trace.nodes[s]["fn"].log_prob(z[s]) for s in vae.latent_sites)


def _where(condition: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.where`` with a per-image ``[N]`` condition broadcast over the other dims."""
    return torch.where(condition.reshape(condition.shape + (1,) * (a.dim() - 1)), a, b)


class _Prediction:
    """Running averages of ``E[x | z_t]`` and ``p(x_m | z_t)`` over a chain's second half."""

    def __init__(self, x: torch.Tensor, mask: torch.Tensor, num_steps: int):
        self.x, self.mask = x, mask
        self.steps_left_to_burn = num_steps // 2
        self.means, self.log_probs = [], []

    @property
    def recording(self) -> bool:
        """Whether the current step is past the burn-in."""
        return self.steps_left_to_burn == 0

    def summarize(self, observation) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``E[x | z]`` and, per image, ``log p(x_m | z)`` at ``x``'s values (None when the
        likelihood has no distribution per value)."""
        per_value = getattr(observation, "base_dist", None)
        if per_value is None or per_value.batch_shape != self.x.shape:
            return observation.mean, None
        log_prob = per_value.log_prob(self.x).masked_fill(self.mask, 0.0)
        return observation.mean, log_prob.flatten(1).sum(1, dtype=torch.float64)

    def add(self, mean: torch.Tensor | None = None, log_prob: torch.Tensor | None = None) -> None:
        """End a step, keeping its summary when past the burn-in."""
        if not self.recording:
            self.steps_left_to_burn -= 1
            return
        self.means.append(mean)
        if log_prob is not None:
            self.log_probs.append(log_prob)

    def result(self, current: torch.Tensor, acceptance_rate: torch.Tensor | None = None) -> Inpainting:
        mean = torch.where(self.mask, self.x, torch.stack(self.means).mean(0))
        log_prob = None
        if self.log_probs:
            log_prob = torch.stack(self.log_probs).logsumexp(0) - math.log(len(self.log_probs))
        return Inpainting(current, acceptance_rate, mean, log_prob)


def pseudo_gibbs(vae, x: torch.Tensor, mask: torch.Tensor, num_steps: int) -> Inpainting:
    """``num_steps`` rounds of ``z ~ q(z | x)``, ``x_m ~ p(x_m | z)``."""
    current = torch.where(mask, x, vae.model(batch_size=x.shape[0]))
    prediction = _Prediction(x, mask, num_steps)
    observed = getattr(vae, "observed_site", "x")
    for _ in range(num_steps):
        observation = _model_trace(vae, current, encode(vae, current)).nodes[observed]["fn"]
        if prediction.recording:
            prediction.add(*prediction.summarize(observation))
        else:
            prediction.add()
        current = torch.where(mask, x, observation.sample())
    return prediction.result(current)


def metropolis_within_gibbs(vae, x: torch.Tensor, mask: torch.Tensor, num_steps: int) -> Inpainting:
    """``num_steps`` Metropolis-within-Gibbs steps targeting ``p(x_m, z | x_o)`` (module docstring)."""
    current = torch.where(mask, x, vae.model(batch_size=x.shape[0]))
    prediction = _Prediction(x, mask, num_steps)
    z, _ = _log_guide(vae, current)
    accepted = torch.zeros(x.shape[0], device=x.device)
    for _ in range(num_steps):
        proposal, log_q_proposal = _log_guide(vae, current)
        log_p_proposal, observation_proposal = _log_joint(vae, current, proposal)
        _, log_q = _log_guide(vae, current, z)
        log_p, observation = _log_joint(vae, current, z)
        log_ratio = (log_p_proposal - log_q_proposal) - (log_p - log_q)
        accept = torch.rand_like(log_ratio).log() < log_ratio
        z = {s: _where(accept, proposal[s], z[s]) for s in vae.latent_sites}
        if prediction.recording:  # the summary of each image's p(x | z) at its new z
            pairs = zip(prediction.summarize(observation_proposal), prediction.summarize(observation))
            prediction.add(*(None if new is None else _where(accept, new, old) for new, old in pairs))
        else:
            prediction.add()
        draw = _where(accept, observation_proposal.sample(), observation.sample())
        current = torch.where(mask, x, draw)
        accepted += accept
    return prediction.result(current, accepted / num_steps)


def conditioned_on_border(vae) -> bool:
    """Whether ``vae`` is a hierarchy conditioned on the border (:class:`~pyro_hvae.BorderLadderVAE`)."""
    from pyro_hvae.models.conditional import BorderLadderVAE  # the models import this module

    return isinstance(vae, BorderLadderVAE)


def conditional_fill(vae, x: torch.Tensor, mask: torch.Tensor, num_steps: int) -> Inpainting:
    """A hierarchy conditioned on the border (:class:`~pyro_hvae.BorderLadderVAE`) draws the
    hidden pixels from its own ``p(x_m | x_o)``: ``vae.fill(x, num_samples=num_steps)``.
    ``mask`` must be the one it was trained with."""
    if not conditioned_on_border(vae):
        raise ValueError("method 'conditional' needs a hierarchy conditioned on the border (BorderLadderVAE); use 'mwg' or 'pseudo_gibbs'")
    if not torch.equal(mask, vae.mask.expand(x.shape)):
        raise ValueError("mask: a hierarchy conditioned on the border fills the region it was trained to fill; pass its mask, vae.mask")
    return vae.fill(x, num_samples=num_steps)


METHODS: dict[str, Callable[..., Inpainting]] = {
    "pseudo_gibbs": pseudo_gibbs,
    "mwg": metropolis_within_gibbs,
    "conditional": conditional_fill,
}


@torch.no_grad()
def inpaint(
    vae,
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    method: Literal["pseudo_gibbs", "mwg", "conditional"] = "mwg",
    num_steps: int = 100,
) -> Inpainting:
    """Fill the pixels of ``x`` where ``mask`` is False, using only ``vae.model`` and ``vae.guide``.

    :param x: images ``[N, *data_shape]``.
    :param mask: boolean, ``True`` where observed, of shape ``x.shape`` or ``x.shape[1:]``
        (see :func:`make_mask`). A mask that observes everything returns ``x`` unchanged.
    :param method: ``"mwg"`` (exact in the limit, reports acceptance) or ``"pseudo_gibbs"``;
        ``"conditional"`` for a hierarchy conditioned on the border, which draws from its own
        ``p(x_m | x_o)`` (:func:`conditional_fill`) and takes no other method.
    :param num_steps: number of sweeps, ``>= 1`` (for ``"conditional"``: of draws).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a batch of images [N, *data_shape] as a torch.Tensor, got {type(x).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    mask = check_mask(mask, x)
    if method != "conditional" and conditioned_on_border(vae):
        raise ValueError("method: a hierarchy conditioned on the border fills from it directly; use method='conditional'")
    if mask.all():
        nothing_missing = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        return Inpainting(x.clone(), predictive_mean=x.clone(), missing_log_prob=nothing_missing)
    return METHODS[method](vae, x, mask, num_steps)


__all__ = [
    "MASKS",
    "METHODS",
    "Inpainting",
    "check_mask",
    "conditional_fill",
    "conditioned_on_border",
    "inpaint",
    "make_mask",
    "metropolis_within_gibbs",
    "pseudo_gibbs",
]
