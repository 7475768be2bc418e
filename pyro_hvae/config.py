"""Run configuration: the pydantic schema of every option, and YAML loading.

The :class:`Config` schema below is the single place where options and their
defaults are defined; the CLI, the training loop and the documentation all read
it. A run is described by a YAML file whose top-level keys are the sections of
:class:`Config`, optionally modified on the command line by dotted overrides::

    pyro-hvae train examples/mnist.yaml optim.lr=3e-4 model.latent_dims=[32,16,8]

The ``model`` section is one of :data:`MODEL_KINDS`, chosen by its ``kind`` (a union
discriminated by ``kind``), so that each kind accepts only its own options.

:func:`load_config` reads the file, applies the overrides and validates the
result. Problems are collected and raised together as one :class:`ConfigError`
whose lines each name the offending option (as a dotted path) and where its
value came from (the file, an override, or the defaults).
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "ARCHITECTURE_FIELDS",
    "BottomUpConfig",
    "ConditionalLadderConfig",
    "Config",
    "ConfigError",
    "ConvLadderConfig",
    "CustomModelConfig",
    "DataConfig",
    "EvalConfig",
    "LadderConfig",
    "MODEL_KINDS",
    "ModelConfig",
    "OptimConfig",
    "SpectralRegConfig",
    "TrainConfig",
    "architecture_changes",
    "data_stream_changes",
    "config_from_yaml",
    "dump_config",
    "load_config",
    "parse_overrides",
]


class ConfigError(ValueError):
    """A configuration that cannot be used, with every problem found.

    ``errors`` holds one line per problem, each of the form
    ``"<dotted.path>: <message> (from <source>)"`` (or a single line naming the
    file when the file itself cannot be read); ``str(error)`` joins them with
    newlines so they can be printed as they are.
    """

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------

_CONFLICT = "config_conflict"


def _conflict(fields: Sequence[str], message: str) -> PydanticCustomError:
    """An error for options that are valid alone but not together.

    ``fields`` are dotted paths relative to the model that raises it, the first
    being the one the error is reported under; the error's source is that of
    every listed field that was set explicitly.
    """
    return PydanticCustomError(_CONFLICT, message, {"fields": list(fields)})


class _Section(BaseModel):
    """Base of every configuration section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


#: The data sets torchvision reads (and downloads) under ``data.root``.
BUILTIN_DATASETS = ("mnist", "fashion_mnist", "cifar10")

#: Options of a user's own images, by the ``data.dataset`` values they apply to.
_USER_DATA_OPTIONS = {
    "path": ("image_folder", "npz"),
    "test_path": ("image_folder",),
    "image_size": ("image_folder",),
    "resize": ("image_folder",),
    "channels": ("image_folder",),
}


