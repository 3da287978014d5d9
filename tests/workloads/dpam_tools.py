"""A DPAM-shaped job, built in a test folder: a tool stage, a fan-out stage and a model stage.

- `search`: a tool stage. `fake_foldseek` stands in for Foldseek's easy-search: it reads a folder
  of structure files (one per protein, <id>.pdb) and writes one TSV of hits (query, n_res, bits,
  evalue). A structure holding UNRESOLVED gets no line, as a query with no hit in Foldseek.
- `parse`: a model stage that fans out: each protein's hit becomes 1-4 domains
  (`domains` [-1, 4] ragged, `n_domains`), ids PROTEIN:K.
- `domass`: a model over the domains (each domain's features and its protein's hit, read from
  stage `search` by qualified name): two class probabilities.

`expected()` computes the same in this process, from the same rules, for the comparison.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

TOOL = '''#!{python}
"""Stands in for Foldseek easy-search: a folder of structures in, one TSV of hits out."""
import hashlib
import pathlib
import sys

command, folder, out = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
assert command == "easy-search", command
lines = ["query\\tn_res\\tbits\\tevalue"]
for path in sorted(folder.iterdir()):
    text = path.read_text()
    if "CRASH" in text:
        print("fake_foldseek: segmentation fault in structure " + path.name, file=sys.stderr)
        sys.exit(3)
    if "UNRESOLVED" in text:
        continue
    digest = hashlib.sha256(text.encode()).digest()
    lines.append(f"{{path.stem}}\\t{{text.count(chr(10))}}\\t{{digest[0] + digest[1] / 256}}\\t{{digest[2] / 1000}}")
out.write_text("\\n".join(lines) + "\\n")
print(f"fake_foldseek: {{len(lines) - 1}} queries with hits", file=sys.stderr)
'''

PARSE_CONFIG = """name: domain_parse
backend: python
max_batch_size: 64
inputs:
  - {name: hit, datatype: FP32, shape: [3]}
outputs:
  - {name: domains, datatype: FP32, shape: [-1, 4], ragged: true}
  - {name: n_domains, datatype: INT32, shape: []}
batching: {max_queue_delay_ms: 1}
"""

PARSE_MODEL = '''"""1-4 domains per protein from its hit: [start, end, bits / (k + 1), k]."""
import numpy as np


def parse(hit):
    count = 1 + int(hit[1]) % 4
    step = hit[0] / count
    return [[k * step, (k + 1) * step, hit[1] / (k + 1), k] for k in range(count)]


class Model:
    def load(self, context):
        pass

    def predict(self, inputs):
        hits = np.asarray(inputs["hit"], dtype=np.float32)
        rows = [parse(hit) for hit in hits]
        width = max(len(r) for r in rows)
        domains = np.zeros((len(rows), width, 4), dtype=np.float32)
        for i, r in enumerate(rows):
            domains[i, : len(r)] = np.asarray(r, dtype=np.float32)
        return {"domains": domains, "n_domains": np.array([len(r) for r in rows], dtype=np.int32)}
'''

DOMASS_CONFIG = """name: domain_class
backend: python
max_batch_size: 64
inputs:
  - {name: features, datatype: FP32, shape: [4]}
  - {name: hit, datatype: FP32, shape: [3]}
outputs:
  - {name: probabilities, datatype: FP32, shape: [2]}
