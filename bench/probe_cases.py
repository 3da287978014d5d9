"""The attack table bench/probe.py replays: issue 28's twelve findings and the families an outside
probe tried before them (malformed protobuf, overflowing shapes, lying BYTES lengths, declared
sizes, shared-memory key tricks, REST traversal, lying headers, wide binds, token leaks, spec path
escapes, YAML tags, hostile input files). Each case is one request, file or job; `all_cases()`
lists them in the order they run (cases that change a server's state run last)."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import random
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.job_specs import minimal_job
from bench.probe import (
    MODELS,
    REPO_ROOT,
    SERVER_TOKEN,
    SUBMIT_TOKEN,
    Case,
    Probe,
    Result,
    raw_socket,
)
from tensorfleet.core.shared_memory import BYTE_SIZE_PARAMETER, OFFSET_PARAMETER, REGION_PARAMETER
from tensorfleet.protos import inference_pb2 as pb
from tensorfleet.protos import inference_pb2_grpc as pb_grpc
from tensorfleet.protos import tensorfleet_pb2 as tf
from tensorfleet.protos import tensorfleet_pb2_grpc as tf_grpc

CLEAN = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS,
}
INFERENCE = "/inference.GRPCInferenceService/"
SERVER_AUTH = (("authorization", f"Bearer {SERVER_TOKEN}"),)
SUBMIT_AUTH = (("authorization", f"Bearer {SUBMIT_TOKEN}"),)
FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


# --- answers -----------------------------------------------------------------------------------------
def grpc_answer(call: Callable[[], object], control: bool = False) -> Result:
    """refused for a clean status; served for a control that worked; failed otherwise."""
    try:
        call()
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        if code in CLEAN or (code == grpc.StatusCode.INTERNAL and "deserializ" in details.lower()):
            return Result("failed" if control else "refused", f"{code.name}: {details}"[:240])
        return Result("failed", f"{code.name}: {details}"[:240])
    return Result("served" if control else "failed", "" if control else "accepted")


def raw_call(probe: Probe, method: str, payload: bytes, server: str = "open", auth=()) -> Result:
    service = getattr(probe, server)
    call = service.channel.unary_unary(method)  # bytes in, bytes out: any payload reaches the parser
    return grpc_answer(lambda: call(payload, timeout=10, metadata=auth))


def http_answer(status: int, body: bytes, control: bool = False) -> Result:
    detail = f"HTTP {status}: {body[:160]!r}"
    if control:
        return Result("served" if status < 300 else "failed", detail)
    if 400 <= status < 500:
        return Result("refused", detail)
    return Result("failed", detail)


def rest(probe: Probe, method: str, path: str, body: bytes = b"", headers: dict | None = None,
         server: str = "open", control: bool = False) -> Result:
    connection = http.client.HTTPConnection("127.0.0.1", getattr(probe, server).http_port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return http_answer(response.status, response.read(), control)
    finally:
        connection.close()


def raw_http(probe: Probe, data: bytes, server: str = "open") -> Result:
    """Bytes as they are on the REST port; the server's status line, or how it closed."""
    with raw_socket(getattr(probe, server).http_port, timeout=10) as sock:
        sock.sendall(data)
        try:
            reply = sock.recv(4096)
        except TimeoutError:
            return Result("failed", "no answer within 10 s")
    if not reply:
        return Result("refused", "connection closed")
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
    return http_answer(status, reply.split(b"\r\n\r\n", 1)[-1])