class DataConfig(_Section):
    """Which images to train on, where they live, and how pixels are binarized."""

    dataset: Literal["mnist", "fashion_mnist", "cifar10", "image_folder", "npz"] = Field(
        "mnist",
        description="Image data set. Built in, read with torchvision: 28x28 grey MNIST "
        "or Fashion-MNIST, or 32x32 colour CIFAR-10. A user's own images: "
        "'image_folder' (image files under `path`, see there) or 'npz' (a NumPy "
        "array file with the arrays `train` and `test`, see `path`).",
    )
    root: Optional[Path] = Field(
        None,
        description="Built-in data sets only: folder holding the torchvision data "
        "folders (MNIST/raw/, FashionMNIST/raw/, cifar-10-batches-py/); a relative "
        "path is taken from the working directory. Unset: $PYRO_HVAE_DATA if set, "
        "else the user cache folder (~/.cache/pyro-hvae/data on Linux, honouring "
        "$XDG_CACHE_HOME).",
    )
    download: bool = Field(
        True,
        description="Built-in data sets only: download the data set into `root` when "
        "its files are missing (needs network access). A user's own data is never "
        "downloaded.",
    )
    path: Optional[Path] = Field(
        None,
        description="Required for image_folder and npz, an error otherwise. "
        "image_folder: a folder whose `train/` and `test/` subfolders hold the "
        "training and test images (or, with `test_path`, a folder of training "
        "images only); every .png, .jpg, .jpeg, .bmp, .gif, .tif, .tiff, .webp, .ppm, "
        ".pgm or .pbm file at any depth is an image (class subfolders as torchvision's "
        "ImageFolder lays them out, or none; labels are ignored), read in sorted "
        "order. npz: a file written by `numpy.savez(path, train=..., test=...)`, each "
        "array either uint8 grey levels 0..255 or floats in [0, 1] (stored as "
        "the nearest k/255), shaped [N, H, W] (grey), [N, C, H, W] or [N, H, W, C] "
        "with C = 1 or 3; other arrays in the file (labels, say) are ignored. A "
        "4-d shape that reads both ways is refused. A relative path is taken from "
        "the working directory.",
    )
    test_path: Optional[Path] = Field(
        None,
        description="image_folder only: a separate folder of test images; then "
        "`path` holds the training images only (and may not have train/ and test/ "
        "subfolders). null: the test images are `path`/test/.",
    )
    image_size: Optional[
        Union[PositiveInt, tuple[PositiveInt, PositiveInt]]
    ] = Field(
        None,
        description="image_folder only: size every image is brought to, as one "
        "number (square) or [H, W]; needs `resize`. null: images are used at their "
        "stored size, which must then be the same for all of them.",
    )
    resize: Optional[Literal["resize", "center_crop"]] = Field(
        None,
        description="image_folder only, with `image_size`: how images reach it. "
        "'resize': scaled to exactly [H, W] (bilinear, with antialiasing; the aspect "
        "ratio may change); 'center_crop': scaled, keeping the aspect ratio, until "
        "they cover [H, W], then the centre [H, W] is cut out.",
    )
    channels: Optional[Literal[1, 3]] = Field(
        None,
        description="image_folder only: 1 converts every image to grey levels, 3 to "
        "RGB. null: 1 when every image is stored as greyscale, else 3.",
    )
    binarize: Literal["dynamic", "threshold", "none"] = Field(
        "dynamic",
        description="Pixel convention. 'dynamic': training images are fresh "
        "Bernoulli(intensity) draws every time they are used, validation and test "
        "images are drawn once (see binarize_seed); 'threshold': pixel = 1 where "
        "intensity > threshold; 'none': 8-bit grey levels k/255 (required for "
        "cifar10 and for the categorical and logistic_mixture likelihoods). The "
        "same for a user's own images, whose intensity is the stored value k/255.",
    )
    binarize_seed: int = Field(
        0,
        description="Seed of the one-off Bernoulli draws that binarize the "
        "validation and test images under binarize: dynamic (each split gets its "
        "own seed derived from it), so that held-out NLLs are reproducible and "
        "comparable between runs.",
    )
    threshold: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="Intensity cut-off in [0, 1) for binarize: threshold.",
    )
    val_size: NonNegativeInt = Field(
        500,
        description="Number of training images held out as the validation set "
        "(used for evaluation during training and early stopping; never the test "
        "set). Must be smaller than the training set, which is checked when the "
        "data is loaded.",
    )
    split_seed: int = Field(
        0, description="Seed of the random choice of validation images."
    )
    batch_size: PositiveInt = Field(128, description="Training minibatch size.")
    eval_batch_size: PositiveInt = Field(
        500, description="Batch size for validation passes during training."
    )

    @model_validator(mode="after")
    def _options_fit_the_dataset(self) -> "DataConfig":
        dataset = self.dataset
        for name, datasets in _USER_DATA_OPTIONS.items():
            if getattr(self, name) is not None and dataset not in datasets:
                kinds = " and ".join(datasets)
                raise _conflict(
                    [name, "dataset"],
                    f"data.{name} applies to data.dataset {kinds} only, and data.dataset "
                    f"is '{dataset}': remove data.{name}"
                    + (" (and point data.root at the torchvision files)" if name == "path" else ""),
                )
        if dataset in BUILTIN_DATASETS:
            return self
        if self.root is not None:
            raise _conflict(
                ["root", "dataset"],
                f"data.root applies to the built-in data sets only, and data.dataset is "
                f"'{dataset}': remove data.root and name the data with data.path",
            )
        if self.path is None:
            what = "a folder of images" if dataset == "image_folder" else "a .npz file"
            raise _conflict(
                ["path", "dataset"],
                f"data.dataset '{dataset}' needs data.path: set it to {what}",
            )
        if (self.image_size is None) != (self.resize is None):
            given, needed = ("image_size", "resize") if self.resize is None else ("resize", "image_size")
            raise _conflict(
                [needed, given],
                f"data.{given} needs data.{needed}: set data.resize (resize or "
                f"center_crop) and data.image_size (e.g. 28 or [32, 48]) together, or "
                f"neither to use the images at their stored size",
            )
        return self

    @model_validator(mode="after")
    def _colour_images_are_not_binarized(self) -> "DataConfig":
        if self.dataset == "cifar10" and self.binarize != "none":
            raise _conflict(
                ["binarize", "dataset"],
                f"data.dataset 'cifar10' holds 8-bit colour images and cannot be "
                f"binarized (data.binarize is '{self.binarize}'): set data.binarize: "
                f"none, with model.likelihood: logistic_mixture or categorical",
            )
        return self

    @property
    def image_hw(self) -> Optional[tuple[int, int]]:
        """``image_size`` as ``(H, W)``, or None."""
        size = self.image_size
        return (size, size) if isinstance(size, int) else size


class _ModelSection(_Section):
    """Base of the ``model`` section of every kind."""

    kind: str = Field(description="Which hierarchy; each kind lists its own options.")


class _PixelLikelihood(_ModelSection):
    """Options of the pixel likelihood ``p(x | z_1)``, shared by the built-in kinds."""

    likelihood: Literal["bernoulli", "categorical", "logistic_mixture"] = Field(
        "bernoulli",
        description="Pixel likelihood p(x|z_1): 'bernoulli' for binarized images; "
        "'categorical' (num_levels classes) or 'logistic_mixture' (discretized "
        "mixture of num_mixtures logistics) for grey levels, data.binarize: none.",
    )
    num_levels: int = Field(
        256, ge=2, description="Number of pixel values of the categorical likelihood."
    )
    num_mixtures: int = Field(
        5, ge=1, description="Mixture components of the logistic_mixture likelihood."
    )


