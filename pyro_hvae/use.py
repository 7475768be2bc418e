"""Using a trained hierarchy: sample at a temperature, encode, decode, interpolate, vary details.

Every function takes any hierarchy that follows the package's protocol: ``vae.model(x=None,
batch_size=N)`` a Pyro model with its per-image sites in ``pyro.plate("data", N)`` and the
observed site ``vae.observed_site`` (``"x"`` when it has none); ``vae.guide(x)`` its guide; ``vae.latent_sites`` the latent site
names bottom first (``["z_1", ..., "z_L"]``). :class:`~pyro_hvae.HierarchicalVAE` has a thin
method for each.

**Temperature.** Sampling at temperature ``t`` replaces each latent prior
``N(mu_l, sigma_l)`` by ``N(mu_l, t_l sigma_l)`` (:func:`tempered`), one ``t`` for all layers or
one per layer. ``t = 0`` takes each prior's mean, ``z_l = mu_l(z_{l+1})``: decoding is then
deterministic. Temperatures must be ``>= 0`` (finite).

**Batch norm at a temperature.** Batch-norm running statistics were collected on posterior
samples during training; at ``t < 1`` the prior samples are less spread and those statistics
no longer fit (Very Deep VAE and NVAE readjust them). :func:`readjust_batch_norm` recomputes
them from prior samples drawn at ``t`` (cumulative average, ``momentum=None``) and, given a run
folder, caches them as ``RUN/bn_stats_T<t>.pt``; a later call reads that file and never
recomputes (delete the file to recompute). :func:`batch_norm_stats` applies them for a block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from torch.nn.modules.batchnorm import _BatchNorm

from pyro_hvae.run import atomic_write

Temperature = float | Sequence[float]


# --------------------------------------------------------------------------- temperature


def temper(fn: dist.TorchDistribution, temperature: float, name: str = "a latent site") -> dist.TorchDistribution:
    """``N(mu, sigma)`` (possibly ``.to_event(k)``) -> ``N(mu, t sigma)``; ``t = 0`` -> ``Delta(mu)``."""
    base, event_dims = fn, 0
    while isinstance(base, dist.Independent):
        event_dims += base.reinterpreted_batch_ndims
        base = base.base_dist
    if not isinstance(base, dist.Normal):
        raise ValueError(
            f"temperature: site {name!r} has a {type(fn).__name__} distribution; temperatures scale "
            "Normal distributions only (use temperature 1, or mean=False for a posterior with flows)"
        )
    if temperature == 0:
        return dist.Delta(base.loc, event_dim=event_dims)
    return dist.Normal(base.loc, base.scale * temperature).to_event(event_dims)


class TemperatureMessenger(Messenger):
    """At each unobserved sample site named in ``temperatures``, replace its distribution
    ``N(mu, sigma)`` by ``N(mu, t sigma)`` (``Delta(mu)`` for ``t = 0``).

    Put it outside the handlers that choose the distribution (a
    :class:`~pyro.poutine.guide.GuideMessenger` guide): it tempers whatever reaches it.
    """

    def __init__(self, temperatures: Mapping[str, float]):
        super().__init__()
        self.temperatures = dict(temperatures)

    def _pyro_sample(self, msg) -> None:
        t = self.temperatures.get(msg["name"])
        if t is None or t == 1 or msg["is_observed"]:
            return
        msg["fn"] = temper(msg["fn"], t, msg["name"])


def tempered(fn, temperatures: Mapping[str, float]):
    """``fn`` run under :class:`TemperatureMessenger` (a handler in the style of ``poutine``)."""
    return TemperatureMessenger(temperatures)(fn)


def layer_temperatures(vae, temperature: Temperature) -> dict[str, float]:
    """``{site: t}`` from one number or one per layer (bottom first); raises ``ValueError`` naming
    ``temperature`` for a negative, non-finite or wrongly sized value."""
    sites = vae.latent_sites
    values = [temperature] * len(sites) if isinstance(temperature, (int, float)) else list(temperature)
    if len(values) != len(sites):
        raise ValueError(f"temperature: expected one number or {len(sites)} (one per layer, bottom first), got {len(values)}")
    for t in values:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0: each prior's mean), got {t!r}")
    return {site: float(t) for site, t in zip(sites, values)}


# --------------------------------------------------------------------------- latents <-> images


def check_layers(vae, layers: Sequence[int], name: str = "layers") -> list[int]:
    """1-based layer indices (1 next to the data), checked against the hierarchy's depth."""
    num_layers = len(vae.latent_sites)
    layers = list(layers)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= num_layers:
            raise ValueError(f"{name}: layer {layer!r} does not exist; this hierarchy has layers 1..{num_layers} (1 next to the data)")
    return layers


def _observation(vae, trace, mean: bool) -> torch.Tensor:
    site = trace.nodes[getattr(vae, "observed_site", "x")]
    return site["fn"].mean if mean else site["value"]