# --- requests ----------------------------------------------------------------------------------------
def infer_request(model: str, tensors: list[tuple[str, str, list[int]]], raw: list[bytes]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name, datatype, shape in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.extend(raw)
    return request


def infer(probe: Probe, request: pb.ModelInferRequest, server: str = "open", auth=(), control: bool = False) -> Result:
    stub = pb_grpc.GRPCInferenceServiceStub(getattr(probe, server).channel)
    return grpc_answer(lambda: stub.ModelInfer(request, timeout=10, metadata=auth), control)


def vec8(rows: int, shape: list[int] | None = None, data: bytes | None = None, datatype: str = "FP32") -> pb.ModelInferRequest:
    data = np.ones((rows, 8), np.float32).tobytes() if data is None else data
    return infer_request("vec8", [("x", datatype, shape or [rows, 8])], [data])


def bytes_elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


# --- coordinator ---------------------------------------------------------------------------------------
def coordinator(probe: Probe) -> tf_grpc.CoordinatorStub:
    return tf_grpc.CoordinatorStub(probe.coordinator.channel)


def submit(probe: Probe, spec: dict | str, auth=SUBMIT_AUTH) -> Result:
    text = spec if isinstance(spec, str) else json.dumps(spec)
    before = probe.outside_snapshot()
    result = grpc_answer(lambda: coordinator(probe).SubmitJob(
        tf.SubmitJobRequest(spec=text, base_dir=str(probe.root / "data")), timeout=30, metadata=auth))
    if probe.outside_snapshot() != before:
        return Result("leaked", "a file appeared outside the roots")
    return result


def job(probe: Probe, job_name: str, **changes) -> dict:
    return minimal_job(probe.root, job_name, probe.guarded.address, f"{job_name}.h5", **changes)


def run_job(probe: Probe, spec: dict, expect: str = "FAILED", wait_s: float = 60) -> Result:
    """Submit an allowed job and wait: `expect` FAILED (a clean refusal at run time) or SUCCEEDED."""
    before = probe.outside_snapshot()
    stub = coordinator(probe)
    try:
        submitted = stub.SubmitJob(tf.SubmitJobRequest(spec=json.dumps(spec), base_dir=str(probe.root / "data")),
                                   timeout=30, metadata=SUBMIT_AUTH)
    except grpc.RpcError as error:
        if expect == "FAILED" and error.code() in CLEAN:
            return Result("refused", f"at submit: {error.code().name}: {error.details()}"[:240])
        return Result("failed", f"submit: {error.code().name}: {error.details()}"[:240])
    deadline = time.monotonic() + wait_s
    while True:
        record = stub.GetJob(tf.GetJobRequest(job_id=submitted.job_id), timeout=10, metadata=SUBMIT_AUTH)
        state = tf.JobState.Name(record.state)
        if state in FINAL or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if probe.outside_snapshot() != before:
        return Result("leaked", f"{state}: a file appeared outside the roots")
    detail = f"{state} exit {record.exit_code}: {record.error}"[:300]
    if state not in FINAL:
        stub.CancelJob(tf.CancelJobRequest(job_id=submitted.job_id), timeout=10, metadata=SUBMIT_AUTH)
        return Result("hung", f"still {state} after {wait_s:g} s")
    if "SIGSEGV" in record.error or "SIGBUS" in record.error:
        return Result("crashed", detail)
    if expect == "SUCCEEDED":
        return Result("served" if state == "SUCCEEDED" else "failed", detail)
    return Result("refused" if state == "FAILED" else "failed", detail)


# --- the families ------------------------------------------------------------------------------------
def protobuf_cases() -> list[Case]:
    rng = random.Random(28)
    valid = vec8(1).SerializeToString()
    payloads = {
        "ff-bytes": b"\xff" * 64,
        "random-1": bytes(rng.getrandbits(8) for _ in range(256)),
        "random-2": bytes(rng.getrandbits(8) for _ in range(4096)),
        "truncated-valid": valid[: len(valid) // 2],
        "length-4gib": b"\x0a\x80\x80\x80\x80\x10abc",  # field 1, declared 4 GiB, 3 bytes follow
        "length-2p63": b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01abc",
        "wire-type-7": b"\x0f\x00\x00",
        "groups-10000-deep": b"\x1b" * 10_000,  # field 3, start-group, never ended
        "varint-unterminated": b"\x08" + b"\xff" * 20,
        "unknown-fields": b"".join(struct.pack("<B", (n << 3) | 2) + b"\x01x" for n in range(16, 31)) * 64,
    }
    cases = []
    for method in ("ModelInfer", "ModelMetadata", "RepositoryModelLoad"):
        for name, payload in payloads.items():
            cases.append(Case(f"protobuf/{method}/{name}", "protobuf",
                              lambda p, m=method, d=payload: raw_call(p, INFERENCE + m, d),
                              quick=name in ("length-4gib", "groups-10000-deep") and method == "ModelInfer"))
    for name in ("ff-bytes", "length-4gib", "groups-10000-deep", "random-2"):
        cases.append(Case(f"protobuf/SubmitJob/{name}", "protobuf",
                          lambda p, d=payloads[name]: raw_call(p, "/tensorfleet.v1.Coordinator/SubmitJob", d,
                                                               server="coordinator", auth=SUBMIT_AUTH)))
    cases.append(Case("protobuf/declared-4gib-on-token-server-without-token", "protobuf",
                      lambda p: raw_call(p, INFERENCE + "ModelInfer", payloads["length-4gib"], server="guarded")))
    return cases


def shape_cases() -> list[Case]:
    ones = np.ones(16, np.float32).tobytes()
    shapes = {
        "product-past-2p64": ([2**62, 8], ones[:64]),
        "negative-dimension": ([-1, 8], ones),
        "negative-inner": ([1, -8], ones),
        "two-2p32": ([2**32, 2**32], ones),
        "forty-dims": ([2] * 40, ones),
        "row-of-nine": ([1, 9], np.ones(9, np.float32).tobytes()),
        "buffer-short": ([2, 8], ones[:10]),
        "buffer-long": ([1, 8], ones * 4),
        "batch-over-max": ([33, 8], np.ones((33, 8), np.float32).tobytes()),
        "zero-rank": ([], ones[:4]),
    }
    cases = [Case(f"shapes/{name}", "shapes", lambda p, s=shape, d=data: infer(p, vec8(1, s, d)),
                  quick=name == "product-past-2p64") for name, (shape, data) in shapes.items()]
    wrong = {
        "datatype-fp64": vec8(1, datatype="FP64"),
        "datatype-unknown": vec8(1, datatype="FP128"),
        "unknown-input": infer_request("vec8", [("nope", "FP32", [1, 8])], [ones[:32]]),
        "duplicate-input": infer_request("vec8", [("x", "FP32", [1, 8]), ("x", "FP32", [1, 8])], [ones[:32]] * 2),
        "missing-input": infer_request("vec8", [], []),
        "unknown-model": infer_request("../vec8", [("x", "FP32", [1, 8])], [ones[:32]]),
        "unknown-version": pb.ModelInferRequest(model_name="vec8", model_version="999", inputs=vec8(1).inputs,
                                                raw_input_contents=vec8(1).raw_input_contents),
        "raw-and-contents": _raw_and_contents(),
        "more-raw-than-inputs": infer_request("vec8", [("x", "FP32", [1, 8])], [ones[:32], ones[:32]]),
    }
    cases += [Case(f"shapes/{name}", "shapes", lambda p, r=request: infer(p, r)) for name, request in wrong.items()]
    cases += [
        Case("shapes/control-valid", "shapes", lambda p: infer(p, vec8(2), control=True), expected="served", quick=True),
        Case("shapes/control-token-server-with-token", "shapes",
             lambda p: infer(p, vec8(2), server="guarded", auth=SERVER_AUTH, control=True), expected="served"),
        Case("shapes/overflow-on-token-server-with-token", "shapes",
             lambda p: infer(p, vec8(1, [2**62, 8], ones[:64]), server="guarded", auth=SERVER_AUTH)),
    ]
    return cases


def _raw_and_contents() -> pb.ModelInferRequest:
    request = vec8(1)
    request.inputs[0].contents.fp32_contents.extend([1.0] * 8)
    return request


def bytes_cases() -> list[Case]:
    def embed(raw: bytes, shape: list[int], contents: list[bytes] | None = None) -> pb.ModelInferRequest:
        request = infer_request("embed", [("sequence", "BYTES", shape)], [] if contents is not None else [raw])
        if contents is not None:
            request.inputs[0].contents.bytes_contents.extend(contents)
        return request

    table = {
        "length-4gib-in-3-bytes": embed(struct.pack("<I", 2**32 - 1) + b"abc", [1]),
        "length-10-in-5-bytes": embed(struct.pack("<I", 10) + b"abcde", [1]),
        "two-declared-one-present": embed(bytes_elements(b"ACDE"), [2]),
        "2p40-elements-in-7-bytes": embed(b"\x01\x00\x00\x00A\x00\x00", [2**40]),
        "trailing-garbage": embed(bytes_elements(b"ACDE") + b"\x07", [1]),
        "contents-count-mismatch": embed(b"", [3], contents=[b"A"]),
        "prefix-cut-short": embed(b"\x04\x00", [1]),
        "element-2gib-declared": embed(struct.pack("<I", 2**31) + b"A" * 16, [1]),
    }
    cases = [Case(f"bytes/{name}", "bytes", lambda p, r=request: infer(p, r), quick=name == "length-4gib-in-3-bytes")
             for name, request in table.items()]
    cases.append(Case("bytes/control-valid", "bytes",
                      lambda p: infer(p, embed(bytes_elements(b"ACDEFGHIK", b"MNPQ"), [2]), control=True),
                      expected="served"))
    return cases


def shm_cases(pid: int) -> list[Case]:
    def register(probe: Probe, key: str, offset: int = 0, size: int = 4096, name: str = "probe") -> Result:
        stub = pb_grpc.GRPCInferenceServiceStub(probe.open.channel)
        result = grpc_answer(lambda: stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
            name=name, key=key, offset=offset, byte_size=size), timeout=10))
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=name), timeout=10)
        return result

    def object_(name: str, size: int) -> str:
        path = Path("/dev/shm") / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, size)
        os.close(fd)
        return name

    def link(probe: Probe) -> Result:
        path = Path("/dev/shm") / f"tf-probe-link-{pid}"
        path.unlink(missing_ok=True)
        path.symlink_to("/etc/passwd")
        try:
            return register(probe, path.name)
        finally:
            path.unlink(missing_ok=True)

    def folder(probe: Probe) -> Result:
        path = Path("/dev/shm") / f"tf-probe-dir-{pid}"
        path.mkdir(exist_ok=True)
        try:
            return register(probe, path.name)
        finally:
            path.rmdir()

    def region_infer(probe: Probe, key: str, size: int, shrink_to: int | None, offset: int = 0,
                     control: bool = False) -> Result:
        stub = pb_grpc.GRPCInferenceServiceStub(probe.open.channel)
        path = Path("/dev/shm") / object_(key, size)
        try:
            stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name=key, key=key, offset=0, byte_size=size), timeout=10)
            if shrink_to is not None:
                os.truncate(path, shrink_to)
            request = pb.ModelInferRequest(model_name="vec8")
            tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 8])
            tensor.parameters[REGION_PARAMETER].string_param = key
            tensor.parameters[BYTE_SIZE_PARAMETER].int64_param = 32
            tensor.parameters[OFFSET_PARAMETER].int64_param = offset
            return grpc_answer(lambda: stub.ModelInfer(request, timeout=10), control)
        finally:
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=key), timeout=10)
            path.unlink(missing_ok=True)

    real = f"tf-probe-real-{pid}"
    keys = {
        "dotdot-etc-passwd": "../../etc/passwd", "slash-dotdot": "/../etc/passwd", "nested-path": "etc/passwd",
        "empty": "", "nul-byte": "a\0b", "absolute-dev-shm": "/dev/shm/x", "missing": f"tf-probe-none-{pid}",
        "proc-self-mem": "../../proc/self/mem",
    }
    cases = [Case(f"shm/key-{name}", "shm", lambda p, k=key: register(p, k), quick=name == "dotdot-etc-passwd")
             for name, key in keys.items()]
    cases += [
        Case("shm/key-symlink-to-etc-passwd", "shm", link),
        Case("shm/key-a-folder", "shm", folder),
        Case("shm/window-past-end", "shm", lambda p: register(p, object_(real, 4096), offset=4000, size=4096)),
        Case("shm/window-2p62", "shm", lambda p: register(p, object_(real, 4096), size=2**62)),
        Case("shm/window-zero", "shm", lambda p: register(p, object_(real, 4096), size=0)),
        Case("shm/tensor-window-outside-region", "shm", lambda p: region_infer(p, f"tf-probe-o-{pid}", 64, None, 48)),
        Case("shm/unknown-region-in-infer", "shm", lambda p: infer(p, _unknown_region())),
        Case("shm/truncated-after-register", "shm", lambda p: region_infer(p, f"tf-probe-t-{pid}", 1 << 20, 0),
             finding="#28.6", quick=True),
        Case("shm/control-valid-region", "shm", lambda p: region_infer(p, f"tf-probe-c-{pid}", 4096, None,
                                                                       control=True), expected="served"),
        Case("shm/status-of-unknown-name", "shm", lambda p: grpc_answer(lambda: pb_grpc.GRPCInferenceServiceStub(
            p.open.channel).SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="nope"), timeout=10))),
    ]
    return cases


