"""colam.feed: the DataLoader path and the device-resident path (`train.data_on_device`), and the
speed options (precision, channels_last, compile) as config. On this CPU machine the resident
path runs on the CPU device: the same code a GPU runs, with the same random draws per seed."""

import dataclasses

import numpy as np
import pytest
import torch

from colam import io as cio
from colam.config import load_config
from colam.data import build_data
from colam.datasets import build_raw_data
from colam.distributed import SINGLE, ShardedBatches, World
from colam.engine import fit, prepare
from colam.errors import ColamError
from colam.feed import LoaderFeed, ResidentFeed, make_feed
from tests.conftest import TINY
from tests.fakes import make_fake_cifar

CPU = torch.device("cpu")


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    fake = make_fake_cifar(tmp_path, "cifar10", n_train=40, n_test=20)
    fake.patch_md5(monkeypatch)
    config = load_config(None, TINY + ["data.name=cifar10", f"data.root={tmp_path}", "data.train_subset=30",
                                       "data.val_fraction=0.2", "train.eval_batch_size=4"])
    return config, build_data(config.data)


def digits(*extra):
    config = load_config(None, TINY + list(extra))
    return config, build_data(config.data)


@pytest.mark.parametrize("source", ["digits", "cifar"])
def test_resident_evaluation_batches_are_the_loaders_bit_for_bit(source, cifar):
    config, data = cifar if source == "cifar" else digits("train.eval_batch_size=7")
    resident, loaded = ResidentFeed(data, config, CPU, SINGLE), LoaderFeed(data, config, CPU, SINGLE)
    for split in ("val", "test"):
        a, b = list(resident.evaluation(split)), list(loaded.evaluation(split))
        assert len(a) == len(b) > 1
        for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    # the estimation pass covers the training set without augmentation, in order
    xs, ys, idx = zip(*resident.estimation())
    assert torch.equal(torch.cat(idx), torch.arange(len(data.train)))
    assert torch.equal(torch.cat(xs), torch.stack([data.train_eval[i][0] for i in range(len(data.train))]))


def test_resident_augmentation_is_a_random_crop_of_the_padded_image_and_a_flip(cifar):
    config, data = cifar
    feed = ResidentFeed(data, config, CPU, SINGLE)
    images = torch.randint(0, 256, (500, 3, 32, 32), dtype=torch.uint8)
    out = feed.augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    found = []
    for k in range(len(images)):
        match = [(i, j, flip) for i in range(9) for j in range(9) for flip in (False, True)
                 if torch.equal(out[k], (padded[k, :, i:i + 32, j:j + 32].flip(2) if flip else
                                         padded[k, :, i:i + 32, j:j + 32]))]
        assert len(match) == 1, k  # each output is exactly one crop, mirrored or not
        found.append(match[0])
    offsets = {(i, j) for i, j, _ in found}
    assert len(offsets) == 81  # every offset of RandomCrop(32, padding=4) occurs
    flips = sum(flip for *_, flip in found)
    assert 200 < flips < 300  # about half are mirrored


def test_digits_are_shifted_by_one_pixel_and_never_mirrored():
    config, data = digits()
    feed = ResidentFeed(data, config, CPU, SINGLE)
    images = torch.rand(300, 1, 8, 8)
    out = feed.augment(images, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    for k in range(len(images)):
        assert any(torch.equal(out[k], padded[k, :, i:i + 8, j:j + 8]) for i in range(3) for j in range(3)), k


def test_resident_training_batches_follow_the_seed_and_cover_the_split_once(cifar):
    config, data = cifar
    feed = ResidentFeed(data, config, CPU, SINGLE)
    first, again, other = list(feed.train(0)), list(feed.train(0)), list(feed.train(1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], other[0][0])
    assert sorted(torch.cat([b[2] for b in first]).tolist()) == list(range(len(data.train)))
    for x, y, index in first:  # labels follow the images: the split's (possibly noisy) labels
        assert torch.equal(y, data.train_targets[index])
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)


