"""Spectral regularization: a penalty on the largest singular value of every layer.

A network whose layers have small spectral norms is Lipschitz with a small constant,
so a small change of the input cannot move the latent codes far (NVAE). The penalty
added to the loss is

.. math::

    \\mathcal L_{SR} = \\lambda(t) \\Big( \\sum_i \\sigma_{\\max}(W_i) + \\sum_j \\lVert\\gamma_j\\rVert_1 \\Big),

where ``W_i`` is the weight of the ``i``-th convolution or linear layer, reshaped to a
matrix ``[out, in * k * k]``, and ``gamma_j`` the scales of the ``j``-th batch-norm
layer (an L1 penalty: the sum of ``|gamma|``). A batch norm rescales its input by
``gamma / sqrt(var)``, so its scale adds to the network's Lipschitz constant too.

``sigma_max`` is estimated by power iteration, a few steps per training step, from
vectors ``u, v`` that are kept between steps (as buffers, so they are saved in
``state_dict`` and checkpoints) and converge as the weights drift slowly. With ``u, v``
held fixed, ``u^T W v`` has the gradient ``u v^T`` of the exact top singular value.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

#: The layers whose weights are regularized when no list is given.
SPECTRAL_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class RegularizationSchedule:
    """``lambda(t)``: linear from ``initial`` at step 0 to ``final`` at step ``steps``, then ``final``.

    .. math:: \\lambda(t) = \\lambda_0 + (\\lambda_1 - \\lambda_0) \\min(t / T, 1)

    ``RegularizationSchedule(0.1)`` is the constant 0.1; ``initial > final`` is a
    decay (a strong pull early, while the weights are still large), ``initial < final``
    a warm-up.
    """

    final: float
    initial: float | None = None
    steps: int = 0

    def __post_init__(self):
        for name in ("final", "initial"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be a non-negative regularization weight, got {value!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}")

    def __call__(self, step: int) -> float:
        if self.initial is None or self.steps == 0:
            return self.final
        progress = min(max(step, 0) / self.steps, 1.0)
        return self.initial + (self.final - self.initial) * progress


class SingularVectors(nn.Module):
    """The power-iteration state of one weight matrix ``W [rows, cols]``: unit vectors
    ``u [rows]`` and ``v [cols]`` (buffers), one step being

    .. math:: v \\leftarrow W^\\top u / \\lVert W^\\top u \\rVert, \\quad u \\leftarrow W v / \\lVert W v \\rVert.
    """

    def __init__(self, rows: int, cols: int, *, device=None, dtype=None):
        super().__init__()
        self.register_buffer("u", F.normalize(torch.randn(rows, device=device, dtype=dtype), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(cols, device=device, dtype=dtype), dim=0))

    @torch.no_grad()
    def update(self, matrix: torch.Tensor, iterations: int) -> None:
        """Run ``iterations`` power-iteration steps on ``matrix`` (not differentiated)."""
        matrix = matrix.detach()
        for _ in range(iterations):
            self.v.copy_(F.normalize(matrix.T @ self.u, dim=0))
            self.u.copy_(F.normalize(matrix @ self.v, dim=0))

    def singular_value(self, matrix: torch.Tensor) -> torch.Tensor:
        """``u^T W v``: differentiable in ``W``, with ``u, v`` held fixed (copies, so a
        later :meth:`update` does not disturb a pending backward pass)."""
        return self.u.clone() @ matrix @ self.v.clone()


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """A layer's weight as a matrix ``[out, in * k * k]`` (``[out, in]`` for a linear layer)."""
    return layer.weight.reshape(layer.weight.shape[0], -1)


class SpectralRegularizer(nn.Module):
    """The spectral penalty of the layers of ``module`` (see the module docstring).

    :param module: the network; every :data:`SPECTRAL_LAYERS` layer and every affine
        batch norm in it is regularized, unless ``layers`` is given.
    :param strength: ``lambda``, a constant or a :class:`RegularizationSchedule` of the step.
    :param layers: regularize only these layers' weights (any module with a weight of
        two or more dimensions); batch norms in this list add their scale penalty.
    :param iterations: power-iteration steps per call of :meth:`loss` (1 per training step).
    :param initial_iterations: steps at the first call, from the random start vectors.

    The ``u, v`` vectors are buffers of this module: save and load its ``state_dict``
    with the model's, and move it with the model (``.to(device)``). In a training step::

        regularizer = SpectralRegularizer(model, RegularizationSchedule(0.01, initial=1.0, steps=10_000))
        loss = negative_elbo + regularizer.loss(step)
    """

    def __init__(
        self,
        module: nn.Module,
        strength: float | RegularizationSchedule,
        *,
        layers: Iterable[nn.Module] | None = None,
        iterations: int = 1,
        initial_iterations: int = 20,
    ):
        super().__init__()
        for name, value in (("iterations", iterations), ("initial_iterations", initial_iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.schedule = strength if isinstance(strength, RegularizationSchedule) else RegularizationSchedule(strength)
        chosen = list(module.modules()) if layers is None else list(layers)
        batch_norms = [m for m in chosen if isinstance(m, _BatchNorm) and m.weight is not None]
        if layers is None:
            spectral = [m for m in chosen if isinstance(m, SPECTRAL_LAYERS)]
        else:
            spectral = [m for m in chosen if not isinstance(m, _BatchNorm)]
            for layer in spectral:
                if not isinstance(getattr(layer, "weight", None), torch.Tensor) or layer.weight.dim() < 2:
                    raise ValueError(
                        f"layers: {type(layer).__name__} has no weight matrix to regularize; "
                        "pass convolution or linear layers (or batch norms)"
                    )
        if not spectral and not batch_norms:
            raise ValueError(
                f"module: {type(module).__name__} has no convolution, linear or batch-norm layer to regularize"
            )
        # plain lists: the layers belong to the model, not to this module's state
        self._layers = spectral
        self._batch_norms = batch_norms
        self.vectors = nn.ModuleList(
            SingularVectors(*weight_matrix(layer).shape, device=layer.weight.device, dtype=layer.weight.dtype)
            for layer in spectral
        )
        self.iterations = iterations
        self.initial_iterations = initial_iterations
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def singular_values(self) -> torch.Tensor:
        """Advance the power iteration, then return ``sigma_max`` of every layer ``[num_layers]``,
        differentiable in the weights."""
        steps = self.initial_iterations if int(self.num_updates) == 0 else self.iterations
        sigmas = []
        for layer, vectors in zip(self._layers, self.vectors):
            matrix = weight_matrix(layer)
            vectors.update(matrix, steps)
            sigmas.append(vectors.singular_value(matrix))
        self.num_updates += 1
        if not sigmas:
            return self.num_updates.new_zeros(0, dtype=torch.get_default_dtype())
        return torch.stack(sigmas)

    def batch_norm_penalty(self) -> torch.Tensor:
        """``sum_j ||gamma_j||_1`` over the batch-norm layers' scales."""
        if not self._batch_norms:
            return self.num_updates.new_zeros((), dtype=torch.get_default_dtype())
        return torch.stack([bn.weight.abs().sum() for bn in self._batch_norms]).sum()

    def loss(self, step: int) -> torch.Tensor:
        """``lambda(step) * (sum_i sigma_max(W_i) + sum_j ||gamma_j||_1)``; one call per training step."""
        return self.schedule(step) * (self.singular_values().sum() + self.batch_norm_penalty())

    def extra_repr(self) -> str:
        return f"layers={len(self._layers)}, batch_norms={len(self._batch_norms)}, strength={self.schedule}"
