"""colam.steps: the run config of an m-step pipeline and where each step starts and ends."""

import json

import pytest

from colam.config import load_config
from colam.errors import ColamError
from colam.steps import RAW_DATA, run_config, step_config, step_ends, with_split
from tests.conftest import TINY


def base(*overrides):
    return load_config(None, TINY + list(overrides)).to_dict()


def test_step_config_lays_the_headline_settings_over_the_base():
    config = step_config(base(), steps=3, method="colam", model="small_cnn", dataset="digits", epochs_per_step=5,
                         temperature=2.5, seed=7)
    assert (config.method.colam.stages, config.method.colam.epochs_per_stage, config.train.epochs) == (3, 5, 15)
    assert (config.method.colam.temperature, config.seed, config.method.name) == (2.5, 7, "colam")
    # The base keeps everything the parameters do not name.
    assert config.train.batch_size == 32 and config.model.options == {"width": 8}


def test_step_config_gives_every_method_the_same_epoch_budget():
    config = step_config(base(), steps=4, method="hl", epochs_per_step=3)
    assert config.train.epochs == 12 and step_ends(config, 4) == [3, 6, 9, 12]


def test_step_config_reads_json_text_and_keeps_integers():
    text = json.dumps(base())
    config = step_config(text, steps=2)
    assert config.train.epochs == 4 and isinstance(config.train.batch_size, int)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, "method.colam.temperature: must be > 0"),
    ({"method": "nope"}, "method.name"),
    ({"epochs_per_step": 0}, "method.colam.epochs_per_stage"),
    ({"seed": 1.5}, "seed"),
    ({"steps": 0}, "steps"),
])
def test_step_config_names_the_bad_setting(kwargs, message):
    kwargs = {"steps": 2, **kwargs}
    with pytest.raises(ColamError, match=message.replace(".", r"\.")):
        step_config(base(), **kwargs)


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "config: expected a mapping"),
    ("{unclosed", "config: not valid YAML or JSON"),
    ('{"train": {"epochs": "many"}}', "train.epochs"),
])
def test_run_config_refuses_bad_text(tmp_path, text, message):
    with pytest.raises(ColamError, match=message):
        run_config(text, tmp_path)


def test_step_ends_follow_colam_stages():
    config = step_config(base(), steps=2, epochs_per_step=3)
    assert step_ends(config, 2) == [3, 6]
    with pytest.raises(ColamError, match=r"method.colam: colam trains 2 stage\(s\) of 3 epochs, which do not split "
                                         r"into 3 equal pipeline steps"):
        step_ends(config, 3)
    assert step_ends(step_config(base(), steps=2, epochs_per_step=4), 4) == [2, 4, 6, 8]  # 2 segments per stage


def test_one_stage_method_must_split_evenly():
    config = load_config(None, TINY + ["method.name=hl", "train.epochs=5"])
    assert step_ends(config, 5) == [1, 2, 3, 4, 5]
    with pytest.raises(ColamError, match=r"train.epochs: hl trains 1 stage\(s\) of 5 epochs, which do not split"):
        step_ends(config, 2)


def test_generations_of_label_refinery_split_into_pipeline_steps():
    config = load_config(None, TINY + ["method.name=refinery", "train.epochs=8"])  # 2 generations of 4
    assert step_ends(config, 2) == [4, 8] and step_ends(config, 4) == [2, 4, 6, 8]


def test_with_split_reads_a_downloaded_data_set_from_the_split(tmp_path):
    config = load_config(None, TINY + ["data.download=true"])
    assert with_split(config, tmp_path) == config  # nothing was downloaded into the split
    (tmp_path / RAW_DATA).mkdir()
    moved = with_split(config, tmp_path)
    assert moved.data.root == str(tmp_path / RAW_DATA) and moved.data.download is False