def test_auto_keeps_the_loader_on_cpu_and_true_refuses_data_without_a_tensor_form(tmp_path):
    config, data = digits()
    assert isinstance(make_feed(data, config, CPU, SINGLE), LoaderFeed)
    assert isinstance(make_feed(data, load_config(None, TINY + ["train.data_on_device=true"]), CPU, SINGLE),
                      ResidentFeed)
    no_tensors = dataclasses.replace(data, tensors=None)
    with pytest.raises(ColamError, match=r"^train\.data_on_device: data set 'digits' has no tensor form"):
        make_feed(no_tensors, load_config(None, TINY + ["train.data_on_device=true"]), CPU, SINGLE)


def test_a_resident_run_is_reproducible_and_trains(tmp_path):
    config = load_config(None, TINY + ["train.data_on_device=true", "train.epochs=8",
                                       "method.colam.epochs_per_stage=4", "model.options.width=16"])
    a = fit(config, tmp_path / "a", progress=False)
    b = fit(config, tmp_path / "b", progress=False)
    assert a["test_acc"] == b["test_acc"] and a["train_loss"] == b["train_loss"]
    assert a["test_acc"] > 0.5  # it learns on the resident path, not only runs
    assert np.array_equal(np.load(tmp_path / "a" / "stage_2" / "soft_labels.npy"),
                          np.load(tmp_path / "b" / "stage_2" / "soft_labels.npy"))


@pytest.mark.parametrize("extra, message", [
    (["train.precision=fp16"], r"^train\.precision: must be auto, fp32 or bf16, got 'fp16'"),
    (["train.channels_last=always"], r"^train\.channels_last: must be true, false or auto, got 'always'"),
    (["train.data_on_device=gpu"], r"^train\.data_on_device: must be true, false or auto, got 'gpu'"),
    (["train.compile=3"], r"^train\.compile: expected bool, got 3"),
    (["method.name=meta", "train.compile=true"], r"^train\.compile: meta does not train through a single model call"),
])
def test_bad_speed_settings_are_refused(extra, message):
    with pytest.raises(ColamError, match=message):
        prepare(load_config(None, TINY + extra))


