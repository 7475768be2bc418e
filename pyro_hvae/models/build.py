"""From a configuration's ``model`` section to a hierarchy: the one place that builds models.

:func:`build_model` has one builder per kind of section (:data:`pyro_hvae.config.MODEL_KINDS`);
adding a kind means registering its builder here. :func:`build_hierarchy` builds and then
checks the result on a couple of data points (:func:`~pyro_hvae.models.protocol.inspect_hierarchy`),
so that ``pyro-hvae train`` and ``pyro-hvae evaluate`` refuse an unusable hierarchy
before they write anything.

``kind: custom`` calls the class or function named by ``class_path``:

* ``my_package.my_module.MyVAE`` is imported like ``python -m`` would, with the working
  directory first on the module search path;
* ``path/to/file.py:MyVAE`` executes that file (its folder first on the search path, so
  that it can import modules beside it); the config stores the path absolute.

It is called with ``init_args`` as keyword arguments, plus ``data_shape`` (the shape of
one data point, e.g. ``(1, 28, 28)``) when it has a parameter of that name, and must
return an ``nn.Module`` with ``model(x)`` and ``guide(x)`` (see :mod:`pyro_hvae.models.base`).
Every problem raises :class:`~pyro_hvae.config.ConfigError` with one line naming the option.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterator, Sequence
from functools import singledispatch
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pyro_hvae.config import (
    BottomUpConfig,
    ConditionalLadderConfig,
    ConfigError,
    ConvLadderConfig,
    CustomModelConfig,
    LadderConfig,
)
from pyro_hvae.inpaint import make_mask
from pyro_hvae.likelihoods import Bernoulli, Categorical, CoupledLogisticMixture, Likelihood, LogisticMixture
from pyro_hvae.models.bottom_up import BottomUpVAE
from pyro_hvae.models.conditional import BorderLadderVAE
from pyro_hvae.models.conv_ladder import ConvLadderVAE
from pyro_hvae.models.ladder import LadderVAE
from pyro_hvae.models.protocol import Hierarchy, HierarchyError, check_interface, inspect_hierarchy

__all__ = ["build_hierarchy", "build_likelihood", "build_model", "import_object"]


def build_likelihood(cfg: LadderConfig | BottomUpConfig | ConditionalLadderConfig | ConvLadderConfig) -> Likelihood:
    """The pixel likelihood ``p(x | z_1)`` of a built-in kind."""
    if cfg.likelihood == "categorical":
        return Categorical(cfg.num_levels)
    if cfg.likelihood == "logistic_mixture":
        return LogisticMixture(cfg.num_mixtures)
    if cfg.likelihood == "coupled_logistic_mixture":
        return CoupledLogisticMixture(cfg.num_mixtures)
    return Bernoulli()


def _mlp_options(cfg: LadderConfig | BottomUpConfig | ConditionalLadderConfig) -> dict[str, Any]:
    return dict(likelihood=build_likelihood(cfg), batch_norm=cfg.batch_norm, activation=cfg.activation)


@singledispatch
def build_model(cfg, data_shape: Sequence[int]) -> nn.Module:
    """The hierarchy a ``model`` section describes, for data points of shape ``data_shape``."""
    raise TypeError(f"no builder for a model section of type {type(cfg).__name__}")


@build_model.register
def _(cfg: LadderConfig, data_shape: Sequence[int]) -> nn.Module:
    return LadderVAE(
        data_shape, cfg.latent_dims, cfg.hidden_dims, posterior=cfg.posterior, flows=cfg.flows, **_mlp_options(cfg)
    )


@build_model.register
def _(cfg: BottomUpConfig, data_shape: Sequence[int]) -> nn.Module:
    return BottomUpVAE(data_shape, cfg.latent_dims, cfg.hidden_dims, **_mlp_options(cfg))


@build_model.register
def _(cfg: ConditionalLadderConfig, data_shape: Sequence[int]) -> nn.Module:
    try:
        return BorderLadderVAE(
            data_shape, cfg.latent_dims, cfg.hidden_dims, mask=make_mask(cfg.mask, tuple(data_shape)),
            context_channels=cfg.context_channels, **_mlp_options(cfg),
        )
    except ValueError as err:  # the maps do not fit the images: name the option
        message = f"{err} (the images are {'x'.join(map(str, data_shape))})"
        raise ConfigError([f"model.{message}" if message.startswith("context_channels") else f"model: {message}"]) from None


#: The options of ``kind: conv_ladder`` that :class:`ConvLadderVAE` takes by the same name.
_CONV_OPTIONS = ("scales", "groups_per_scale", "latent_channels", "widths", "encoder_cells")


@build_model.register
def _(cfg: ConvLadderConfig, data_shape: Sequence[int]) -> nn.Module:
    try:
        return ConvLadderVAE(
            data_shape, **{name: getattr(cfg, name) for name in _CONV_OPTIONS}, likelihood=build_likelihood(cfg)
        )
    except ValueError as err:  # the geometry does not fit the images: name the option
        raise ConfigError([_conv_problem(str(err), data_shape)]) from None


def _conv_problem(message: str, data_shape: Sequence[int]) -> str:
    """The constructor's message as a config line: ``model.<option>...`` when it names one
    (its messages start with the argument's name), else under ``model``."""
    message = f"{message} (the images are {'x'.join(map(str, data_shape))})"
    for name in _CONV_OPTIONS:
        if message.startswith(name):
            return f"model.{message}"
    return f"model: {message}"


@build_model.register
def _(cfg: CustomModelConfig, data_shape: Sequence[int]) -> nn.Module:
    target = import_object(cfg.class_path)
    if not callable(target):
        raise ConfigError([f"model.class_path: {cfg.class_path} is an object of type {type(target).__name__}, not a class or function"])
    kwargs = dict(cfg.init_args)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins have none: call and see
        signature = None
    if signature is not None and "data_shape" in signature.parameters:
        if "data_shape" in kwargs:
            raise ConfigError(["model.init_args.data_shape: the data set fixes it; remove it from init_args"])
        kwargs["data_shape"] = tuple(data_shape)
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as err:
            raise ConfigError([f"model.init_args: {cfg.class_path} does not take them: {err}"]) from None
    try:
        vae = target(**kwargs)
    except Exception as err:  # the user's code: report any failure as one line
        raise ConfigError([f"model.init_args: {cfg.class_path}(...) failed with them: {_one_line(err)}"]) from None
    try:
        check_interface(vae)
    except HierarchyError as err:
        raise ConfigError([f"model.class_path: {cfg.class_path} {err}"]) from None
    return vae


def build_hierarchy(cfg, data_shape: Sequence[int], example: torch.Tensor) -> tuple[nn.Module, Hierarchy]:
    """:func:`build_model`, then :func:`~pyro_hvae.models.protocol.inspect_hierarchy` on
    ``example`` (a couple of data points); a custom hierarchy that fails the check
    raises :class:`~pyro_hvae.config.ConfigError`."""
    vae = build_model(cfg, data_shape).to(example.device)
    try:
        return vae, inspect_hierarchy(vae, example)
    except HierarchyError as err:
        if isinstance(cfg, CustomModelConfig):
            raise ConfigError([f"model.class_path: {cfg.class_path}: {err}"]) from None
        raise


def import_object(class_path: str) -> Any:
    """The object named by ``package.module.Name`` or ``path/to/file.py:Name``.

    :raises ConfigError: one line naming ``model.class_path`` when the module or file
        cannot be found or imported, or has no such name.
    """
    file, sep, name = class_path.rpartition(":")
    if sep and file.endswith(".py"):
        where, module = file, _import_file(Path(file).expanduser())
    else:
        where, _, name = class_path.rpartition(".")
        module = _import_module(where)
    try:
        return getattr(module, name)
    except AttributeError:
        raise ConfigError([f"model.class_path: {class_path}: {where} defines no {name!r}"]) from None


def _import_module(module_name: str):
    with _first_on_path(Path.cwd()):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and module_name.startswith(err.name):
                raise ConfigError(
                    [
                        f"model.class_path: cannot import module {module_name!r} ({err}); put it in the working "
                        "directory or on PYTHONPATH, or name a file: path/to/file.py:Name"
                    ]
                ) from None
            raise ConfigError([f"model.class_path: importing {module_name!r} failed: {_one_line(err)}"]) from None
        except Exception as err:  # the user's module: report any failure as one line
            raise ConfigError([f"model.class_path: importing {module_name!r} failed: {_one_line(err)}"]) from None


def _import_file(path: Path):
    if not path.is_file():
        raise ConfigError([f"model.class_path: file {path} not found; give an existing .py file (relative to the working directory) or a dotted import path"])
    # a private module name: a file called torch.py must not shadow torch
    name = f"_pyro_hvae_user_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    with _first_on_path(path.resolve().parent):
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # the user's file: report any failure as one line
            del sys.modules[name]
            raise ConfigError([f"model.class_path: executing {path} failed: {_one_line(err)}"]) from None
    return module


@contextlib.contextmanager
def _first_on_path(folder: Path) -> Iterator[None]:
    """``folder`` first on ``sys.path`` while importing."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)


def _one_line(err: BaseException) -> str:
    message = (str(err).strip().splitlines() or [""])[0][:300]
    return f"{type(err).__name__}: {message}" if message else type(err).__name__
