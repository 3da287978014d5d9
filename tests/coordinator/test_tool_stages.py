"""Tool stages of a multi-stage job (`command:`), through `tensorfleet run`, with a real script as the tool.

The tool reads the chunk's rows as one TSV and writes one TSV of results; what it does with a row
is chosen by the row's text: `skip` (no result: that row fails alone), `many` (three results: a
fan-out's children), `crash` (the tool exits 4: the chunk's rows fail with its stderr), `sleep`
(runs past timeout_s: killed, the chunk's rows fail). It also reports whether it saw any secret
in its environment and whether it ran in its scratch folder.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from .helpers import MODELS, run_tensorfleet

TOOL = """#!{python}
import os, sys, time
inputs, out = sys.argv[1], sys.argv[2]
secret = int(any(k in os.environ for k in ("TENSORFLEET_TOKEN", "MY_API_TOKEN", "AWS_SECRET_ACCESS_KEY")))
here = int(os.getcwd() == os.path.dirname(inputs))
rows = [line.rstrip("\\n").split("\\t") for line in open(inputs)][1:]
lines = ["name\\tsize\\tdoubled\\tsecret\\there"]
for row_id, text, value in rows:
    if text == "crash" or (text == "flaky" and os.path.exists(os.environ.get("TOY_FLAKY", "/nonexistent"))):
        print("boom: the tool hit a row it cannot take", file=sys.stderr)
        sys.exit(4)
    if text == "sleep":
        time.sleep(60)
    if text == "skip":
        continue
    for k in range(3 if text == "many" else 1):
        lines.append(f"{{row_id}}\\t{{len(text) + k}}\\t{{float(value) * 2}}\\t{{secret}}\\t{{here}}")
