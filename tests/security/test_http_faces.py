"""Issue 28's HTTP findings (10, 11 and the HTTP items of 12), each against real servers on loopback
with real clients (a raw socket, curl-like requests by hand, Python's TLS, the SDK over gRPC).

- 28.10: half-sent requests are cut off (header and body timeouts); a flood of connections is
  refused past a cap, so the process keeps the descriptors authenticated gRPC needs;
- 28.11: with no token, a cross-origin POST (what a page's `fetch(..., {mode: "no-cors"})`
  sends) cannot unload a model, and a foreign `Host` (DNS rebinding) is refused, on REST, on
  the metrics port and on the coordinator's dashboard;
- 28.12: `--metrics-port` takes the server's token and TLS; a metrics port in use is a one-line
  exit 2; deep JSON and huge integers are 400 with no traceback in the log.
"""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tensorfleet.client import InferenceClient
from tensorfleet.core.process import server_command, start_and_wait, stop_process
from tests.certificates import make_pki
from tests.serving import REPO_ROOT, running_server

from .helpers import spawned

MODELS = REPO_ROOT / "tests" / "models"
ROW = {"INPUT0": np.ones((1, 16), np.float32), "INPUT1": np.ones((1, 16), np.float32)}
TOKEN = "h-rest-token-0123456789"


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
            host: str | None = None, timeout: float = 30) -> tuple[int, dict]:
    """One HTTP/1.1 request on a fresh raw socket; (status, JSON body or {})."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Connection: close",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, content = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(content) if content else {}
    except ValueError:
        return status, {"text": content.decode(errors="replace")}


def port_from_log(server, words: str) -> int:
    for line in server.log().splitlines():
        if words in line:
            return int(line.rsplit(" ", 1)[-1])
    raise AssertionError(f"no {words!r} in the log:\n{server.log()}")


def closed_by_server(sock: socket.socket, timeout: float) -> bytes:
    """What the server sent before closing `sock`; fails if it keeps the socket open `timeout` s."""
    sock.settimeout(timeout)
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except TimeoutError:
        pytest.fail(f"the server still holds a half-sent request after {timeout} s (got {reply[:200]!r})")
    except ConnectionResetError:
        pass
    return reply


# --- 28.10: timeouts and the connection cap --------------------------------------------------------

def _rest_port(server) -> int:
    for line in server.log().splitlines():
        if "REST (Open Inference Protocol HTTP) on" in line:
            return int(line.rsplit(":", 1)[-1])
    raise AssertionError(f"no REST port in the log:\n{server.log()}")


@pytest.fixture(scope="module")
def timeouts_server():
    env = {"TENSORFLEET_HTTP_HEADER_TIMEOUT_S": "1", "TENSORFLEET_HTTP_BODY_TIMEOUT_S": "1"}
    with running_server(MODELS, "--model", "simple", "--http-port", "0", "--metrics-port", "0", env=env) as server:
        yield server


@pytest.mark.parametrize("face", ["rest", "metrics"])
def test_28_10_half_sent_request_head_is_cut_off(timeouts_server, face):
    port = _rest_port(timeouts_server) if face == "rest" else port_from_log(timeouts_server, "metrics on port")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        reply = closed_by_server(sock, 20)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"request head not received within 1 s" in reply


def test_28_10_stalled_request_body_is_cut_off(timeouts_server):
    port = _rest_port(timeouts_server)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{\"in")
        reply = closed_by_server(sock, 20)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"request body not received" in reply
    with InferenceClient(timeouts_server.address) as client:  # the server goes on
        assert client.infer("simple", ROW)["OUTPUT0"][0, 0] == 2
    assert request(port, "GET", "/v2/health/ready")[0] == 200


def test_28_10_idle_keep_alive_and_slow_but_steady_clients_are_served(timeouts_server):
    """A keep-alive connection is reusable after a response, and a body that keeps arriving (a
    byte under the body timeout apart) is read, not cut off."""
    port = _rest_port(timeouts_server)
    body = json.dumps({"inputs": [{"name": n, "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16}
                                  for n in ("INPUT0", "INPUT1")]}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(f"POST /v2/models/simple/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode())
        for start in range(0, len(body), len(body) // 3 + 1):  # three parts, 0.5 s apart: 1.5 s in all
            sock.sendall(body[start:start + len(body) // 3 + 1])
            time.sleep(0.5)
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200"), reply
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # same connection
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def _launch_with_fd_limit(limit: int, workdir: Path, *args: str, env: dict | None = None):
    """A model server whose RLIMIT_NOFILE is `limit` (the reproduction's "at the file limit")."""
    workdir.mkdir(parents=True, exist_ok=True)
    inner = server_command("--model-repository", str(MODELS), "--host", "127.0.0.1", *args,
                           port_file=workdir / "port")
    wrapper = [sys.executable, "-c",
               f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
               "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])", *inner[1:]]
    return start_and_wait(wrapper, workdir / "port", workdir / "server.log", 120,
                          env={"OMP_NUM_THREADS": "1", **(env or {})}, cwd=REPO_ROOT)


def test_28_10_connection_flood_is_capped_and_authenticated_grpc_keeps_working(tmp_path):
    """The finding: sockets that send half a request, held forever, until the server is out of
    descriptors and authenticated gRPC calls fail. Now: at the cap (a quarter of the fd limit,
    64 here) new connections get 503 and are closed; gRPC with the token is served."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    process, port = _launch_with_fd_limit(
        256, tmp_path / "run", "--model", "simple", "--http-port", "0", "--http-port-file", str(tmp_path / "http"),
        "--token-file", str(token_file), env={"TENSORFLEET_HTTP_HEADER_TIMEOUT_S": "600"},
    )
    sockets: list[socket.socket] = []
    try:
        http_port = int((tmp_path / "http").read_text())
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", http_port), timeout=10)
            sock.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            sockets.append(sock)
        refused, open_ = [], list(sockets)
        deadline = time.monotonic() + 30
        while len(refused) < 300 - 64 and time.monotonic() < deadline:
            readable, _, _ = select.select(open_, [], [], 1)
            for sock in readable:
                try:
                    reply = sock.recv(65536)
                except ConnectionResetError:
                    reply = b""
                refused.append(reply)
                open_.remove(sock)
        assert len(refused) >= 300 - 64, f"only {len(refused)} of 300 connections refused past the cap of 64"
        assert sum(r.startswith(b"HTTP/1.1 503") for r in refused) >= 1, refused[:3]
        with InferenceClient(f"127.0.0.1:{port}", token=TOKEN, timeout=20) as client:
            assert client.infer("simple", ROW)["OUTPUT0"][0, 0] == 2
        assert process.poll() is None
    finally:
        for sock in sockets:
            sock.close()
        stop_process(process, timeout=30)
    log = (tmp_path / "run" / "server.log").read_text()
    assert "Too many open files" not in log, log[-3000:]


# --- 28.11: the browser guard with no token ---------------------------------------------------------

@pytest.fixture(scope="module")
def tokenless(tmp_path_factory):
    args = ("--model", "simple", "--http-port", "0", "--metrics-port", "0")
    with running_server(MODELS, *args, env={"TENSORFLEET_HTTP_ALLOW_HOSTS": "lab.example"}) as server:
        yield server


def _ready_over_grpc(server) -> bool:
    with InferenceClient(server.address) as client:
        return client.is_model_ready("simple")


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example", "Content-Type": "text/plain"},
    {"Origin": "null", "Content-Type": "text/plain"},
    {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
    {"Origin": "http://127.0.0.1:1", "Sec-Fetch-Site": "same-site"},
], ids=["foreign-origin", "null-origin", "sec-fetch-cross-site", "sec-fetch-same-site"])
def test_28_11_cross_origin_post_cannot_unload_a_model(tokenless, headers):
    port = _rest_port(tokenless)
    status, body = request(port, "POST", "/v2/repository/models/simple/unload", headers)
    assert status == 403, body
    assert "cross-origin request refused" in body["error"]
    assert _ready_over_grpc(tokenless), "the model was unloaded by a cross-origin request"


def test_28_11_same_origin_and_non_browser_posts_pass(tokenless):
    port = _rest_port(tokenless)
    own = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    assert request(port, "POST", "/v2/repository/index", own)[0] == 200
    assert request(port, "POST", "/v2/repository/index")[0] == 200  # curl, tritonclient: no Origin


@pytest.mark.parametrize("face", ["rest", "metrics"])
def test_28_11_foreign_host_header_is_refused(tokenless, face):
    port = _rest_port(tokenless) if face == "rest" else port_from_log(tokenless, "metrics on port")
    path = "/v2/models/simple" if face == "rest" else "/metrics"
    status, body = request(port, "GET", path, host=f"rebind.evil.example:{port}")
    assert status == 403, body
    assert "--http-allow-host" in body["error"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "lab.example", f"app.localhost:{port}"):
        assert request(port, "GET", path, host=host)[0] == 200, host


def test_28_11_dashboard_refuses_a_foreign_host(tmp_path):
    args = ["coordinator", "serve", "--state-dir", tmp_path / "state", "--http-port", "0",
            "--http-port-file", tmp_path / "http"]
    with spawned(args, tmp_path / "coord"):
        port = int((tmp_path / "http").read_text())
        status, body = request(port, "GET", "/api/jobs", host=f"rebind.evil.example:{port}")
        assert status == 403, body
        assert request(port, "GET", "/api/jobs")[0] == 200


def test_http_allow_host_adds_a_name_to_the_dashboard_and_rest(tmp_path):
    args = ["coordinator", "serve", "--state-dir", tmp_path / "state", "--http-port", "0",
            "--http-port-file", tmp_path / "http", "--http-allow-host", "jobs.lab.example"]
    with spawned(args, tmp_path / "coord"):
        port = int((tmp_path / "http").read_text())
        assert request(port, "GET", "/api/jobs", host=f"jobs.lab.example:{port}")[0] == 200
        assert request(port, "GET", "/api/jobs", host=f"other.lab.example:{port}")[0] == 403
    with running_server(MODELS, "--model", "simple", "--http-port", "0", "--http-allow-host", "gpu1.lab") as server:
        port = _rest_port(server)
        assert request(port, "GET", "/v2/models/simple", host="gpu1.lab")[0] == 200
        assert request(port, "GET", "/v2/models/simple", host="gpu2.lab")[0] == 403


# --- 28.12: metrics port, port in use, deep JSON and huge integers -----------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_28_12_metrics_port_takes_the_token_and_tls(pki):
    args = ("--model", "simple", "--metrics-port", "0", "--token", TOKEN,
            "--tls-cert", str(pki["server"]), "--tls-key", str(pki["server_key"]))
    with running_server(MODELS, *args) as server:
        port = port_from_log(server, "metrics on port")
        with pytest.raises((ConnectionError, ValueError, IndexError, OSError)):  # plaintext gets no HTTP answer
            request(port, "GET", "/metrics", timeout=10)
        context = ssl.create_default_context(cafile=str(pki["ca"]))

        def get(headers: dict[str, str]) -> tuple[int, bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost") as sock:
                lines = ["GET /metrics HTTP/1.1", "Host: localhost", "Connection: close",
                         *(f"{k}: {v}" for k, v in headers.items())]
                sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            head, _, content = reply.partition(b"\r\n\r\n")
            return int(head.split(b" ", 2)[1]), content

        status, content = get({})
        assert status == 401 and b"bearer token" in content
        assert get({"Authorization": "Bearer wrong"})[0] == 401
        status, content = get({"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and b"tensorfleet_requests" in content


def test_28_12_metrics_port_in_use_is_a_one_line_exit_2(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "tensorfleet.services", "--model-repository", str(MODELS), "--model", "simple",
             "--port", "0", "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot listen for metrics on 127.0.0.1:{port}: Address already in use"], done.stderr


@pytest.mark.parametrize("body, words", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":[' + b"9" * 5000 + b"]}]}",
     "number too long"),
    (b'{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[100000000000000000000,16],"data":[1]}]}',
     "out of the int64 range"),
    (b'{"parameters":{"x":1000000000000000000000000000000},"inputs":[{"name":"INPUT0","datatype":"FP32",'
     b'"shape":[1,16],"data":[1]}]}', "out of the int64 range"),
], ids=["deep-json", "5000-digit-integer", "int64-overflow-shape", "int64-overflow-parameter"])
def test_28_12_deep_json_and_huge_integers_are_400_without_a_traceback(tokenless, body, words):
    port = _rest_port(tokenless)
    status, reply = request(port, "POST", "/v2/models/simple/infer", {"Content-Type": "application/json"}, body)
    assert status == 400, reply
    assert words in reply["error"]
    assert "Traceback" not in tokenless.log()
    assert _ready_over_grpc(tokenless)