class _MLPHierarchy(_PixelLikelihood):
    """Options of the built-in hierarchies of MLP blocks."""

    latent_dims: list[PositiveInt] = Field(
        default_factory=lambda: [64, 32, 16, 8, 4],
        min_length=1,
        description="Size of each stochastic layer, z_1 (next to x) first and the "
        "top layer z_L last; one entry gives a single-layer VAE.",
    )
    hidden_dims: list[PositiveInt] = Field(
        default_factory=lambda: [512, 256],
        min_length=1,
        description="Widths of the hidden layers of every deterministic MLP block.",
    )
    batch_norm: bool = Field(
        True, description="Batch normalisation in the deterministic MLP blocks."
    )
    activation: Literal["elu", "relu", "tanh", "silu"] = Field(
        "elu", description="Nonlinearity of the deterministic MLP blocks."
    )
    output_bias: Literal["default", "data_mean"] = Field(
        "default",
        description="Initial bias of the decoder's output layer: 'default' (PyTorch's "
        "initialisation) or 'data_mean' (logit of the training set's mean image, so that "
        "p(x|z_1) starts at the average image; bernoulli likelihood only).",
    )

    @model_validator(mode="after")
    def _data_mean_needs_bernoulli(self) -> "_MLPHierarchy":
        if self.output_bias == "data_mean" and self.likelihood != "bernoulli":
            raise _conflict(
                ["output_bias", "likelihood"],
                f"model.output_bias 'data_mean' sets Bernoulli logits and cannot start the "
                f"'{self.likelihood}' likelihood: set model.output_bias: default, or "
                f"model.likelihood: bernoulli with binarized data",
            )
        return self


class LadderConfig(_MLPHierarchy):
    """The ladder hierarchy (the default kind): top-down inference that shares the
    generative path with the posterior, as in 'Ladder Variational Autoencoders'."""

    kind: Literal["ladder"] = Field(
        "ladder",
        description="'ladder': the top-down hierarchy (the default when `kind` is left out).",
    )
    posterior: Literal["residual", "independent"] = Field(
        "residual",
        description="'residual': each posterior is parameterised relative to the "
        "prior of its layer (as in 'NVAE: A Deep Hierarchical Variational "
        "Autoencoder'); 'independent': posterior mean and scale predicted directly.",
    )
    flows: NonNegativeInt = Field(
        0,
        description="Inverse autoregressive flow steps applied to each posterior "
        "sample (0 = Gaussian posteriors).",
    )


class BottomUpConfig(_MLPHierarchy):
    """The naive hierarchy: the ladder's generative model with a guide that infers each
    latent layer from the one below it only (the posterior-collapse comparison)."""

    kind: Literal["bottom_up"] = Field(
        description="'bottom_up': the naive hierarchy with a bottom-up guide."
    )


class ConditionalLadderConfig(_MLPHierarchy):
    """A ladder hierarchy whose prior is conditioned on a context
    (:class:`~pyro_hvae.models.conditional.BorderLadderVAE`): with ``context: border`` it
    models ``p(x_c, z | x_b) = p(z | x_b) p(x_c | z, x_b)``, the hidden region ``x_c`` of
    ``mask`` given the observed border ``x_b``; evaluation reports ``log p(x_c | x_b)``."""

    kind: Literal["conditional_ladder"] = Field(
        description="'conditional_ladder': a ladder hierarchy conditioned on a context."
    )
    context: Literal["border"] = Field(
        "border",
        description="What the prior is conditioned on. 'border': the observed pixels around "
        "the hidden region of `mask`, encoded into a vector for every prior and posterior and "
        "into feature maps that reach the decoder at equal resolution. (Class labels are a "
        "Python-only context for now: the data pipeline yields images without labels.)",
    )
    mask: Literal["center", "left", "right", "top", "bottom"] = Field(
        "center",
        description="The hidden region, filled from the rest: 'center' the central square of "
        "half the height and width (as `pyro-hvae inpaint --mask center`), or that half of the "
        "image. The likelihood explains the hidden pixels only.",
    )
    context_channels: list[PositiveInt] = Field(
        default_factory=lambda: [16, 32, 32],
        min_length=1,
        description="Channels of the border's feature maps, finest first: the first at the "
        "image's resolution, each next one at half the one before (so the image's height and "
        "width must be divisible by 2^(entries - 1)).",
    )

    @field_validator("context", mode="before")
    @classmethod
    def _labels_are_not_loaded(cls, value: Any) -> Any:
        if value == "label":
            raise PydanticCustomError(
                "context_label",
                "'label' needs class labels, which training does not load (the data pipeline "
                "yields images only): use context: border, or condition on labels from Python "
                "with ConditionalLadderVAE and a LabelEncoder",
            )
        return value


#: Width ratio of the conv ladder's bottleneck blocks (:data:`pyro_hvae.cells.BOTTLENECK_RATIO`,
#: kept here so that reading a config needs no torch; a test checks they agree).
CONV_WIDTH_MULTIPLE = 4


