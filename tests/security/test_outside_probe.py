"""Issue 28's findings 1, 4, 5, 6, 7, 9 and the low items of 12 that are not REST: each reproduced
against real processes on loopback, each failing before its fix (checked once against the unfixed
code) and passing after. docs/security.md's attack table names them "#28.N"."""

from __future__ import annotations

import json
import os
import stat
import threading
from concurrent import futures
from pathlib import Path

import grpc
import h5py
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorfleet.client import (
    ConnectionOptions,
    CoordinatorClient,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from tensorfleet.client.coordinator_client import job_state
from tensorfleet.core.shared_memory import BYTE_SIZE_PARAMETER, REGION_PARAMETER
from tensorfleet.protos import inference_pb2 as pb
from tensorfleet.protos import inference_pb2_grpc as pb_grpc
from tests.coordinator.helpers import MODELS, make_fasta
from tests.serving import REPO_ROOT

from .helpers import run_cli, snapshot, spawned

SERVER_TOKEN = "server-probe-5e1f0a9c27"
SUBMIT_TOKEN = "submit-probe-0b7c4d2e19"


# --- #28.1: the server token goes only to servers the operator named ----------------------------------
class RecordingProxy:
    """The submitter's listener: records every call's metadata and forwards it to a server of theirs."""

    def __init__(self, upstream: str) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self._upstream = grpc.insecure_channel(upstream)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers([self])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def service(self, details: grpc.HandlerCallDetails):
        self.seen.append((details.method, {k: str(v) for k, v in details.invocation_metadata}))
        call = self._upstream.stream_stream(details.method)  # raw bytes, any rpc kind (same framing)
        return grpc.stream_stream_rpc_method_handler(lambda requests, context: call(requests))

    def close(self) -> None:
        self.server.stop(None)
        self._upstream.close()


def test_28_1_a_job_naming_its_own_listener_never_receives_the_server_token(tmp_path):
    (tmp_path / "secrets").mkdir()
    token_file = tmp_path / "secrets" / "server"
    token_file.write_text(SERVER_TOKEN + "\n")
    token_file.chmod(0o600)
    work = tmp_path / "work"
    work.mkdir()
    make_fasta(work / "in.fasta", 400)
    with spawned(["serve", "--model-repository", MODELS, "--model", "embed", "--token-file", token_file],
                 tmp_path / "operator") as operator, \
            spawned(["serve", "--model-repository", MODELS, "--model", "embed"], tmp_path / "theirs") as theirs, \
            spawned(["coordinator", "serve", "--state-dir", tmp_path / "state", "--server-token-file", token_file,
                     "--servers", operator.address, "--data-root", work, "--output-root", work],
                    tmp_path / "coordinator") as coordinator:
        proxy = RecordingProxy(theirs.address)
        try:
            with CoordinatorClient(coordinator.address) as client:
                job = client.submit({"name": "steal", "input": {"path": str(work / "in.fasta")},
                                     "model": {"name": "embed", "servers": [f"127.0.0.1:{proxy.port}"]},
                                     "chunking": {"chunk_rows": 8, "batch_rows": 4},
                                     "output": {"path": str(work / "out.h5")}})
                while job_state(client.get(job.job_id)) in ("QUEUED", "RUNNING"):
                    client.servers()  # ListServers probes every running job's servers too
                final = client.wait(job.job_id)
                control = client.submit({"name": "ours", "input": {"path": str(work / "in.fasta")},
                                         "model": {"name": "embed", "servers": [operator.address]},
                                         "output": {"path": str(work / "ours.h5")}})
                assert job_state(client.wait(control.job_id)) == "SUCCEEDED"  # the operator's server gets it
        finally:
            proxy.close()
    assert proxy.seen, "the job never reached its listener"
    leaked = [method for method, metadata in proxy.seen if SERVER_TOKEN in json.dumps(metadata)]
    assert not leaked, f"the server token reached the submitter's listener in {leaked[:3]}"
    assert job_state(final) == "SUCCEEDED", final.error  # their own tokenless server still serves them


# --- #28.4 and #28.5: outputs replace only our own files, in folders checked when written ----------------
@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe28")
    for name in ("data", "out", "outside"):
        (root / name).mkdir()
    make_fasta(root / "data" / "in.fasta", 6)
    with spawned(["serve", "--model-repository", MODELS, "--model", "embed"], root / "server") as server, \
            spawned(["coordinator", "serve", "--state-dir", root / "out" / "state", "--data-root", root / "data",
                     "--output-root", root / "out", "--allow-url-prefix", "s3://b/a/"], root / "coordinator") as coord:
        yield {"root": root, "server": server, "coordinator": coord}


def _job(service, output: Path | str, **extra) -> dict:
    root = service["root"]
    return {"name": extra.pop("name", "probe"), "input": {"path": str(root / "data" / "in.fasta")},
            "model": {"name": "embed", "servers": extra.pop("servers", [service["server"].address])},
            "output": {"path": str(output), **({"format": extra.pop("format")} if "format" in extra else {})}, **extra}


def test_28_4_an_output_naming_the_coordinators_database_or_a_user_file_is_refused(service):
    root = service["root"]
    database = root / "out" / "state" / "coordinator.sqlite"
    user_file = root / "out" / "notes.csv"
    user_file.write_text("mine\n")
    before = database.read_bytes()[:16]
    with CoordinatorClient(service["coordinator"].address) as client:
        for target in (database, user_file):
            with pytest.raises(PermissionDenied, match="tensorfleet did not write it"):
                client.submit(_job(service, target, format="csv"))
        assert not [job for job in client.jobs() if job.name == "probe"]  # nothing recorded; still answers
    assert user_file.read_text() == "mine\n"
    assert database.read_bytes()[:16] == before == b"SQLite format 3\x00"


def test_28_4_the_engine_refuses_to_replace_a_file_it_did_not_write_and_restart_replaces_its_own(tmp_path):
    make_fasta(tmp_path / "in.fasta", 5)
    job = {"name": "own", "input": {"path": str(tmp_path / "in.fasta")},
           "model": {"name": "embed", "local": {"repository": str(MODELS)}},
           "output": {"path": str(tmp_path / "result.h5")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    (tmp_path / "result.h5").write_text("a user's file\n")
    refused = run_cli(["run", tmp_path / "job.yaml"], timeout=240)
    assert refused.returncode == 2, refused.stderr
    assert "tensorfleet did not write it" in refused.stderr
    assert (tmp_path / "result.h5").read_text() == "a user's file\n"
    (tmp_path / "result.h5").unlink()
    for _ in range(2):  # written, then replaced by --restart: our own file
        done = run_cli(["run", tmp_path / "job.yaml", "--restart"], timeout=240)
        assert done.returncode == 0, done.stderr
        with h5py.File(tmp_path / "result.h5") as written:
            assert len(written["ids"]) == 5


def test_28_5_an_output_folder_swapped_for_a_symlink_while_queued_is_not_written_through(tmp_path):
    for name in ("data", "out", "outside"):
        (tmp_path / name).mkdir()
    make_fasta(tmp_path / "data" / "in.fasta", 6)
    (tmp_path / "out" / "sub").mkdir()
    with spawned(["serve", "--model-repository", MODELS, "--model", "embed"], tmp_path / "server") as server, \
            spawned(["coordinator", "serve", "--state-dir", tmp_path / "state", "--data-root", tmp_path / "data",
                     "--output-root", tmp_path / "out", "--max-jobs", "1"], tmp_path / "coordinator") as coordinator:
        with CoordinatorClient(coordinator.address) as client:
            blocker = client.submit({"name": "blocker", "input": {"path": str(tmp_path / "data" / "in.fasta")},
                                     "model": {"name": "embed", "servers": ["127.0.0.1:1"]},
                                     "policy": {"server_wait_s": 600}, "output": {"path": str(tmp_path / "out" / "b.h5")}})
            job = client.submit({"name": "swapped", "input": {"path": str(tmp_path / "data" / "in.fasta")},
                                 "model": {"name": "embed", "servers": [server.address]},
                                 "output": {"path": str(tmp_path / "out" / "sub" / "result.h5")}})
            assert job_state(client.get(job.job_id)) == "QUEUED"
            (tmp_path / "out" / "sub").rmdir()
            (tmp_path / "out" / "sub").symlink_to(tmp_path / "outside", target_is_directory=True)
            client.cancel(blocker.job_id)
            final = client.wait(job.job_id)
    assert job_state(final) == "FAILED"
    assert "outside" in final.error and "--output-root" in final.error, final.error
    assert snapshot(tmp_path / "outside") == set()


# --- #28.6: a truncated shared-memory region is a clean error, not SIGBUS ---------------------------------
def test_28_6_a_truncated_shared_memory_region_gets_an_error_and_the_server_lives(tmp_path):
    key = f"tf-probe28-{os.getpid()}"
    path = Path("/dev/shm") / key
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 1 << 20)
        with spawned(["serve", "--model-repository", REPO_ROOT / "tests" / "models", "--model", "simple"],
                     tmp_path) as server, grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name="r", key=key, offset=0, byte_size=1 << 20))
            os.ftruncate(fd, 0)  # the client shrinks its object under the server
            request = pb.ModelInferRequest(model_name="simple")
            for name in ("INPUT0", "INPUT1"):
                tensor = request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
                tensor.parameters[REGION_PARAMETER].string_param = "r"
                tensor.parameters[BYTE_SIZE_PARAMETER].int64_param = 64
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "truncated" in refused.value.details()
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        assert server.process.returncode == 0  # stopped by us, not by SIGBUS (-7)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


