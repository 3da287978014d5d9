"""One engine for every job kind (issue 13): the examples' own job files through run, --dry-run,
status and --resume; validation before any server starts; model parameters; sweep routing;
pipeline stages that read the input and any earlier stage.

"Servers started" is counted the way a local fleet leaves evidence: each start writes
`servers/server-N.log` in the run's folder; the tests delete those folders after the first run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anndata
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from .helpers import MODELS, REPO_ROOT, local_model, make_fasta, run_tensorfleet, write_job

EXAMPLES = REPO_ROOT / "examples"


def server_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("servers") if p.is_dir())


def copy_example(tmp_path: Path, name: str) -> Path:
    """A copy of examples/NAME; the epistasis models are built into it when the checkout has none (make models)."""
    target = tmp_path / name
    shutil.copytree(EXAMPLES / name, target, ignore=shutil.ignore_patterns("output", "*.tfjob", "__pycache__"))
    if name == "epistasis" and not (target / "models" / "embed_tiny" / "encoder.pt").exists():
        subprocess.run([sys.executable, str(EXAMPLES / name / "build.py"), "--out", str(target), "--models-only"],
                       check=True, capture_output=True, timeout=600, cwd=REPO_ROOT)
    return target


EXAMPLE_JOBS = {
    # example -> (job file, top job folder relative to the example, status lines, output files)
    "stack": ("stack.yaml", "output/predictions.h5ad.tfjob", ["prompt run (stack_toy): done", "control run (stack_toy): done"],
              ["output/predictions.h5ad"]),
    "epistasis": ("epistasis.yaml", "output/.epistasis.tfjob",
                  ["model embed_small source singles (embed_small): done", "model embed_tiny source doubles (embed_tiny): done"],
                  ["output/embed_small.parquet", "output/embed_tiny.parquet"]),
    "dpam": ("dpam.yaml", "output/domass.parquet.tfjob", ["stage 1 features (dpam_features): done", "stage 2 domass (domass): done"],
             ["output/domass.parquet"]),
}


@pytest.mark.parametrize("name", sorted(EXAMPLE_JOBS))
def test_example_plans_runs_reports_status_on_its_top_folder_and_resumes_with_no_server(tmp_path, name):
    job_file, top, lines, outputs = EXAMPLE_JOBS[name]
    root = copy_example(tmp_path, name)
    job = root / job_file
    plan = run_tensorfleet("run", job, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "dry run" in plan.stdout and not (root / "output").exists() and not server_folders(root)

    done = run_tensorfleet("run", job)
    assert done.returncode == 0, done.stderr
    status = run_tensorfleet("status", root / top)
    assert status.returncode == 0, status.stderr
    for line in lines:
        assert line in status.stdout, status.stdout
    assert "\ntotal: done" in status.stdout
    report = json.loads(run_tensorfleet("status", root / top, "--json").stdout)
    assert report["total"]["rows_done"] == report["total"]["rows"] > 0
    assert report["total"]["chunks_done"] == sum(p["chunks"] for p in report["parts"])

    marker = root / top / "workflow.json"  # folders written before it had pipeline.json / sweep.json
    older = marker.rename(marker.with_name({"dpam": "pipeline.json", "epistasis": "sweep.json"}.get(name, "none.json")))
    legacy = run_tensorfleet("status", root / top, "--json")
    assert legacy.returncode == 0, legacy.stderr
    found = json.loads(legacy.stdout)
    assert len(found["parts"]) == len(report["parts"]) and found["total"] == report["total"]
    assert found["kind"] == {"dpam": "multi-stage", "epistasis": "models x sources"}.get(name, "unknown")
    assert "\ntotal: done" in run_tensorfleet("status", root / top).stdout
    older.rename(marker)

    for folder in server_folders(root):
        shutil.rmtree(folder)
    stamps = [(root / o).stat().st_mtime_ns for o in outputs]
    again = run_tensorfleet("run", job, "--resume")
    assert again.returncode == 0, again.stderr
    assert server_folders(root) == []  # no server started
    assert [(root / o).stat().st_mtime_ns for o in outputs] == stamps  # nothing rewritten


def test_stack_dry_run_plans_both_runs(tmp_path):
    root = copy_example(tmp_path, "stack")
    plan = run_tensorfleet("run", root / "stack.yaml", "--dry-run", "--limit", "40")
    assert plan.returncode == 0, plan.stderr
    assert "prompt run: prompt" in plan.stdout and "control run: prompt" in plan.stdout
    assert plan.stdout.count("rows: 40 (limited to the first 40)") == 2


def test_duplicate_ids_are_refused_before_any_server_starts(tmp_path):
    # plain
    make_fasta(tmp_path / "dup.fasta", 50, duplicate={7: 3})
    job = write_job(tmp_path / "plain.yaml", input={"path": "dup.fasta"}, model=local_model("embed"),
                    output={"path": "out.h5"})
    result = run_tensorfleet("run", job)
    assert result.returncode == 2 and "'seq3' at rows [3, 7]" in result.stderr, result.stderr
    assert not (tmp_path / "out.h5.tfjob").exists()
    # multi-stage: the first stage's input
    root = copy_example(tmp_path, "dpam")
    table = pq.read_table(root / "data" / "domains.parquet")
    ids = table.column("domain").to_pylist()
    ids[9] = ids[2]
    pq.write_table(table.set_column(table.column_names.index("domain"), "domain", pa.array(ids)), root / "data" / "domains.parquet")
    result = run_tensorfleet("run", root / "dpam.yaml")
    assert result.returncode == 2 and "occur more than once" in result.stderr, result.stderr
    assert server_folders(root) == []
    # models x sources: the second source; the first model's first source is fine
    root = copy_example(tmp_path, "epistasis")
    text = (root / "data" / "doubles.fasta").read_text().splitlines()
    headers = [i for i, line in enumerate(text) if line.startswith(">")]
    text[headers[4]] = text[headers[1]]
    (root / "data" / "doubles.fasta").write_text("\n".join(text) + "\n")
    result = run_tensorfleet("run", root / "epistasis.yaml", "--dry-run")
    assert result.returncode == 2 and "occur more than once" in result.stderr and "source doubles" in result.stderr
    assert server_folders(root) == []


def _numeric(path: Path, rows: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)
    with h5py.File(path, "w") as handle:
        handle["x"] = x
        handle["ids"] = np.array([f"{path.stem}-{i}" for i in range(rows)], dtype="S")
    return x


def test_model_parameters_travel_with_every_request_and_reach_the_model(tmp_path):
    x = _numeric(tmp_path / "in.h5", 70, 1)
    job = write_job(
        tmp_path / "job.yaml", input={"path": "in.h5", "ids": "ids", "tensors": {"x": "x"}},
        model={**local_model("scaled"), "parameters": {"scale": 2.5, "steps": 7}}, output={"path": "out.h5"},
        chunking={"batch_rows": 16, "chunk_rows": 32},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "out.h5") as handle:
        np.testing.assert_array_equal(handle["y"][:], x * np.float32(2.5))
        assert (handle["steps"][:] == 7).all()
    # the parameters change the results: a resume with other ones is refused, not mixed
    changed = yaml.safe_load(job.read_text())
    changed["model"]["parameters"]["scale"] = 3
    job.write_text(yaml.safe_dump(changed))
    refused = run_tensorfleet("run", job)
    assert refused.returncode == 2 and "model.parameters.scale 2.5 -> 3" in refused.stderr, refused.stderr
    bad = write_job(tmp_path / "bad.yaml", input={"path": "in.h5", "tensors": {"x": "x"}},
                    model={**local_model("scaled"), "parameters": {"tensorfleet.context": "x"}}, output={"path": "b.h5"})
    refused = run_tensorfleet("run", bad)
    assert refused.returncode == 2 and "model.parameters" in refused.stderr, refused.stderr


def test_a_stage_reads_the_jobs_input_and_any_earlier_stage(tmp_path):
    x = _numeric(tmp_path / "in.h5", 50, 2)
    spec = {
        "name": "three",
        "input": {"path": "in.h5", "ids": "ids"},
        "stages": [
            {"name": "a", "model": {**local_model("scaled"), "parameters": {"scale": 2}}, "tensors": {"x": "x"}},
            {"name": "b", "model": local_model("vec8"), "tensors": {"x": "input:x"}},
            {"name": "c", "model": {**local_model("scaled"), "parameters": {"scale": 3}}, "tensors": {"x": "a:y"}},
        ],
        "output": {"path": "out.h5"},
        "chunking": {"chunk_rows": 16},
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    plan = run_tensorfleet("run", job, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "stage 3 c: model scaled" in plan.stdout and "fields: x <- a:y" in plan.stdout
    result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "out.h5") as handle:
        np.testing.assert_array_equal(handle["y"][:], x * np.float32(2) * np.float32(3))
    spec["stages"][2]["tensors"] = {"x": "later:y"}
    job.write_text(yaml.safe_dump(spec))
    refused = run_tensorfleet("run", job, "--dry-run")
    assert refused.returncode == 2 and "names no earlier stage" in refused.stderr


def test_sweep_routes_models_to_their_sources_into_one_table_and_runs_a_subset(tmp_path):
    one, two = _numeric(tmp_path / "one.h5", 30, 3), _numeric(tmp_path / "two.h5", 20, 4)
    spec = {
        "name": "routes",
        "sources": [{"path": "one.h5", "ids": "ids", "tensors": {"x": "x"}},
                    {"path": "two.h5", "ids": "ids", "tensors": {"x": "x"}}],
        "models": [
            {**local_model("vec8"), "sources": ["one"], "outputs": {"norm": "value"}},
            {**local_model("scaled"), "parameters": {"steps": 5}, "outputs": {"steps": "value"}},
        ],
        "output": {"dir": "out", "layout": "one_table"},
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    subset = run_tensorfleet("run", job, "--dry-run", "--models", "scaled")
    assert subset.returncode == 0, subset.stderr
    assert "model scaled" in subset.stdout and "model vec8" not in subset.stdout
    assert run_tensorfleet("run", job, "--models", "nope").returncode == 2
    result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    table = pq.read_table(tmp_path / "out" / "routes.parquet")
    assert table.column_names[:3] == ["model", "source", "id"]
    keys = list(zip(table.column("model").to_pylist(), table.column("source").to_pylist(), strict=True))
    assert keys == [("vec8", "one")] * 30 + [("scaled", "one")] * 30 + [("scaled", "two")] * 20
    values = np.array(table.column("value").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(values[:30], np.sqrt((one * one).sum(axis=1)), rtol=1e-6)
    assert (values[30:] == 5).all() and len(two) == 20
    job_dir = tmp_path / "out" / ".routes.tfjob"
    status = run_tensorfleet("status", job_dir)
    assert "model vec8 source one (vec8): done" in status.stdout and "vec8 source two" not in status.stdout

    # unfinished work starts only the servers it needs: scaled's second source is lost, vec8 is done
    for folder in server_folders(job_dir):
        shutil.rmtree(folder)
    shutil.rmtree(job_dir / "scaled" / "two")
    again = run_tensorfleet("run", job, "--resume")
    assert again.returncode == 0, again.stderr
    assert server_folders(job_dir) == [job_dir / "scaled" / "servers"]
    assert pq.read_table(tmp_path / "out" / "routes.parquet").equals(table)


def test_cells_example_status_and_resume_without_a_server(tmp_path):
    """The plain example job (.h5ad): status on its folder, and a finished resume is a manifest read."""
    jobs = EXAMPLES / "jobs"
    subprocess.run([sys.executable, str(jobs / "make_h5ad.py"), "--cells", "120", "--out", str(tmp_path / "c.h5ad")],
                   check=True, capture_output=True)
    spec = yaml.safe_load((jobs / "cell-embeddings.yaml").read_text())
    spec["input"]["path"], spec["output"]["path"] = "c.h5ad", "c.out.h5ad"
    spec["model"]["local"] = {"repository": str(jobs / spec["model"]["local"]["repository"]), "count": 1}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert run_tensorfleet("run", tmp_path / "job.yaml").returncode == 0
    status = run_tensorfleet("status", tmp_path / "c.out.h5ad.tfjob")
    assert "state: done" in status.stdout and "rows: 120/120" in status.stdout
    shutil.rmtree(tmp_path / "c.out.h5ad.tfjob" / "servers")
    again = run_tensorfleet("run", tmp_path / "job.yaml", "--resume")
    assert again.returncode == 0, again.stderr
    assert not (tmp_path / "c.out.h5ad.tfjob" / "servers").exists()
    assert anndata.read_h5ad(tmp_path / "c.out.h5ad").obsm[next(iter(anndata.read_h5ad(tmp_path / "c.out.h5ad").obsm))].shape[0] == 120


def test_models_flag_is_for_sweeps_only(tmp_path):
    _numeric(tmp_path / "in.h5", 10, 5)
    job = write_job(tmp_path / "job.yaml", input={"path": "in.h5", "tensors": {"x": "x"}}, model=local_model("vec8"),
                    output={"path": "out.h5"})
    result = run_tensorfleet("run", job, "--models", "vec8", "--dry-run")
    assert result.returncode == 2 and "models x sources" in result.stderr
    assert MODELS.is_dir()
