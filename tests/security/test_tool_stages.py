"""A tool stage runs a program on the coordinator's host: a submitted job may name one only when the
service's operator allow-listed that executable (`coordinator serve --allow-tool PATH`).

Real services on loopback: started without --allow-tool, a DPAM-shaped job with a tool stage is
refused (PERMISSION_DENIED, nothing recorded, the tool never ran); started with --allow-tool for
that script, the same job is accepted and finishes with the output `tensorfleet run` makes; another
executable (or a symlink's target that is not allowed) is still refused.
"""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
import yaml

from tensorfleet.client import CoordinatorClient, PermissionDenied
from tensorfleet.client.coordinator_client import job_state
from tests.coordinator.helpers import run_tensorfleet
from tests.workloads.dpam_tools import build, expected

from .helpers import run_cli, spawned


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    job, tool = build(root, proteins=8, chunk_rows=4, stages_kept=("search",))
    return root, job, tool


def serve_args(root, *extra) -> list:
    return ["coordinator", "serve", "--state-dir", root / "state", "--data-root", root, "--output-root", root,
            "--model-root", root / "models", *extra]


def test_without_allow_tool_a_tool_stage_is_refused_before_anything_runs(world):
    root, job, _ = world
    marker_dir = root / "out"
    with spawned(serve_args(root), root / "plain") as service:
        with CoordinatorClient(service.address) as client:
            with pytest.raises(PermissionDenied) as refused:
                client.submit(job)
            message = refused.value.message
            assert "stages[0].command" in message and "started without --allow-tool" in message, message
            assert client.jobs() == []
    assert not marker_dir.exists(), "nothing may run or be written for a refused job"


def test_with_allow_tool_the_job_runs_and_another_executable_is_refused(world, tmp_path):
    root, job, tool = world
    with spawned(serve_args(root, "--allow-tool", tool), root / "allowed") as service:
        done = run_tensorfleet("submit", job, "--coordinator", service.address, "--wait")
        assert done.returncode == 1, done.stdout + done.stderr  # one protein has no hit: it fails alone
        final = pq.read_table(root / "out" / "dpam.parquet")
        assert final.column("id").to_pylist() == expected(root)["children"]
        assert pq.read_table(root / "out" / "dpam.search.parquet").num_rows == 8

        with CoordinatorClient(service.address) as client:
            recorded = len(client.jobs())
            other = yaml.safe_load(job.read_text())
            other["name"] = "other-tool"
            other["stages"][0]["command"][0] = "/bin/sh"
            with pytest.raises(PermissionDenied) as refused:
                client.submit(other, base_dir=root)
            assert "'/bin/sh'" in refused.value.message and str(tool.resolve()) in refused.value.message
            # a symlink to a program that is not allowed is refused by its target, however it is named
            link = root / "bin" / "foldseek"
            link.symlink_to("/bin/sh")
            other["stages"][0]["command"][0] = str(link)
            with pytest.raises(PermissionDenied) as refused:
                client.submit(other, base_dir=root)
            assert "(resolved: /" in refused.value.message
            assert len(client.jobs()) == recorded
            assert job_state(client.jobs()[0]) in ("SUCCEEDED", "FAILED")


def test_allow_tool_must_name_an_executable_file(tmp_path):
    plain = tmp_path / "data.txt"
    plain.write_text("not a program")
    os.chmod(plain, 0o644)
    refused = run_cli(["coordinator", "serve", "--state-dir", tmp_path / "state", "--port", "0",
                       "--allow-tool", plain])
    assert refused.returncode == 2
    assert "--allow-tool" in refused.stderr and "not an executable file" in refused.stderr
