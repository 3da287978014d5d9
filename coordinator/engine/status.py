"""`tensorfleet status` for a job folder of any kind: one line per stage, model x source or run, and a total.

A plain job's folder holds its manifest and status.json. A workflow's top folder holds
`workflow.json`: its kind and the sub-folders of its parts (each an ordinary run's folder),
so status reads every part's manifest and never needs the job file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..spec.errors import JobFatal
from .manifest import MANIFEST_NAME, Manifest
from .progress import pid_alive, read_status, write_json_atomic

MARKER_NAME = "workflow.json"



def open_workflow_folder(job_dir: Path, marker: dict[str, Any], *, restart: bool, resume: bool) -> None:
    """A workflow's top folder, with its marker written: started over with --restart, continued
    with --resume, and never taken over silently by a second run of the job."""
    path = job_dir / MARKER_NAME
    if path.is_file() and restart:
        shutil.rmtree(job_dir)
    elif path.is_file() and not resume:
        raise JobFatal(f"{job_dir} already holds this job; pass --resume to continue it or --restart to start over")
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, marker)


COUNTS = ("rows", "rows_done", "rows_failed", "chunks", "chunks_done")


def _part(folder: Path) -> dict[str, Any] | None:
    """A run folder's status.json with its manifest's exact counts on top; None when empty."""
    manifest = Manifest.open_existing(folder)
    status = read_status(folder) or {}
    if manifest is None and not status:
        return None
    counts = manifest.counts() if manifest is not None else {}
    if manifest is not None:
        manifest.close()
    state = status.get("state", "planned" if counts else "waiting")
    if state in ("running", "starting", "merging") and status.get("pid") and not pid_alive(status["pid"]):
        state = "stopped"
    return {**status, **counts, "state": state}


def _unmarked_workflow(job_dir: Path) -> dict[str, Any] | None:
    """A workflow folder without workflow.json: one written before it existed (its marker was
    pipeline.json or sweep.json) or whose marker was lost. Its parts are the run folders below
    it that hold a manifest, named by their path; --resume of the job writes the marker again."""
    if not job_dir.is_dir():
        return None
    manifests = sorted(
        path.parent for depth in ("*", "*/*", "*/*/*") for path in job_dir.glob(f"{depth}/{MANIFEST_NAME}")
    )
    if not manifests:
        return None
    older = next((name for name in ("pipeline.json", "sweep.json") if (job_dir / name).is_file()), None)
    kind = {"pipeline.json": "multi-stage", "sweep.json": "models x sources"}.get(older or "", "unknown")
    parts = [{"label": str(folder.relative_to(job_dir)), "dir": str(folder.relative_to(job_dir))} for folder in manifests]
    return {"kind": kind, "name": f"no {MARKER_NAME}: parts found by their manifests", "parts": parts}


def job_status(job_dir: Path) -> dict[str, Any] | None:
    """The job's progress: {'kind', 'parts': [...], 'total': {...}} or, for a plain job, its report; None: no job."""
    marker = job_dir / MARKER_NAME
    if not marker.is_file():
        report = _part(job_dir)
        if report is not None:
            return {"kind": "plain", "job_dir": str(job_dir), **report}
        workflow = _unmarked_workflow(job_dir)
        if workflow is None:
            return None
    else:
        workflow = json.loads(marker.read_text())
    parts = []
    for entry in workflow["parts"]:
        report = _part(job_dir / entry["dir"]) or {"state": "waiting"}
        parts.append({**{k: v for k, v in entry.items() if k != "dir"}, **{k: report.get(k, 0) for k in COUNTS},
                      "state": report["state"]})
    total = {key: sum(part[key] for part in parts) for key in COUNTS}
    states = {part["state"] for part in parts}
    total["state"] = next((s for s in ("failed", "stopped", "running", "merging", "starting", "waiting") if s in states),
                          "done_with_errors" if total["rows_failed"] else "done")
    return {"kind": workflow["kind"], "name": workflow.get("name"), "job_dir": str(job_dir),
            "output": workflow.get("output"), "parts": parts, "total": total}


def _line(label: str, report: dict[str, Any]) -> str:
    rows, done = report.get("rows", 0), report.get("rows_done", 0)
    share = f" ({done / rows:.1%})" if rows else ""
    return (f"{label}: {report['state']}, rows {done}/{rows}{share}, chunks {report.get('chunks_done', 0)}/"
            f"{report.get('chunks', 0)}, rows failed {report.get('rows_failed', 0)}")


def format_status(report: dict[str, Any]) -> str:
    """The text `tensorfleet status` prints."""
    import time

    from .progress import format_duration

    lines = [f"job folder: {report['job_dir']}"]
    if report["kind"] != "plain":
        lines.append(f"kind: {report['kind']} ({report.get('name')})")
        lines += [_line(part["label"] + (f" ({part['model']})" if part.get("model") else ""), part)
                  for part in report["parts"]]
        lines.append(_line("total", report["total"]))
        if report.get("output"):
            lines.append(f"output: {report['output']}")
        return "\n".join(lines)
    state = report["state"]
    rows, done = report.get("rows", 0), report.get("rows_done", 0)
    lines.append(f"state: {state}" + (" (the coordinator is gone; run the same `tensorfleet run JOB` again to continue)"
                                      if state == "stopped" else ""))
    lines.append(f"rows: {done}/{rows} done ({done / rows:.1%})" if rows else "rows: 0")
    if "chunks" in report:
        lines.append(f"chunks: {report['chunks_done']}/{report['chunks']} done; rows failed: {report['rows_failed']}")
    if report.get("rows_per_second"):
        lines.append(f"speed: {report['rows_per_second']} rows/s, ETA {format_duration(report.get('eta_seconds'))}")
    for server in report.get("servers", []):
        lines.append(f"server {server['address']}: {'alive' if server['alive'] else 'down'}, {server['rows']} rows"
                     + (f" ({server['last_error']})" if server.get("last_error") else ""))
    if report.get("output"):
        lines.append(f"output: {report['output']}")
    if report.get("updated"):
        lines.append(f"updated: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(report['updated']))}")
    return "\n".join(lines)
