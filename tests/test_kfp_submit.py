"""`colam kfp submit` against a fake Kubeflow Pipelines v2beta1 REST API on loopback: the run the
real kfp.Client sends (experiment, parameters, service account, the package's spec, the token),
and the refusals that must happen before anything reaches the server."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import kfp
import pytest
import yaml

from pipelines.cli import main

PARAMS = str(Path(__file__).resolve().parents[1] / "params.yaml")
RUN_ID = "5d1f0c2e-run-0001"

# kfp.Client warns on every construction that it needs KFP >= 2.0.0-beta.2.
pytestmark = pytest.mark.filterwarnings("ignore:This client only works with Kubeflow Pipeline:FutureWarning")


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict
    body: object


@dataclass
class FakeKfp:
    """The few endpoints kfp.Client(host=...).create_run_from_pipeline_package calls."""

    url: str = ""
    requests: list = field(default_factory=list)
    experiments: dict = field(default_factory=dict)  # display_name -> experiment
    healthz_status: int = 200  # anything else: a server that is not Kubeflow Pipelines
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seen(self, method, path):
        return [r for r in self.requests if r.method == method and r.path == path]

    def runs_created(self):
        return self.seen("POST", "/apis/v2beta1/runs")

    def handle(self, method, raw_path, headers, body):
        parts = urlsplit(raw_path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        with self.lock:
            self.requests.append(Request(method, parts.path, query, {k.lower(): v for k, v in headers.items()}, body))
            if (method, parts.path) == ("GET", "/apis/v2beta1/healthz"):
                if self.healthz_status != 200:
                    return self.healthz_status, {"error": "not here", "code": 5, "message": "not found"}
                return 200, {"multi_user": False, "pipeline_store": "database"}
            if (method, parts.path) == ("GET", "/apis/v2beta1/experiments"):
                found = list(self.experiments.values())
                if "filter" in query:
                    predicates = json.loads(query["filter"])["predicates"]
                    names = {p["stringValue"] for p in predicates if p["key"] == "display_name"}
                    found = [e for e in found if e["display_name"] in names]
                return 200, ({"experiments": found, "total_size": len(found)} if found else {})
            if (method, parts.path) == ("POST", "/apis/v2beta1/experiments"):
                experiment = {**body, "experiment_id": f"exp-id-{len(self.experiments) + 1}",
                              "storage_state": "AVAILABLE"}
                self.experiments[body["display_name"]] = experiment
                return 200, experiment
            if (method, parts.path) == ("POST", "/apis/v2beta1/runs"):
                return 200, {"run_id": RUN_ID, "display_name": body.get("display_name"),
                             "experiment_id": body.get("experiment_id"), "state": "PENDING",
                             "storage_state": "AVAILABLE"}
        return 404, {"error": f"no route {method} {parts.path}", "code": 5, "message": "not found"}


def make_handler(fake):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length) if length else b""
            body = json.loads(data) if data else None
            status, payload = fake.handle(self.command, self.path, dict(self.headers.items()), body)
            out = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args):
            pass

    return Handler


def free_port():
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def fake_kfp(monkeypatch, tmp_path):
    # Nothing from this machine's kfp setup: no context file, no endpoint or experiment overrides.
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "no-kfp-context.json"))
    for name in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
                 "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME", "KFP_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    fake = FakeKfp()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("kfp") / "colam-pipeline.yaml"
    assert main(["kfp", "compile", "--params", PARAMS, "--stages", "2", "--out", str(out)]) == 0
    return out


def submit(fake_url, package, *extra):
    return main(["kfp", "submit", "--host", fake_url, "--experiment", "exp-1", "--package", str(package),
                 "--run-name", "r1", "--service-account", "colam-pipeline-runner", *extra])


def last_json_line(text):
    return json.loads(text.strip().splitlines()[-1])


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("colam: error:"), err
    return lines[0]


# --------------------------------------------------------------------------- a run reaches the server


def test_submit_creates_the_experiment_and_the_run_kfp_would_send(fake_kfp, package, capsys):
    assert submit(fake_kfp.url, package, "--param", "temperature=2", "--param", "seed=3") == 0
    printed = last_json_line(capsys.readouterr().out)
    assert printed["run_id"] == RUN_ID
    assert printed["run"] == f"{fake_kfp.url}/#/runs/details/{RUN_ID}"
    assert printed["experiment"] == "exp-1"
    assert printed["arguments"] == {"temperature": 2, "seed": 3}

    lookups = fake_kfp.seen("GET", "/apis/v2beta1/experiments")
    assert lookups and json.loads(lookups[0].query["filter"])["predicates"][0]["stringValue"] == "exp-1"
    created = fake_kfp.seen("POST", "/apis/v2beta1/experiments")
    assert [r.body["display_name"] for r in created] == ["exp-1"]
    experiment_id = fake_kfp.experiments["exp-1"]["experiment_id"]

    [run] = fake_kfp.runs_created()
    body = run.body
    assert body["display_name"] == "r1"
    assert body["experiment_id"] == experiment_id
    assert body["service_account"] == "colam-pipeline-runner"
    parameters = body["runtime_config"]["parameters"]
    assert parameters == {"temperature": 2, "seed": 3}  # only what was given: the rest are the package's defaults
    # The package has a platform spec (secrets, config maps, node selectors): kfp then sends both.
    pipeline_doc, platform_doc = list(yaml.safe_load_all(package.read_text()))
    assert body["pipeline_spec"]["pipeline_spec"] == pipeline_doc
    assert body["pipeline_spec"]["platform_spec"] == platform_doc
    assert "authorization" not in run.headers


def test_submit_prints_only_its_json_on_stdout(fake_kfp, package, capsys):
    assert submit(fake_kfp.url, package) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1, out
    assert json.loads(out)["run_id"] == RUN_ID


def test_submit_files_the_run_under_an_existing_experiment(fake_kfp, package, capsys):
    fake_kfp.experiments["exp-1"] = {"experiment_id": "exp-old", "display_name": "exp-1"}
    fake_kfp.experiments["other"] = {"experiment_id": "exp-other", "display_name": "other"}
    assert submit(fake_kfp.url, package) == 0
    assert last_json_line(capsys.readouterr().out)["run_id"] == RUN_ID
    assert fake_kfp.seen("POST", "/apis/v2beta1/experiments") == []
    [run] = fake_kfp.runs_created()
    assert run.body["experiment_id"] == "exp-old"
    assert run.body["runtime_config"].get("parameters", {}) == {}


def test_no_cache_turns_caching_off_in_every_task(fake_kfp, package, capsys):
    assert submit(fake_kfp.url, package, "--no-cache") == 0
    [run] = fake_kfp.runs_created()
    tasks = run.body["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]
    assert tasks and all(task["cachingOptions"] in ({}, {"enableCache": False}) for task in tasks.values())
    compiled = yaml.safe_load_all(package.read_text()).__next__()["root"]["dag"]["tasks"]
    assert all(task["cachingOptions"] == {"enableCache": True} for task in compiled.values())


def test_kfp_token_is_sent_as_a_bearer_header(fake_kfp, package, monkeypatch, capsys):
    monkeypatch.setenv("KFP_TOKEN", "s3cr3t-token")
    assert submit(fake_kfp.url, package) == 0
    [run] = fake_kfp.runs_created()
    assert run.headers["authorization"] == "Bearer s3cr3t-token"
    assert all(r.headers.get("authorization") == "Bearer s3cr3t-token" for r in fake_kfp.requests)


# --------------------------------------------------------------------------- refused before any request


# colam.config.validate does not check data.name / model.name: these go through to the cluster.
@pytest.mark.parametrize("params, named", [
    (["--param", "temperature=-1"], "method.colam.temperature"),
    (["--param", "temperature=abc"], "method.colam.temperature"),
    (["--param", "seed=1.5"], "seed"),
    (["--param", "method=nope"], "method.name"),
    (["--param", "epochs_per_stage=1.5"], "method.colam.epochs_per_stage"),
    (["--param", "epochs_per_stage=0"], "method.colam.epochs_per_stage"),  # not train.epochs (derived)
    (["--param", "dataset=nope"], "data.name"),
    (["--param", "model=nope"], "model.name"),
    (["--param", "config=[1, 2"], "config"),
    (["--param", "nosuch=1"], "--param"),
    (["--param", "temperature"], "--param"),
])
def test_bad_parameters_are_refused_before_any_request(fake_kfp, package, capsys, params, named):
    code = submit(fake_kfp.url, package, *params)
    assert fake_kfp.runs_created() == []
    assert code == 2
    line = one_error_line(capsys)
    assert named in line
    assert fake_kfp.requests == []


def test_a_missing_package_is_refused(fake_kfp, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert submit(fake_kfp.url, missing) == 2
    line = one_error_line(capsys)
    assert "--package" in line and str(missing) in line
    assert fake_kfp.requests == []


@pytest.mark.parametrize("text", ["just: a mapping\nof: keys\n", "- a\n- list\n", "", "key: [unclosed\n"])
def test_a_file_that_is_not_a_pipeline_is_refused(fake_kfp, tmp_path, capsys, text):
    path = tmp_path / "not-a-pipeline.yaml"
    path.write_text(text)
    assert submit(fake_kfp.url, path) == 2
    line = one_error_line(capsys)
    assert "--package" in line and str(path) in line
    assert fake_kfp.requests == []


def test_an_unreachable_host_fails_fast_with_one_line(package, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "no-kfp-context.json"))
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    began = time.perf_counter()
    assert submit(url, package) == 2
    seconds = time.perf_counter() - began
    line = one_error_line(capsys)
    assert "--host" in line and url in line
    assert seconds < 10, f"took {seconds:.1f}s"


def test_a_server_that_is_not_kubeflow_is_refused_at_once_with_one_line(fake_kfp, package, capsys):
    # kfp.Client alone would ask /healthz 5 times, 5 s apart, logging a traceback each time.
    fake_kfp.healthz_status = 404
    began = time.perf_counter()
    assert submit(fake_kfp.url, package) == 2
    line = one_error_line(capsys)
    assert "--host" in line and fake_kfp.url in line and "HTTP 404" in line
    assert fake_kfp.runs_created() == []
    assert len(fake_kfp.seen("GET", "/apis/v2beta1/healthz")) == 1
    assert time.perf_counter() - began < 5


@pytest.fixture(scope="module")
def unreachable_cli(package, tmp_path_factory):
    """`colam kfp submit` as a process (its own logging and warnings) against a closed port."""
    url = f"http://127.0.0.1:{free_port()}"
    home = tmp_path_factory.mktemp("home")  # no ~/.config/kfp/context.json
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KF_PIPELINES_", "KFP_"))}
    env.update(HOME=str(home), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main())",
                           "kfp", "submit", "--host", url, "--experiment", "exp-1", "--package", str(package)],
                          capture_output=True, text=True, env=env, timeout=120)
    return SimpleNamespace(url=url, done=done, seconds=time.perf_counter() - began)


def test_the_command_fails_fast_on_an_unreachable_host(unreachable_cli):
    done = unreachable_cli.done
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("colam: error: --host:") and unreachable_cli.url in last
    assert unreachable_cli.seconds < 20  # the interpreter and kfp's imports included


def test_the_command_writes_one_line_on_an_unreachable_host(unreachable_cli):
    lines = unreachable_cli.done.stderr.strip().splitlines()
    assert len(lines) == 1, unreachable_cli.done.stderr


def test_config_file_sets_the_run_config_and_the_headline_parameters(fake_kfp, package, capsys, tmp_path):
    """The headline parameters override `config`: from another file they must come along, or the
    run would train the package's method/model/T on the file's other settings."""
    params = yaml.safe_load(Path(PARAMS).read_text())
    params["method"]["name"] = "ls"
    params["method"]["colam"].update(temperature=3.0, epochs_per_stage=7)
    params["seed"] = 5
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(params))
    assert submit(fake_kfp.url, package, "--config", str(other), "--param", "seed=9") == 0
    parameters = fake_kfp.runs_created()[0].body["runtime_config"]["parameters"]
    assert (parameters["method"], parameters["temperature"], parameters["epochs_per_stage"]) == ("ls", 3.0, 7)
    assert parameters["seed"] == 9  # --param wins over the file
    assert json.loads(parameters["config"])["method"]["name"] == "ls"


def test_namespace_skips_the_health_check_as_kfp_does(fake_kfp, package, capsys):
    """Multi-user endpoints may refuse /healthz while namespaced calls work."""
    fake_kfp.healthz_status = 403
    assert submit(fake_kfp.url, package, "--namespace", "kubeflow-user-example-com") == 0
    assert fake_kfp.seen("GET", "/apis/v2beta1/healthz") == []
    assert len(fake_kfp.runs_created()) == 1


def test_a_login_redirect_is_refused_with_one_line(package, capsys, monkeypatch, tmp_path):
    """An auth proxy answers the health check with a redirect to its login page (200 after following)."""
    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "/dex/auth?client_id=kubeflow")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "no-kfp-context.json"))
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        assert submit(f"http://127.0.0.1:{server.server_address[1]}", package) == 2
    finally:
        server.shutdown()
        server.server_close()
    line = one_error_line(capsys)
    assert "--host" in line and "login" in line and "/dex/auth" in line


def test_a_package_without_the_pipeline_parameters_is_refused_with_one_line(fake_kfp, tmp_path, capsys):
    foreign = tmp_path / "foreign.yaml"
    foreign.write_text(yaml.safe_dump({"pipelineInfo": {"name": "x"}, "root": {"dag": {"tasks": {}}}}))
    assert submit(fake_kfp.url, foreign) == 2
    assert "--package" in one_error_line(capsys)
    assert fake_kfp.requests == []