class ConvLadderConfig(_PixelLikelihood):
    """The convolutional ladder (NVAE / Very Deep VAE style, :class:`~pyro_hvae.ConvLadderVAE`):
    spatial latent groups at several resolutions over one top-down state shared by model
    and guide. Every option is the constructor's argument of the same name; the checks
    that need the image size (scales that divide it) run when the model is built."""

    kind: Literal["conv_ladder"] = Field(
        description="'conv_ladder': the convolutional top-down hierarchy of spatial latent groups."
    )
    scales: list[PositiveInt] = Field(
        min_length=1,
        description="Resolutions (heights) of the latent groups, finest first: each divides "
        "the one before it and the first divides the image height, e.g. [14, 7] for 28x28 "
        "images or [16, 8, 4] for 32x32; widths follow the image's aspect ratio.",
    )
    groups_per_scale: Union[int, list[int]] = Field(
        2,
        description="Latent groups at each scale: one integer for all scales or one per "
        "scale (finest first, like scales); their sum is the number of layers L.",
    )
    latent_channels: Union[int, list[int]] = Field(
        8, description="Channels C of each group's [C, h, w] latent: one integer or one per scale."
    )
    widths: Union[int, list[int]] = Field(
        64,
        description=f"Channels of the top-down state and the encoder features: one integer or "
        f"one per scale, each a multiple of {CONV_WIDTH_MULTIPLE} (the bottleneck blocks' ratio).",
    )
    encoder_cells: PositiveInt = Field(
        1, description="NVAE encoder cells per scale on the bottom-up path."
    )
    likelihood: Literal["bernoulli", "categorical", "logistic_mixture", "coupled_logistic_mixture"] = Field(
        "bernoulli",
        description="Pixel likelihood p(x|z_1): 'bernoulli' for binarized images; for 8-bit "
        "images (data.binarize: none) 'categorical' (num_levels classes), 'logistic_mixture' "
        "(num_mixtures logistics per channel value) or 'coupled_logistic_mixture' (num_mixtures "
        "logistics per pixel, colour channels coupled as in PixelCNN++).",
    )

    @field_validator("scales")
    @classmethod
    def _finest_first(cls, scales: list[int]) -> list[int]:
        if any(fine <= coarse for fine, coarse in zip(scales, scales[1:])):
            raise PydanticCustomError(
                "scales_order",
                "scales must be strictly decreasing (finest first, like z_1 .. z_L), e.g. [14, 7] for 28x28 images",
            )
        return scales

    @field_validator("groups_per_scale", "latent_channels", "widths", mode="wrap")
    @classmethod
    def _one_per_scale(cls, value: Any, handler, info) -> int | list[int]:
        try:
            value = handler(value)
        except ValidationError:  # one line, not one per member of the union
            raise PydanticCustomError(
                "per_scale", "expected an integer or a list of integers (one per scale, finest first)"
            ) from None
        values = value if isinstance(value, list) else [value]
        fix = {
            "groups_per_scale": "give every scale at least one latent group",
            "latent_channels": "give every group at least one channel",
            "widths": "e.g. 32 or 64",
        }[info.field_name]
        if any(v < 1 for v in values):
            raise PydanticCustomError("per_scale", "must be positive integers; {fix}", {"fix": fix})
        scales = info.data.get("scales")
        if isinstance(value, list) and scales is not None and len(value) != len(scales):
            raise PydanticCustomError(
                "per_scale",
                "has {n} entries but model.scales has {m}; give one per scale (finest first) or a single integer",
                {"n": len(value), "m": len(scales)},
            )
        if info.field_name == "widths" and any(v % CONV_WIDTH_MULTIPLE for v in values):
            raise PydanticCustomError(
                "per_scale",
                "must be multiples of {k} (the bottleneck blocks use width // {k} middle channels); {fix}",
                {"k": CONV_WIDTH_MULTIPLE, "fix": fix},
            )
        return value


#: A dotted import path ``package.module.Name`` or a file ``path/to/file.py:Name``.
_CLASS_PATH = re.compile(r"^(?:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+|[^:]+\.py:[A-Za-z_]\w*)$")


class CustomModelConfig(_ModelSection):
    """A hierarchy of your own, built by calling the class or function that class_path
    names with init_args (see the tutorial 'Writing a hierarchy of your own')."""

    kind: Literal["custom"] = Field(description="'custom': a user-written hierarchy.")
    class_path: str = Field(
        description="What builds the hierarchy: a class or function, as a dotted "
        "import path `package.module.Name` (importable from the working directory "
        "or the Python path) or as `path/to/file.py:Name` (a relative file is taken "
        "from the working directory and stored absolute). It is called with "
        "`init_args`, plus `data_shape` (e.g. (1, 28, 28)) when it has a parameter "
        "of that name, and must return an nn.Module with `model(x)` and `guide(x)`.",
    )
    init_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of `class_path` (YAML values).",
    )

    @field_validator("class_path")
    @classmethod
    def _import_path_or_file(cls, value: str) -> str:
        """Check the form; a relative file is taken from the working directory now, so
        that the run folder's copy of the config finds it from anywhere."""
        if not _CLASS_PATH.match(value):
            raise PydanticCustomError(
                "class_path",
                "expected a dotted import path like my_package.my_module.MyVAE or a "
                "file and name like path/to/file.py:MyVAE",
            )
        file, sep, name = value.rpartition(":")
        if sep and file.endswith(".py") and not Path(file).expanduser().is_absolute():
            return f"{Path.cwd() / file}:{name}"
        return value


#: The configuration of each kind of hierarchy; adding a kind adds its class here
#: (and its builder to :func:`pyro_hvae.models.build.build_model`).
MODEL_KINDS: tuple[type[_ModelSection], ...] = (
    LadderConfig, BottomUpConfig, ConditionalLadderConfig, ConvLadderConfig, CustomModelConfig
)