@torch.no_grad()
def encode(vae, x: torch.Tensor, *, mean: bool = False) -> dict[str, torch.Tensor]:
    """Per-layer codes ``{site: z_l}`` of ``x``: ``z ~ q(z | x)``, or with ``mean=True`` each
    layer's posterior mean given the means above (``q`` at temperature 0)."""
    guide = tempered(vae.guide, dict.fromkeys(vae.latent_sites, 0.0)) if mean else vae.guide
    trace = poutine.trace(guide).get_trace(x)
    return {site: trace.nodes[site]["value"] for site in vae.latent_sites}


@torch.no_grad()
def decode(vae, latents: Mapping[str, torch.Tensor], *, temperature: Temperature = 1.0, mean: bool = True) -> torch.Tensor:
    """Images from (some) latents: the layers in ``latents`` are fixed (``poutine.condition``),
    every layer left out is drawn from its prior at ``temperature``; then ``E[x | z]``
    (``mean=True``) or ``x ~ p(x | z)``."""
    if not latents:
        raise ValueError("latents: give at least one layer's code, e.g. encode(vae, x); for no codes use sample()")
    unknown = sorted(set(latents) - set(vae.latent_sites))
    if unknown:
        raise ValueError(f"latents: {unknown} are not latent sites of this hierarchy ({vae.latent_sites})")
    num = {value.shape[0] for value in latents.values()}
    if len(num) != 1:
        raise ValueError(f"latents: every layer's code needs the same number of images, got {sorted(num)}")
    model = tempered(poutine.condition(vae.model, data=dict(latents)), layer_temperatures(vae, temperature))
    return _observation(vae, poutine.trace(model).get_trace(batch_size=num.pop()), mean)


