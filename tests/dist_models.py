"""Hierarchies for the tests of several processes (a config names one by this file's path)."""

import math
import os

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_hvae import MLP, Bernoulli


class PointPosterior(nn.Module):
    """One latent layer whose posterior is a point mass, ``q(z | x) = Delta(f(x))``: its loss
    involves no random draw, so several processes can be compared with one to float precision
    (the built-in hierarchies draw their posterior noise per process)."""

    def __init__(self, data_shape, width: int = 16, dim: int = 3, batch_norm: bool = False):
        super().__init__()
        self.data_shape, self.dim = tuple(data_shape), dim
        pixels = math.prod(data_shape)
        self.encoder = MLP(pixels, [width], dim, batch_norm=batch_norm)
        self.decoder = MLP(dim, [width], pixels, batch_norm=batch_norm)
        self.likelihood = Bernoulli()

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z_1", dist.Normal(x.new_zeros(x.shape[0], self.dim), 1.0).to_event(1))
            pyro.sample("x", self.likelihood.distribution(self.logits(z), self.data_shape), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z_1", dist.Delta(self.encoder(x.flatten(1)), event_dim=1))


class NaNOnRank(PointPosterior):
    """:class:`PointPosterior` whose decoder gives NaN in training mode on torchrun's rank
    ``rank`` once ``after`` training steps (passes with gradients) are done."""

    def __init__(self, data_shape, rank: int = 1, after: int = 0):
        super().__init__(data_shape)
        self.on_rank = int(os.environ.get("RANK", 0)) == rank
        self.after, self.steps = after, 0

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        logits = super().logits(z)
        nan = self.training and self.on_rank and self.steps >= self.after
        if self.training and torch.is_grad_enabled():
            self.steps += 1
        return logits * float("nan") if nan else logits


class LaplacePosterior(PointPosterior):
    """:class:`PointPosterior` with a Laplace posterior around ``f(x)``: noise that the
    trainer cannot draw per row of the global batch (it is not a normal)."""

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z_1", dist.Laplace(self.encoder(x.flatten(1)), 0.1).to_event(1))