# --- #28.7 and #28.12: job files the coordinator refuses at submit ----------------------------------------
def test_28_7_deeply_nested_yaml_is_refused_fast_and_health_keeps_answering(service):
    address = service["coordinator"].address
    answered: list[int] = []

    def probe() -> None:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            answered.append(reply.status)

    with CoordinatorClient(address) as client:
        thread = threading.Thread(target=probe)
        with pytest.raises(InvalidArgument, match="nested over"):
            thread.start()
            client.submit("[" * 50_000, base_dir=service["root"])
        thread.join()
    assert answered == [health_pb2.HealthCheckResponse.SERVING]


def test_28_12_duplicate_yaml_keys_are_refused_naming_the_key(service):
    text = yaml.safe_dump(_job(service, service["root"] / "out" / "dup.h5")) + "name: second\n"
    with CoordinatorClient(service["coordinator"].address) as client:
        with pytest.raises(InvalidArgument, match="duplicate key 'name'"):
            client.submit(text, base_dir=service["root"])


def test_28_12_a_sweep_over_ten_thousand_models_is_refused_at_submit(service):
    root = service["root"]
    sweep = {"name": "wide", "sources": [{"path": str(root / "data" / "in.fasta")}],
             "models": [{"name": f"m{i}", "servers": ["127.0.0.1:1"]} for i in range(10_000)],
             "output": {"dir": str(root / "out" / "sheets")}}
    text = json.dumps(sweep, separators=(",", ":"))
    assert len(text) < 1024 * 1024  # the text passes the size limit; its resolved form does not
    with CoordinatorClient(service["coordinator"].address) as client:
        jobs_before = len(client.jobs())
        with pytest.raises(ResourceExhausted, match="TENSORFLEET_MAX_SPEC_BYTES"):
            client.submit(text, base_dir=root)
        assert len(client.jobs()) == jobs_before


