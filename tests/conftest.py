import pytest

from colam.config import load_config

# A few-second run: 200 digits, a narrow small CNN, 4 epochs in 2 COLAM stages.
TINY = [
    "data.name=digits", "data.train_subset=200", "data.val_fraction=0.2", "model.name=small_cnn",
    "model.options={width: 8}", "train.epochs=4", "train.batch_size=32", "train.lr=0.05",
    "method.name=colam", "method.colam.stages=2", "method.colam.epochs_per_stage=2",
]


@pytest.fixture
def tiny_config():
    def make(*overrides):
        return load_config(None, TINY + list(overrides))

    return make