def _unknown_region() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="vec8")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 8])
    tensor.parameters[REGION_PARAMETER].string_param = "never-registered"
    tensor.parameters[BYTE_SIZE_PARAMETER].int64_param = 32
    return request


def rest_cases() -> list[Case]:
    json_headers = {"Content-Type": "application/json"}
    paths = {
        "model-dotdot-encoded": ("GET", "/v2/models/..%2F..%2Fetc%2Fpasswd/config"),
        "model-dotdot-plain": ("GET", "/v2/models/../../etc/passwd/config"),
        "model-dot-encoded": ("GET", "/v2/models/%2e%2e/config"),
        "version-dotdot": ("GET", "/v2/models/embed/versions/..%2F..%2F/config"),
        "load-dotdot": ("POST", "/v2/repository/models/..%2Fembed/load"),
        "load-absolute": ("POST", "/v2/repository/models/%2Fetc/load"),
        "load-nul": ("POST", "/v2/repository/models/embed%00/load"),
        "load-backslash": ("POST", "/v2/repository/models/a%5Cb/load"),
        "double-slash": ("GET", "//etc/passwd"),
        "static-dotdot": ("GET", "/static/../../etc/passwd"),
    }
    cases = [Case(f"rest/{name}", "rest", lambda p, m=method, u=url: rest(p, m, u), quick=name == "load-dotdot")
             for name, (method, url) in paths.items()]
    cases += [
        Case("rest/load-sends-file-parameter", "rest", lambda p: rest(
            p, "POST", "/v2/repository/models/embed/load",
            json.dumps({"parameters": {"file:1/model.py": "aW1wb3J0IG9z"}}).encode(), json_headers)),
        Case("rest/load-sends-config", "rest", lambda p: rest(
            p, "POST", "/v2/repository/models/embed/load", json.dumps({"parameters": {"config": "{}"}}).encode(),
            json_headers)),
        Case("rest/token-server-infer-without-token", "rest", lambda p: rest(
            p, "POST", "/v2/models/vec8/infer", b"{}", json_headers, server="guarded")),
        Case("rest/token-server-metrics-without-token", "rest", lambda p: rest(p, "GET", "/metrics", server="guarded")),
        Case("rest/token-server-wrong-token", "rest", lambda p: rest(
            p, "GET", "/v2/models/vec8", headers={"Authorization": "Bearer nope"}, server="guarded")),
        Case("rest/control-infer", "rest", lambda p: rest(p, "POST", "/v2/models/vec8/infer", json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [1.0] * 8}]}).encode(),
            json_headers, control=True), expected="served"),
    ]
    return cases


