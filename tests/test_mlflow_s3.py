"""MLflow artifacts proxied to a real S3 (SeaweedFS): what the client logs is what lands in the bucket."""

import uuid
from pathlib import Path
from urllib.parse import urlparse

import boto3
import botocore.config
import botocore.exceptions
import mlflow
import numpy as np
import pytest

AUTH_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"}


@pytest.fixture(scope="module")
def logged_run(mlflow_s3_server, tmp_path_factory):
    """One run with a binary and a text artifact, shared by the tests below (logging is the slow part)."""
    src = tmp_path_factory.mktemp("artifacts_src")
    np.save(src / "weights.npy", np.arange(1000, dtype=np.float32).reshape(10, 100))
    (src / "notes.txt").write_text("colam artifact round trip\n")

    client = mlflow.MlflowClient(tracking_uri=mlflow_s3_server.uri)
    # Unique name: the server is session-wide and other tests may create experiments too.
    experiment_id = client.create_experiment(f"s3-roundtrip-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    client.log_artifact(run.info.run_id, str(src / "weights.npy"), artifact_path="arrays")
    client.log_artifact(run.info.run_id, str(src / "notes.txt"))
    client.set_terminated(run.info.run_id)
    files = {"arrays/weights.npy": (src / "weights.npy").read_bytes(), "notes.txt": (src / "notes.txt").read_bytes()}
    return client, client.get_run(run.info.run_id), files


def s3_location(mlflow_server, run, rel):
    """(bucket, key) of a run's artifact: mlflow-artifacts:/EXP/RUN/artifacts maps to DESTINATION/EXP/RUN/artifacts."""
    destination = urlparse(mlflow_server.artifacts_destination)  # s3://BUCKET/mlflow
    return destination.netloc, destination.path.strip("/") + urlparse(run.info.artifact_uri).path + "/" + rel


def test_experiment_artifacts_are_proxied(logged_run):
    client, run, _ = logged_run
    experiment = client.get_experiment(run.info.experiment_id)
    # mlflow-artifacts:/ means clients go through the server and never need S3 credentials.
    assert experiment.artifact_location.startswith("mlflow-artifacts:/")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")


def test_download_is_byte_identical(logged_run, tmp_path):
    client, run, files = logged_run
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["arrays", "notes.txt"]
    for rel, data in files.items():
        local = client.download_artifacts(run.info.run_id, rel, dst_path=str(tmp_path))
        assert Path(local).read_bytes() == data, rel


def test_objects_are_in_the_bucket(logged_run, s3_server, mlflow_s3_server):
    _, run, files = logged_run
    s3 = s3_server.client()
    for rel, data in files.items():
        bucket, key = s3_location(mlflow_s3_server, run, rel)
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert body == data, rel


def _unsigned_client(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        config=botocore.config.Config(signature_version=botocore.UNSIGNED))


@pytest.mark.parametrize("who", ["wrong secret", "unknown key", "anonymous"])
def test_bucket_refuses_wrong_credentials(s3_server, mlflow_s3_server, logged_run, who):
    _, run, _ = logged_run
    if who == "wrong secret":
        s3 = s3_server.client(secret_key=s3_server.secret_key[::-1])
    elif who == "unknown key":
        s3 = s3_server.client(access_key="AKNOTAKEY", secret_key="nope")
    else:
        s3 = _unsigned_client(s3_server.endpoint)
    bucket, key = s3_location(mlflow_s3_server, run, "notes.txt")
    # A real object, so a refusal cannot be a NoSuchKey in disguise.
    for call in (lambda: s3.list_objects_v2(Bucket=bucket), lambda: s3.get_object(Bucket=bucket, Key=key)):
        with pytest.raises(botocore.exceptions.ClientError) as excinfo:
            call()
        assert excinfo.value.response["Error"]["Code"] in AUTH_ERRORS