batching: {max_queue_delay_ms: 1}
"""

DOMASS_MODEL = '''"""Two class probabilities from a domain's features and its protein's hit."""
import numpy as np

W = np.array([[0.01, -0.02], [0.02, 0.01], [0.03, -0.01], [-0.5, 0.5]], dtype=np.float32)
V = np.array([[0.001, 0.002], [-0.01, 0.01], [1.0, -1.0]], dtype=np.float32)


def probabilities(features, hit):
    logits = features @ W + hit @ V
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class Model:
    def load(self, context):
        pass

    def predict(self, inputs):
        return {"probabilities": probabilities(np.asarray(inputs["features"], np.float32),
                                               np.asarray(inputs["hit"], np.float32))}
'''


def structure(index: int) -> str:
    """A fake structure file: one line per residue."""
    rng = np.random.default_rng(index)
    lines = [f"ATOM {i:5d} CA {rng.normal():.3f} {rng.normal():.3f} {rng.normal():.3f}" for i in range(rng.integers(20, 80))]
    return "\n".join(lines) + "\n"


def build(root: Path, proteins: int = 24, unresolved: tuple[int, ...] = (7,), chunk_rows: int = 6,
          stages_kept: tuple[str, ...] = ("search", "parse", "domass")) -> tuple[Path, Path]:
    """(job file, the tool) in `root`: data, a model repository, the tool and the job."""
    root.mkdir(parents=True, exist_ok=True)
    tool = root / "bin" / "fake_foldseek"
    tool.parent.mkdir(exist_ok=True)
    tool.write_text(TOOL.format(python=sys.executable))
    os.chmod(tool, 0o755)
    for name, config, code in (("domain_parse", PARSE_CONFIG, PARSE_MODEL), ("domain_class", DOMASS_CONFIG, DOMASS_MODEL)):
        (root / "models" / name).mkdir(parents=True, exist_ok=True)
        (root / "models" / name / "config.yaml").write_text(config)
        (root / "models" / name / "model.py").write_text(code)
    ids = [f"P{i:04d}" for i in range(proteins)]
    texts = [structure(i) + ("UNRESOLVED\n" if i in unresolved else "") for i in range(proteins)]
    pq.write_table(pa.table({"protein": ids, "structure": texts}), root / "proteins.parquet")
    job = {
        "name": "dpam-tools",
        "input": {"path": "proteins.parquet", "ids": "protein"},
        "stages": [
            {"name": "search", "command": [str(tool), "easy-search", "{inputs}", "{outputs}/hits.tsv"],
             "write": {"format": "files", "fields": ["structure"], "suffix": ".pdb"},
             "read": {"format": "tsv", "name": "hits.tsv", "id_column": "query",
                      "outputs": {"hit": ["n_res", "bits", "evalue"]}},
             "concurrency": 2, "timeout_s": 120},
            {"name": "parse", "model": {"name": "domain_parse", "local": {"repository": "models"}},
             "tensors": {"hit": "hit"}, "fan_out": "domains", "ragged": {"domains": "n_domains"}, "batch_rows": 4},
            {"name": "domass", "model": {"name": "domain_class", "local": {"repository": "models"}},
             "tensors": {"features": "domains", "hit": "search:hit"}, "batch_rows": 5},
        ],
        "output": {"path": "out/dpam.parquet", "stages": list(stages_kept)},
        "chunking": {"chunk_rows": chunk_rows},
    }
    path = root / "dpam.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path, tool


def expected(root: Path) -> dict:
    """Every stage's result computed here from the same rules: hits, domains, probabilities."""
    sys.path.insert(0, str(root / "models" / "domain_class"))
    try:
        namespace: dict = {}
        exec(compile(DOMASS_MODEL, "domass", "exec"), namespace)
        parse_ns: dict = {}
        exec(compile(PARSE_MODEL, "parse", "exec"), parse_ns)
    finally:
        sys.path.pop(0)
    table = pq.read_table(root / "proteins.parquet").to_pydict()
    hits, children, features, child_hits = {}, [], [], []
    for protein, text in zip(table["protein"], table["structure"], strict=True):
        if "UNRESOLVED" in text:
            continue
        digest = hashlib.sha256(text.encode()).digest()
        hit = np.array([text.count("\n"), digest[0] + digest[1] / 256, digest[2] / 1000], dtype=np.float32)
        hits[protein] = hit
        for k, domain in enumerate(parse_ns["parse"](hit)):
            children.append(f"{protein}:{k}")
            features.append(np.asarray(domain, dtype=np.float32))
            child_hits.append(hit)
    probabilities = namespace["probabilities"](np.stack(features), np.stack(child_hits))
    return {"hits": hits, "children": children, "features": np.stack(features), "probabilities": probabilities,
            "proteins": table["protein"]}