@torch.no_grad()
def sample(
    vae,
    num_samples: int,
    *,
    temperature: Temperature = 1.0,
    mean: bool = True,
    batch_norm: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Images from the prior at ``temperature``: ``z ~ p_t(z)``, then ``E[x | z]`` or ``x ~ p(x | z)``.

    :param batch_norm: batch-norm statistics to sample with, from :func:`readjust_batch_norm`.
    """
    model = tempered(vae.model, layer_temperatures(vae, temperature))
    with batch_norm_stats(vae, batch_norm):
        return _observation(vae, poutine.trace(model).get_trace(batch_size=num_samples), mean)


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, *, mean: bool = True) -> torch.Tensor:
    """``z ~ q(z | x)``, then ``E[x' | z]`` (``mean=True``) or ``x' ~ p(x' | z)``."""
    return decode(vae, encode(vae, x), mean=mean)


@torch.no_grad()
def interpolate(
    vae,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    steps: int,
    *,
    layers: Sequence[int] | None = None,
    temperature: Temperature = 0.0,
    mean: bool = True,
) -> torch.Tensor:
    """Images along ``z = (1 - a) z^A + a z^B``, ``a = 0 .. 1`` in ``steps`` steps, at the chosen
    ``layers`` (1-based, default all), with ``z^A, z^B`` the posterior means of ``x_a, x_b``
    (posterior samples with ``mean=False``, needed for posteriors with flows).

    The other layers above the lowest chosen one keep ``x_a``'s code; the layers below it are
    drawn from their priors at ``temperature`` (default 0, their means): in a top-down hierarchy
    ``x`` depends on the upper layers only through the lower ones, so keeping the lower codes
    would keep the image. Returns ``[steps, N, *data_shape]`` (``E[x | z]``).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2 (both ends included), got {steps!r}")
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_b: expected the shape of x_a {list(x_a.shape)}, got {list(x_b.shape)}")
    chosen = check_layers(vae, layers if layers is not None else range(1, len(vae.latent_sites) + 1))
    if not chosen:
        raise ValueError("layers: choose at least one layer to interpolate")
    z_a, z_b = encode(vae, x_a, mean=mean), encode(vae, x_b, mean=mean)
    kept = [site for layer, site in enumerate(vae.latent_sites, 1) if layer > min(chosen) and layer not in chosen]
    moving = [vae.latent_sites[layer - 1] for layer in chosen]
    images = []
    for a in torch.linspace(0, 1, steps).tolist():
        latents = {site: z_a[site] for site in kept}
        latents.update({site: torch.lerp(z_a[site], z_b[site], a) for site in moving})
        images.append(decode(vae, latents, temperature=temperature))
    return torch.stack(images)


@torch.no_grad()
def vary_details(
    vae,
    x: torch.Tensor,
    *,
    keep_top: int,
    num_samples: int,
    temperature: Temperature = 1.0,
    mean: bool = True,
) -> torch.Tensor:
    """Fix the top ``keep_top`` layers to a posterior sample of ``x`` and redraw the layers below
    from their priors at ``temperature``: ``[num_samples, N, *data_shape]`` images that share
    ``x``'s global content and vary in detail."""
    num_layers = len(vae.latent_sites)
    if isinstance(keep_top, bool) or not isinstance(keep_top, int) or not 1 <= keep_top <= num_layers:
        raise ValueError(f"keep_top must be an integer in 1..{num_layers} (the number of top layers to keep), got {keep_top!r}")
    code = encode(vae, x)
    top = {site: code[site] for site in vae.latent_sites[num_layers - keep_top :]}
    return torch.stack([decode(vae, top, temperature=temperature, mean=mean) for _ in range(num_samples)])


# --------------------------------------------------------------------------- batch norm


_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def batch_norm_layers(vae) -> dict[str, _BatchNorm]:
    """The batch-norm layers of ``vae.model`` by name (those sampling uses)."""
    return {name: m for name, m in vae.model.named_modules() if isinstance(m, _BatchNorm)}


def _buffers(layers: Mapping[str, _BatchNorm]) -> dict[str, torch.Tensor]:
    """The running statistics of ``layers`` as ``{"<module>.<buffer>": tensor}`` (views, not copies)."""
    return {f"{name}.{key}": getattr(m, key) for name, m in layers.items() for key in _BUFFERS}


def _load_buffers(layers: Mapping[str, _BatchNorm], stats: Mapping[str, torch.Tensor]) -> None:
    for key, buffer in _buffers(layers).items():
        buffer.copy_(stats[key])


def bn_stats_path(run_dir: str | Path, temperature: Temperature) -> Path:
    """``RUN/bn_stats_T<t>.pt`` (``T0.8``, or ``T1-0.8-0.6`` for one temperature per layer)."""
    values = [temperature] if isinstance(temperature, (int, float)) else list(temperature)
    return Path(run_dir) / f"bn_stats_T{'-'.join(f'{float(t):g}' for t in values)}.pt"


@torch.no_grad()
def readjust_batch_norm(
    vae,
    temperature: Temperature,
    *,
    num_samples: int = 2048,
    batch_size: int = 256,
    run_dir: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """Batch-norm running statistics of ``vae.model`` for prior samples at ``temperature``.

    The model's batch-norm layers are reset and run in training mode with ``momentum=None``
    (the cumulative average over ``num_samples`` prior samples), then restored; the new
    statistics are returned as ``{"<module>.running_mean": ..., ...}``. With ``run_dir`` they are
    cached in :func:`bn_stats_path`: an existing file is read, not recomputed.
    """
    for flag, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"{flag} must be an integer >= 2 (batch norm needs two samples per batch), got {value!r}")
    temperatures = layer_temperatures(vae, temperature)
    if min(temperatures.values()) <= 0:
        raise ValueError(f"temperature must be > 0 to readjust batch norm (at 0 every sample is the same), got {temperature!r}")
    layers = batch_norm_layers(vae)
    if not layers:
        raise ValueError("this hierarchy's model has no batch norm: there is nothing to readjust; sample without it")
    path = bn_stats_path(run_dir, temperature) if run_dir is not None else None
    if path is not None and path.is_file():
        stats = torch.load(path, map_location="cpu", weights_only=True)
        if set(stats) != set(_buffers(layers)):
            raise ValueError(f"{path} holds batch-norm statistics of another model; delete it to recompute them")
        return stats
    saved = {key: value.clone() for key, value in _buffers(layers).items()}
    modes = {name: (m.training, m.momentum) for name, m in layers.items()}
    try:
        for m in layers.values():
            m.reset_running_stats()
            m.momentum = None
            m.train()
        model = tempered(vae.model, temperatures)
        sizes = [batch_size] * (num_samples // batch_size)
        remainder = num_samples % batch_size
        if remainder:  # a last batch of one sample has no batch statistics: merge it
            sizes = sizes[:-1] + [sizes[-1] + remainder] if sizes and remainder == 1 else sizes + [remainder]
        for size in sizes:
            model(batch_size=size)
        stats = {key: value.cpu().clone() for key, value in _buffers(layers).items()}
    finally:
        _load_buffers(layers, saved)
        for name, m in layers.items():
            m.train(modes[name][0])
            m.momentum = modes[name][1]
    if path is not None:
        atomic_write(path, lambda f: torch.save(stats, f))
    return stats


@contextlib.contextmanager
def batch_norm_stats(vae, stats: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Use ``stats`` (from :func:`readjust_batch_norm`) in ``vae.model``'s batch norm inside the
    block, and restore the trained statistics after it; ``None`` changes nothing."""
    if stats is None:
        yield
        return
    layers = batch_norm_layers(vae)
    if set(stats) != set(_buffers(layers)):
        raise ValueError("batch_norm: these statistics belong to another model; compute them with readjust_batch_norm(vae, ...)")
    saved = {key: value.clone() for key, value in _buffers(layers).items()}
    try:
        _load_buffers(layers, stats)
        yield
    finally:
        _load_buffers(layers, saved)


__all__ = [
    "TemperatureMessenger",
    "batch_norm_layers",
    "batch_norm_stats",
    "bn_stats_path",
    "check_layers",
    "decode",
    "encode",
    "interpolate",
    "layer_temperatures",
    "readjust_batch_norm",
    "reconstruct",
    "sample",
    "temper",
    "tempered",
    "vary_details",
]