open(out, "w").write("\\n".join(lines) + "\\n")
"""


def setup(root, texts: list[str], **stage) -> tuple:
    root.mkdir(parents=True, exist_ok=True)
    tool = root / "toy_tool"
    tool.write_text(TOOL.format(python=sys.executable))
    os.chmod(tool, 0o755)
    ids = [f"r{i:02d}" for i in range(len(texts))]
    pq.write_table(pa.table({"name": ids, "text": texts, "value": np.arange(len(texts), dtype=np.float64)}),
                   root / "rows.parquet")
    job = {
        "name": "toy", "input": {"path": "rows.parquet", "ids": "name"},
        "stages": [{
            "name": "tool", "command": ["./toy_tool", "{inputs}", "{outputs}/results.tsv"],
            "write": {"format": "tsv", "fields": ["text", "value"]},
            "read": {"format": "tsv", "name": "results.tsv", "id_column": "name",
                     "outputs": {"size": "size", "doubled": "doubled", "secret": "secret", "here": "here"},
                     "datatypes": {"size": "INT64"}},
            "concurrency": 2, **stage,
        }],
        "output": {"path": "out/toy.parquet"},
        "chunking": {"chunk_rows": 4},
    }
    (root / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    return root / "job.yaml", ids


def test_a_failing_tool_fails_its_chunk_and_a_missing_result_fails_its_row(tmp_path):
    texts = ["aa", "bbb", "skip", "c", "dd", "crash", "e", "ff", "ggg", "h"]
    job, ids = setup(tmp_path, texts)
    secrets = {"TENSORFLEET_TOKEN": "t0ken", "MY_API_TOKEN": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    done = run_tensorfleet("run", job, env=secrets)
    assert done.returncode == 1, done.stderr
    table = pq.read_table(tmp_path / "out" / "toy.parquet").to_pydict()
    assert table["id"] == ids
    assert table["ok"] == [True, True, False, True, False, False, False, False, True, True]
    assert table["error"][2].startswith("NOT_FOUND") and "no result for id 'r02'" in table["error"][2]
    for row in (4, 5, 6, 7):  # the chunk the tool crashed on: every row fails, with the tool's stderr
        assert table["error"][row].startswith("TOOL_FAILED"), table["error"][row]
        assert "toy_tool exited with 4" in table["error"][row] and "boom: the tool hit a row" in table["error"][row]
    ok = [i for i, good in enumerate(table["ok"]) if good]
    assert [table["size"][i] for i in ok] == [len(texts[i]) for i in ok]
    assert [table["doubled"][i] for i in ok] == [2.0 * i for i in ok]
    assert {table["secret"][i] for i in ok} == {0.0}, "the tool saw a secret from the coordinator's environment"
    assert {table["here"][i] for i in ok} == {1.0}, "the tool runs in its chunk's scratch folder"
    stage = tmp_path / "out" / "toy.parquet.tfjob" / "stages" / "00-tool"
    kept = sorted(p.name for p in (stage / "scratch").glob("run-*/*"))
    assert kept == ["chunk-0000001"], kept  # the failed chunk's folder stays for a look; the others go


def test_a_tool_past_its_timeout_is_killed_and_its_chunk_fails(tmp_path):
    job, ids = setup(tmp_path, ["a", "sleep", "b", "c", "d"], timeout_s=2)
    done = run_tensorfleet("run", job)
    assert done.returncode == 1, done.stderr
    table = pq.read_table(tmp_path / "out" / "toy.parquet").to_pydict()
    assert table["ok"] == [False] * 4 + [True]
    assert table["error"][0].startswith("DEADLINE_EXCEEDED") and "timeout_s 2s" in table["error"][0]


def test_a_tool_fan_out_feeds_a_model_stage_over_its_children(tmp_path):
    texts = ["many", "one", "skip", "many", "xy"]
    job, ids = setup(tmp_path, texts, fan_out="size")
    spec = yaml.safe_load(job.read_text())
    spec["stages"][0]["read"]["outputs"] = {"size": "size", "x": ["size", "doubled", "size", "doubled",
                                                                   "size", "doubled", "size", "doubled"]}
    spec["stages"][0]["read"]["datatypes"] = {"size": "INT64"}
    spec["stages"].append({"name": "model", "model": {"name": "vec8", "local": {"repository": str(MODELS)}},
                           "tensors": {"x": "x"}})
    spec["output"]["stages"] = ["tool"]
    job.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = run_tensorfleet("run", job)
    assert done.returncode == 0, done.stderr  # a row with no result has no children: not a failure
    table = pq.read_table(tmp_path / "out" / "toy.parquet").to_pydict()
    children = [f"r00:{k}" for k in range(3)] + ["r01:0"] + [f"r03:{k}" for k in range(3)] + ["r04:0"]
    assert table["id"] == children
    x = np.array([[len(texts[int(c[1:3])]) + int(c[-1]), 2.0 * int(c[1:3])] * 4 for c in children], dtype=np.float32)
    np.testing.assert_allclose(table["norm"], np.sqrt((x * x).sum(axis=1)), rtol=1e-6)
    own = pq.read_table(tmp_path / "out" / "toy.tool.parquet").to_pydict()
    assert own["id"] == ids and own["size_count"] == [3, 1, 0, 3, 1]


def test_retry_failed_recomputes_a_failed_tool_chunk_and_replans_the_children(tmp_path):
    """A tool chunk fails (its rows have no children: exit 1); once the cause is gone,
    --retry-failed runs that chunk again and the stage over the children is planned again."""
    texts = ["many", "one", "flaky", "xy", "many"]
    job, ids = setup(tmp_path, texts, fan_out="size")
    spec = yaml.safe_load(job.read_text())
    spec["stages"][0]["read"]["outputs"] = {"size": "size", "x": ["size", "doubled"] * 4}
    spec["stages"].append({"name": "model", "model": {"name": "vec8", "local": {"repository": str(MODELS)}},
                           "tensors": {"x": "x"}})
    job.write_text(yaml.safe_dump(spec, sort_keys=False))
    flag = tmp_path / "flaky"
    flag.touch()
    first = run_tensorfleet("run", job, env={"TOY_FLAKY": str(flag)})
    assert first.returncode == 1, first.stderr
    assert "4 row(s) failed up to stage tool (a fan-out)" in first.stdout, first.stdout
    assert pq.read_table(tmp_path / "out" / "toy.parquet").column("id").to_pylist() == ["r04:0", "r04:1", "r04:2"]
    flag.unlink()
    again = run_tensorfleet("run", job, "--retry-failed", env={"TOY_FLAKY": str(flag)})
    assert again.returncode == 0, again.stderr
    assert "planned again" in again.stderr
    children = ["r00:0", "r00:1", "r00:2", "r01:0", "r02:0", "r03:0", "r04:0", "r04:1", "r04:2"]
    assert pq.read_table(tmp_path / "out" / "toy.parquet").column("id").to_pylist() == children


def test_a_stage_with_a_model_and_a_command_or_an_unknown_field_is_refused(tmp_path):
    job, _ = setup(tmp_path, ["a"])
    spec = yaml.safe_load(job.read_text())
    spec["stages"][0]["model"] = {"name": "vec8", "local": {"repository": str(MODELS)}}
    job.write_text(yaml.safe_dump(spec))
    refused = run_tensorfleet("run", job)
    assert refused.returncode == 2 and "give exactly one of model (a model stage) or command" in refused.stderr
    spec["stages"][0].pop("model")
    spec["stages"][0]["write"]["fields"] = ["nothere"]
    job.write_text(yaml.safe_dump(spec))
    refused = run_tensorfleet("run", job)
    assert refused.returncode == 2 and "write.fields: ['nothere'] are not fields" in refused.stderr, refused.stderr


RENDEZVOUS = """#!{python}
import pathlib, sys, time
import numpy as np
fasta, outputs, scratch, chunk = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), sys.argv[4]
(scratch.parent / f"started-{{chunk}}").touch()
deadline = time.monotonic() + 60
while len(list(scratch.parent.glob("started-*"))) < 2:  # the other chunk runs beside this one
    if time.monotonic() > deadline:
        sys.exit("no other chunk ran beside chunk " + chunk)
    time.sleep(0.05)