def _kind_of(value: Any) -> str | None:
    """The kind of a model section; ``ladder`` when left out."""
    if isinstance(value, dict):
        return value.get("kind", "ladder")
    return getattr(value, "kind", None)


#: The ``model`` section: one of :data:`MODEL_KINDS`, chosen by its ``kind``.
ModelConfig = Annotated[
    Union[tuple(Annotated[kind, Tag(kind.model_fields["kind"].annotation.__args__[0])] for kind in MODEL_KINDS)],
    Discriminator(_kind_of),
]


class SpectralRegConfig(_Section):
    """Spectral regularization (NVAE): ``lambda(t) (sum_i sigma_max(W_i) + sum_j |gamma_j|_1)``
    over every convolution and linear layer ``W_i`` and batch-norm scale ``gamma_j`` of the
    hierarchy, added to the per-image loss; ``lambda(t)`` goes linearly from ``initial`` to
    ``weight`` over ``steps`` steps (see :mod:`pyro_hvae.spectral`)."""

    weight: NonNegativeFloat = Field(
        description="lambda: the penalty's weight (after `steps` steps when `initial` is set); "
        "0 with no `initial` = off. (Not `lambda`, a Python keyword.)",
    )
    initial: Optional[NonNegativeFloat] = Field(
        None,
        description="lambda at step 0, moving linearly to `weight` at step `steps` "
        "(null = `weight` from the start). Larger than `weight`: a strong pull early.",
    )
    steps: NonNegativeInt = Field(
        0, description="Steps over which lambda goes from `initial` to `weight`."
    )
    iterations: PositiveInt = Field(
        1,
        description="Power-iteration steps per training step that estimate each sigma_max "
        "(20 at the first step, from random vectors; the vectors are kept in last.pt).",
    )

    @property
    def enabled(self) -> bool:
        return self.weight > 0 or bool(self.initial)


class TrainConfig(_Section):
    """Objective, schedule, stabilisation and bookkeeping of training."""

    steps: PositiveInt = Field(20000, description="Number of optimiser steps.")
    elbo: Literal["analytic", "monte_carlo"] = Field(
        "analytic",
        description="KL terms of the ELBO computed in closed form where possible "
        "('analytic') or estimated from the posterior samples ('monte_carlo').",
    )
    num_particles: PositiveInt = Field(
        1, description="Posterior samples per data point in the training ELBO."
    )
    kl_warmup_steps: NonNegativeInt = Field(
        0,
        description="Steps over which the weight of the KL terms rises linearly "
        "from 0 to 1 (0 = full weight from the start).",
    )
    free_bits: NonNegativeFloat = Field(
        0.0,
        description="Minimum KL in nats per latent layer (batch mean) below which "
        "its KL term is not penalised (0 = off).",
    )
    kl_balancing: bool = Field(
        False,
        description="During KL warm-up (beta < 1), weight each latent group's KL term by "
        "gamma_l, proportional to its batch-mean KL per latent unit and averaging 1 over "
        "groups, so that groups with little KL are penalised less (NVAE's KL balancing; "
        "logged as `kl_balance`). No effect after warm-up.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the conv ladder's cells in the backward pass instead of "
        "storing their activations: less memory, about a third more compute, the same "
        "loss and gradients (model.kind: conv_ladder only).",
    )
    channels_last: bool = Field(
        False,
        description="Keep the weights and the training batches in channels-last memory "
        "format (often faster convolutions on GPUs); the same model.",
    )
    sync_batch_norm: bool = Field(
        False,
        description="Under torchrun, normalize with the batch statistics of the global batch "
        "(torch.nn.SyncBatchNorm over the processes) instead of each process's share; CUDA "
        "devices only: refused on CPU (PyTorch synchronizes no CPU tensors). No effect in one process on a GPU.",
    )
    bf16_autocast: bool = Field(
        False,
        description="Compute the training loss under bfloat16 autocast (CUDA devices "
        "only; refused on CPU). Evaluation stays float32.",
    )
    grad_clip: Optional[PositiveFloat] = Field(
        200.0,
        description="Clip the global norm of the gradient of the per-image loss "
        "(nats per image) to this value (null = off).",
    )
    skip_factor: Optional[PositiveFloat] = Field(
        10.0,
        description="Skip an update whose gradient norm is non-finite or larger "
        "than skip_factor times its running median (null = never skip).",
    )
    ema_decay: Optional[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        None,
        description="Decay in (0, 1) of an exponential moving average of the "
        "parameters used for evaluation (null = evaluate the raw parameters).",
    )
    log_every: PositiveInt = Field(50, description="Steps between log lines.")
    eval_every: PositiveInt = Field(
        1000, description="Steps between evaluations on the validation set."
    )
    val_num_samples: NonNegativeInt = Field(
        0,
        description="Importance samples K of a cheap importance-weighted bound on "
        "the validation set at each evaluation (0 = ELBO only).",
    )
    early_stopping_patience: Optional[PositiveInt] = Field(
        None,
        description="Stop after this many evaluations without a validation "
        "improvement (null = train for all steps).",
    )
    checkpoint_every: PositiveInt = Field(
        1000, description="Steps between checkpoints of the run."
    )
    max_minutes: Optional[PositiveFloat] = Field(
        None,
        description="Wall-clock budget of training in minutes, evaluations included and "
        "counted over resumes (`elapsed_s` in the records): once spent, training stops "
        "after one last validation evaluation, so that best.pt is chosen among all the "
        "weights trained, and a checkpoint (null = no limit). The learning-rate schedule "
        "still spans train.steps: set train.steps to about what fits the budget for a "
        "schedule that ends with it.",
    )
    spectral_reg: Optional[SpectralRegConfig] = Field(
        None,
        description="Spectral regularization of every layer, a mapping {weight, initial, "
        "steps, iterations} (null = off). Its value per image is logged as `spectral_reg`.",
    )


