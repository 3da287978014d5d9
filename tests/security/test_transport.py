"""Bearer-token auth (health stays open), TLS and mutual TLS, against real servers."""

from pathlib import Path

import numpy as np
import pytest

from tensorfleet.client import InferenceClient, TensorfleetError, Unauthenticated, Unavailable
from tests.certificates import make_pki
from tests.serving import running_server

MODELS = Path(__file__).parents[1] / "models"
ROW = {"INPUT0": np.ones((1, 16), np.float32), "INPUT1": np.ones((1, 16), np.float32)}


@pytest.fixture(scope="module")
def token_server():
    with running_server(MODELS, "--model", "simple", "--token", "s3cret") as server:
        yield server


@pytest.mark.parametrize("token", [None, "wrong", "s3cret "])
def test_missing_or_wrong_token_is_unauthenticated(token_server, token):
    with InferenceClient(token_server.address, token=token) as client:
        with pytest.raises(Unauthenticated, match="bearer token"):
            client.infer("simple", ROW)
        with pytest.raises(Unauthenticated):
            client.is_live()
        with pytest.raises(Unauthenticated):  # streams are guarded too
            list(client.stream("simple", [ROW]))


def test_health_stays_open_without_a_token(token_server):
    with InferenceClient(token_server.address) as client:
        assert client.health() == "SERVING"


def test_right_token_is_served(token_server):
    with InferenceClient(token_server.address, token="s3cret") as client:
        assert client.infer("simple", ROW)["OUTPUT0"][0, 0] == 2
        assert [r["OUTPUT1"][0, 0] for r in client.stream("simple", [ROW, ROW])] == [0, 0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_with_a_certificate_the_test_made(pki):
    args = ("--model", "simple", "--tls-cert", str(pki["server"]), "--tls-key", str(pki["server_key"]))
    with running_server(MODELS, *args) as server:
        with InferenceClient(server.address, root_cert=str(pki["ca"])) as client:
            assert client.infer("simple", ROW)["OUTPUT0"][0, 0] == 2
        with InferenceClient(server.address) as plaintext, pytest.raises(Unavailable):
            plaintext.is_live()


def test_mutual_tls_requires_a_client_certificate(pki):
    args = (
        "--model", "simple",
        "--tls-cert", str(pki["server"]), "--tls-key", str(pki["server_key"]), "--tls-ca", str(pki["ca"]),
    )
    with running_server(MODELS, *args) as server:
        with InferenceClient(
            server.address, root_cert=str(pki["ca"]), client_cert=str(pki["client"]), client_key=str(pki["client_key"])
        ) as client:
            assert client.infer("simple", ROW)["OUTPUT1"][0, 0] == 0
        with InferenceClient(server.address, root_cert=str(pki["ca"])) as anonymous, pytest.raises(TensorfleetError):
            anonymous.is_live()
