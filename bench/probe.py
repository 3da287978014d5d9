"""Replay the attack table (bench/probe_cases.py) against live processes on loopback.

Issue 28: an outside probe sent 168 hostile requests and files to tensorfleet; this replays the
table so the next probe starts from it. Four processes on loopback, each on a port from the OS:
a model server without a token (REST on), a model server with a token (REST on), a coordinator
service with a submit token and the second server's token (`--server-token-file`, `--servers`
naming that server), and a recording listener a submitter controls. Every case is one request,
file or job; after each, every process must still be alive and answer health within 1 s.

Each case ends as one of
- refused: a clean error (gRPC status, 4xx, a FAILED job naming its cause), nothing leaked;
- served: a control case that must work (a valid request, an allowed job);
- failed: a wrong answer (accepted what must be refused, HTTP 500, a crash reported as success);
- leaked: a token reached someone who should not see it, or bytes/files crossed a root;
- crashed: a process died (it is restarted for the cases after it);
- hung: a process did not answer health within 1 s after the case, or the case ran past its limit.

Prints one JSON line: counts, seconds, load, and `failing` (id, outcome, why, owner) for every
case that did not end as expected; `--cases` adds every case's result. Cases for findings fixed
on other branches (owner named) fail until those branches are merged: the line says so.

    python -m bench.probe                  # the whole table (>= 150 cases, under 5 minutes)
    python -m bench.probe --quick          # a few cases of every family (the test's subset)
    python -m bench.probe --family yaml --cases
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import emit, machine
from tensorfleet.core.process import ProcessStartError, server_command, start_and_wait, stop_process

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = REPO_ROOT / "tests" / "coordinator" / "models"
SERVER_TOKEN = "probe-server-token-4c1d9e7a"
SUBMIT_TOKEN = "probe-submit-token-b83f20e5"
HEALTH_DEADLINE_S = 1.0
OUTCOMES = ("refused", "served", "failed", "leaked", "crashed", "hung")


@dataclass
class Result:
    outcome: str
    detail: str = ""


@dataclass
class Case:
    id: str
    family: str
    run: Callable[[Probe], Result]
    #: Issue 28's finding this case reproduces ("#28.1"), or "" for the families handled before.
    finding: str = ""
    #: Which branch fixes it, when not this one (its failures are expected until the merge).
    owner: str = ""
    expected: str = "refused"
    quick: bool = False
    #: Seconds the case may take before it counts as hung (jobs take longer than one rpc).
    limit_s: float = 20.0


@dataclass
class Service:
    """One server process of the probe, restartable."""

    name: str
    args: list
    workdir: Path
    module: str = "tensorfleet.coordinator"
    env: dict = field(default_factory=dict)
    process: object = None
    port: int = 0
    http_port: int = 0
    channel: grpc.Channel | None = None
    restarts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        stamp = time.monotonic_ns()
        port_file, log = self.workdir / f"port-{stamp}", self.workdir / f"log-{stamp}.txt"
        args = list(map(str, self.args))
        http_file = self.workdir / f"http-{stamp}"
        if "--http-port" in args:
            args += ["--http-port-file", str(http_file)]
        command = server_command(*args, port_file=port_file, module=self.module)
        self.process, self.port = start_and_wait(command, port_file, log, 180,
                                                 env={"OMP_NUM_THREADS": "1", **self.env}, cwd=self.workdir)
        if "--http-port" in args:
            deadline = time.monotonic() + 30
            while not http_file.is_file() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.http_port = int(http_file.read_text())
        self.channel = grpc.insecure_channel(self.address)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.process is not None:
            stop_process(self.process, timeout=20)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        """Health answers SERVING within HEALTH_DEADLINE_S (gRPC; REST too when it is on)."""
        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(),
                                                                   timeout=HEALTH_DEADLINE_S)
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                return False
            if self.http_port:
                connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=HEALTH_DEADLINE_S)
                try:
                    connection.request("GET", "/v2/health/live")
                    return connection.getresponse().status == 200
                finally:
                    connection.close()
            return True
        except (grpc.RpcError, OSError):
            return False


class Recorder:
    """A listener the submitter controls: records every call's metadata, answers UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers([self])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def service(self, details: grpc.HandlerCallDetails):
        self.seen.append((details.method, repr(details.invocation_metadata)))

    def leaked(self, secret: str) -> list[str]:
        return [method for method, metadata in self.seen if secret in metadata]