class OptimConfig(_Section):
    """Optimiser and learning-rate schedule."""

    name: Literal["adam", "adamax", "adamw"] = Field(
        "adamax", description="Optimiser (torch.optim.Adam, Adamax or AdamW)."
    )
    lr: PositiveFloat = Field(2e-3, description="Peak learning rate.")
    weight_decay: NonNegativeFloat = Field(0.0, description="Weight decay.")
    betas: tuple[
        Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]
    ] = Field((0.9, 0.999), description="Moment decay rates of the optimiser.")
    warmup_steps: NonNegativeInt = Field(
        100, description="Steps of linear learning-rate warm-up from 0 to lr."
    )
    min_lr: NonNegativeFloat = Field(
        1e-4,
        description="Learning rate reached at the last step: after warm-up the "
        "rate follows a cosine decay from lr to min_lr over train.steps.",
    )


class EvalConfig(_Section):
    """Importance-weighted evaluation by `pyro-hvae evaluate`."""

    num_samples: PositiveInt = Field(
        1000,
        description="Importance samples K per image of the log-likelihood estimate.",
    )
    chunk_size: Optional[PositiveInt] = Field(
        None,
        description="Importance samples drawn per forward pass, bounding memory. "
        "null: the largest number whose tensors fit in 1 GiB on the CPU, or in half "
        "the free memory of a CUDA device, measured on the first batch (at most K); "
        "`pyro-hvae evaluate --chunk-size` overrides it.",
    )
    batch_size: PositiveInt = Field(100, description="Images per evaluation batch.")
    split: Literal["test", "val"] = Field(
        "test", description="Held-out split to evaluate."
    )


