from pathlib import Path

import pytest

from colam.config import load_config

REPO = Path(__file__).resolve().parent.parent

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


def _tracking_files() -> dict[str, int]:
    """The MLflow files in the checkout's folder (a sqlite store, its ./mlruns and their experiments), by mtime."""
    found = {p.name: p.stat().st_mtime_ns for p in (REPO / "mlflow.db", REPO / "mlruns") if p.exists()}
    if (REPO / "mlruns").is_dir():
        found.update({f"mlruns/{p.name}": p.stat().st_mtime_ns for p in (REPO / "mlruns").iterdir()})
    return found


@pytest.fixture(autouse=True)
def _checkout_keeps_no_tracking(request):
    """A test leaves no MLflow store or artifacts in the checkout: MLflow keeps a new experiment's artifacts in
    ./mlruns of the process that creates it, so a test that tracks runs (or starts the command) in tmp_path."""
    before = _tracking_files()
    yield
    assert _tracking_files() == before, f"{request.node.nodeid} wrote MLflow files into {REPO}; run it in tmp_path"


# Real servers on loopback (see tests/servers.py). Session-scoped: seaweed starts in ~1.5 s,
# MLflow in ~9 s, so every test that needs them shares one of each. Imported lazily so that
# sessions which use neither do not pay for importing boto3.
@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from tests.servers import seaweed_s3

    with seaweed_s3(tmp_path_factory.mktemp("seaweed"), bucket="colam-test") as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_s3_server(s3_server, tmp_path_factory):
    """MLflow tracking server that proxies artifacts to s3://<bucket>/mlflow on `s3_server`."""
    from tests.servers import mlflow_server

    destination = f"s3://{s3_server.bucket}/mlflow"
    with mlflow_server(tmp_path_factory.mktemp("mlflow"), destination, s3_server.env()) as server:
        yield server
