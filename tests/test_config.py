"""Config loading: YAML + overrides, unknown keys and wrong values refused with the key named."""

from pathlib import Path

import pytest

from colam.config import Config, load_config
from colam.errors import ColamError


def test_defaults_are_the_papers_cifar_settings():
    config = load_config()
    t = config.train
    assert (t.epochs, t.batch_size, t.lr, t.momentum, t.weight_decay) == (160, 64, 0.1, 0.9, 1e-4)
    assert config.method.colam.stages * config.method.colam.epochs_per_stage == t.epochs
    assert config.method.ls.convention == "C"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 20}\nmethod: {name: colam, colam: {stages: 4, epochs_per_stage: 5}}\n")
    config = load_config(path, ["method.colam.temperature=1.5", "method.colam.peers=3", "model.options={width: 8}"])
    assert config.method.colam.temperature == 1.5 and config.method.colam.peers == 3
    assert config.model.options == {"width": 8}
    assert config.train.epochs == 20
    assert load_config(path, ["data.train_subset=null"]).data.train_subset is None
    assert isinstance(load_config(path, ["method.colam.temperature=2"]).method.colam.temperature, float)


def test_round_trips_through_dict():
    config = load_config(None, ["seed=3", "data.label_noise=0.2"])
    from colam.config import from_dict

    assert from_dict(config.to_dict()) == config
    assert isinstance(config, Config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.name=xyz"], "method.name: unknown method"),
        (["method.colam.tempreture=2"], "method.colam.tempreture: unknown key"),
        (["trian.epochs=3"], "trian: unknown key"),
        (["method.colam.temperature=0"], "method.colam.temperature: must be > 0"),
        (["method.colam.temperature=-2"], "method.colam.temperature: must be > 0"),
        (["method.colam.temperature=.nan"], "method.colam.temperature: must be a finite number"),
        (["method.colam.temperature=hot"], "method.colam.temperature: expected float"),
        (["train.epochs=100"], "method.colam.stages: .* must equal train.epochs \\(100\\)"),
        (["method.colam.peers=0"], "method.colam.peers: must be 'all' or an integer >= 1"),
        (["train.epochs=ten"], "train.epochs: expected int"),
        (["train.epochs=2.5"], "train.epochs: expected int"),
        (["train.lr=-0.1"], "train.lr: must be > 0"),
        (["train.batch_size=0"], "train.batch_size: must be >= 1"),
        (["train.lr_schedule=step"], "train.lr_schedule"),
        (["train.milestones=[0.5, 2]"], "train.milestones\\[1\\]"),
        (["data.label_noise=1.0"], "data.label_noise"),
        (["data.download=yes please"], "data.download: expected bool"),
        (["method=colam"], "method: expected a section"),
        (["train.device=tpu"], "train.device"),
        (["epochs"], "--set: 'epochs' is not of the form KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ColamError, match=message):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ColamError, match="--config: file .* does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {epochs: [1, 2}\n")
    with pytest.raises(ColamError, match="not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ColamError, match="must hold a mapping"):
        load_config(listing)


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    assert config.method.name in ("hl", "ls", "cp", "disturblabel", "colam")


def test_the_method_section_is_the_registry():
    """`method` holds `name` and one section per registered method, of the method's own settings class."""
    import dataclasses

    from colam.config import MethodConfig
    from colam.methods import METHODS

    fields = dataclasses.fields(MethodConfig)
    assert [f.name for f in fields] == ["name", *METHODS]
    assert {f.name: f.type for f in fields[1:]} == {name: method.settings for name, method in METHODS.items()}
    config = load_config()
    for name, method in METHODS.items():
        assert getattr(config.method, name) == method.settings(), name


def test_a_new_methods_settings_become_a_typed_section_without_editing_config():
    """A method file alone adds its section: checked on the builder with a registry that has one more method."""
    from dataclasses import dataclass

    from colam.config import build_section, method_section
    from colam.methods import METHODS, Method

    @dataclass
    class ToySettings:
        rate: float = 0.5
        tags: list[str] | None = None

    class Toy(Method):
        name = "toy"
        settings = ToySettings

    section = method_section({**METHODS, "toy": Toy})
    assert section().toy == ToySettings() and section().colam == METHODS["colam"].settings()
    built = build_section(section, {"name": "toy", "toy": {"rate": 2, "tags": ["a"]}}, "method.")
    assert (built.name, built.toy.rate, built.toy.tags) == ("toy", 2.0, ["a"])
    for raw, message in [({"toy": {"rate": "fast"}}, "method.toy.rate: expected float"),
                         ({"toy": {"rat": 1.0}}, "method.toy.rat: unknown key"),
                         ({"toy": 3}, "method.toy: expected a section"),
                         ({"toy": {"tags": [1]}}, r"method.toy.tags: expected list or null")]:
        with pytest.raises(ColamError, match="^" + message):
            build_section(section, raw, "method.")


@pytest.mark.parametrize("first, second", [("colam.config", "colam.methods"), ("colam.methods", "colam.config"),
                                           ("colam.runs", "colam.methods.kd")])
def test_config_and_the_method_registry_import_in_either_order(first, second):
    """colam.config builds its method section from colam.methods (kd's colam.runs imports colam.config):
    in a fresh interpreter, neither may need the other half-imported."""
    import subprocess
    import sys

    code = (f"import {first}, {second}; from colam.config import load_config; "
            f"print(load_config(None, ['method.name=cskd', 'method.cskd.temperature=3']).method.cskd.temperature)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0 and result.stdout == "3.0\n", result.stderr
