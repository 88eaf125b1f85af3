"""Soft-label estimation without an extra pass: `method.colam.estimation: online` sums the
training logits of each stage's last epoch (colam.soft_labels.OutputSums) instead of running the
stage-end forward pass. With the model frozen both must give the same matrix."""

import numpy as np
import pytest
import torch
from torch import nn

import colam.engine
import colam.feed
from colam.config import load_config
from colam.engine import fit
from colam.errors import ColamError
from colam.soft_labels import OutputSums, class_soft_labels, peer_soft_labels
from tests.conftest import TINY


@pytest.mark.parametrize("aggregation", ["logits", "probs"])
def test_sums_fed_in_shuffled_batches_equal_the_whole_pass(aggregation):
    g = torch.Generator().manual_seed(0)
    outputs, targets = torch.randn(103, 7, generator=g) * 3, torch.randint(0, 7, (103,), generator=g)
    sums = OutputSums(7, aggregation, num_samples=103)
    order = torch.randperm(103, generator=g)
    for index in torch.split(order, [1, 31, 64, 7]):  # uneven batches in a shuffled order
        sums.add(outputs[index], targets[index], index)
    assert torch.allclose(sums.class_labels(0.5), class_soft_labels(outputs, targets, 7, 0.5, aggregation), atol=1e-7)
    assert torch.equal(sums.sample_outputs(), outputs)
    # the peer labels then come from exactly the same outputs
    a = peer_soft_labels(sums.sample_outputs(), targets, 7, 3, 2.0, aggregation, torch.Generator().manual_seed(1))
    b = peer_soft_labels(outputs, targets, 7, 3, 2.0, aggregation, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_sums_refuse_a_sample_never_seen_and_keep_their_state():
    sums = OutputSums(3, "logits", num_samples=4)
    sums.add(torch.randn(3, 3), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3]))
    with pytest.raises(ColamError, match=r"^method\.colam\.peers: .*1 of 4 were not seen"):
        sums.sample_outputs()
    restored = OutputSums(3, "logits", num_samples=4)
    restored.load_state_dict(sums.state_dict())
    assert torch.equal(restored.class_labels(1.0), sums.class_labels(1.0))


class Linear(nn.Module):
    """No BatchNorm, no dropout: a frozen one gives the same logits in train and eval mode."""

    def __init__(self, num_classes, in_channels=1, **_):
        super().__init__()
        self.fc = nn.Linear(64 * in_channels, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def frozen(monkeypatch):
    """Training that changes nothing: a linear model, steps that do not move it, and the training
    view of the data without augmentation."""
    monkeypatch.setattr(colam.engine, "build_model", lambda name, c, in_channels=1, **o: Linear(c, in_channels))
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, closure=None: None)
    real = colam.engine.build_data

    def unaugmented(cfg, split_dir=None):
        data = real(cfg, split_dir)
        data.train = data.train_eval
        return data

    monkeypatch.setattr(colam.engine, "build_data", unaugmented)


@pytest.mark.parametrize("extra", [[], ["method.colam.peers=3"], ["method.colam.aggregation=probs"],
                                   ["train.data_on_device=true"]])
def test_online_and_pass_give_the_same_soft_labels_when_the_model_is_frozen(tmp_path, monkeypatch, extra):
    frozen(monkeypatch)
    if "train.data_on_device=true" in extra:  # the resident path: no augmentation either
        monkeypatch.setattr(colam.feed.ResidentFeed, "augment", lambda self, images, generator: images)
    outputs = {}
    for mode in ("pass", "online"):
        fit(load_config(None, TINY + extra + [f"method.colam.estimation={mode}"]), tmp_path / mode, progress=False)
        outputs[mode] = {f.relative_to(tmp_path / mode).as_posix(): np.load(f)
                         for f in sorted((tmp_path / mode).glob("stage_*/*.npy"))}
    assert outputs["pass"].keys() == outputs["online"].keys()
    assert len(outputs["pass"]) == (4 if "method.colam.peers=3" in extra else 2)
    for name, labels in outputs["pass"].items():
        np.testing.assert_allclose(outputs["online"][name], labels, atol=1e-6, err_msg=name)
        assert labels.shape[1] == 10 and labels.max() < 0.95  # soft labels of an untrained model, not one-hot