def header_cases() -> list[Case]:
    def request(headers: str, body: bytes = b"") -> bytes:
        return (f"POST /v2/models/vec8/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n").encode() + body

    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [1.0] * 8}]}).encode()
    wrong_shape = body.replace(b"[1, 8]", b'"ab"')
    table = {
        "content-length-4gib": request("Content-Length: 4294967296\r\n", b"{}"),
        "content-length-negative": request("Content-Length: -1\r\n", b"{}"),
        "content-length-and-chunked": request("Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        "inference-header-longer-than-body": request(
            f"Content-Length: {len(body)}\r\nInference-Header-Content-Length: 99999999\r\n", body),
        "inference-header-negative": request(
            f"Content-Length: {len(body)}\r\nInference-Header-Content-Length: -5\r\n", body),
        "inference-header-not-a-number": request(
            f"Content-Length: {len(body)}\r\nInference-Header-Content-Length: abc\r\n", body),
        "header-line-100kb": request("X-Big: " + "a" * 100_000 + "\r\nContent-Length: 2\r\n", b"{}"),
        "body-not-json": request("Content-Length: 9\r\nContent-Type: application/json\r\n", b"not json!"),
        "shape-wrong-type": request(f"Content-Length: {len(wrong_shape)}\r\n", wrong_shape),
    }
    cases = [Case(f"headers/{name}", "headers", lambda p, d=data: raw_http(p, d),
                  quick=name == "content-length-4gib") for name, data in table.items()]
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    huge = body.replace(b"[1, 8]", b"[1, " + b"9" * 400 + b"]")
    cases += [
        Case("headers/deep-json-body", "headers", lambda p: raw_http(
            p, request(f"Content-Length: {len(deep)}\r\nContent-Type: application/json\r\n", deep)),
             finding="#28.12"),
        Case("headers/huge-integer-in-shape", "headers", lambda p: raw_http(
            p, request(f"Content-Length: {len(huge)}\r\nContent-Type: application/json\r\n", huge)),
             finding="#28.12"),
    ]
    return cases