class Probe:
    """The world every case sees: the servers, the folders, the tokens."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for name in ("data", "out", "outside", "secrets", "models"):
            (root / name).mkdir(parents=True, exist_ok=True)
        self.server_token_file = root / "secrets" / "server"
        self.submit_token_file = root / "secrets" / "submit"
        for path, token in ((self.server_token_file, SERVER_TOKEN), (self.submit_token_file, SUBMIT_TOKEN)):
            path.write_text(token + "\n")
            path.chmod(0o600)
        self.recorder = Recorder()
        model_args = ["serve", "--model-repository", MODELS, "--model", "vec8", "--model", "embed", "--http-port", "0"]
        self.open = Service("open-server", model_args, root / "run" / "open")
        self.guarded = Service("token-server", [*model_args, "--token-file", self.server_token_file],
                               root / "run" / "guarded")
        self.services = [self.open, self.guarded]
        self.coordinator: Service | None = None

    def start(self) -> None:
        self.open.start()
        self.guarded.start()
        self.coordinator = Service("coordinator", [
            "coordinator", "serve", "--state-dir", self.root / "out" / "state", "--token-file", self.submit_token_file,
            "--server-token-file", self.server_token_file, "--servers", self.guarded.address,
            "--data-root", self.root / "data", "--output-root", self.root / "out", "--allow-url-prefix", "s3://b/a/",
            "--max-jobs", "2",
        ], self.root / "run" / "coordinator", env={"TENSORFLEET_MAX_ROW_BYTES": str(1 << 20)})
        self.coordinator.start()
        self.services.append(self.coordinator)

    def stop(self) -> None:
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                service.stop()
        self.recorder.server.stop(None)

    # --- what cases share ---------------------------------------------------------------
    def outside_snapshot(self) -> set[str]:
        return {str(p.relative_to(self.root / "outside")) for p in (self.root / "outside").rglob("*")}

    def tokens_in_files(self) -> list[str]:
        """Files the coordinator and its jobs left that hold either token (none may)."""
        found = []
        for path in (self.root / "out").rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file() and path.stat().st_size < (8 << 20):
                    data = path.read_bytes()
                    if SERVER_TOKEN.encode() in data or SUBMIT_TOKEN.encode() in data:
                        found.append(str(path))
        return found


def check_after(probe: Probe, case: Case, result: Result) -> Result:
    """Every process alive and answering health within 1 s; a dead one is restarted."""
    for service in probe.services:
        if not service.alive():
            code = service.process.poll() if service.process is not None else None
            service.stop()
            service.restarts += 1
            try:
                service.start()
            except ProcessStartError as error:
                return Result("crashed", f"{service.name} exited ({code}) and could not restart: {error}")
            return Result("crashed", f"{service.name} exited with {code}")
        if not service.healthy():
            time.sleep(2)  # tell a stall from a process that stays down
            return Result("hung", f"{service.name} did not answer health within {HEALTH_DEADLINE_S} s")
    leaked = probe.recorder.leaked(SERVER_TOKEN)
    if leaked:
        probe.recorder.seen.clear()
        return Result("leaked", f"the server token reached the submitter's listener ({leaked[0]})")
    return result


def run_case(probe: Probe, case: Case) -> Result:
    outcome: list[Result] = []

    def body() -> None:
        try:
            outcome.append(case.run(probe))
        except Exception as error:  # noqa: BLE001 - a case that raised is a wrong answer, shown
            outcome.append(Result("failed", f"the probe itself raised {type(error).__name__}: {error}"[:300]))

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(case.limit_s)
    result = outcome[0] if outcome else Result("hung", f"no answer within {case.limit_s:g} s")
    return check_after(probe, case, result)


def load() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return ""


def main(argv: list[str] | None = None) -> int:
    from bench.probe_cases import all_cases, prepare_world

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few cases of every family")
    parser.add_argument("--family", action="append", help="only these families (repeatable)")
    parser.add_argument("--cases", action="store_true", help="every case's result in the JSON line")
    args = parser.parse_args(argv)
    cases = all_cases()
    if args.quick:
        cases = [case for case in cases if case.quick]
    if args.family:
        cases = [case for case in cases if case.family in args.family]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tf-probe-") as folder:
        probe = Probe(Path(folder))
        try:
            probe.start()
            prepare_world(probe)
            setup_s = time.monotonic() - started
            results = [(case, run_case(probe, case)) for case in cases]
            leaked_files = probe.tokens_in_files()
        finally:
            probe.stop()
    counts = dict.fromkeys(OUTCOMES, 0)
    for _, result in results:
        counts[result.outcome] += 1
    failing = [
        {"id": case.id, "finding": case.finding, "outcome": result.outcome, "why": result.detail,
         **({"owner": case.owner} if case.owner else {})}
        for case, result in results if result.outcome != case.expected
    ]
    if leaked_files:
        counts["leaked"] += 1
        failing.append({"id": "token-in-files", "outcome": "leaked", "why": ", ".join(leaked_files[:5])})
    record = {
        "bench": "probe", "cases": len(results), **counts,
        "expected": sum(1 for case, result in results if result.outcome == case.expected),
        "unexpected_outside_other_branches": sum(1 for item in failing if not item.get("owner")),
        "families": sorted({case.family for case, _ in results}),
        "seconds": round(time.monotonic() - started, 1), "setup_seconds": round(setup_s, 1),
        "restarts": {s.name: s.restarts for s in probe.services if s.restarts},
        "failing": failing,
        "load": load(), "machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.cases:
        record["results"] = [{"id": case.id, "family": case.family, "finding": case.finding, "outcome": result.outcome,
                              "expected": case.expected, "detail": result.detail[:300]} for case, result in results]
    emit(record)
    return 0


def raw_socket(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


@contextlib.contextmanager
def quiet_channel(address: str) -> Iterator[grpc.Channel]:
    channel = grpc.insecure_channel(address)
    try:
        yield channel
    finally:
        channel.close()


if __name__ == "__main__":
    sys.exit(main())