name = None
for line in fasta.read_text().splitlines():
    if line.startswith(">"):
        name = line[1:]
    else:
        np.save(outputs / f"{{name}}.npy", np.array([len(line), line.count("G") + line.count("C")], dtype=np.float32))
"""


def test_two_chunks_run_side_by_side_from_fasta_to_npy_files(tmp_path):
    """concurrency 2: each chunk's tool waits until the other one has started (it gives up and fails
    after 60s if they never overlap), writes one .npy per row; FASTA in, npy out."""
    tool = tmp_path / "rendezvous"
    tool.write_text(RENDEZVOUS.format(python=sys.executable))
    os.chmod(tool, 0o755)
    sequences = ["ACGT", "GGGCCA", "TTTT", "GCGCGCA"]
    (tmp_path / "in.fasta").write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(sequences)))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "name": "npy", "input": {"path": "in.fasta"},
        "stages": [{"name": "count", "command": [str(tool), "{inputs}", "{outputs}", "{scratch}", "{chunk}"],
                    "write": {"format": "fasta", "fields": ["sequence"]},
                    "read": {"format": "npy", "name": "{id}.npy", "outputs": {"counts": "array"},
                             "shapes": {"counts": [2]}},
                    "concurrency": 2}],
        "output": {"path": "out/counts.parquet"},
        "chunking": {"chunk_rows": 2},
    }))
    done = run_tensorfleet("run", tmp_path / "job.yaml")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(tmp_path / "out" / "counts.parquet").to_pydict()
    assert table["id"] == ["s0", "s1", "s2", "s3"]
    assert table["counts"] == [[len(s), s.count("G") + s.count("C")] for s in sequences]
