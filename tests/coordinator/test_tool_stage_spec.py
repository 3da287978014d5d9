"""What a job file may say about tool stages, fan-out and output.stages, checked when it is read
(each mistake names the field and the fix), and the service policy's tool check on its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tensorfleet.coordinator.service.job_policy import JobPolicy, PolicyError
from tensorfleet.coordinator.spec import SpecError
from tensorfleet.coordinator.spec.kinds import parse_job


def job(tmp_path: Path, **stage) -> dict:
    tool = {"name": "search", "command": ["./tool", "{inputs}", "{outputs}/o.tsv"],
            "write": {"fields": ["structure"], "suffix": ".pdb"},
            "read": {"name": "o.tsv", "id_column": "query", "outputs": {"hit": ["a", "b"]}}}
    tool.update(stage)
    return {"input": {"path": str(tmp_path / "in.parquet")}, "stages": [tool], "output": {"path": "out.parquet"}}


def refused(raw: dict, base: Path, *words: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_job(raw, "job.yaml", base)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_a_tool_stage_resolves_its_executable_against_the_job_folder(tmp_path):
    spec = parse_job(job(tmp_path), "job.yaml", tmp_path)
    assert spec.stages[0].command == [str(tmp_path / "tool"), "{inputs}", "{outputs}/o.tsv"]
    assert spec.stages[0].read.declared() == {"hit": ("FP32", [2])}
    bare = parse_job(job(tmp_path, command=["sh", "-c"]), "job.yaml", tmp_path)
    assert Path(bare.stages[0].command[0]).is_absolute()  # found on PATH when the job is read


def test_mistakes_are_named_when_the_job_is_read(tmp_path):
    refused(job(tmp_path, model={"name": "m", "servers": ["127.0.0.1:1"]}), tmp_path, "exactly one of model")
    refused(job(tmp_path, read=None), tmp_path, "needs `read`")
    refused(job(tmp_path, fan_out="nothere"), tmp_path, "fan_out 'nothere' is not one of read.outputs")
    refused(job(tmp_path, read={"format": "npy", "name": "x.npy", "outputs": {"e": "array"}}), tmp_path, "'{id}'")
    refused(job(tmp_path, write={"format": "fasta", "fields": ["a", "b"]}), tmp_path, "writes one field per row")
    refused(job(tmp_path, write={"fields": ["a"], "name": "../x"}), tmp_path, "cannot be used as a name")
    raw = job(tmp_path)
    raw["output"]["stages"] = ["search", "nope"]
    refused(raw, tmp_path, "output.stages names ['nope']")
    model = {"name": "parse", "model": {"name": "m", "servers": ["127.0.0.1:1"]}, "fan_out": "domains"}
    raw = job(tmp_path)
    raw["stages"].append(model)
    refused(raw, tmp_path, "fan_out 'domains' needs its per-row count", "ragged: {domains:")
    raw["stages"][1]["ragged"] = {"domains": "n"}
    raw["stages"].append({"name": "last", "model": {"name": "m", "servers": ["127.0.0.1:1"]}})
    raw["output"]["path"] = "out.h5ad"
    refused(raw, tmp_path, "fan_out writes rows that are not the input's cells")


def test_the_policy_allows_only_listed_tools_by_their_real_path(tmp_path):
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    os.chmod(tool, 0o755)
    (tmp_path / "alias").symlink_to(tool)
    dump = parse_job(job(tmp_path), "job.yaml", tmp_path).model_dump(mode="json")
    with pytest.raises(PolicyError, match="started without --allow-tool"):
        JobPolicy(data_roots=[tmp_path], output_roots=[tmp_path]).check(dump)
    JobPolicy(data_roots=[tmp_path], output_roots=[tmp_path], allowed_tools=[tmp_path / "alias"]).check(dump)
    dump["stages"][0]["command"][0] = "/bin/sh"
    with pytest.raises(PolicyError, match="is not a tool this coordinator allows"):
        JobPolicy(data_roots=[tmp_path], output_roots=[tmp_path], allowed_tools=[tool]).check(dump)
    with pytest.raises(ValueError, match="not an executable file"):
        JobPolicy(allowed_tools=[tmp_path / "missing"])