def bind_cases() -> list[Case]:
    def start(args: list, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tensorfleet.coordinator", *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                              cwd=REPO_ROOT)

    def refused_start(args: list, words: str) -> Callable[[Probe], Result]:
        def run(probe: Probe) -> Result:
            done = start(args(probe) if callable(args) else args)
            text = done.stderr[-400:]
            if done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr:
                return Result("refused", text.strip().splitlines()[-1] if text.strip() else "")
            return Result("failed", f"exit {done.returncode}: {text}")
        return run

    model = ["serve", "--model-repository", MODELS, "--model", "vec8", "--port", "0"]
    cases = []
    for host in ("0.0.0.0", "::"):
        cases.append(Case(f"binds/model-server-{host}-no-token", "binds",
                          refused_start([*model, "--host", host], "--token-file"), limit_s=60, quick=host == "::"))
        cases.append(Case(f"binds/coordinator-{host}-no-token", "binds", refused_start(
            lambda p, h=host: ["coordinator", "serve", "--host", h, "--port", "0", "--state-dir", p.root / "bindstate"],
            "--token-file"), limit_s=60))
    for name, content, mode, words in (("one-character", "x\n", 0o600, "too easy to guess"),
                                       ("world-writable", SUBMIT_TOKEN + "\n", 0o666, "writable by group or others")):
        def weak(probe: Probe, content=content, mode=mode, words=words, name=name) -> Result:
            path = probe.root / "secrets" / f"weak-{name}"
            path.write_text(content)
            path.chmod(mode)
            return refused_start(["coordinator", "serve", "--port", "0", "--state-dir", probe.root / "weakstate",
                                  "--token-file", path], words)(probe)
        cases.append(Case(f"tokens/token-file-{name}", "tokens", weak, finding="#28.12", limit_s=60))

    def metrics_in_use(probe: Probe) -> Result:
        return refused_start([*model, "--metrics-port", str(probe.open.http_port)],
                             "cannot listen for metrics")(probe)

    cases.append(Case("binds/metrics-port-in-use", "binds", metrics_in_use, finding="#28.12", limit_s=90))
    return cases


def token_cases() -> list[Case]:
    def control_stub(probe: Probe) -> tf_grpc.ServerControlStub:
        return tf_grpc.ServerControlStub(probe.guarded.channel)

    def unauthenticated(call: Callable[[Probe], object]) -> Callable[[Probe], Result]:
        def run(probe: Probe) -> Result:
            try:
                call(probe)
            except grpc.RpcError as error:
                ok = error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
                return Result("refused" if ok else "failed", f"{error.code().name}: {error.details()}"[:200])
            return Result("failed", "served without the token")
        return run

    def guarded(probe: Probe) -> pb_grpc.GRPCInferenceServiceStub:
        return pb_grpc.GRPCInferenceServiceStub(probe.guarded.channel)

    bad = {"none": (), "wrong": (("authorization", "Bearer nope"),),
           "padded": (("authorization", f"Bearer {SERVER_TOKEN} "),),
           "lowercase-scheme": (("authorization", f"bearer {SERVER_TOKEN}"),),
           "submit-token": (("authorization", f"Bearer {SUBMIT_TOKEN}"),)}
    cases = [Case(f"tokens/model-server-infer-{name}", "tokens",
                  unauthenticated(lambda p, a=auth: guarded(p).ModelInfer(vec8(1), timeout=10, metadata=a)),
                  quick=name == "none") for name, auth in bad.items()]
    cases += [
        Case("tokens/model-server-index-without-token", "tokens", unauthenticated(
            lambda p: guarded(p).RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10))),
        Case("tokens/model-server-unload-without-token", "tokens", unauthenticated(
            lambda p: guarded(p).RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="vec8"), timeout=10))),
        Case("tokens/model-server-drain-without-token", "tokens", unauthenticated(
            lambda p: control_stub(p).Drain(tf.DrainRequest(), timeout=10))),
        Case("tokens/model-server-stream-without-token", "tokens", unauthenticated(
            lambda p: list(guarded(p).ModelStreamInfer(iter([vec8(1)]), timeout=10)))),
        Case("tokens/coordinator-submit-without-token", "tokens", unauthenticated(
            lambda p: coordinator(p).SubmitJob(tf.SubmitJobRequest(spec="{}"), timeout=10))),
        Case("tokens/coordinator-list-without-token", "tokens", unauthenticated(
            lambda p: coordinator(p).ListJobs(tf.ListJobsRequest(), timeout=10))),
        Case("tokens/coordinator-with-server-token", "tokens", unauthenticated(
            lambda p: coordinator(p).ListJobs(tf.ListJobsRequest(), timeout=10, metadata=SERVER_AUTH))),
        Case("tokens/health-names-no-model", "tokens", _health_names_a_model, finding="#28.12", quick=True),
        Case("tokens/list-servers-shows-no-token", "tokens", _list_servers_shows_no_token),
        Case("tokens/no-token-on-any-command-line", "tokens", _command_lines),
        Case("tokens/job-naming-its-own-listener", "tokens", lambda p: run_job(p, job(
            p, "steal", model__servers=[f"127.0.0.1:{p.recorder.port}"], policy={"server_wait_s": 2})),
             finding="#28.1", quick=True, limit_s=60),
        Case("tokens/job-hostfile-naming-its-own-listener", "tokens", _hostfile_listener, finding="#28.1", limit_s=60),
    ]
    return cases


def _health_names_a_model(probe: Probe) -> Result:
    health = health_pb2_grpc.HealthStub(probe.guarded.channel)
    try:
        reply = health.Check(health_pb2.HealthCheckRequest(service="vec8"), timeout=5)
    except grpc.RpcError as error:
        return Result("refused", f"{error.code().name} for a model name, as for any other name")
    return Result("leaked", f"health answers {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)} "
                            "for a model name without a token")


def _list_servers_shows_no_token(probe: Probe) -> Result:
    reply = coordinator(probe).ListServers(tf.ListServersRequest(), timeout=15, metadata=SUBMIT_AUTH)
    text = str(reply)
    if SERVER_TOKEN in text or SUBMIT_TOKEN in text:
        return Result("leaked", "a token in ListServers")
    return Result("refused", f"{len(reply.servers)} servers listed, no token")


