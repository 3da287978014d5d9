"""The minimal job spec that hostile-spec cases change one field at a time.

`tests/security/test_job_policy.py` and `bench/probe_cases.py` attack the same base job (an
8-row FASTA under ROOT/data, an HDF5 output under ROOT/out) with the same change syntax, so
both build it here: a case that passes in one and is refused in the other then differs only
in the change, never in a drifted copy of the base.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def with_changes(base: dict, changes: dict[str, Any]) -> dict:
    """A copy of `base` with each change applied: key `a__b` sets base['a']['b'] (making the
    parents it needs); the value None removes the key."""
    spec = copy.deepcopy(base)
    for dotted, value in changes.items():
        node = spec
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return spec


def minimal_job(root: Path, job_name: str, server: str, output_name: str, /, **changes: Any) -> dict:
    """Job `job_name` reading ROOT/data/in.fasta on `server`, writing ROOT/out/OUTPUT_NAME, changed
    (positional-only, so a change may be named `name`)."""
    base = {
        "name": job_name,
        "input": {"path": str(Path(root) / "data" / "in.fasta")},
        "model": {"name": "embed", "servers": [server]},
        "output": {"path": str(Path(root) / "out" / output_name)},
    }
    return with_changes(base, changes)
