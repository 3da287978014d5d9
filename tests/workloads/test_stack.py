"""Workload 2 (STACK): in-context prediction with a stored prompt, query and synthetic control.

The served predictions are compared with the same model class run in this process on the
same query and prompt cells. Tolerance: 1e-5 absolute (float32; softmax over the same prompt).
The prompt must reach each server once per run: the server's context-put counter says so.
"""

from __future__ import annotations

import socket
import sys
import urllib.request

import anndata
import grpc
import numpy as np
import pytest

from tensorfleet.client import InferenceClient
from tensorfleet.client.errors import FailedPrecondition
from tests.serving import running_server

from .helpers import REPO_ROOT, run_tensorfleet, write_yaml

sys.path.insert(0, str(REPO_ROOT))
from examples.protein.inprocess import load_python_model  # noqa: E402
from examples.stack import build  # noqa: E402

GENES, QUERY, BATCH = 24, 90, 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def context_puts(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    lines = [line for line in text.splitlines() if line.startswith('tensorfleet_context_puts_total{model="stack_toy"}')]
    return float(lines[0].split()[-1]) if lines else 0.0


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    build.build_model(root / "models", GENES)
    build.build_data(root / "data", GENES, query=QUERY, prompt=20)
    metrics = free_port()
    with running_server(root / "models", "--metrics-port", str(metrics)) as server:
        yield root, server, metrics


def job(root, name, control) -> object:
    return write_yaml(root / f"{name}.yaml", {
        "name": name,
        "input": {"path": "data/query.h5ad", "tensors": {"query": "X"}},
        "prompt": {"path": "data/prompt.h5ad", "tensors": {"prompt": "X"}},
        "control": control,
        "model": {"name": "stack_toy", "servers": ["127.0.0.1:1"]},
        "output": {"path": f"out/{name}.h5ad", "h5ad_slot": "layers"},
        "chunking": {"batch_rows": BATCH, "chunk_rows": 32},
    })


def in_process(root, prompt: str) -> np.ndarray:
    model = load_python_model(root / "models" / "stack_toy")
    query = anndata.read_h5ad(root / "data" / "query.h5ad").X
    cells = anndata.read_h5ad(root / "data" / f"{prompt}.h5ad").X
    return model.predict({"query": np.asarray(query), "prompt": np.asarray(cells)})["prediction"]


def test_synthetic_control_two_paired_runs_prompt_sent_once_each(example):
    root, server, metrics = example
    before = context_puts(metrics)
    spec = job(root, "synthetic", {"path": "data/control_prompt.h5ad", "tensors": {"prompt": "X"}})
    done = run_tensorfleet("run", spec, "--servers", server.address)
    assert done.returncode == 0, done.stderr
    assert context_puts(metrics) - before == 2  # one per run, though each run sends ceil(90/16) = 6 requests
    out = anndata.read_h5ad(root / "out" / "synthetic.h5ad")
    query = anndata.read_h5ad(root / "data" / "query.h5ad")
    assert list(out.obs_names) == list(query.obs_names) and list(out.var_names) == list(query.var_names)
    assert list(out.obs["batch"]) == list(query.obs["batch"])
    assert out.uns["tensorfleet_control"] == "synthetic"
    np.testing.assert_allclose(out.layers["prediction"], in_process(root, "prompt"), atol=1e-5)
    np.testing.assert_allclose(out.layers["prediction_control"], in_process(root, "control_prompt"), atol=1e-5)
    assert not np.allclose(out.layers["prediction"], out.layers["prediction_control"])


def test_query_as_control_is_one_run(example):
    root, server, metrics = example
    before = context_puts(metrics)
    done = run_tensorfleet("run", job(root, "querycontrol", "query"), "--servers", server.address)
    assert done.returncode == 0, done.stderr
    assert context_puts(metrics) - before == 1
    out = anndata.read_h5ad(root / "out" / "querycontrol.h5ad")
    assert out.uns["tensorfleet_control"] == "query" and set(out.layers) == {"prediction"}
    np.testing.assert_allclose(out.layers["prediction"], in_process(root, "prompt"), atol=1e-5)


def test_an_unknown_context_is_failed_precondition_naming_it(example):
    root, server, _ = example
    query = np.ones((2, GENES), dtype=np.float32)
    with InferenceClient(server.address) as client:
        with pytest.raises(FailedPrecondition, match="'never-put'") as caught:
            client.infer("stack_toy", {"query": query}, parameters={"tensorfleet.context": "never-put"})
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        prompts = {name: np.random.default_rng(i).poisson(2.0, (5, GENES)).astype(np.float32) for i, name in enumerate("ab")}
        for name, cells in prompts.items():
            client.infer("stack_toy", {"prompt": cells}, parameters={"tensorfleet.context_put": name})
        # concurrent requests under two contexts: each gets its own prompt, never the other's
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            futures = [(name, pool.submit(client.infer, "stack_toy", {"query": query},
                                          parameters={"tensorfleet.context": name})) for name in "abab" * 4]
        model = load_python_model(root / "models" / "stack_toy")
        for name, future in futures:
            expected = model.predict({"query": query, "prompt": prompts[name]})["prediction"]
            np.testing.assert_allclose(future.result()["prediction"], expected, atol=1e-5)


def local_job(root, name: str, prompt: str) -> object:
    """An in-context job on its own local server of the model built under `root`."""
    return write_yaml(root / f"{name}.yaml", {
        "name": name,
        "input": {"path": "data/query.h5ad", "tensors": {"query": "X"}},
        "prompt": {"path": prompt, "tensors": {"prompt": "X"}},
        "model": {"name": "stack_toy", "local": {"repository": "models", "count": 1}},
        "output": {"path": f"out/{name}.h5ad", "h5ad_slot": "layers"},
        "chunking": {"batch_rows": BATCH, "chunk_rows": 32},
    })


def test_a_prompt_with_its_genes_in_another_order_is_aligned_like_the_query(tmp_path):
    """STACK ships a gene list; prompt cells often come from another dataset, with the genes in
    another order and some missing. The prompt is matched to the model's genes by name, as the
    query is; fed as stored, its columns would be the wrong genes."""
    import yaml

    folder = build.build_model(tmp_path / "models", GENES)
    genes = [f"GENE{i:04d}" for i in range(GENES)]
    (folder / "genes.txt").write_text("\n".join(genes) + "\n")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["features"] = {"file": "genes.txt", "input": "query"}
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    build.build_data(tmp_path / "data", GENES, query=40, prompt=12)

    prompt = anndata.read_h5ad(tmp_path / "data" / "prompt.h5ad")
    order = np.random.default_rng(5).permutation(GENES)
    kept = order[: GENES - 2]  # two genes the prompt's dataset lacks
    shuffled = anndata.AnnData(X=np.asarray(prompt.X)[:, kept], obs=prompt.obs, var=prompt.var.iloc[kept])
    shuffled.write_h5ad(tmp_path / "data" / "shuffled_prompt.h5ad")

    done = run_tensorfleet("run", local_job(tmp_path, "shuffled", "data/shuffled_prompt.h5ad"))
    assert done.returncode == 0, done.stderr
    assert f"prompt run: prompt {tmp_path / 'data' / 'shuffled_prompt.h5ad'}: aligned: {GENES - 2}/{GENES}" in done.stdout, done.stdout

    aligned = np.zeros((prompt.n_obs, GENES), dtype=np.float32)  # by name, built here independently
    for column, gene in enumerate(genes):
        if gene in list(shuffled.var_names):
            aligned[:, column] = np.asarray(shuffled.X)[:, list(shuffled.var_names).index(gene)]
    model = load_python_model(folder)
    query = np.asarray(anndata.read_h5ad(tmp_path / "data" / "query.h5ad").X)
    want = model.predict({"query": query, "prompt": aligned})["prediction"]
    out = anndata.read_h5ad(tmp_path / "out" / "shuffled.h5ad")
    np.testing.assert_allclose(out.layers["prediction"], want, atol=1e-5)
    as_stored = model.predict({"query": query, "prompt": np.pad(np.asarray(shuffled.X), ((0, 0), (0, 2)))})["prediction"]
    assert not np.allclose(as_stored, want, atol=1e-3)
    provenance = out.uns["tensorfleet"]["provenance"]
    assert provenance["prompt_alignment_missing"] == 2 and provenance["prompt_alignment_found"] == GENES - 2


def test_a_prompt_of_the_wrong_width_is_refused_before_any_server_starts(tmp_path):
    """Every stream's context put would fail; each chunk was lost and retried until its rows
    were all failed. Now: exit 2 naming the field, the input and both widths."""
    build.build_model(tmp_path / "models", GENES)
    build.build_data(tmp_path / "data", GENES, query=20, prompt=6)
    prompt = anndata.read_h5ad(tmp_path / "data" / "prompt.h5ad")
    narrow = anndata.AnnData(X=np.asarray(prompt.X)[:, : GENES - 2], obs=prompt.obs, var=prompt.var.iloc[: GENES - 2])
    narrow.write_h5ad(tmp_path / "data" / "narrow.h5ad")
    done = run_tensorfleet("run", local_job(tmp_path, "narrow", "data/narrow.h5ad"))
    assert done.returncode == 2, done.stderr
    assert f"field 'X' has rows of [{GENES - 2}]; model 'stack_toy' input 'prompt' takes rows of [{GENES}]" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob("out/narrow.h5ad.tfjob/servers/*.log"))