def _command_lines(probe: Probe) -> Result:
    for service in probe.services:
        cmdline = Path(f"/proc/{service.process.pid}/cmdline").read_bytes()
        if SERVER_TOKEN.encode() in cmdline or SUBMIT_TOKEN.encode() in cmdline:
            return Result("leaked", f"a token on {service.name}'s command line")
    return Result("refused", "no token on any command line")


def _hostfile_listener(probe: Probe) -> Result:
    hostfile = probe.root / "data" / "hosts"
    hostfile.write_text(f"127.0.0.1:{probe.recorder.port}\n")
    return run_job(probe, job(probe, "steal-hostfile", model__servers=[f"hostfile:{hostfile}"],
                              policy={"server_wait_s": 2}))


def spec_cases() -> list[Case]:
    table = {
        "input-outside-data-root": {"input__path": "{w}/outside/secret.fasta"},
        "input-dotdot": {"input__path": "{w}/data/../outside/secret.fasta"},
        "input-etc-passwd": {"input__path": "/etc/passwd", "input__format": "fasta"},
        "input-symlink-escapes": {"input__path": "{w}/data/escape.fasta"},
        "output-outside-root": {"output__path": "{w}/outside/stolen.h5"},
        "output-symlinked-folder": {"output__path": "{w}/out/escape/stolen.h5"},
        "job-dir-outside": {"job_dir": "{w}/outside/jobdir"},
        "hostfile-outside": {"model__servers": ["hostfile:{w}/outside/hosts"]},
        "local-without-model-root": {"model__servers": None, "model__local": {"repository": str(MODELS)}},
        "inline-token": {"model__token": "leaky-token-value"},
        "url-outside-prefix": {"output__path": "s3://other/x.h5"},
        "parts-outside-prefix": {"output__parts": "s3://other/parts"},
        "job-name-dotdot": {"name": ".."},
        "model-name-traversal": {"model__name": "../../outside"},
        "model-name-500-chars": {"model__name": "m" * 500},
        "output-nul-byte": {"output__path": "{w}/out/a\u0000b.h5"},
    }

    def expand(value, world: Path):
        if isinstance(value, str):
            return value.replace("{w}", str(world))
        if isinstance(value, list):
            return [expand(v, world) for v in value]
        return value

    cases = [Case(f"spec/{name}", "spec", lambda p, c=changes: submit(p, job(p, "attack", **{
        k: expand(v, p.root) for k, v in c.items()})), quick=name == "input-symlink-escapes")
             for name, changes in table.items()]
    cases += [
        Case("spec/url-dotdot-passes-prefix", "spec", lambda p: submit(p, job(p, "url", output__path="s3://b/a/../b/x.h5")),
             finding="#28.12"),
        Case("spec/url-prefix-boundary", "spec", lambda p: submit(p, job(p, "url", output__path="s3://b/ab/x.h5")),
             finding="#28.12"),
        Case("spec/output-is-coordinator-database", "spec", lambda p: submit(p, job(
            p, "db", output__path=str(p.root / "out" / "state" / "coordinator.sqlite"), output__format="csv")),
             finding="#28.4", quick=True),
        Case("spec/output-is-a-user-file", "spec", _user_file, finding="#28.4"),
        Case("spec/output-folder-swapped-while-queued", "spec", _swapped_while_queued, finding="#28.5", limit_s=90),
        Case("spec/control-allowed-job", "spec", lambda p: run_job(p, job(p, "fine"), expect="SUCCEEDED"),
             expected="served", quick=True, limit_s=90),
    ]
    return cases


def _user_file(probe: Probe) -> Result:
    path = probe.root / "out" / "notes.h5"
    path.write_bytes(b"a user's file")
    result = submit(probe, job(probe, "notes", output__path=str(path)))
    if path.read_bytes() != b"a user's file":
        return Result("failed", "the user's file changed")
    return result


def _swapped_while_queued(probe: Probe) -> Result:
    sub = probe.root / "out" / "swap"
    sub.mkdir(exist_ok=True)
    stub = coordinator(probe)
    blockers = [stub.SubmitJob(tf.SubmitJobRequest(spec=json.dumps(job(
        probe, f"blocker{i}", model__servers=["127.0.0.1:1"], policy={"server_wait_s": 120}))),
        timeout=30, metadata=SUBMIT_AUTH) for i in range(2)]  # --max-jobs 2: both run, the next waits
    try:
        target = stub.SubmitJob(tf.SubmitJobRequest(spec=json.dumps(job(
            probe, "swapped", output__path=str(sub / "result.h5")))), timeout=30, metadata=SUBMIT_AUTH)
        sub.rmdir()
        sub.symlink_to(probe.root / "outside", target_is_directory=True)
    finally:
        for blocker in blockers:
            stub.CancelJob(tf.CancelJobRequest(job_id=blocker.job_id), timeout=10, metadata=SUBMIT_AUTH)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        record = stub.GetJob(tf.GetJobRequest(job_id=target.job_id), timeout=10, metadata=SUBMIT_AUTH)
        if tf.JobState.Name(record.state) in FINAL:
            break
        time.sleep(0.2)
    written = sorted(os.listdir(probe.root / "outside"))
    if any("result" in name for name in written):
        return Result("leaked", f"written through the symlink: {written}")
    state = tf.JobState.Name(record.state)
    return Result("refused" if state == "FAILED" else "failed", f"{state}: {record.error}"[:240])


