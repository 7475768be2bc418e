"""Tests of the configuration schema, YAML loading, overrides and error reports."""

from pathlib import Path

import pytest
from pydantic import BaseModel

from pyro_hvae.config import (
    ARCHITECTURE_FIELDS,
    Config,
    ConfigError,
    MODEL_KINDS,
    DataConfig,
    LadderConfig,
    architecture_changes,
    dump_config,
    load_config,
    parse_overrides,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(path, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.errors


# --- overrides and YAML values ---------------------------------------------


def test_parse_overrides_builds_nested_values():
    tree = parse_overrides(
        [
            "optim.lr=3e-4",
            "model.latent_dims=[32,16,8]",
            "train.ema_decay=null",
            "optim.betas=[0.5, 0.9]",
            "model.kind=bottom_up",
            "seed=7",
        ]
    )
    assert tree == {
        "optim": {"lr": 3e-4, "betas": [0.5, 0.9]},
        "model": {"latent_dims": [32, 16, 8], "kind": "bottom_up"},
        "train": {"ema_decay": None},
        "seed": 7,
    }


@pytest.mark.parametrize(
    "text, value",
    [
        ("3e-4", 3e-4),
        ("1e-3", 1e-3),
        ("3E-4", 3e-4),
        ("1.5e3", 1500.0),
        ("1e3", 1000.0),
        (".5", 0.5),
        ("-2.5", -2.5),
        ("+1e2", 100.0),
        ("10", 10),
        ("1.2.3", "1.2.3"),
        ("e5", "e5"),
        ("true", True),
        ("none", "none"),
    ],
)
def test_override_values_use_yaml_with_exponent_floats(text, value):
    parsed = parse_overrides([f"x={text}"])["x"]
    assert parsed == value and type(parsed) is type(value)


def test_later_override_wins_and_mappings_merge(tmp_path):
    assert parse_overrides(["optim.lr=1", "optim.lr=2"]) == {"optim": {"lr": 2}}
    path = write(tmp_path, "model:\n  latent_dims: [8, 4]\n  kind: ladder\n")
    cfg = load_config(path, ["model={kind: ladder, flows: 2}"])
    assert cfg.model.kind == "ladder"
    assert cfg.model.flows == 2
    assert cfg.model.latent_dims == [8, 4]


def test_malformed_overrides_are_all_reported():
    with pytest.raises(ConfigError) as info:
        parse_overrides(["optim.lr", "=3", "x=[1,", "a..b=1", "seed=1"])
    errors = info.value.errors
    assert len(errors) == 4
    assert "'optim.lr'" in errors[0] and "KEY=VALUE" in errors[0]
    assert "'=3'" in errors[1]
    assert "'x=[1,'" in errors[2] and "YAML" in errors[2]
    assert "'a..b=1'" in errors[3]


def test_floats_without_dot_in_files_and_overrides(tmp_path):
    path = write(
        tmp_path,
        "optim:\n  lr: 3e-4\n  min_lr: 1E-5\ntrain:\n  free_bits: .5\n"
        "  ema_decay: 9.99e-1\n",
    )
    cfg = load_config(path, ["data.threshold=25e-2", "optim.weight_decay=1e-6"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.min_lr == pytest.approx(1e-5)
    assert cfg.train.free_bits == 0.5
    assert cfg.train.ema_decay == pytest.approx(0.999)
    assert cfg.data.threshold == 0.25
    assert cfg.optim.weight_decay == pytest.approx(1e-6)


def test_overrides_apply_on_top_of_file(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1e-3\ntrain:\n  ema_decay: 0.99\n")
    cfg = load_config(
        path, ["optim.lr=3e-4", "train.ema_decay=null", "model.latent_dims=[32,16,8]"]
    )
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.ema_decay is None
    assert cfg.model.latent_dims == [32, 16, 8]
    assert cfg.model.hidden_dims == [512, 256]


def test_no_file_gives_defaults():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.data.dataset == "mnist" and cfg.optim.name == "adamax"
    assert cfg.model.latent_dims == [64, 32, 16, 8, 4]
    assert cfg.optim.betas == (0.9, 0.999)


# --- error reports ----------------------------------------------------------


def test_unknown_keys_at_any_depth(tmp_path):
    path = write(tmp_path, "colour: red\nmodel:\n  latnt_dims: [4]\n")
    errors = errors_of(path, ["optim.lrr=1", "foo.bar=2", "optim.x.y=3"])
    by_path = {e.split(":")[0]: e for e in errors}
    assert set(by_path) == {"colour", "model.latnt_dims", "optim.lrr", "optim.x", "foo"}
    assert f"(from {path})" in by_path["colour"]
    assert "did you mean 'latent_dims'" in by_path["model.latnt_dims"]
    assert f"(from {path})" in by_path["model.latnt_dims"]
    assert "did you mean 'lr'" in by_path["optim.lrr"]
    assert "(from override 'optim.lrr=1')" in by_path["optim.lrr"]
    assert "(from override 'foo.bar=2')" in by_path["foo"]
    assert "(from override 'optim.x.y=3')" in by_path["optim.x"]


def test_wrong_types_name_path_value_and_source(tmp_path):
    path = write(tmp_path, "train:\n  steps: -5\nmodel:\n  latent_dims: [8, 0]\n")
    errors = errors_of(path, ["optim.lr=abc", "device=gpu"])
    assert len(errors) == 4
    text = "\n".join(errors)
    assert f"train.steps: Input should be greater than 0, got -5 (from {path})" in text
    assert f"model.latent_dims[1]: Input should be greater than 0, got 0 (from {path})" in text
    assert "optim.lr: " in text and "got 'abc' (from override 'optim.lr=abc')" in text
    assert "device: Input should be 'cpu', 'cuda' or 'auto', got 'gpu'" in text


def test_every_error_listed_at_once_with_its_source(tmp_path):
    path = write(
        tmp_path,
        "data:\n  batch_size: 0\n  binarize: sometimes\nmodel:\n  latent_dims: []\n",
    )
    overrides = ["train.ema_decay=1.5", "optim.betas=[0.9]", "eval.split=train"]
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    err = info.value
    assert isinstance(err, ValueError)
    assert str(err) == "\n".join(err.errors)
    paths = [e.split(":")[0] for e in err.errors]
    assert paths == [
        "data.binarize",
        "data.batch_size",
        "model.latent_dims",
        "train.ema_decay",
        "optim.betas[1]",
        "eval.split",
    ]
    assert all(e.endswith(f"(from {path})") for e in err.errors[:3])
    for line, item in zip(err.errors[3:], overrides):
        assert line.endswith(f"(from override '{item}')")
    assert "Field required (from" in err.errors[4]


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert errors_of(missing) == [f"{missing}: config file not found"]
    assert errors_of(tmp_path) == [f"{tmp_path}: is a folder, not a config file"]


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "optim:\n  lr: [1, 2\nmodel: {}\n")
    (line,) = errors_of(path)
    assert line.startswith(f"{path}: invalid YAML at line ")
    assert "\n" not in line


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("3\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    (line,) = errors_of(path)
    assert line.startswith(f"{path}: expected a mapping") and line.endswith(kind)


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n")) == Config()


def test_names_are_folder_safe_and_numbers_accepted():
    assert load_config(None, ["name=2024"]).name == "2024"
    (line,) = errors_of(None, ["name=a/b"])
    assert line.startswith("name: ") and "(from override 'name=a/b')" in line


# --- cross-field checks -----------------------------------------------------


def test_cifar10_cannot_be_binarized(tmp_path):
    path = write(tmp_path, "data:\n  dataset: cifar10\n")
    (line,) = errors_of(path)
    assert line.startswith("data.binarize: ")
    assert "data.dataset" in line and "data.binarize: none" in line
    assert line.endswith(f"(from {path})")
    with pytest.raises(ValueError, match="cannot be binarized"):
        DataConfig(dataset="cifar10")


def test_bernoulli_needs_binary_pixels():
    (line,) = errors_of(None, ["data.binarize=none"])
    assert line.startswith("model.likelihood: ")
    assert "data.binarize" in line and "logistic_mixture" in line
    assert line.endswith("(from override 'data.binarize=none')")


def test_grey_level_likelihoods_need_unbinarized_data(tmp_path):
    path = write(tmp_path, "data:\n  binarize: threshold\n")
    (line,) = errors_of(path, ["model.likelihood=categorical"])
    assert line.startswith("data.binarize: ")
    assert "model.likelihood" in line and "data.binarize: none" in line
    assert line.endswith(f"(from {path} and override 'model.likelihood=categorical')")
    with pytest.raises(ValueError, match="grey levels"):
        Config(model=LadderConfig(likelihood="logistic_mixture"))


def test_consistent_grey_level_configs_load():
    cfg = load_config(
        None,
        ["data.dataset=cifar10", "data.binarize=none", "model.likelihood=logistic_mixture"],
    )
    assert cfg.data.dataset == "cifar10"
    cfg = load_config(None, ["data.binarize=none", "model.likelihood=categorical"])
    assert cfg.model.likelihood == "categorical"


# --- dumping, architecture, schema, examples --------------------------------


def test_dump_load_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "name=round_trip",
            "data.root=/some/data",
            "optim.lr=1e-10",
            "optim.betas=[0.5, 0.9]",
            "train.ema_decay=0.999",
            "model.latent_dims=[7, 5, 3]",
            "eval.chunk_size=250",
        ],
    )
    text = dump_config(cfg)
    assert "latent_dims: [7, 5, 3]" in text
    again = load_config(write(tmp_path, text))
    assert again == cfg
    assert again.data.root == Path("/some/data")
    assert load_config(write(tmp_path, dump_config(Config()), "d.yaml")) == Config()


def test_architecture_changes():
    old = Config()
    assert architecture_changes(old, old.model_copy(deep=True)) == []
    new = load_config(
        None, ["model.latent_dims=[8]", "data.dataset=fashion_mnist", "optim.lr=1e-4"]
    )
    assert architecture_changes(old, new) == ["data.dataset", "model.latent_dims"]
    # the image size and channels of a user's images fix the data shape
    assert set(ARCHITECTURE_FIELDS) == {"data.dataset", "data.image_size", "data.channels"} | {
        f"model.{name}" for kind in MODEL_KINDS for name in kind.model_fields
    }


def sections(model: type[BaseModel] = Config):
    yield model
    for field in model.model_fields.values():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from sections(field.annotation)
    if model is Config:
        yield from MODEL_KINDS


def test_every_option_is_described_and_extra_keys_forbidden():
    for section in sections():
        assert section.model_config.get("extra") == "forbid", section
        assert section.__doc__, section
        for name, field in section.model_fields.items():
            assert field.description, f"{section.__name__}.{name}"


def test_every_section_has_defaults():
    cfg = Config()
    assert cfg.train.grad_clip == 200.0 and cfg.train.skip_factor == 10.0
    assert cfg.data.val_size == 500 and cfg.data.eval_batch_size == 500
    assert cfg.eval.num_samples == 1000 and cfg.eval.split == "test"


@pytest.mark.parametrize(
    "name", ["mnist", "two_level", "two_level_bottom_up", "vae_1layer"]
)
def test_examples_load(name):
    path = EXAMPLES / f"{name}.yaml"
    assert path.read_text().startswith("# ")
    cfg = load_config(path, ["data.root=/elsewhere"])
    assert cfg.data.root == Path("/elsewhere")
    assert load_config(path).data.root is None
    expected = {
        "mnist": ("ladder", [64, 32, 16, 8, 4]),
        "two_level": ("ladder", [16, 8]),
        "two_level_bottom_up": ("bottom_up", [16, 8]),
        "vae_1layer": ("ladder", [50]),
    }[name]
    assert (cfg.model.kind, cfg.model.latent_dims) == expected


def test_single_layer_example_is_the_iwae_architecture():
    cfg = load_config(EXAMPLES / "vae_1layer.yaml")
    assert cfg.model.hidden_dims == [200, 200]
    assert cfg.model.activation == "tanh" and not cfg.model.batch_norm


def test_two_level_examples_differ_only_in_inference_order():
    ladder = load_config(EXAMPLES / "two_level.yaml")
    bottom_up = load_config(EXAMPLES / "two_level_bottom_up.yaml")
    assert architecture_changes(ladder, bottom_up) == ["model.kind"]


def test_data_stream_changes():
    from pyro_hvae.config import data_stream_changes

    old = load_config(None)
    new = load_config(None, ["data.batch_size=64", "data.eval_batch_size=50", "data.root=/elsewhere"])
    assert data_stream_changes(old, new) == ["data.batch_size"]  # where data lives and eval batches may change
