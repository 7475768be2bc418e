import os
from pathlib import Path

import pyro
import pytest
import torch

#: Real data beside the checkout (``../shared/data``), or wherever $PYRO_HVAE_DATA points.
SHARED_DATA = Path(os.environ.get("PYRO_HVAE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def fresh_pyro():
    """Every test starts with Pyro's validation on, an empty param store and seed 0."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.settings.set(module_local_params=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks run fastest on one thread, and far faster than on two when the cores are busy:
    a module uses it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"real MNIST not found under {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def tiny(data_root, tmp_path) -> Path:
    """A tiny config file naming the real MNIST folder; a test adds the rest as overrides."""
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny\ndata:\n  root: {data_root}\n")
    return config


@pytest.fixture
def strokes(tmp_path) -> Path:
    """80 random 6x6 black-and-white images as an npz file (``data.dataset=npz``); its test split is the first 8."""
    import numpy as np

    images = (np.random.default_rng(0).random((80, 6, 6)) < 0.3).astype(np.uint8) * 255
    path = tmp_path / "strokes.npz"
    np.savez(path, train=images, test=images[:8])
    return path


@pytest.fixture(scope="session")
def mnist_binary(data_root) -> torch.Tensor:
    """The first 512 real MNIST training digits, binarized once with a fixed seed: [512, 1, 28, 28]."""
    import torchvision

    images = torchvision.datasets.MNIST(data_root, train=True, download=False).data[:512]
    generator = torch.Generator().manual_seed(0)
    return torch.bernoulli(images.float().div(255).unsqueeze(1), generator=generator)
