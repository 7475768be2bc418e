"""Models whose marginal likelihood ``log p(x)`` is known exactly, for tests of bounds and estimators.

* :class:`LinearGaussian`: a two-level linear-Gaussian hierarchy with its exact marginal and
  posterior, and the exact ELBO of any affine-Gaussian guide (:class:`AffineGuide`);
* :func:`grid_log_marginal`: ``log p(x)`` of a package hierarchy with two scalar latents or one
  two-dimensional latent, by quadrature on a grid.
"""

import math

import pyro
import pyro.distributions as dist
import torch

DZ2, DZ1, DX, N = 2, 3, 4, 5


def gaussian_expected_log_density(mean, cov, loc, precision):
    """``E[log N(v; loc, P^-1)]`` for ``v ~ N(mean, cov)``, rows of ``mean`` and ``loc`` broadcast:

    .. math:: -\\tfrac12\\big(d \\log 2\\pi - \\log|P| + \\mathrm{tr}(P\\,\\Sigma) + (\\mu - m)^\\top P (\\mu - m)\\big)
    """
    d = cov.shape[-1]
    r = mean - loc
    quadratic = torch.einsum("...i,ij,...j->...", r, precision, r)
    return -0.5 * (d * math.log(2 * math.pi) - torch.logdet(precision) + torch.trace(precision @ cov) + quadratic)


