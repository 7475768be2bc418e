"""The top-down generative model shared by every hierarchy in this package.

.. math::

    p(x, z_{1:L}) = p(z_L) \\prod_{l=1}^{L-1} p(z_l \\mid z_{l+1})\\; p(x \\mid z_1),
    \\qquad p(z_L) = \\mathcal{N}(0, I)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyro_hvae.latents import ConditionalNormal
from pyro_hvae.likelihoods import Bernoulli, Likelihood
from pyro_hvae.nn import MLP, check_positive_sizes

_instance_ids = itertools.count()


def register_params(name: str, module: nn.Module) -> None:
    """Make ``module``'s parameters visible to classic ``SVI`` + ``pyro.optim``.

    With ``pyro.settings.set(module_local_params=True)`` parameters live in their
    modules (train them with ``torch.optim`` over ``module.parameters()``, as with an
    ``ELBOModule``) and nothing is registered: the param store is skipped entirely.
    """
    if not pyro.settings.get("module_local_params"):
        pyro.module(name, module)


def latent_site(layer: int) -> str:
    """The Pyro site name of latent layer ``layer`` (1-based, 1 next to the data)."""
    return f"z_{layer}"


class GenerativeModel(nn.Module):
    """What every generative model here shares: ``data_shape``, the likelihood head,
    the Pyro name its parameters register under, and the checks on the data it is given.

    Subclasses build their networks and implement ``forward(x=None, *, batch_size=None)``
    as a Pyro program with sites ``z_L, ..., z_1`` and ``x`` inside ``pyro.plate("data", N)``.
    """

    def __init__(self, data_shape: Sequence[int], likelihood: Likelihood | None, name: str | None):
        super().__init__()
        self.data_shape = tuple(check_positive_sizes("data_shape", data_shape))
        self.likelihood = likelihood if likelihood is not None else Bernoulli()
        self.pyro_name = name or f"{type(self).__name__.lower()}_{next(_instance_ids)}"

    @property
    def num_layers(self) -> int:
        """The number of latent sites ``L``."""
        raise NotImplementedError

    @property
    def data_dim(self) -> int:
        """Number of values in one data point, ``prod(data_shape)``."""
        return math.prod(self.data_shape)

    def batch_size_of(self, x: torch.Tensor | None, batch_size: int | None) -> int:
        """The number of data points: ``len(x)`` after :meth:`check_data`, or ``batch_size``."""
        if x is None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be a positive integer when x is None, got {batch_size!r}")
            return batch_size
        self.check_data(x)
        return x.shape[0]

    def check_data(self, x: torch.Tensor) -> None:
        """Check ``x`` against ``data_shape``, and the likelihood's support while Pyro's
        validation is on; raise ``ValueError`` saying what was expected."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor of shape [N, {', '.join(map(str, self.data_shape))}], got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.data_shape:
            expected = ", ".join(map(str, self.data_shape))
            raise ValueError(
                f"x: expected shape [N, {expected}] (a batch of data points of shape {self.data_shape}), "
                f"got {list(x.shape)}; reshape the batch, or build the model with data_shape={tuple(x.shape[1:])}"
            )
        if is_validation_enabled():
            self.likelihood.check_support(x)


class TopDownModel(GenerativeModel):
    """The generative model ``p(x, z_{1:L})`` as a Pyro program: ``model(x)``.

    :param data_shape: shape of one data point, e.g. ``(1, 28, 28)``.
    :param latent_dims: sizes of ``z_1 ... z_L``, **bottom first**: ``latent_dims[0]``
        is ``z_1`` (next to ``x``), ``latent_dims[-1]`` the top ``z_L``.
    :param hidden_dims: widths of the decoder ``z_1 -> x`` (used in reverse order);
        each prior network ``z_{l+1} -> z_l`` has two hidden layers of ``hidden_dims[-1]``.
    :param likelihood: the head ``p(x | z_1)``.

    Sites: ``z_L, ..., z_1`` (in that order) and the observed ``x``, all inside
    ``pyro.plate("data", N)``.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dims: Sequence[int],
        hidden_dims: Sequence[int] = (512, 256),
        *,
        likelihood: Likelihood | None = None,
        activation: str = "elu",
        batch_norm: bool = False,
        name: str | None = None,
    ):
        super().__init__(data_shape, likelihood, name)
        self.latent_dims = check_positive_sizes("latent_dims", latent_dims)
        hidden_dims = check_positive_sizes("hidden_dims", hidden_dims)
        width = hidden_dims[-1]
        self.priors = nn.ModuleList(
            ConditionalNormal(above, [width, width], below, activation=activation, batch_norm=batch_norm)
            for below, above in zip(self.latent_dims[:-1], self.latent_dims[1:])
        )
        self.decoder = MLP(
            self.latent_dims[0],
            hidden_dims[::-1],
            self.likelihood.num_features(self.data_shape),
            activation=activation,
            batch_norm=batch_norm,
        )
        self.register_buffer("_zero", torch.zeros(()), persistent=False)

    @property
    def num_layers(self) -> int:
        return len(self.latent_dims)

    def top_prior(self, batch_size: int) -> dist.TorchDistribution:
        """``p(z_L) = N(0, I)``."""
        zero = self._zero.expand(batch_size, self.latent_dims[-1])
        return dist.Normal(zero, 1.0).to_event(1)

    def prior(self, layer: int, z_above: torch.Tensor) -> dist.TorchDistribution:
        """``p(z_l | z_{l+1})`` for 1-based ``layer`` ``l < L``."""
        return self.priors[layer - 1](z_above)

    def observation(self, z_1: torch.Tensor) -> dist.TorchDistribution:
        """``p(x | z_1)``."""
        return self.likelihood.distribution(self.decoder(z_1), self.data_shape)

    @torch.no_grad()
    def start_at_data_mean(self, data_mean: torch.Tensor) -> None:
        """Set the decoder's output bias so that ``p(x | z_1)`` starts at the data's mean
        image where the decoder's last hidden layer is zero: for Bernoulli pixels
        ``b_d = logit(mean_d)``. Training then spends no early steps learning the average."""
        output = self.decoder[-1]
        output.bias.copy_(self.likelihood.features_for_mean(data_mean.to(output.bias)))

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None) -> torch.Tensor:
        """Run the generative program; returns ``x`` (observed, or sampled when ``x is None``)."""
        num_data = self.batch_size_of(x, batch_size)
        register_params(self.pyro_name, self)
        L = self.num_layers
        with pyro.plate("data", num_data):
            z = pyro.sample(latent_site(L), self.top_prior(num_data))
            for layer in reversed(range(1, L)):
                z = pyro.sample(latent_site(layer), self.prior(layer, z))
            return pyro.sample("x", self.observation(z), obs=x)
