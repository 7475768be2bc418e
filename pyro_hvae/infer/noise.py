"""Posterior noise per data row: the same draw for a row whichever process computes it.

A reparameterized normal sample is ``z = loc + scale * eps`` with ``eps ~ N(0, I)``.
Under torchrun each process computes the loss of its rows of the global batch; if each
drew ``eps`` from a stream of its own, N processes would agree with one only in
distribution. :class:`RowNoise` instead draws ``eps`` for the **whole** global batch of
``B`` rows from one generator that every process seeds alike, keeps the rows of this
process, and sets the site's value

.. math::

    z_i = T\\big(\\mu_i + \\sigma_i \\, \\varepsilon_{r + i}\\big),
    \\qquad \\varepsilon \\sim \\mathcal{N}(0, I) \\text{ of shape } [B, \\dots]

for the ``i``-th row of a process whose rows start at ``r`` of the global batch, where
``T`` is the composition of the transforms of a ``TransformedDistribution`` (IAF flows)
and the identity otherwise. In one process ``r = 0`` and the rows are the batch, so
row ``r + i`` gets the same ``eps`` in one process and in N. Dims other than the data
plate's (particles, latent units) are drawn whole.
"""

from __future__ import annotations

import torch
from pyro.distributions import Delta
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent, Normal, TransformedDistribution

from pyro_hvae.infer.iw import _find_frame


def _normal_and_transforms(fn) -> tuple[Normal, list] | None:
    """``(base, transforms)`` of a (possibly ``Independent``) ``Normal``, or of a
    ``TransformedDistribution`` over one, whose values have the shape of ``fn`` 's; else None."""
    shape, transforms = fn.shape(), []
    while isinstance(fn, Independent):
        fn = fn.base_dist
    if isinstance(fn, TransformedDistribution):
        transforms, fn = list(fn.transforms), fn.base_dist
        while isinstance(fn, Independent):
            fn = fn.base_dist
    return (fn, transforms) if isinstance(fn, Normal) and fn.loc.shape == shape else None


class RowNoise(Messenger):
    """Sets the value of each reparameterized normal latent site from noise drawn per
    row of the global batch (module docstring).

    :param generator: the noise stream, seeded alike on every process.
    :param batch_size: ``B``, the rows of the global batch.
    :param rows: this process's rows of it (``slice(0, B)`` in one process).
    :param data_plate: the name of the plate over data points.

    A latent site is left to draw its own value when its distribution is not a ``Normal``
    (possibly in ``Independent``, possibly under transforms that keep its shape) or its
    data plate does not hold this process's rows: its name is then added to
    :attr:`own_draws`. Observed sites, sites that already have a value (a model replayed
    against its guide), ``Delta`` s (no noise) and a plate's subsample site are left alone. A site outside the data
    plate (a global latent) gets the same noise on every process.
    """

    def __init__(self, generator: torch.Generator, batch_size: int, rows: slice, data_plate: str = "data"):
        super().__init__()
        self.generator = generator
        self.batch_size = batch_size
        self.rows = range(batch_size)[rows]
        self.data_plate = data_plate
        #: names of the latent sites left to draw their own noise
        self.own_draws: set[str] = set()

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        if msg["is_observed"] or msg["value"] is not None or isinstance(fn, Delta) or site_is_subsample(msg):
            return
        found, frame = _normal_and_transforms(fn), _find_frame(msg, self.data_plate)
        shape = list(fn.shape())
        if frame is not None:
            dim = None if frame.dim is None else frame.dim - fn.event_dim
            if dim is None or -dim > len(shape) or shape[dim] != len(self.rows):
                found = None  # not a plate of this process's rows (sequential, subsampled)
            else:
                shape[dim] = self.batch_size
        if found is None:
            self.own_draws.add(msg["name"])
            return
        normal, transforms = found
        eps = torch.randn(shape, generator=self.generator, device=self.generator.device, dtype=normal.loc.dtype)
        if frame is not None:
            eps = eps.narrow(dim, self.rows.start, len(self.rows))
        z = normal.loc + normal.scale * eps.to(normal.loc.device)
        for transform in transforms:  # through each transform's cache, as rsample goes
            z = transform(z)
        msg["value"] = z
