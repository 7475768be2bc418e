"""User-written hierarchies: `model.kind: custom` from config to train, resume and evaluate."""

import itertools
import json
import textwrap

import pytest
import torch

from pyro_hvae import BottomUpVAE, LadderVAE
from pyro_hvae.config import ConfigError, CustomModelConfig, architecture_changes, config_from_yaml, load_config
from pyro_hvae.models.build import build_hierarchy, build_model
from pyro_hvae.models.protocol import HierarchyError, inspect_hierarchy
from clirun import run

#: A user's module: a two-level top-down hierarchy as a plain nn.Module (no
#: pyro_hvae base class), a builder function, and things that are not hierarchies.
SOURCE = textwrap.dedent(
    """
    import pyro
    import pyro.distributions as dist
    from torch import nn

    from pyro_hvae import Bernoulli, ConditionalNormal, FeatureNet, MLP


    class TwoLevel(nn.Module):
        def __init__(self, data_shape, width=32, dims=(6, 3)):
            super().__init__()
            self.data_shape, self.width, self.dims = tuple(data_shape), width, tuple(dims)
            d1, d2 = dims
            pixels = 1
            for size in data_shape:
                pixels *= size
            self.p_z1 = ConditionalNormal(d2, [width], d1)
            self.decoder = MLP(d1, [width], pixels)
            self.up = FeatureNet(pixels, [width])
            self.q_z2 = ConditionalNormal(width, [], d2)
            self.q_z1 = ConditionalNormal(width + d2, [], d1)
            self.likelihood = Bernoulli()

        def model(self, x):
            with pyro.plate("data", x.shape[0]):
                z2 = pyro.sample("z_2", dist.Normal(x.new_zeros(x.shape[0], self.dims[1]), 1.0).to_event(1))
                z1 = pyro.sample("z_1", self.p_z1(z2))
                pyro.sample("x", self.likelihood.distribution(self.decoder(z1), self.data_shape), obs=x)

        def guide(self, x):
            r = self.up(x.flatten(1))
            with pyro.plate("data", x.shape[0]):
                z2 = pyro.sample("z_2", self.q_z2(r))
                pyro.sample("z_1", self.q_z1(r, z2))


    class BottomUpOrder(TwoLevel):
        def guide(self, x):
            r = self.up(x.flatten(1))
            with pyro.plate("data", x.shape[0]):
                z1 = pyro.sample("z_1", dist.Normal(r[:, : self.dims[0]], 1.0).to_event(1))
                pyro.sample("z_2", dist.Normal(z1[:, : self.dims[1]], 1.0).to_event(1))


    class Renamed(TwoLevel):
        data_plate, observed_site, latent_sites = "images", "pixels", ["z_1"]

        def model(self, x):
            with pyro.plate("images", x.shape[0]):
                z2 = pyro.sample("z_2", dist.Normal(x.new_zeros(x.shape[0], self.dims[1]), 1.0).to_event(1))
                z1 = pyro.sample("z_1", self.p_z1(z2))
                pyro.sample("pixels", self.likelihood.distribution(self.decoder(z1), self.data_shape), obs=x)

        def guide(self, x):
            r = self.up(x.flatten(1))
            with pyro.plate("images", x.shape[0]):
                z2 = pyro.sample("z_2", self.q_z2(r))
                pyro.sample("z_1", self.q_z1(r, z2))


    class NoPlate(TwoLevel):
        def model(self, x):
            z2 = pyro.sample("z_2", dist.Normal(x.new_zeros(x.shape[0], self.dims[1]), 1.0).to_event(1))
            z1 = pyro.sample("z_1", self.p_z1(z2))
            pyro.sample("x", self.likelihood.distribution(self.decoder(z1), self.data_shape), obs=x)

        def guide(self, x):
            r = self.up(x.flatten(1))
            z2 = pyro.sample("z_2", self.q_z2(r))
            pyro.sample("z_1", self.q_z1(r, z2))


    def build(width=16):
        return TwoLevel((1, 28, 28), width=width)


    def returns_a_dict(data_shape):
        return {"model": None, "guide": None}


    class NoGuide(nn.Module):
        def model(self, x):
            pass


    NOT_CALLABLE = 3
    """
)