def test_28_12_a_dotdot_url_does_not_pass_an_object_store_prefix(service):
    with CoordinatorClient(service["coordinator"].address) as client:
        with pytest.raises(PermissionDenied, match="'..' segments"):
            client.submit(_job(service, "s3://b/a/../b/x.h5"))
        with pytest.raises(PermissionDenied, match="object-store prefixes"):
            client.submit(_job(service, "s3://b/ab/x.h5"))


# --- #28.9: a crash is FAILED with exit code 3, never SUCCEEDED "some rows failed" -----------------------
def test_28_9_a_crashing_job_is_failed_with_its_last_traceback_line(tmp_path):
    (tmp_path / "data").mkdir()
    with h5py.File(tmp_path / "data" / "huge.h5", "w") as handle:  # 1.4 KB declaring 10^12 rows
        handle.create_dataset("x", shape=(10**12, 8), dtype="f4", chunks=(1024, 8))
    job = {"name": "crash", "input": {"path": str(tmp_path / "data" / "huge.h5"), "format": "hdf5"},
           "model": {"name": "vec8", "local": {"repository": str(MODELS)}}, "output": {"path": str(tmp_path / "o.h5")}}
    with spawned(["coordinator", "serve", "--state-dir", tmp_path / "state", "--data-root", tmp_path / "data",
                  "--output-root", tmp_path, "--model-root", MODELS], tmp_path / "coordinator") as coordinator:
        with CoordinatorClient(coordinator.address) as client:
            final = client.wait(client.submit(job).job_id)
    assert job_state(final) == "FAILED", (final.exit_code, final.error)
    assert final.exit_code in (2, 3) and "some rows failed" not in final.error  # 2 once the reader bounds it
    if final.exit_code == 3:
        assert final.error.startswith("the job crashed") and "Error" in final.error, final.error