def test_bf16_and_channels_last_on_cpu(tmp_path):
    p = prepare(load_config(None, TINY + ["train.precision=bf16", "train.channels_last=true"]))
    assert p.precision == torch.bfloat16 and p.channels_last
    conv = next(m for m in p.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert p.speed == {"world_size": 1, "precision": "bf16", "channels_last": True, "compile": False,
                       "data_on_device": False, "threads": torch.get_num_threads()}
    metrics = fit(p.config, tmp_path, progress=False)
    assert np.isfinite(metrics["train_loss"])
    # the checkpoint is an ordinary state_dict: it loads into a model built the usual way
    state = torch.load(tmp_path / "stage_2" / "model.pt", weights_only=True)
    fresh = prepare(load_config(None, TINY)).model
    fresh.load_state_dict(state)
    auto = prepare(load_config(None, TINY))
    assert auto.precision is None and not auto.channels_last  # auto on CPU: fp32, contiguous


def test_sharded_batches_deal_each_global_batch_over_the_ranks():
    n, batch = 23, 8
    single = ShardedBatches(n, batch, seed=5, world=SINGLE).index_batches()
    ranks = [ShardedBatches(n, batch, seed=5, world=World(r, 3)).index_batches() for r in range(3)]
    # 23 = 8 + 8 + 7: every rank gets a share of every batch, in lockstep
    assert [len(b) for b in single] == [8, 8, 7] and all(len(r) == 3 for r in ranks)
    for k, whole in enumerate(single):
        assert sorted(torch.cat([r[k] for r in ranks]).tolist()) == sorted(whole.tolist())
    # a last global batch with fewer samples than ranks is dropped on every rank
    assert [len(ShardedBatches(17, 8, 5, World(r, 2)).index_batches()) for r in range(2)] == [2, 2]
    assert [len(ShardedBatches(17, 8, 5, World(r, 3)).index_batches()) for r in range(3)] == [2, 2, 2]
    # estimation shards (no shuffle) keep every sample, uneven or not
    shards = [torch.cat(ShardedBatches(17, 6, 0, World(r, 3), shuffle=False).index_batches()) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(17))


def test_build_raw_data_gives_cifar_tensors_with_the_datasets_pixels(tmp_path, monkeypatch):
    fake = make_fake_cifar(tmp_path, "cifar10", n_train=12, n_test=5)
    fake.patch_md5(monkeypatch)
    raw = build_raw_data("cifar10", tmp_path)
    assert raw.tensors.train.shape == (12, 3, 32, 32) and raw.tensors.train.dtype == torch.uint8
    assert raw.tensors.pad == 4 and raw.tensors.flip
    assert raw.tensors.train[5, 2, 7, 13].item() == fake.train_data[5, 2 * 1024 + 7 * 32 + 13]


def test_layout_and_compile_are_how_a_run_executes_precision_and_data_path_are_what_it_computes():
    from colam.run_folder import run_identity

    plain = run_identity(load_config(None, TINY).to_dict())
    assert run_identity(load_config(None, TINY + ["train.compile=true", "train.channels_last=true"]).to_dict()) == plain
    for changed in ("train.precision=bf16", "train.data_on_device=true", "method.colam.estimation=online"):
        assert run_identity(load_config(None, TINY + [changed]).to_dict()) != plain, changed


def test_a_run_saved_before_the_speed_keys_existed_is_the_same_run(tmp_path):
    """Configs written by earlier releases lack precision, data_on_device and estimation."""
    from colam.run_folder import run_identity

    new = load_config(None, TINY).to_dict()
    old = load_config(None, TINY).to_dict()
    for key in ("precision", "data_on_device", "channels_last", "compile"):
        del old["train"][key]
    del old["method"]["colam"]["estimation"]
    assert run_identity(old) == run_identity(new)
    # and a checkpoint of such a run resumes: cut a finished run back to its stage 1 in the old format
    config = load_config(None, TINY)
    whole = fit(config, tmp_path / "whole", progress=False)
    state = torch.load(tmp_path / "whole" / "stage_1" / "state.pt", weights_only=True)
    state["model"] = torch.load(tmp_path / "whole" / "stage_1" / "model.pt", weights_only=True)
    state["config"], state["method"] = old, {k: v for k, v in state["method"].items() if k != "online_sums"}
    del state["execution"], state["world_size"]
    cio.take_folder(tmp_path / "old", "training run")  # as colam writes it, manifest and all
    cio.save_torch(tmp_path / "old" / "checkpoint.pt", state)
    resumed = fit(config, tmp_path / "old", progress=False)
    assert (resumed["test_acc"], resumed["train_loss"]) == (whole["test_acc"], whole["train_loss"])


def test_a_run_does_not_continue_on_a_data_path_or_precision_auto_chose_differently(tmp_path):
    """`auto` resolves by device: a GPU run (bf16, resident) resumed on a CPU would change its numbers."""
    config = load_config(None, TINY)
    fit(config, tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["execution"] == {"precision": "fp32", "data_on_device": False} and state["world_size"] == 1
    state["execution"] = {"precision": "bf16", "data_on_device": True}
    state["epoch"] = 2
    torch.save(state, tmp_path / "checkpoint.pt")
    (tmp_path / "metrics.json").unlink()
    with pytest.raises(ColamError, match=r"^--out: '.*' was trained in bf16 on the device-resident data path; `auto` "
                                         r"settings would continue it in fp32 on the DataLoader data path"):
        fit(config, tmp_path, progress=False)
