"""Exit 2: each fatal case says what to fix and leaves no file that looks like a finished output."""

from __future__ import annotations

import socket

import pytest

from .helpers import local_model, make_fasta, run_tensorfleet, write_job


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def no_output_left(folder) -> None:
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.startswith("out") or "partial" in n], names


def _job(folder, *, input=None, model=None, output=None, **extra):
    return write_job(
        folder / "job.yaml", input=input or {"path": "in.fasta"}, model=model or local_model("embed"),
        output=output or {"path": "out.h5"}, **extra,
    )


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing input", "does not exist; fix input.path"),
        ("corrupt input", "cannot read"),
        ("spec error", "chunking.chunk_rows"),
        ("bad yaml", "not valid YAML"),
        ("unknown local model", "model 'nope' is not in the repository"),
        ("unknown served model", "does not serve model 'nope'"),
        ("unreachable servers", "no server reachable"),
        ("wrong field", "input.tensors.sequence: the input has no field 'seq'"),
        ("duplicate ids", "'seq4' at rows [4, 9]"),
    ],
)
def test_fatal_cases_exit_2_with_a_clear_message(tmp_path, servers, case, message):
    make_fasta(tmp_path / "in.fasta", 20, duplicate={9: 4} if case == "duplicate ids" else None)
    served = {"name": "embed", "servers": [s.address for s in servers]}
    if case == "missing input":
        job = _job(tmp_path, input={"path": "missing.fasta"}, model=served)
    elif case == "corrupt input":
        (tmp_path / "in.h5").write_bytes(b"not an hdf5 file at all" * 10)
        job = _job(tmp_path, input={"path": "in.h5"}, model=served)
    elif case == "spec error":
        job = _job(tmp_path, model=served, chunking={"chunk_rows": -3})
    elif case == "bad yaml":
        job = tmp_path / "job.yaml"
        job.write_text("input: [unclosed\n")
    elif case == "unknown local model":
        job = _job(tmp_path, model=local_model("nope"))
    elif case == "unknown served model":
        job = _job(tmp_path, model={"name": "nope", "servers": [servers[0].address]})
    elif case == "unreachable servers":
        job = _job(tmp_path, model={"name": "embed", "servers": [f"127.0.0.1:{closed_port()}"]},
                   policy={"server_wait_s": 1.5})
    elif case == "wrong field":
        job = _job(tmp_path, input={"path": "in.fasta", "tensors": {"sequence": "seq"}}, model=served)
    else:
        job = _job(tmp_path, model=served)
    result = run_tensorfleet("run", job)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert result.stderr.startswith("tensorfleet: error:")
    assert "Traceback" not in result.stderr
    no_output_left(tmp_path)


def test_batch_rows_above_the_model_limit_is_refused(tmp_path, servers):
    make_fasta(tmp_path / "in.fasta", 10)
    job = _job(tmp_path, model={"name": "embed", "servers": [servers[0].address]}, chunking={"batch_rows": 99})
    result = run_tensorfleet("run", job)
    assert result.returncode == 2 and "exceeds model 'embed' max_batch_size 16" in result.stderr
    no_output_left(tmp_path)


def test_status_of_a_folder_without_a_job(tmp_path):
    result = run_tensorfleet("status", tmp_path)
    assert result.returncode == 2 and "holds no job" in result.stderr
