"""The naive (bottom-up) two-level-style hierarchy, kept to show posterior collapse.

Same generative model as :class:`~pyro_hvae.LadderVAE`,
``p(z_L) prod_l p(z_l | z_{l+1}) p(x | z_1)``, but the guide reverses the arrows:

.. math:: q(z_{1:L} | x) = q(z_1 | x) \\prod_{l=2}^{L} q(z_l | z_{l-1})

so nothing ties ``q(z_L | z_{L-1})`` to the model, and the upper layers tend to
collapse onto the prior. The guide samples bottom-up, in the opposite order to the
model: ``TraceMeanField_ELBO`` is biased for it (Pyro warns), use ``Trace_ELBO``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
from torch import nn

from pyro_hvae.latents import ConditionalNormal
from pyro_hvae.likelihoods import Likelihood
from pyro_hvae.models.base import HierarchicalVAE
from pyro_hvae.models.top_down import TopDownModel, latent_site, register_params
from pyro_hvae.nn import check_positive_sizes


class BottomUpGuide(nn.Module):
    """``q(z_1 | x) prod_{l>1} q(z_l | z_{l-1})`` as a plain Pyro guide: ``guide(x)``."""

    def __init__(
        self,
        model: TopDownModel,
        hidden_dims: Sequence[int],
        *,
        activation: str = "elu",
        batch_norm: bool = False,
    ):
        super().__init__()
        self._model = (model,)  # not a submodule: the guide only reads its shapes
        dims = model.latent_dims
        width = hidden_dims[-1]
        nets = dict(activation=activation, batch_norm=batch_norm)
        first = ConditionalNormal(model.data_dim, hidden_dims, dims[0], **nets)
        rest = (ConditionalNormal(below, [width, width], above, **nets) for below, above in zip(dims[:-1], dims[1:]))
        self.posteriors = nn.ModuleList([first, *rest])

    def forward(self, x, *, batch_size=None):
        model = self._model[0]
        num_data = model.batch_size_of(x, batch_size)
        register_params(model.pyro_name + "_guide", self)
        with pyro.plate("data", num_data):
            z = pyro.sample(latent_site(1), self.posteriors[0](x.flatten(start_dim=1)))
            for layer in range(2, model.num_layers + 1):
                z = pyro.sample(latent_site(layer), self.posteriors[layer - 1](z))
        return z


class BottomUpVAE(HierarchicalVAE):
    """The naive hierarchy: ``LadderVAE``'s generative model with a bottom-up guide.

    Arguments as for :class:`~pyro_hvae.LadderVAE` (``latent_dims`` bottom first).
    """

    analytic_kl = False  # the guide samples against the model's order: Monte Carlo KL

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dims: Sequence[int],
        hidden_dims: Sequence[int] = (512, 256),
        *,
        likelihood: Likelihood | None = None,
        batch_norm: bool = False,
        activation: str = "elu",
        name: str | None = None,
    ):
        super().__init__()
        hidden_dims = check_positive_sizes("hidden_dims", hidden_dims)
        nets = dict(activation=activation, batch_norm=batch_norm)
        self.model = TopDownModel(data_shape, latent_dims, hidden_dims, likelihood=likelihood, name=name, **nets)
        self.guide = BottomUpGuide(self.model, hidden_dims, **nets)