def test_online_estimation_runs_no_stage_end_pass(tmp_path, monkeypatch):
    calls = []
    real = colam.engine.stream_outputs
    monkeypatch.setattr(colam.engine, "stream_outputs", lambda p: calls.append(1) or real(p))
    fit(load_config(None, TINY + ["method.colam.estimation=online"]), tmp_path / "online", progress=False)
    assert calls == []
    fit(load_config(None, TINY), tmp_path / "pass", progress=False)
    assert len(calls) == 2  # one pass per stage end
    # online labels differ from the pass's on a model that learns: they are a different estimate
    a, b = (np.load(tmp_path / mode / "stage_1" / "soft_labels.npy") for mode in ("online", "pass"))
    assert a.shape == b.shape == (10, 10) and not np.array_equal(a, b)


def test_an_online_run_interrupted_in_the_last_epoch_of_a_stage_resumes_to_the_same_labels(tmp_path, monkeypatch):
    config = load_config(None, TINY + ["method.colam.estimation=online"])
    whole = fit(config, tmp_path / "whole", progress=False)
    real = colam.feed.LoaderFeed.train

    def cut_in_epoch_2(self, epoch):  # epoch 2 (0-based 1) is the last of stage 1: stop after 2 batches of it
        for i, batch in enumerate(real(self, epoch)):
            if epoch == 1 and i == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(colam.feed.LoaderFeed, "train", cut_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit(config, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    resumed = fit(config, tmp_path / "cut", progress=False)
    assert resumed["test_acc"] == whole["test_acc"] and resumed["train_loss"] == whole["train_loss"]
    for stage in (1, 2):
        assert np.array_equal(np.load(tmp_path / "whole" / f"stage_{stage}" / "soft_labels.npy"),
                              np.load(tmp_path / "cut" / f"stage_{stage}" / "soft_labels.npy"))


def test_an_unknown_estimation_is_refused():
    with pytest.raises(ColamError, match=r"^method\.colam\.estimation: must be one of pass, online, got 'lazy'"):
        load_config(None, TINY + ["method.colam.estimation=lazy"])


def test_online_labels_are_the_class_means_of_the_last_epoch_of_each_stage(tmp_path, monkeypatch):
    """On a model that learns: stage k's labels come from the training logits of epoch 2k alone."""
    from colam.methods.colam import Colam

    epochs, seen = [], {}
    real_epoch, real_loss = colam.engine.train_one_epoch, Colam.loss

    def counting(*args, **kwargs):
        epochs.append(len(epochs) + 1)
        return real_epoch(*args, **kwargs)

    def recording(self, logits, targets, indices, stage):
        seen.setdefault(epochs[-1], []).append((logits.detach().clone(), targets.clone()))
        return real_loss(self, logits, targets, indices, stage)

    monkeypatch.setattr(colam.engine, "train_one_epoch", counting)
    monkeypatch.setattr(Colam, "loss", recording)
    fit(load_config(None, TINY + ["method.colam.estimation=online", "method.colam.temperature=0.5",
                                  "method.colam.guard=none"]), tmp_path,  # Algorithm 1's means, unrepaired
        progress=False)
    for stage, epoch in ((1, 2), (2, 4)):
        logits = torch.cat([batch[0] for batch in seen[epoch]])
        targets = torch.cat([batch[1] for batch in seen[epoch]])
        expected = class_soft_labels(logits, targets, 10, 0.5)
        other = class_soft_labels(torch.cat([b[0] for b in seen[epoch - 1]]), torch.cat([b[1] for b in seen[epoch - 1]]),
                                  10, 0.5)
        saved = torch.from_numpy(np.load(tmp_path / f"stage_{stage}" / "soft_labels.npy"))
        assert torch.allclose(saved, expected, atol=1e-6), stage
        assert not torch.allclose(saved, other, atol=1e-4), stage  # not the epoch before