class Config(_Section):
    """Everything that defines a run."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    name: str = Field(
        "run",
        pattern=r"^[\w.-]+$",
        description="Prefix of the run folder name (letters, digits, '_', '-', '.').",
    )
    seed: int = Field(
        0,
        description="Seed of parameter initialisation, sampling and batch order.",
    )
    device: Literal["cpu", "cuda", "auto"] = Field(
        "auto", description="Torch device; 'auto' picks cuda when it is available."
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Data options.")
    model: ModelConfig = Field(
        default_factory=LadderConfig,
        description="Architecture options, by `kind` (all of them fixed once a run starts).",
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="Training options."
    )
    optim: OptimConfig = Field(
        default_factory=OptimConfig, description="Optimiser options."
    )
    eval: EvalConfig = Field(
        default_factory=EvalConfig, description="Evaluation options."
    )

    @model_validator(mode="after")
    def _likelihood_fits_pixels(self) -> "Config":
        if not isinstance(self.model, _PixelLikelihood):  # a custom hierarchy's own business
            return self
        likelihood, binarize = self.model.likelihood, self.data.binarize
        if likelihood == "bernoulli" and binarize == "none":
            raise _conflict(
                ["model.likelihood", "data.binarize"],
                "model.likelihood 'bernoulli' needs binary pixels but data.binarize "
                "is 'none': choose model.likelihood: logistic_mixture or categorical "
                "for grey levels, or set data.binarize: dynamic or threshold",
            )
        if likelihood != "bernoulli" and binarize != "none":
            raise _conflict(
                ["data.binarize", "model.likelihood"],
                f"model.likelihood '{likelihood}' models 8-bit grey levels but "
                f"data.binarize is '{binarize}': set data.binarize: none, or use "
                f"model.likelihood: bernoulli for binarized pixels",
            )
        return self


#: Dotted names of the options that fix the shapes of the model's parameters (the
#: options of every kind); a resumed run may not change them.
ARCHITECTURE_FIELDS: tuple[str, ...] = (
    "data.dataset",
    "data.image_size",
    "data.channels",
    *dict.fromkeys(f"model.{name}" for kind in MODEL_KINDS for name in kind.model_fields),
)


#: Dotted names of the options that fix the stream of training batches (which images,
#: in which batches, binarized how); a resumed run may not change them either.
DATA_STREAM_FIELDS: tuple[str, ...] = tuple(
    f"data.{name}"
    for name in ("val_size", "split_seed", "batch_size", "binarize", "binarize_seed", "threshold", "resize")
)


def _changes(old: Config, new: Config, fields: Sequence[str]) -> list[str]:
    def value(cfg: Config, dotted: str) -> Any:
        section, name = dotted.split(".")
        return getattr(getattr(cfg, section), name, None)  # None: not an option of this kind

    return [f for f in fields if value(old, f) != value(new, f)]


def architecture_changes(old: Config, new: Config) -> list[str]:
    """Dotted names from :data:`ARCHITECTURE_FIELDS` whose values differ; between
    models of different kinds, ``model.kind`` alone stands for the whole section."""
    changes = _changes(old, new, ARCHITECTURE_FIELDS)
    if old.model.kind != new.model.kind:
        changes = [f for f in changes if not f.startswith("model.") or f == "model.kind"]
    return changes


def data_stream_changes(old: Config, new: Config) -> list[str]:
    """Dotted names from :data:`DATA_STREAM_FIELDS` whose values differ."""
    return _changes(old, new, DATA_STREAM_FIELDS)


# ---------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------

_FLOAT_TAG = "tag:yaml.org,2002:float"

# YAML 1.1 (PyYAML) only reads a float when it has a dot, so `3e-4` would be the
# string "3e-4"; this pattern also accepts exponents without a dot or sign.
_FLOAT_PATTERN = re.compile(
    r"""^[-+]?(?:
        [0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
      | \.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
      | [0-9][0-9_]*[eE][-+]?[0-9]+
      | \.(?:inf|Inf|INF)
      | \.(?:nan|NaN|NAN)
    )$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """Safe YAML loader whose floats include `1e-3`, `3E-4`, `1.5e3` and `.5`."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != _FLOAT_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_PATTERN, list("-+0123456789."))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A one-line description of a YAML syntax error."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + " ".join(problem.split())


class _Dumper(yaml.SafeDumper):
    """Safe YAML dumper writing sections as blocks and lists inline (``[64, 32]``)."""


_Dumper.add_representer(
    list,
    lambda dumper, value: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", value, flow_style=True
    ),
)


def dump_config(cfg: Config) -> str:
    """The configuration as YAML text that :func:`load_config` reads back equal."""
    return yaml.dump(cfg.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False)


# ---------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _parse_item(item: str) -> tuple[tuple[str, ...], Any]:
    """Split one ``KEY=VALUE`` override into its key path and YAML value."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep:
        raise ValueError(
            f"override '{item}' is not KEY=VALUE (e.g. optim.lr=3e-4 or "
            f"model.latent_dims=[32,16,8])"
        )
    if not _KEY.match(key):
        raise ValueError(
            f"override '{item}': '{key}' is not a dotted option name like optim.lr"
        )
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ValueError(
            f"override '{item}': value is not valid YAML ({_yaml_problem(err)})"
        ) from None
    return tuple(key.split(".")), value


def _parse_items(items: Sequence[str]) -> list[tuple[tuple[str, ...], Any, str]]:
    """Parse every override, raising one ConfigError listing all malformed ones."""
    parsed, errors = [], []
    for item in items:
        try:
            path, value = _parse_item(item)
        except ValueError as err:
            errors.append(str(err))
        else:
            parsed.append((path, value, item))
    if errors:
        raise ConfigError(errors)
    return parsed


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """Set ``tree[path]``, creating (or replacing non-mapping) parents.

    A mapping value is merged into an existing mapping rather than replacing
    it, so ``model={kind: bottom_up}`` keeps the other model options.
    """
    for key in path[:-1]:
        if not isinstance(tree.get(key), dict):
            tree[key] = {}
        tree = tree[key]
    last = path[-1]
    if isinstance(value, dict) and isinstance(tree.get(last), dict):
        for key, sub in value.items():
            _set(tree[last], (key,), sub)
    else:
        tree[last] = value


def _leaves(path: tuple[str, ...], value: Any) -> list[tuple[str, ...]]:
    """Key paths of the values an override sets (a mapping sets each entry)."""
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in _leaves((*path, str(k)), v)]
    return [path]


def parse_overrides(items: Sequence[str]) -> dict:
    """Turn ``["optim.lr=3e-4", "model.latent_dims=[32,16]"]`` into nested dicts.

    Values are parsed as YAML (so ``null``, lists and mappings work); later
    items win over earlier ones. Raises :class:`ConfigError` listing every
    malformed item.
    """
    tree: dict = {}
    for path, value, _ in _parse_items(items):
        _set(tree, path, value)
    return tree


# ---------------------------------------------------------------------------
# Loading and error reporting
# ---------------------------------------------------------------------------


class _Origins:
    """Where each configuration value came from: the file, an override, or defaults."""

    def __init__(self, file: str | None, file_tree: dict):
        self.file = file
        self.file_tree = file_tree
        self.overrides: dict[tuple[str, ...], str] = {}

    def _explicit(self, loc: tuple) -> str | None:
        # The override that set this value or a mapping around it, else one
        # that set something inside it (an unknown section, say).
        for n in range(len(loc), 0, -1):
            if loc[:n] in self.overrides:
                return f"override '{self.overrides[loc[:n]]}'"
        for path, item in self.overrides.items():
            if loc and path[: len(loc)] == loc:
                return f"override '{item}'"
        node: Any = self.file_tree
        for key in loc:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return self.file

    def _fallback(self) -> str:
        """The origin of values nobody set explicitly."""
        return self.file or "defaults"

    def of(self, loc: tuple) -> str:
        """Origin of the value at ``loc``."""
        return self._explicit(loc) or self._fallback()

    def of_all(self, locs: Sequence[tuple]) -> str:
        """Origins of the explicitly set values among ``locs``."""
        found = [o for o in map(self._explicit, locs) if o]
        return " and ".join(dict.fromkeys(found)) or self._fallback()