def yaml_cases() -> list[Case]:
    def yaml_job(probe: Probe, name_value: str) -> str:
        return (f"name: {name_value}\ninput: {{path: {probe.root / 'data' / 'in.fasta'}}}\n"
                f"model: {{name: embed, servers: ['{probe.guarded.address}']}}\n"
                f"output: {{path: {probe.root / 'out' / 'y.h5'}}}\n")

    bomb = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    bomb += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    cases = [
        Case("yaml/python-object-apply", "yaml", lambda p: submit(
            p, yaml_job(p, f"!!python/object/apply:os.system ['touch {p.root / 'outside' / 'pwned'}']")), quick=True),
        Case("yaml/python-name", "yaml", lambda p: submit(p, yaml_job(p, "!!python/name:os.system"))),
        Case("yaml/python-object-new", "yaml", lambda p: submit(p, yaml_job(p, "!!python/object/new:os.system [id]"))),
        Case("yaml/binary-tag-smuggles-a-path", "yaml", lambda p: submit(p, yaml_job(p, "b").replace(
            f"{{path: {p.root / 'data' / 'in.fasta'}}}", "{path: !!binary L2V0Yy9wYXNzd2Q=, format: fasta}"))),
        Case("yaml/custom-tag", "yaml", lambda p: submit(p, yaml_job(p, "!evil x"))),
        Case("yaml/set-tag", "yaml", lambda p: submit(p, yaml_job(p, "!!set {a, b}"))),
        Case("yaml/alias-bomb", "yaml", lambda p: submit(p, "\n".join(bomb) + "\n")),
        Case("yaml/spec-2mib", "yaml", lambda p: submit(p, yaml_job(p, "big") + "# " + "x" * (2 << 20) + "\n")),
        Case("yaml/nested-50000-brackets", "yaml", _deep_while_health, finding="#28.7", quick=True),
        Case("yaml/nested-json-100000", "yaml", lambda p: submit(p, '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"),
             finding="#28.7"),
        Case("yaml/duplicate-keys", "yaml", lambda p: submit(p, yaml_job(p, "one") + "name: two\n"), finding="#28.12"),
        Case("yaml/duplicate-keys-json", "yaml", lambda p: submit(p, '{"name": "a", "name": "b"}'), finding="#28.12"),
        Case("yaml/sweep-10000-models", "yaml", _wide_sweep, finding="#28.12", limit_s=60),
        Case("yaml/not-a-mapping", "yaml", lambda p: submit(p, "- just\n- a list\n")),
        Case("yaml/nul-in-name", "yaml", lambda p: submit(p, yaml_job(p, '"a\\0b"'))),
    ]
    return cases


def _deep_while_health(probe: Probe) -> Result:
    """The submission and a health check at once: health must answer within 1 s meanwhile."""
    import threading

    answers: list[float] = []

    def watch() -> None:
        time.sleep(0.05)
        started = time.monotonic()
        health_pb2_grpc.HealthStub(probe.coordinator.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        answers.append(time.monotonic() - started)

    thread = threading.Thread(target=watch)
    thread.start()
    result = submit(probe, "[" * 50_000)
    thread.join()
    if not answers or answers[0] > 1.0:
        return Result("hung", f"health took {answers[0] if answers else 'over 5'} s during the submission")
    return result


def _wide_sweep(probe: Probe) -> Result:
    sweep = {"name": "wide", "sources": [{"path": str(probe.root / "data" / "in.fasta")}],
             "models": [{"name": f"m{i}", "servers": [probe.guarded.address]} for i in range(10_000)],
             "output": {"dir": str(probe.root / "out" / "sheets")}}
    return submit(probe, json.dumps(sweep, separators=(",", ":")))


def file_cases() -> list[Case]:
    def data(probe: Probe) -> Path:
        return probe.root / "data"

    def vec8_job(probe: Probe, name: str, path: Path, fmt: str) -> dict:
        return job(probe, name, input={"path": str(path), "format": fmt}, model={"name": "vec8",
                   "servers": [probe.guarded.address]}, output={"path": str(probe.root / "out" / f"{name}.h5")})

    def external(probe: Probe) -> Result:
        import h5py

        path = data(probe) / "external.h5"
        with h5py.File(path, "w") as handle:
            handle.create_dataset("x", shape=(4, 8), dtype="f4", external=[("/etc/passwd", 0, 128)])
        return run_job(probe, vec8_job(probe, "external", path, "hdf5"))

    def virtual(probe: Probe) -> Result:
        import h5py

        source = probe.root / "outside" / "v.h5"
        with h5py.File(source, "w") as handle:
            handle["x"] = np.full((4, 8), 7, np.float32)
        layout = h5py.VirtualLayout(shape=(4, 8), dtype="f4")
        layout[:] = h5py.VirtualSource(str(source), "x", shape=(4, 8))
        path = data(probe) / "virtual.h5"
        with h5py.File(path, "w") as handle:
            handle.create_virtual_dataset("x", layout)
        return run_job(probe, vec8_job(probe, "virtual", path, "hdf5"))

    def sparse(probe: Probe, name: str, indices: list[int], indptr: list[int]) -> Result:
        import anndata
        import scipy.sparse

        path = data(probe) / f"{name}.h5ad"
        matrix = scipy.sparse.csr_matrix(np.eye(2, 8, dtype=np.float32))
        anndata.AnnData(matrix).write_h5ad(path)
        import h5py

        with h5py.File(path, "r+") as handle:
            del handle["X/indices"], handle["X/indptr"]
            handle["X/indices"] = np.asarray(indices, np.int64)
            handle["X/indptr"] = np.asarray(indptr, np.int64)
        return run_job(probe, vec8_job(probe, name, path, "h5ad"))

    def huge_rows(probe: Probe) -> Result:
        import h5py

        path = data(probe) / "huge.h5"
        with h5py.File(path, "w") as handle:
            handle.create_dataset("x", shape=(10**12, 8), dtype="f4", chunks=(1024, 8))
        return run_job(probe, vec8_job(probe, "huge", path, "hdf5"))

    def wide_rows(probe: Probe) -> Result:
        import h5py

        path = data(probe) / "wide.h5"
        with h5py.File(path, "w") as handle:
            handle.create_dataset("x", shape=(4, 10**9), dtype="f4", chunks=(1, 1024))
        return run_job(probe, vec8_job(probe, "wide", path, "hdf5"))

    def long_fasta(probe: Probe) -> Result:
        path = data(probe) / "long.fasta.gz"
        with gzip.open(path, "wb", compresslevel=1) as handle:
            handle.write(b">long\n" + b"A" * (4 << 20) + b"\n")
        return run_job(probe, job(probe, "long", input={"path": str(path)}))

    def npy_header(probe: Probe) -> Result:
        path = data(probe) / "lying.npy"
        header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000000000, 8), }"
        header += " " * (118 - len(header)) + "\n"
        path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\x00" * 64)
        return run_job(probe, vec8_job(probe, "npy", path, "npy"))

    return [
        Case("files/hdf5-external-storage-etc-passwd", "files", external, finding="#28.2", limit_s=90),
        Case("files/hdf5-virtual-dataset-outside-root", "files", virtual, finding="#28.2", limit_s=90),
        Case("files/h5ad-csr-indices-out-of-bounds", "files", lambda p: sparse(p, "csr-indices", [10**6, 1], [0, 1, 2]),
             finding="#28.3", limit_s=90),
        Case("files/h5ad-csr-negative-indptr", "files", lambda p: sparse(p, "csr-indptr", [0, 1], [0, -5, 2]),
             finding="#28.3", limit_s=90),
        Case("files/fasta-record-over-max-row-bytes", "files", long_fasta, finding="#28.8", limit_s=90),
        Case("files/hdf5-10p12-rows-crash", "files", huge_rows, finding="#28.9", limit_s=90, quick=True),
        Case("files/hdf5-rows-of-10p9-floats", "files", wide_rows, limit_s=90),
        Case("files/npy-header-10p18-elements", "files", npy_header, limit_s=90),
    ]