def test_28_9_run_exits_3_on_a_crash(tmp_path):
    with h5py.File(tmp_path / "huge.h5", "w") as handle:
        handle.create_dataset("x", shape=(10**12, 8), dtype="f4", chunks=(1024, 8))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "name": "crash", "input": {"path": "huge.h5", "format": "hdf5"},
        "model": {"name": "vec8", "local": {"repository": str(MODELS)}}, "output": {"path": "o.h5"}}))
    done = run_cli(["run", tmp_path / "job.yaml"], timeout=240)
    assert done.returncode in (2, 3), done.stderr  # never 1 ("rows failed"); 2 once the reader bounds it
    if done.returncode == 3:
        assert "tensorfleet: crashed: " in done.stderr


# --- #28.12: token files, health --------------------------------------------------------------------------
@pytest.mark.parametrize("content,mode,words", [
    ("x\n", 0o600, "too easy to guess"),
    (SERVER_TOKEN + "\n", 0o666, "writable by group or others"),
], ids=["one-character", "world-writable"])
def test_28_12_a_weak_token_file_stops_the_start(tmp_path, content, mode, words):
    token_file = tmp_path / "token"
    token_file.write_text(content)
    token_file.chmod(mode)
    for command in (["serve", "--model-repository", MODELS, "--model", "embed"],
                    ["coordinator", "serve", "--state-dir", tmp_path / "state"]):
        done = run_cli([*command, "--token-file", token_file, "--port", "0"], timeout=60)
        assert done.returncode == 2, done.stderr
        assert str(token_file) in done.stderr and words in done.stderr, done.stderr


def test_28_12_a_world_readable_token_file_is_warned_about_loudly(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(SUBMIT_TOKEN + "\n")
    token_file.chmod(0o644)
    with spawned(["coordinator", "serve", "--state-dir", tmp_path / "state", "--token-file", token_file],
                 tmp_path / "run") as coordinator:
        with CoordinatorClient(coordinator.address, options=ConnectionOptions(token=SUBMIT_TOKEN)) as client:
            assert client.jobs() == []
        log = coordinator.log()
    assert "readable by every user" in log and f"chmod 600 {token_file}" in log
    assert SUBMIT_TOKEN not in log
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o644  # warned about, never changed behind one's back


def test_28_12_health_names_no_model_to_callers_without_the_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(SERVER_TOKEN + "\n")
    token_file.chmod(0o600)
    with spawned(["serve", "--model-repository", MODELS, "--model", "embed", "--token-file", token_file],
                 tmp_path / "run") as server, grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        answers = {}
        for name in ("embed", "no-such-model"):
            try:
                answers[name] = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            except grpc.RpcError as error:
                answers[name] = error.code()
    assert answers["embed"] == answers["no-such-model"] == grpc.StatusCode.NOT_FOUND  # the same for both
