"""Object storage for every job kind (issue 13): the STACK example (in-context), a multi-stage job and a models x sources job; the STACK one with its query,
prompts, output and part files in an S3 bucket (moto's server on loopback) equals a local run."""

from __future__ import annotations

import shutil

import anndata
import yaml

from tests.coordinator.helpers import REPO_ROOT, run_tensorfleet

from .test_s3 import BUCKET, s3  # noqa: F401 - the moto server fixture


def test_stack_job_with_s3_inputs_parts_and_output_equals_a_local_run(tmp_path, s3):  # noqa: F811
    fs, env = s3
    local = tmp_path / "local"
    shutil.copytree(REPO_ROOT / "examples" / "stack", local, ignore=shutil.ignore_patterns("output", "*.tfjob"))
    assert run_tensorfleet("run", local / "stack.yaml").returncode == 0
    for name in ("query", "prompt", "control_prompt"):
        fs.put(str(local / "data" / f"{name}.h5ad"), f"{BUCKET}/stack/{name}.h5ad")
    spec = yaml.safe_load((local / "stack.yaml").read_text())
    spec["input"]["path"] = f"s3://{BUCKET}/stack/query.h5ad"
    spec["prompt"]["path"] = f"s3://{BUCKET}/stack/prompt.h5ad"
    spec["control"]["path"] = f"s3://{BUCKET}/stack/control_prompt.h5ad"
    spec["output"].update(path=f"s3://{BUCKET}/results/predictions.h5ad", parts=f"s3://{BUCKET}/parts/stack")
    spec["model"]["local"]["repository"] = str(local / "models")
    spec["job_dir"] = str(tmp_path / "work" / "stack.tfjob")
    job = tmp_path / "s3-stack.yaml"
    job.write_text(yaml.safe_dump(spec))
    done = run_tensorfleet("run", job, env=env)
    assert done.returncode == 0, done.stderr
    assert f"uploaded: s3://{BUCKET}/results/predictions.h5ad" in done.stdout
    fs.invalidate_cache()
    assert fs.ls(f"{BUCKET}/parts/stack/prompt") and fs.ls(f"{BUCKET}/parts/stack/control")
    fs.get(f"{BUCKET}/results/predictions.h5ad", str(tmp_path / "downloaded.h5ad"))
    ours, theirs = anndata.read_h5ad(tmp_path / "downloaded.h5ad"), anndata.read_h5ad(local / "output" / "predictions.h5ad")
    assert list(ours.obs_names) == list(theirs.obs_names)
    for key in ("prediction", "prediction_control"):
        assert ours.layers[key].tobytes() == theirs.layers[key].tobytes(), key
    status = run_tensorfleet("status", tmp_path / "work" / "stack.tfjob")
    assert "total: done" in status.stdout, status.stdout


def test_models_x_sources_job_reads_sources_from_s3_and_uploads_its_sheets(tmp_path, s3):  # noqa: F811
    import h5py
    import numpy as np
    import pyarrow.parquet as pq

    fs, env = s3
    for name, rows in (("one", 30), ("two", 20)):
        with h5py.File(tmp_path / f"{name}.h5", "w") as handle:
            handle["x"] = np.random.default_rng(rows).standard_normal((rows, 8)).astype(np.float32)
        fs.put(str(tmp_path / f"{name}.h5"), f"{BUCKET}/sweep/{name}.h5")
    model = {"name": "scaled", "local": {"repository": str(REPO_ROOT / "tests" / "coordinator" / "models")},
             "parameters": {"scale": 2}}
    spec = {
        "name": "s3sweep",
        "sources": [{"path": f"s3://{BUCKET}/sweep/{n}.h5", "tensors": {"x": "x"}} for n in ("one", "two")],
        "models": [model],
        "output": {"dir": f"s3://{BUCKET}/sheets"},
        "job_dir": str(tmp_path / "work"),
    }
    job = tmp_path / "sweep.yaml"
    job.write_text(yaml.safe_dump(spec))
    done = run_tensorfleet("run", job, env=env)
    assert done.returncode == 0, done.stderr
    fs.invalidate_cache()
    fs.get(f"{BUCKET}/sheets/scaled.parquet", str(tmp_path / "scaled.parquet"))
    table = pq.read_table(tmp_path / "scaled.parquet")
    assert table.column("source").to_pylist() == ["one"] * 30 + ["two"] * 20
    with h5py.File(tmp_path / "one.h5") as handle:
        expected = handle["x"][:] * np.float32(2)
    assert np.array(table.column("y").to_pylist()[:30], dtype=np.float32).tobytes() == expected.tobytes()


def test_multi_stage_job_with_s3_input_parts_and_output_equals_a_local_run(tmp_path, s3):  # noqa: F811
    """Two stages (the embedder, then a head reading its output) with the input, every stage's
    parts and the output in the bucket: the same table as the local run."""
    import pyarrow.parquet as pq

    from tests.coordinator.helpers import MODELS, make_fasta

    fs, env = s3
    make_fasta(tmp_path / "in.fasta", 90)
    fs.put(str(tmp_path / "in.fasta"), f"{BUCKET}/pipeline/in.fasta")
    local_model = {"local": {"repository": str(MODELS)}}

    def spec(input_path: str, output: dict, job_dir: str) -> dict:
        return {
            "name": "two-stages", "input": {"path": input_path}, "output": output, "job_dir": job_dir,
            "stages": [
                {"name": "embed", "model": {"name": "embed", **local_model}, "batch_rows": 8},
                {"name": "head", "model": {"name": "head16", **local_model}, "tensors": {"x": "embedding"}},
            ],
            "chunking": {"chunk_rows": 32},
        }

    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump(spec(str(tmp_path / "in.fasta"), {"path": str(tmp_path / "local.parquet")},
                                         str(tmp_path / "local.tfjob"))))
    assert run_tensorfleet("run", local).returncode == 0
    remote = tmp_path / "remote.yaml"
    remote.write_text(yaml.safe_dump(spec(
        f"s3://{BUCKET}/pipeline/in.fasta",
        {"path": f"s3://{BUCKET}/pipeline/out.parquet", "parts": f"s3://{BUCKET}/pipeline/parts"},
        str(tmp_path / "remote.tfjob"),
    )))
    done = run_tensorfleet("run", remote, env=env)
    assert done.returncode == 0, done.stderr
    fs.invalidate_cache()
    # the last stage's parts go to output.parts; earlier stages keep theirs in the job folder
    remote_parts = sorted(path.rsplit("/", 1)[1] for path in fs.find(f"{BUCKET}/pipeline/parts"))
    head_parts = sorted(p.name for p in (tmp_path / "local.tfjob" / "stages" / "01-head" / "parts").glob("*.part"))
    assert remote_parts == head_parts and remote_parts, (remote_parts, head_parts)
    assert len(list((tmp_path / "remote.tfjob" / "stages" / "00-embed" / "parts").glob("*.part"))) == 3
    fs.get(f"{BUCKET}/pipeline/out.parquet", str(tmp_path / "downloaded.parquet"))
    ours = pq.read_table(tmp_path / "downloaded.parquet").replace_schema_metadata(None)
    theirs = pq.read_table(tmp_path / "local.parquet").replace_schema_metadata(None)
    assert ours.num_rows == 90 and ours.equals(theirs)
    status = run_tensorfleet("status", tmp_path / "remote.tfjob")
    assert "total: done" in status.stdout, status.stdout
