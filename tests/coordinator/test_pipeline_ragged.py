"""A ragged output handed to the next stage (issue 27 #4): stage 1 returns per-residue vectors
[-1, 4] with their lengths, stage 2 pools them. This crashed in the stage reader
(`ValueError: negative dimensions are not allowed`) after `--dry-run` passed; now stage 2 reads
each row padded to the longest row it reads, with the real lengths, and every stage's output is
kept (`output.stages`), the ragged one stored flat with its offsets in HDF5.
"""

from __future__ import annotations

import h5py
import numpy as np
import yaml

from .helpers import make_fasta, run_tensorfleet

RESIDUES_CONFIG = """name: residues
backend: python
max_batch_size: 16
inputs:
  - {name: sequence, datatype: BYTES, shape: []}
outputs:
  - {name: per_residue, datatype: FP32, shape: [-1, 4], ragged: true}
  - {name: length, datatype: INT32, shape: []}
batching: {max_queue_delay_ms: 1}
"""

RESIDUES_MODEL = '''import numpy as np


def vectors(sequence):
    return np.array([[ord(c) / 100.0, i, 1.0, len(sequence)] for i, c in enumerate(sequence)], dtype=np.float32)


class Model:
    def load(self, context):
        pass

    def predict(self, inputs):
        rows = [vectors(bytes(s).decode()) for s in inputs["sequence"]]
        width = max(len(r) for r in rows)
        out = np.zeros((len(rows), width, 4), dtype=np.float32)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return {"per_residue": out, "length": np.array([len(r) for r in rows], dtype=np.int32)}
'''

POOL_CONFIG = """name: pool
backend: python
max_batch_size: 16
inputs:
  - {name: per_residue, datatype: FP32, shape: [-1, 4], ragged: true}
  - {name: length, datatype: INT32, shape: []}
outputs:
  - {name: mean, datatype: FP32, shape: [4]}
batching: {max_queue_delay_ms: 1}
"""

POOL_MODEL = '''import numpy as np


class Model:
    def load(self, context):
        pass

    def predict(self, inputs):
        values, lengths = inputs["per_residue"], inputs["length"].reshape(-1)
        return {"mean": np.stack([values[i, : int(n)].mean(axis=0) for i, n in enumerate(lengths)]).astype(np.float32)}
'''


def vectors(sequence: str) -> np.ndarray:
    return np.array([[ord(c) / 100.0, i, 1.0, len(sequence)] for i, c in enumerate(sequence)], dtype=np.float32)


def test_a_ragged_output_feeds_the_next_stage_and_every_stage_is_kept(tmp_path):
    for name, config, code in (("residues", RESIDUES_CONFIG, RESIDUES_MODEL), ("pool", POOL_CONFIG, POOL_MODEL)):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.yaml").write_text(config)
        (tmp_path / "models" / name / "model.py").write_text(code)
    records = make_fasta(tmp_path / "in.fasta", 40, seed=4)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "ragged", "input": {"path": "in.fasta"},
        "stages": [
            {"name": "residues", "model": {"name": "residues", "local": {"repository": "models"}},
             "ragged": {"per_residue": "length"}, "batch_rows": 4},
            {"name": "pool", "model": {"name": "pool", "local": {"repository": "models"}},
             "tensors": {"per_residue": "per_residue", "length": "length"}, "batch_rows": 3, "token_budget": 400},
        ],
        "output": {"path": "out/pooled.h5", "stages": ["residues"]},
        "chunking": {"chunk_rows": 8},
    }))
    plan = run_tensorfleet("run", job, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    done = run_tensorfleet("run", job)
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "out" / "pooled.h5") as f:
        assert [i.decode() for i in f["ids"][:]] == [name for name, _ in records]
        np.testing.assert_allclose(f["mean"][:], np.stack([vectors(s).mean(axis=0) for _, s in records]), rtol=1e-6)
    with h5py.File(tmp_path / "out" / "pooled.residues.h5") as f:  # stage 1's own output, ragged, flat
        offsets = f["per_residue_offsets"][:]
        flat = f["per_residue"][:]
        for row, (_, sequence) in enumerate(records):
            np.testing.assert_array_equal(flat[offsets[row]:offsets[row + 1]], vectors(sequence))
        assert list(f["length"][:]) == [len(s) for _, s in records]
