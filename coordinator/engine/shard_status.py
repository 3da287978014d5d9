"""The progress of a sharded job: each shard's, the total, and whether the merge has run.

A shard's folder (`<job folder>/shards/I-of-N/`) is an ordinary job folder of the job's kind, so
each shard's progress is `job_status` of it; a shard is complete when every run it holds (a
plain job's one, a workflow's parts) is planned and has every chunk done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .manifest import MANIFEST_NAME, Manifest
from .progress import read_status
from .shard_plan import SHARDS_DIR, shard_count, shard_folder
from .status import COUNTS, job_status
from .status import MARKER_NAME as WORKFLOW_MARKER


def _runs(folder: Path) -> list[Path] | None:
    """The run folders a shard's folder holds (None: the shard has not started)."""
    marker = folder / WORKFLOW_MARKER
    if marker.is_file():
        return [folder / entry["dir"] for entry in json.loads(marker.read_text())["parts"]]
    if (folder / MANIFEST_NAME).is_file():
        return [folder]
    return None


def shard_progress(top: Path, index: int, count: int) -> dict[str, Any]:
    """One shard: its counts over every run it holds, and whether it is complete."""
    folder = shard_folder(top, index, count)
    report = job_status(folder) or {}
    state = report.get("total", report).get("state", "not started")
    counts = {key: 0 for key in COUNTS}
    runs = _runs(folder)
    unplanned = 0
    for run in runs or []:
        manifest = Manifest.open_existing(run)
        if manifest is None or not manifest.has_plan():
            unplanned += 1
        if manifest is not None:
            try:
                for key, value in manifest.counts().items():
                    counts[key] += value
            finally:
                manifest.close()
    complete = runs is not None and not unplanned and counts["chunks_done"] == counts["chunks"]
    return {"label": f"shard {index}/{count}", "index": index, "state": state if runs is not None else "not started",
            "complete": complete, "runs": len(runs or []), "runs_not_planned": unplanned, **counts}


def describe_shard(progress: dict[str, Any]) -> str:
    """`shard 1/3 (rows 64/128, chunks 1/2)`, or `(not started)`."""
    if progress["state"] == "not started":
        return f"{progress['label']} (not started)"
    more = f"; {progress['runs_not_planned']} of {progress['runs']} runs not started" if progress["runs_not_planned"] else ""
    return (f"{progress['label']} ({progress['state']}, rows {progress['rows_done']}/{progress['rows']}, "
            f"chunks {progress['chunks_done']}/{progress['chunks']}{more})")


def incomplete_shards(top: Path, count: int) -> list[str]:
    """Every shard not complete yet, described with its progress."""
    return [describe_shard(p) for p in (shard_progress(top, i, count) for i in range(count)) if not p["complete"]]


def sharded_status(top: Path) -> dict[str, Any] | None:
    """`tensorfleet status` of a sharded job's folder: one entry per shard, a total and the merge's state."""
    count = shard_count(top)
    if count is None:
        return None
    shards = [shard_progress(top, index, count) for index in range(count)]
    total = {key: sum(shard[key] for shard in shards) for key in COUNTS}
    merge = read_status(top / SHARDS_DIR) or {}
    complete = all(shard["complete"] for shard in shards)
    merge_state = merge.get("state") if complete and merge.get("state") else ("waiting for shards" if not complete
                                                                               else "not run")
    return {"kind": "sharded", "job_dir": str(top), "count": count, "shards": shards, "total": total,
            "merge": merge_state, "output": merge.get("output")}


def format_sharded(report: dict[str, Any]) -> str:
    """The text `tensorfleet status` prints for a sharded job."""
    lines = [f"job folder: {report['job_dir']}", f"kind: sharded ({report['count']} shards)"]
    for shard in report["shards"]:
        lines.append(describe_shard(shard) + (", complete" if shard["complete"] else "")
                     + (f", rows failed {shard['rows_failed']}" if shard["rows_failed"] else ""))
    total = report["total"]
    rows = total["rows"]
    share = f" ({total['rows_done'] / rows:.1%})" if rows else ""
    lines.append(f"total: rows {total['rows_done']}/{rows}{share}, chunks {total['chunks_done']}/{total['chunks']}, "
                 f"rows failed {total['rows_failed']}")
    lines.append(f"merge: {report['merge']}" + (f" ({report['output']})" if report.get("output") else ""))
    return "\n".join(lines)