_names = itertools.count()


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The name of a fresh importable module holding SOURCE (a new name per test:
    imported modules are cached)."""
    name = f"user_hierarchies_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def custom(class_path, **init_args) -> CustomModelConfig:
    return CustomModelConfig(kind="custom", class_path=class_path, init_args=init_args)


def images(n=4):
    return (torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1)) < 0.3).float()


# --- building -----------------------------------------------------------------


def test_dotted_class_path_gets_init_args_and_the_data_shape(user_module):
    vae = build_model(custom(f"{user_module}.TwoLevel", width=24, dims=[5, 2]), (1, 28, 28))
    assert type(vae).__name__ == "TwoLevel" and type(vae).__module__ == user_module
    assert (vae.width, vae.dims, vae.data_shape) == (24, (5, 2), (1, 28, 28))
    assert vae.up.out_features == 24 and vae.decoder(torch.zeros(1, 5)).shape == (1, 784)


def test_file_path_relative_to_the_working_directory_is_stored_absolute(tmp_path, monkeypatch):
    (tmp_path / "hier.py").write_text(SOURCE)
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  kind: custom\n  class_path: hier.py:TwoLevel\n  init_args: {width: 8}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(config)
    assert cfg.model.class_path == f"{tmp_path / 'hier.py'}:TwoLevel"
    monkeypatch.chdir("/")  # the stored path works from anywhere
    vae = build_model(cfg.model, (1, 28, 28))
    assert vae.width == 8


def test_builder_function_without_data_shape_parameter(user_module):
    vae = build_model(custom(f"{user_module}.build", width=12), (1, 28, 28))
    assert type(vae).__name__ == "TwoLevel" and vae.width == 12


# --- the protocol -------------------------------------------------------------


def test_protocol_defaults_are_read_from_a_trace(user_module):
    vae, hierarchy = build_hierarchy(custom(f"{user_module}.TwoLevel"), (1, 28, 28), images())
    assert hierarchy.data_plate == "data" and hierarchy.observed_site == "x"
    assert hierarchy.latent_sites == ("z_1", "z_2")  # bottom first: the model samples z_2 first
    assert hierarchy.analytic_kl is True  # the guide samples in the model's order
    _, hierarchy = build_hierarchy(custom(f"{user_module}.BottomUpOrder"), (1, 28, 28), images())
    assert hierarchy.analytic_kl is False


def test_declared_names_win(user_module):
    _, hierarchy = build_hierarchy(custom(f"{user_module}.Renamed"), (1, 28, 28), images())
    assert (hierarchy.data_plate, hierarchy.observed_site, hierarchy.latent_sites) == ("images", "pixels", ("z_1",))


def test_built_in_hierarchies_follow_the_same_protocol():
    ladder = inspect_hierarchy(LadderVAE((1, 28, 28), [6, 3], [16]), images())
    bottom_up = inspect_hierarchy(BottomUpVAE((1, 28, 28), [6, 3], [16]), images())
    for hierarchy in (ladder, bottom_up):
        assert (hierarchy.data_plate, hierarchy.observed_site, hierarchy.latent_sites) == ("data", "x", ("z_1", "z_2"))
    assert ladder.analytic_kl and not bottom_up.analytic_kl


def test_inspection_leaves_random_state_and_weights_alone(user_module):
    vae = build_model(custom(f"{user_module}.TwoLevel"), (1, 28, 28))
    vae.train()
    weights = {k: v.clone() for k, v in vae.state_dict().items()}
    state = torch.get_rng_state()
    inspect_hierarchy(vae, images())
    assert torch.equal(torch.get_rng_state(), state) and vae.training
    for name, value in vae.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_a_model_without_the_data_plate_is_refused(user_module):
    vae = build_model(custom(f"{user_module}.NoPlate"), (1, 28, 28))
    with pytest.raises(HierarchyError, match="no sample site of its model lies in a plate named 'data'"):
        inspect_hierarchy(vae, images())


# --- the command line ---------------------------------------------------------

TINY = [
    "data.batch_size=32",
    "data.val_size=64",
    "data.eval_batch_size=64",
    "train.log_every=10",
    "train.eval_every=10",
    "train.checkpoint_every=10",
    "optim.warmup_steps=5",
    "eval.num_samples=8",
    "eval.batch_size=50",
]



def test_train_resume_evaluate_a_custom_hierarchy(user_module, data_root, tmp_path):
    config = tmp_path / "custom.yaml"
    config.write_text(
        f"name: mine\ndata:\n  root: {data_root}\n"
        f"model:\n  kind: custom\n  class_path: {user_module}.TwoLevel\n  init_args: {{width: 24, dims: [6, 3]}}\n"
    )
    out = tmp_path / "run"
    result = run("train", config, *TINY, "train.steps=20", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    stored = load_config(out / "config.yaml")
    assert stored.model == custom(f"{user_module}.TwoLevel", width=24, dims=[6, 3])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(records[0]["kl"]) == {"z_1", "z_2"}
    assert len(list((out / "images").glob("samples_*.png"))) == 2

    result = run("train", "--resume", out, "train.steps=30", "--device", "cpu")
    assert result.exit_code == 0, result.output
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["step"] == 30
    # the checkpoint alone rebuilds the hierarchy: its stored config names the class and arguments
    cfg = config_from_yaml(last["config"], "last.pt")
    vae = build_model(cfg.model, (1, 28, 28))
    vae.load_state_dict(last["model"])
    assert type(vae).__name__ == "TwoLevel" and vae.width == 24

    result = run("evaluate", out, "--device", "cpu", "--split", "val")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "eval-val-K8" / "results.json").read_text())
    assert results["num_images"] == 64 and results["step"] == 30
    assert list(results["kl_per_layer"]) == ["z_1", "z_2"]
    assert [results["active_units"][name][1] for name in ("z_1", "z_2")] == [6, 3]
    assert results["log_likelihood"] >= results["elbo"] - 1.0  # the K = 8 bound is no looser on average


BAD = {
    "unimportable module": ("no_such_package_xyz.Model", {}, "cannot import module 'no_such_package_xyz'"),
    "missing attribute": ("{m}.Missing", {}, "defines no 'Missing'"),
    "not callable": ("{m}.NOT_CALLABLE", {}, "is an object of type int, not a class or function"),
    "wrong return type": ("{m}.returns_a_dict", {}, "returned a dict, not a torch.nn.Module"),
    "no guide": ("{m}.NoGuide", {}, "returned a NoGuide without a callable guide"),
    "no data plate": ("{m}.NoPlate", {}, "no sample site of its model lies in a plate named 'data'"),
    "unknown init_args": ("{m}.TwoLevel", {"depth": 3}, "model.init_args: "),
    "init_args the class rejects": ("{m}.TwoLevel", {"width": -1}, "model.init_args: "),
    "data_shape in init_args": ("{m}.TwoLevel", {"data_shape": [1, 2]}, "model.init_args.data_shape: "),
    "missing file": ("missing_file.py:TwoLevel", {}, "missing_file.py not found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_custom_hierarchies_exit_2_with_one_line_and_write_nothing(case, user_module, data_root, tmp_path):
    class_path, init_args, expected = BAD[case]
    config = tmp_path / "bad.yaml"
    config.write_text(
        f"data:\n  root: {data_root}\n  val_size: 64\n"
        f"model:\n  kind: custom\n  class_path: {class_path.format(m=user_module)}\n  init_args: {json.dumps(init_args)}\n"
    )
    out = tmp_path / "run"
    result = run("train", config, "train.steps=5", "--out", out, "--device", "cpu")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert not out.exists()


def test_build_errors_are_config_errors_naming_the_option(user_module):
    with pytest.raises(ConfigError) as info:
        build_model(custom(f"{user_module}.TwoLevel", depth=3), (1, 28, 28))
    (line,) = info.value.errors
    assert line.startswith("model.init_args: ") and "depth" in line


def test_each_kind_lists_only_its_options_and_resume_guards_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  kind: custom\n  class_path: pkg.mod.VAE\n  latent_dims: [4]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (line,) = info.value.errors
    assert line.startswith("model.latent_dims: unknown option of kind 'custom'") and "class_path, init_args" in line
    with pytest.raises(ConfigError, match=r"model.kind: Input should be 'ladder', 'bottom_up', 'conditional_ladder', 'conv_ladder' or 'custom', got 'conv'"):
        load_config(None, ["model.kind=conv"])
    old = load_config(None, ["model.kind=custom", "model.class_path=pkg.mod.VAE", "model.init_args={width: 8}"])
    new = load_config(None, ["model.kind=custom", "model.class_path=pkg.mod.VAE", "model.init_args={width: 16}"])
    assert architecture_changes(old, new) == ["model.init_args"]
    assert architecture_changes(old, load_config(None)) == ["model.kind"]


def test_a_class_changed_since_training_is_refused_with_one_line(data_root, tmp_path):
    source = tmp_path / "hier.py"
    source.write_text(SOURCE)
    config = tmp_path / "custom.yaml"
    config.write_text(f"data:\n  root: {data_root}\nmodel:\n  kind: custom\n  class_path: {source}:TwoLevel\n")
    out = tmp_path / "run"
    assert run("train", config, *TINY, "train.steps=10", "--out", out, "--device", "cpu").exit_code == 0
    source.write_text(SOURCE.replace("MLP(d1, [width], pixels)", "MLP(d1, [width + 1], pixels)"))
    before = (out / "last.pt").read_bytes()
    for args, expected in (
        (("evaluate", out, "--device", "cpu", "--split", "val"), "the class named by model.class_path changed since training"),
        (("train", "--resume", out, "train.steps=20", "--device", "cpu"), "do not fit the model its config builds"),
    ):
        result = run(*args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert (out / "last.pt").read_bytes() == before and not list(out.glob("eval-*"))