def test_step_config_leaves_the_device_to_the_pipeline():
    """A CPU step (prepare, evaluate) given train.device=cuda would fail after every GPU step."""
    assert step_config(base("train.device=cuda"), steps=2).train.device == "auto"


@pytest.mark.parametrize("name", list(__import__("colam.methods", fromlist=["METHODS"]).METHODS))
def test_every_method_gives_the_numbers_of_fit_when_run_as_pipeline_steps(name, tmp_path):
    """What the Kubeflow components run: 2 x (train_step, estimate_step) = one fit, for every method."""
    import torch

    from colam.engine import fit
    from colam.steps import estimate_step, prepare_step, train_step
    from tests.test_methods import method_extras

    config = step_config(load_config(None, TINY + [f"method.name={name}", *method_extras(name, tmp_path)]).to_dict(),
                         steps=2)
    whole = fit(config, tmp_path / "whole", progress=False)
    prepare_step(config, tmp_path / "split")
    previous: dict = {}
    for step in (1, 2):
        out = tmp_path / f"train_{step}"
        metrics = train_step(config, step, 2, out, split_dir=tmp_path / "split", **previous)
        estimate_step(config, step, 2, out, tmp_path / f"estimate_{step}", split_dir=tmp_path / "split")
        previous = {"checkpoint": out, "soft_labels": tmp_path / f"estimate_{step}"}
    for key in ("test_acc", "val_acc", "train_loss", "train_acc"):
        assert metrics[key] == whole[key], key
    stage = len(list((tmp_path / "whole").glob("stage_*")))
    final = torch.load(tmp_path / "whole" / f"stage_{stage}" / "model.pt", weights_only=True)
    stepped = torch.load(tmp_path / "train_2" / "model.pt", weights_only=True)
    assert all(torch.equal(final[k], stepped[k]) for k in final)


@pytest.mark.parametrize("extra", [
    [],
    # online sums travel from the train step to the estimate step in the stage state
    ["method.colam.estimation=online"],
    ["method.colam.estimation=online", "method.colam.peers=3", "train.data_on_device=true"],
])
def test_colam_stages_cut_into_several_steps_give_the_numbers_of_fit(tmp_path, extra):
    """Two steps per COLAM stage: a step that starts mid-stage needs no new soft labels."""
    from colam.engine import fit
    from colam.steps import estimate_step, prepare_step, train_step

    config = step_config(base(*extra), steps=2, epochs_per_step=2)  # 2 stages of 2 epochs
    whole = fit(config, tmp_path / "whole", progress=False)
    prepare_step(config, tmp_path / "split")
    previous: dict = {}
    for step in range(1, 5):
        out = tmp_path / f"train_{step}"
        metrics = train_step(config, step, 4, out, split_dir=tmp_path / "split", **previous)
        estimate_step(config, step, 4, out, tmp_path / f"estimate_{step}", split_dir=tmp_path / "split")
        previous = {"checkpoint": out, "soft_labels": tmp_path / f"estimate_{step}"}
    assert (metrics["test_acc"], metrics["train_loss"]) == (whole["test_acc"], whole["train_loss"])
    import json

    import numpy as np

    from colam.run_folder import PROVENANCE, run_digest

    # one digest of the run: the whole run's provenance holds it, each estimate step's record its first 16 digits
    recorded = json.loads((tmp_path / "estimate_4" / "estimation.json").read_text())["run"]
    assert recorded == run_digest(config)[:16] == json.loads((tmp_path / "whole" / PROVENANCE).read_text())["run"][:16]

    for stage, step in ((1, 2), (2, 4)):  # the soft labels of each stage end, bit for bit
        for name in ("soft_labels", "sample_soft_labels")[: 2 if "method.colam.peers=3" in extra else 1]:
            assert np.array_equal(np.load(tmp_path / "whole" / f"stage_{stage}" / f"{name}.npy"),
                                  np.load(tmp_path / f"estimate_{step}" / f"{name}.npy")), (stage, name)
