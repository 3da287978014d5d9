"""Secure by default: loopback unless told otherwise; an unprotected wider bind refuses to start."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tensorfleet.client import CoordinatorClient, InferenceClient
from tensorfleet.protos import tensorfleet_pb2 as tf
from tensorfleet.protos import tensorfleet_pb2_grpc as tf_grpc
from tests.serving import REPO_ROOT

from .helpers import run_cli, spawned

MODELS = REPO_ROOT / "tests" / "models"
WAYS_OUT = ("--token-file", "--tls-ca", "--insecure")


_LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def listening_on(port: int) -> set[str]:
    """'loopback' or the raw address of every listening socket on `port` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add("loopback" if address in _LOOPBACK else address)
    return found


def _server_info(address: str) -> tf.ServerInfo:
    with grpc.insecure_channel(address) as channel:
        return tf_grpc.ServerControlStub(channel).GetServerInfo(tf.GetServerInfoRequest(), timeout=10)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_model_server_refuses_a_wide_bind_without_auth(tmp_path, host):
    done = run_cli(["serve", "--model-repository", MODELS, "--model", "simple", "--host", host, "--port", "0"])
    assert done.returncode == 2
    for way in WAYS_OUT:
        assert way in done.stderr, done.stderr
    assert "refusing to serve the model server" in done.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_coordinator_refuses_a_wide_bind_without_auth(tmp_path, host):
    done = run_cli(["coordinator", "serve", "--host", host, "--port", "0", "--state-dir", tmp_path / "state"])
    assert done.returncode == 2
    for way in WAYS_OUT:
        assert way in done.stderr, done.stderr
    assert not (tmp_path / "state").exists(), "a refused start must leave nothing behind"


def test_both_servers_default_to_loopback(tmp_path):
    with spawned(["serve", "--model-repository", MODELS, "--model", "simple"], tmp_path / "server") as server:
        assert listening_on(server.port) == {"loopback"}
        with InferenceClient(server.address) as client:
            assert client.is_live()
        assert _server_info(server.address).insecure is False
    with spawned(["coordinator", "serve", "--state-dir", tmp_path / "state"], tmp_path / "coord") as coordinator:
        assert listening_on(coordinator.port) == {"loopback"}
        with CoordinatorClient(coordinator.address) as client:
            assert client.jobs() == []


def test_insecure_is_logged_and_reported_by_get_server_info(tmp_path):
    # On loopback (tests never listen wider); the flag still logs its warning and shows in ServerInfo.
    with spawned(["serve", "--model-repository", MODELS, "--model", "simple", "--host", "127.0.0.1", "--insecure"],
                 tmp_path / "server") as server:
        assert _server_info(server.address).insecure is True
        assert "INSECURE" in server.log()
    with spawned(["coordinator", "serve", "--host", "127.0.0.1", "--insecure", "--state-dir", tmp_path / "s"],
                 tmp_path / "coord") as coordinator:
        assert "INSECURE" in coordinator.log()


def test_a_token_file_makes_a_wide_bind_acceptable_to_the_check():
    from tensorfleet.core.exposure import ExposureError, check_exposure

    check_exposure("0.0.0.0", token=True, mutual_tls=False, insecure=False)
    check_exposure("0.0.0.0", token=False, mutual_tls=True, insecure=False)
    with pytest.raises(ExposureError):
        check_exposure("10.1.2.3", token=False, mutual_tls=False, insecure=False)
