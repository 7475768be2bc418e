"""How one training step runs.

The loss is Pyro's: ``HierarchicalELBO(...)(model, guide)`` is an ``nn.Module`` whose
forward is the negative ELBO, differentiable. Parameters live in their modules
(``pyro.settings.set(module_local_params=True)``) and a plain ``torch.optim``
optimizer updates them: this skips the per-parameter optimizers and param-store
bookkeeping of ``SVI`` + ``pyro.optim``, which cost most of Pyro's fixed overhead.

An optional ``penalty()`` (e.g. spectral regularization, :mod:`pyro_hvae.spectral`)
is added to the per-image loss: ``loss = -ELBO(x) / N + penalty()``.

On top of the gradient: global norm clipping, skipping of updates whose gradient
norm is non-finite or far above its recent level, and an optional exponential
moving average (EMA) of the weights for evaluation.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pyro_hvae.infer.elbo import HierarchicalELBO


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up ``(step + 1) / warmup`` to 1, then cosine decay
    to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def kl_weight(step: int, warmup_steps: int) -> float:
    """KL warm-up: ``beta = min(1, (step + 1) / warmup_steps)``, never 0."""
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


class UpdateSkipper:
    """Decides whether to skip an update from its gradient norm.

    An update is skipped when the norm is non-finite, or larger than ``factor`` times
    the median of the last ``window`` finite norms. The level is relative to the run
    itself and follows every finite norm, skipped or not: an isolated spike is
    skipped, while a lasting change of scale moves the median within ``window / 2``
    steps and updates resume (a fixed threshold could skip every update forever).
    The first ``window // 4`` steps are only checked for being finite.
    """

    def __init__(self, factor: float | None, window: int = 100):
        self.factor = factor
        self.history: deque[float] = deque(maxlen=window)
        self.skipped = 0

    def should_skip(self, grad_norm: float) -> bool:
        skip = not math.isfinite(grad_norm)
        if not skip:
            if self.factor is not None and len(self.history) >= self.history.maxlen // 4:
                median = sorted(self.history)[len(self.history) // 2]
                skip = grad_norm > self.factor * median
            self.history.append(grad_norm)
        self.skipped += skip
        return skip

    def state_dict(self) -> dict:
        return {"history": list(self.history), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state["history"])
        self.skipped = state["skipped"]


class EMA:
    """Exponential moving average of a module's floating-point state, with a warm-up
    of its decay. After the ``t``-th accepted update (``t = 0, 1, ...``)::

        shadow <- decay_t * shadow + (1 - decay_t) * current,
        decay_t = min(decay, (1 + t) / (10 + t))

    Without the warm-up the initial weights would keep ``decay^t`` of the average
    (61% after 500 updates at 0.999); with it they keep
    ``prod_t decay_t = 1 / C(t + 9, 9)`` while ``decay_t < decay`` (the first
    ``9 / (1 - decay) - 10`` updates), and a steadily moving weight is followed at
    nine tenths of its path (``theta_t = t`` gives ``shadow = 0.9 t``).
    ``updates`` counts the updates: a checkpoint must keep it to resume the same average.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """``decay_t`` of the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        weight = 1 - self.current_decay()
        current = module.state_dict()
        for name, value in self.shadow.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(current[name], weight)
            else:
                value.copy_(current[name])
        self.updates += 1


class HierarchyLoss(nn.Module):
    """The negative ELBO of a hierarchy as a module holding all of its parameters:
    ``HierarchyLoss(vae, elbo)(x) = elbo.differentiable_loss(vae.model, vae.guide, x)``.

    Pyro's ``elbo(model, guide)`` holds the model and the guide only where they are
    modules; this one holds ``vae`` itself, so that the parameters of a hierarchy whose
    ``model`` and ``guide`` are methods are in it too, and
    :class:`~torch.nn.parallel.DistributedDataParallel` can wrap it.
    """

    def __init__(self, vae: nn.Module, elbo: HierarchicalELBO):
        super().__init__()
        self.vae = vae
        self.elbo = elbo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.elbo.differentiable_loss(self.vae.model, self.vae.guide, x)


@dataclass
class StepStats:
    """What one step reports; tensors stay on the device until logged."""

    loss: torch.Tensor
    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kl: dict[str, torch.Tensor]
    grad_norm: float
    skipped: bool
    penalty: torch.Tensor | None = None
    kl_balance: dict[str, torch.Tensor] = field(default_factory=dict)  # gamma_l while KL balancing acts


class TrainStep:
    """One optimizer update of ``model``/``guide`` on a batch.

    :param module: the module holding every parameter (e.g. the VAE).
    :param elbo: the objective; its ``beta``, ``free_bits`` and ``kl_balancing`` may change between steps.
    :param penalty: called once per step, a scalar added to the per-image loss.
    :param autocast: a dtype (``torch.bfloat16``) to compute the loss under ``torch.autocast``
        on the batch's device; the backward pass and the update stay outside it.
    :param loss: the module whose forward is ``-ELBO(x)`` summed over the batch (default
        ``elbo(model, guide)``); under torchrun a
        :class:`~torch.nn.parallel.DistributedDataParallel` over a :class:`HierarchyLoss`,
        whose backward pass averages the gradients of the ranks.
    :param agree: maps the gradient norm to the value every process of a distributed run
        decides on (its mean over the ranks), so that all skip the same updates.
    """

    def __init__(
        self,
        model,
        guide,
        module: nn.Module,
        elbo: HierarchicalELBO,
        optimizer: torch.optim.Optimizer,
        *,
        grad_clip: float | None,
        skipper: UpdateSkipper,
        ema: EMA | None = None,
        penalty: Callable[[], torch.Tensor] | None = None,
        autocast: torch.dtype | None = None,
        loss: nn.Module | None = None,
        agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.loss = loss if loss is not None else elbo(model, guide)
        self.agree = agree
        self.penalty = penalty
        self.elbo = elbo
        self.module = module
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.skipper = skipper
        self.ema = ema
        self.autocast = autocast

    def __call__(self, x: torch.Tensor) -> StepStats:
        # a skipped update must leave no trace: batch-norm statistics move in the forward pass
        buffers = [b.detach().clone() for b in self.module.buffers() if b.dtype.is_floating_point]
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            loss = self.loss(x) / x.shape[0]  # per image: clipping and skipping thresholds do not scale with the batch
        penalty = self.penalty() if self.penalty is not None else None
        if penalty is not None:
            loss = loss + penalty
        loss.backward()
        max_norm = self.grad_clip if self.grad_clip is not None else math.inf
        norm = nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        grad_norm = float(self.agree(norm) if self.agree is not None else norm)
        skipped = self.skipper.should_skip(grad_norm)
        if skipped:
            with torch.no_grad():
                for saved, b in zip(buffers, (b for b in self.module.buffers() if b.dtype.is_floating_point)):
                    b.copy_(saved)
        else:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.module)
        terms = self.elbo.terms
        return StepStats(
            loss=loss.detach(),
            elbo=terms["elbo"],
            reconstruction=terms["reconstruction"],
            kl=terms["kl"],
            grad_norm=grad_norm,
            skipped=skipped,
            penalty=penalty.detach() if penalty is not None else None,
            kl_balance=terms["kl_balance"],
        )
