"""Code shipped inside a Hugging Face checkpoint (`trust_remote_code`) runs only when the
operator's own model config says so, never because a job or a request asked.

The checkpoint here is real: a folder whose config.json maps AutoModel to a modeling file in
the folder (as HyenaDNA's and Caduceus' do), and that file writes a marker when it is imported.
Cases: a submitted job naming such a repository outside the model roots (PERMISSION_DENIED, no
server started, the code never ran); the operator's config without the flag (a clear load
error, code never ran); the operator's config with it, the folder inside the model folder
(served, the code ran); the flag pointing at a folder outside the model folder (refused).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tensorfleet.client import (
    CoordinatorClient,
    InferenceClient,
    PermissionDenied,
    TensorfleetError,
)
from tests.coordinator.helpers import make_fasta
from tests.hf_checkpoints import model_folder, save_gene_bert
from tests.serving import launch_server

from .helpers import spawned

MODELING = '''
open({marker!r}, "a").write("ran\\n")
from transformers import BertConfig, BertModel


class ShippedConfig(BertConfig):
    model_type = "shipped_bert"


class ShippedModel(BertModel):
    config_class = ShippedConfig
'''


def shipped_code_checkpoint(folder: Path, marker: Path) -> Path:
    """A BERT checkpoint whose config asks for its own modeling code, which leaves `marker`."""
    save_gene_bert(folder)
    (folder / "modeling_shipped.py").write_text(MODELING.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="shipped_bert", auto_map={"AutoConfig": "modeling_shipped.ShippedConfig",
                                                       "AutoModel": "modeling_shipped.ShippedModel"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-code")
    for name in ("data", "out", "models", "outside"):
        (root / name).mkdir()
    make_fasta(root / "data" / "in.fasta", 4)
    return root


def test_a_job_naming_remote_code_outside_the_roots_is_refused_and_starts_no_server(world):
    marker = world / "outside" / "ran.txt"
    repo = world / "outside" / "repo"
    model = model_folder(repo, "shipped", {"path": "checkpoint", "trust_remote_code": True}, ["mean"])
    shipped_code_checkpoint(model / "checkpoint", marker)
    job = {"name": "remote", "input": {"path": str(world / "data" / "in.fasta")},
           "model": {"name": "shipped", "local": {"repository": str(repo)}},
           "output": {"path": str(world / "out" / "remote.h5")}}
    args = ["coordinator", "serve", "--state-dir", world / "state", "--data-root", world / "data",
            "--output-root", world / "out", "--model-root", world / "models"]
    with spawned(args, world / "coordinator") as service, CoordinatorClient(service.address) as client:
        with pytest.raises(PermissionDenied) as refused:
            client.submit(job)
        assert "--model-root" in refused.value.message and "model.local.repository" in refused.value.message
        assert client.jobs() == []
    assert not marker.exists(), "the checkpoint's code ran"
    assert not list((world / "state").rglob("servers.json")), "a server was started"


def test_operator_config_decides_whether_shipped_code_runs(tmp_path):
    marker = tmp_path / "ran.txt"
    repo = tmp_path / "repo"
    allowed = model_folder(repo, "allowed", {"path": "checkpoint", "trust_remote_code": True}, ["mean"])
    shipped_code_checkpoint(allowed / "checkpoint", marker)
    refused = model_folder(repo, "not_allowed", {"path": "../allowed/checkpoint"}, ["mean"])
    assert refused.is_dir()
    outside = model_folder(repo, "outside", {"path": str(allowed / "checkpoint"), "trust_remote_code": True},
                           ["mean"])
    assert outside.is_dir()
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    server = launch_server(repo, "--threads", "1", env=env)
    try:
        with InferenceClient(server.address) as client:
            assert client.infer("allowed", {"sequence": ["GENE1 GENE2"]})["mean"].shape == (1, 32)
            reasons = {}
            for name in ("not_allowed", "outside"):
                with pytest.raises(TensorfleetError) as caught:
                    client.infer(name, {"sequence": ["GENE1"]})
                reasons[name] = caught.value.message
    finally:
        server.stop()
    assert marker.read_text().count("ran") >= 1  # the operator allowed it: it ran
    assert "ships its own model code" in reasons["not_allowed"]
    assert "transformers.trust_remote_code: true" in reasons["not_allowed"]
    assert "must be inside the model folder" in reasons["outside"]
    assert yaml.safe_load((refused / "config.yaml").read_text())["transformers"].get("trust_remote_code") is None