def late_cases() -> list[Case]:
    """Cases that may change a server's state (an unload that should be refused): they run last."""
    def cross_site_unload(probe: Probe) -> Result:
        result = rest(probe, "POST", "/v2/repository/models/embed/unload", b"{}",
                      {"Origin": "http://evil.example", "Content-Type": "text/plain"})
        if result.outcome == "failed":  # it was unloaded: load it again for whatever runs next
            rest(probe, "POST", "/v2/repository/models/embed/load", b"{}", {"Content-Type": "application/json"})
        return result

    def half_request(probe: Probe) -> Result:
        """Half a request, then silence: the server must close it (header/body timeouts)."""
        with raw_socket(probe.open.http_port, timeout=75) as sock:
            sock.sendall(b"POST /v2/models/vec8/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n0123")
            started = time.monotonic()
            try:
                closed = sock.recv(4096) is not None
            except TimeoutError:
                closed = False
        waited = time.monotonic() - started
        return Result("refused", f"closed after {waited:.0f} s") if closed else Result("failed", "held over 75 s")

    def foreign_host(probe: Probe) -> Result:
        return rest(probe, "GET", "/v2/models/vec8", headers={"Host": "evil.example"})

    def metrics_without_token(probe: Probe) -> Result:
        import socket as sockets

        with sockets.socket() as spare:
            spare.bind(("127.0.0.1", 0))
            port = spare.getsockname()[1]
        from bench.probe import Service

        server = Service("metrics-server", ["serve", "--model-repository", MODELS, "--model", "vec8",
                                            "--token-file", probe.server_token_file, "--metrics-port", str(port)],
                         probe.root / "run" / "metrics")
        server.start()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            return http_answer(response.status, response.read())
        finally:
            server.stop()

    return [
        Case("rest/foreign-host-header", "rest", foreign_host, finding="#28.11"),
        Case("rest/cross-site-unload", "rest", cross_site_unload, finding="#28.11"),
        Case("rest/metrics-port-without-token", "rest", metrics_without_token, finding="#28.12", limit_s=90),
        Case("rest/half-request-held", "rest", half_request, finding="#28.10", limit_s=90),
    ]


def prepare_world(probe: Probe) -> None:
    """The files the spec cases point at (the probe's data root, the outside folder)."""
    for path, rows in ((probe.root / "data" / "in.fasta", 6), (probe.root / "outside" / "secret.fasta", 2)):
        path.write_text("".join(f">r{row}\n{'ACDEFGHIKLMNPQRSTVWY'[row:] * 2}\n" for row in range(rows)))
    (probe.root / "outside" / "hosts").write_text("127.0.0.1:1\n")
    escape = probe.root / "data" / "escape.fasta"
    if not escape.exists():
        escape.symlink_to(probe.root / "outside" / "secret.fasta")
    folder = probe.root / "out" / "escape"
    if not folder.exists():
        folder.symlink_to(probe.root / "outside", target_is_directory=True)


def all_cases() -> list[Case]:
    pid = os.getpid()
    return [*protobuf_cases(), *shape_cases(), *bytes_cases(), *shm_cases(pid), *rest_cases(), *header_cases(),
            *token_cases(), *spec_cases(), *yaml_cases(), *file_cases(), *bind_cases(), *late_cases()]