class LinearGaussian:
    """
    z2 ~ N(0, I), z1 | z2 ~ N(A z2 + a, S1), x | z1 ~ N(B z1 + b, Sx) with
    diagonal S1, Sx, in float64, with its exact marginal and posterior.
    """

    def __init__(self, seed=0, noise=0.5):
        g = torch.Generator().manual_seed(seed)
        randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
        self.A, self.a = randn(DZ1, DZ2), randn(DZ1)
        self.B, self.b = randn(DX, DZ1), randn(DX)
        self.s1 = 0.5 + torch.rand(DZ1, generator=g, dtype=torch.float64)
        self.sx = noise * (0.5 + torch.rand(DX, generator=g, dtype=torch.float64))
        self.x = randn(N, DX) * 2

        # joint prior over z = [z2, z1] and the linear observation x = H z + b + noise
        cov_z1 = self.A @ self.A.T + torch.diag(self.s1**2)
        self.prior_mean = torch.cat([torch.zeros(DZ2, dtype=torch.float64), self.a])
        eye = torch.eye(DZ2, dtype=torch.float64)
        self.prior_cov = torch.cat([torch.cat([eye, self.A.T], 1), torch.cat([self.A, cov_z1], 1)])
        H = torch.cat([torch.zeros(DX, DZ2, dtype=torch.float64), self.B], 1)
        noise_prec = torch.diag(self.sx**-2)
        prior_prec = torch.linalg.inv(self.prior_cov)
        self.post_cov = torch.linalg.inv(prior_prec + H.T @ noise_prec @ H)
        natural = prior_prec @ self.prior_mean[:, None] + H.T @ noise_prec @ (self.x - self.b).T
        self.post_mean = (self.post_cov @ natural).T
        self.gain = self.post_cov[DZ2:, :DZ2] @ torch.linalg.inv(self.post_cov[:DZ2, :DZ2])
        self.cond_cov = self.post_cov[DZ2:, DZ2:] - self.gain @ self.post_cov[:DZ2, DZ2:]

        marginal = dist.MultivariateNormal(
            self.B @ self.a + self.b, self.B @ cov_z1 @ self.B.T + torch.diag(self.sx**2)
        )
        self.log_px = marginal.log_prob(self.x)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(DZ2, dtype=x.dtype), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(z2 @ self.A.T + self.a, self.s1).to_event(1))
            pyro.sample("x", dist.Normal(z1 @ self.B.T + self.b, self.sx).to_event(1), obs=x)

    def posterior_z2(self):
        return dist.MultivariateNormal(self.post_mean[:, :DZ2], self.post_cov[:DZ2, :DZ2])

    def posterior_z1(self, z2):
        loc = self.post_mean[:, DZ2:] + (z2 - self.post_mean[:, :DZ2]) @ self.gain.T
        return dist.MultivariateNormal(loc, self.cond_cov)

    def exact_guide(self, x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", self.posterior_z2())
            pyro.sample("z1", self.posterior_z1(z2))

    def prior_guide(self, x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(DZ2, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("z1", dist.Normal(z2 @ self.A.T + self.a, self.s1).to_event(1))




class AffineGuide:
    """``q(z2 | x_n) = N(m_n, diag s^2)``, ``q(z1 | z2, x_n) = N(C z2 + c_n, diag t^2)``: the exact
    posterior's form with diagonal covariances and perturbed means, a guide with a known
    ELBO (:meth:`exact_elbo`) a few nats below ``log p(x)``. Defined for the data ``lg.x``."""

    def __init__(self, lg, seed=1, offset=0.3):
        g = torch.Generator().manual_seed(seed)
        randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
        self.lg = lg
        exact_m = lg.post_mean[:, :DZ2]
        sd2, sd1 = lg.post_cov[:DZ2, :DZ2].diagonal().sqrt(), lg.cond_cov.diagonal().sqrt()  # exact posterior scales
        self.m = exact_m + offset * sd2 * randn(N, DZ2)
        self.C = lg.gain.clone()
        self.c = lg.post_mean[:, DZ2:] - exact_m @ lg.gain.T + offset * sd1 * randn(N, DZ1)
        self.s = sd2 * (0.8 + 0.4 * torch.rand(DZ2, generator=g, dtype=torch.float64))
        self.t = sd1 * (0.8 + 0.4 * torch.rand(DZ1, generator=g, dtype=torch.float64))

    def __call__(self, x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(self.m, self.s).to_event(1))
            pyro.sample("z1", dist.Normal(z2 @ self.C.T + self.c, self.t).to_event(1))

    def exact_elbo(self, x):
        """``E_q[log p(x, z)] + H[q]`` per data point, in closed form: ``q`` is jointly Gaussian
        over ``z = [z2, z1]`` with mean ``[m2, C m2 + c]`` and covariance
        ``[[S2, S2 C^T], [C S2, C S2 C^T + T]]``."""
        lg = self.lg
        mean = torch.cat([self.m, self.m @ self.C.T + self.c], -1)
        S2 = torch.diag(self.s**2)
        cov = torch.cat([torch.cat([S2, S2 @ self.C.T], 1), torch.cat([self.C @ S2, self.C @ S2 @ self.C.T + torch.diag(self.t**2)], 1)])
        log_prior = gaussian_expected_log_density(mean, cov, lg.prior_mean, torch.linalg.inv(lg.prior_cov))
        # x | z ~ N(H z + b, Sx): the expectation over z of a Gaussian in x with a linear mean
        H = torch.cat([torch.zeros(DX, DZ2, dtype=torch.float64), lg.B], 1)
        noise_precision = torch.diag(lg.sx**-2)
        r = x - mean @ H.T - lg.b
        log_lik = -0.5 * (
            DX * math.log(2 * math.pi) - torch.logdet(noise_precision)
            + torch.trace(noise_precision @ H @ cov @ H.T) + torch.einsum("ni,ij,nj->n", r, noise_precision, r)
        )
        entropy = 0.5 * torch.logdet(2 * math.pi * math.e * cov)
        return log_prior + log_lik + entropy


def grid_log_marginal(model, x, half_width=6.0, points=301):
    """``log p(x_n)`` of a :class:`~pyro_hvae.TopDownModel` with latents ``[1, 1]`` or ``[2]``,
    by the rectangle rule on a ``points x points`` grid over ``[-half_width, half_width]^2``:

    .. math:: p(x) \\approx \\sum_{i, j} p(x, z = (u_i, u_j))\\, h^2

    The integrand is smooth and decays like a Gaussian, so the error is far below the
    tolerances the tests use.
    """
    u = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    h = float(u[1] - u[0])
    with torch.no_grad():
        if model.latent_dims == [2]:
            z = torch.cartesian_prod(u, u)  # [G, 2]
            log_joint = dist.Normal(0.0, 1.0).log_prob(z).sum(-1, keepdim=True)  # [G, 1]
            log_joint = log_joint + model.observation(z.float().unsqueeze(1)).log_prob(x).double()  # [G, N]
        elif model.latent_dims == [1, 1]:
            z2, z1 = u.unsqueeze(-1), u.unsqueeze(-1)
            log_top = dist.Normal(0.0, 1.0).log_prob(z2).squeeze(-1)  # [G2]
            prior = model.prior(1, z2.float())  # one normal over z1 per grid value of z2
            log_prior = prior.base_dist.log_prob(z1.float().unsqueeze(1)).double().squeeze(-1)  # [G1, G2]
            log_obs = model.observation(z1.float().unsqueeze(1)).log_prob(x).double()  # [G1, N]
            inner = (log_top + log_prior).unsqueeze(-1) + log_obs.unsqueeze(1)  # [G1, G2, N]
            log_joint = inner.flatten(0, 1)
        else:
            raise ValueError(f"grid_log_marginal needs latent_dims [2] or [1, 1], got {model.latent_dims}")
    return log_joint.logsumexp(0) + 2 * math.log(h)