def _dotted(loc: Sequence[str | int]) -> str:
    """``("model", "latent_dims", 1)`` -> ``"model.latent_dims[1]"``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "<config>"


def _kinds(annotation: Any) -> dict[str, type[BaseModel]] | None:
    """``{tag: section}`` of a union of sections discriminated by ``kind``, else None."""
    if get_origin(annotation) is not Union:
        return None
    members = [get_args(a)[0] if get_origin(a) is Annotated else a for a in get_args(annotation)]
    if not all(isinstance(m, type) and issubclass(m, BaseModel) and "kind" in m.model_fields for m in members):
        return None
    return {get_args(m.model_fields["kind"].annotation)[0]: m for m in members}


def _optional_section(annotation: Any) -> type[BaseModel] | None:
    """The section of an option typed ``Section`` or ``Optional[Section]``, else None."""
    if get_origin(annotation) is Union:
        members = [a for a in get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _walk(loc: Sequence[str | int]) -> tuple[tuple[str | int, ...], type[BaseModel] | None]:
    """``loc`` without the union tags pydantic inserts (``("model", "custom", "x")`` is
    ``model.x``), and the section at its end (None when it ends at an option)."""
    shown: list[str | int] = []
    model: type[BaseModel] | None = Config
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        shown.append(part)
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        annotation = field.annotation if field else None
        kinds = _kinds(annotation)
        if kinds is not None and parts and parts[0] in kinds:
            model = kinds[parts.pop(0)]
        else:
            model = _optional_section(annotation)
    return tuple(shown), model


def _message(error: Mapping[str, Any]) -> str:
    """Readable text of one pydantic error (without its location)."""
    loc = error["loc"]
    if error["type"] == "extra_forbidden":
        _, section = _walk(loc[:-1])
        if section is None:
            return "unknown option"
        options = list(section.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), options, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        kind = section.model_fields.get("kind")
        of_kind = f" of kind '{get_args(kind.annotation)[0]}'" if kind and get_origin(kind.annotation) is Literal else ""
        return f"unknown option{of_kind}{hint} (valid here: {', '.join(options)})"
    if error["type"] == "union_tag_invalid":
        *tags, last = error["ctx"]["expected_tags"].split(", ")
        return f"Input should be {', '.join(tags)} or {last}, got {error['ctx']['tag']!r}"
    if error["type"] == "union_tag_not_found":
        return f"expected a mapping of options, got {error.get('input')!r}"
    message = error["msg"]
    value = error.get("input")
    if error["type"] != "missing" and not isinstance(value, dict) and len(repr(value)) <= 80:
        message += f", got {value!r}"
    return message


def _validation_errors(err: ValidationError, origins: _Origins) -> list[str]:
    """One line per pydantic error: dotted path, message and origin."""
    lines = []
    for error in err.errors(include_url=False):
        loc, _ = _walk(error["loc"])
        if error["type"] == "union_tag_invalid":  # an unknown kind
            loc = (*loc, "kind")
        if error["type"] == _CONFLICT:
            fields = [(*loc, *f.split(".")) for f in error["ctx"]["fields"]]
            where, origin, message = fields[0], origins.of_all(fields), error["msg"]
        else:
            where, origin, message = loc, origins.of(loc), _message(error)
        lines.append(f"{_dotted(where)}: {message} (from {origin})")
    return lines


def _read_file(path: Path) -> dict:
    """The top-level mapping of a YAML config file (empty file = empty mapping)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a folder, not a config file"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: cannot read config file (not UTF-8 text)"]) from None
    except OSError as err:
        raise ConfigError([f"{path}: cannot read config file ({err.strerror})"]) from None
    return _parse_tree(text, str(path))


def _parse_tree(text: str, source: str) -> dict:
    """The top-level mapping of config YAML text (empty text = empty mapping)."""
    try:
        tree = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError([f"{source}: invalid YAML at {_yaml_problem(err)}"]) from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(
            [
                f"{source}: expected a mapping of sections (data, model, train, optim, "
                f"eval, ...) at the top level, got a {type(tree).__name__}"
            ]
        )
    return tree


def _validate(tree: dict, origins: _Origins) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_validation_errors(err, origins)) from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``KEY=VALUE`` overrides and validate.

    ``path`` None starts from the defaults. Override keys are dotted paths into
    the sections (``optim.lr=3e-4``, ``train.ema_decay=null``,
    ``model.latent_dims=[32,16,8]``) and their values are parsed as YAML with
    the same float rules as the file. Raises :class:`ConfigError` listing every
    problem, each with the dotted path of the option and where its value came
    from.
    """
    file_tree = {} if path is None else _read_file(Path(path))
    origins = _Origins(None if path is None else str(path), file_tree)
    tree = copy.deepcopy(file_tree)
    for key_path, value, item in _parse_items(overrides):
        _set(tree, key_path, value)
        for leaf in _leaves(key_path, value):
            origins.overrides[leaf] = item
    return _validate(tree, origins)


def config_from_yaml(text: str, source: str) -> Config:
    """Validate configuration YAML text, e.g. the ``config`` stored in a checkpoint.

    ``source`` names the text in error messages. Raises :class:`ConfigError` like
    :func:`load_config`.
    """
    tree = _parse_tree(text, source)
    return _validate(tree, _Origins(source, tree))
