"""A job's progress as one report, for any job kind: what the coordinator service, its dashboard
and `tensorfleet top` show.

A plain job's folder holds its manifest and the status.json its Progress writes (rows/s,
servers). A workflow (multi-stage, models x sources, in-context) runs one ordinary run per
part, each writing those two files in its own sub-folder named in `workflow.json`; the
workflow's report is built from them here, read-only:

- counts (rows, chunks, done, failed) are the manifests' committed ones, summed over parts;
  a part not yet planned counts the rows its plan will have where another part says so
  (a models x sources part: the same source's; a stage or in-context run: the first part's),
  so a sweep cancelled half way reports 101/202 rows, not 101/101;
- rows/s is the sum over the parts running now (a pipeline's stages run side by side);
- servers are the running parts' (each address once); after the end, the last ones seen;
- a state written by a process that is gone ("running", "starting") reads "stopped".

Every part is listed too (label, model, state, counts, rows/s): a pipeline per stage and overall.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from .manifest import MANIFEST_NAME
from .progress import pid_alive, read_status

#: Where the workflow marker lives (status.MARKER_NAME; not imported, to keep this module light).
MARKER_NAME = "workflow.json"
COUNTS = ("rows", "rows_done", "rows_failed", "chunks", "chunks_done")
#: States a live run writes; one whose writer is gone is "stopped".
LIVE = frozenset({"starting", "running", "merging"})
#: The workflow's state from its parts', the first found in this order wins.
ORDER = ("failed", "stopped", "running", "merging", "starting", "interrupted", "waiting")


def manifest_counts(run_dir: Path) -> dict[str, int]:
    """Committed counts from a run folder's manifest, opened read-only (never locks out the
    engine writing it); {} before it exists."""
    path = run_dir / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            total, done, rows, rows_done, failed = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(done), 0), COALESCE(SUM(stop - start), 0),"
                " COALESCE(SUM(CASE WHEN done THEN stop - start ELSE 0 END), 0), COALESCE(SUM(failed), 0)"
                " FROM chunks"
            ).fetchone()
    except sqlite3.Error:
        return {}
    return {"chunks": total, "chunks_done": done, "rows": rows, "rows_done": rows_done, "rows_failed": failed}


def live_state(status: dict[str, Any]) -> str:
    """The state status.json says, or "stopped" when it says the run is live but its process is gone."""
    state = str(status.get("state") or "")
    if state in LIVE and status.get("pid") and not pid_alive(int(status["pid"])):
        return "stopped"
    return state


def run_report(run_dir: Path) -> dict[str, Any]:
    """One run folder: its status.json with the manifest's exact counts on top; {} when empty."""
    status = read_status(run_dir) or {}
    counts = manifest_counts(run_dir)
    if not status and not counts:
        return {}
    return {**status, **counts, "state": live_state(status) or ("planned" if counts else "waiting")}


def is_workflow(job_dir: Path) -> bool:
    return (job_dir / MARKER_NAME).is_file()


def run_dirs(job_dir: Path) -> list[Path]:
    """The run folders of a job of any kind: the folder itself, or a workflow's parts."""
    if not is_workflow(job_dir):
        return [job_dir]
    try:
        marker = json.loads((job_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return []
    return [job_dir / entry["dir"] for entry in marker.get("parts", [])]


def job_progress(job_dir: Path) -> dict[str, Any]:
    """The report of a job folder of any kind ({} before the job wrote anything)."""
    if not is_workflow(job_dir):
        return run_report(job_dir)
    try:
        marker = json.loads((job_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return workflow_progress(job_dir, marker)


def _sibling_key(kind: str, entry: dict[str, Any]) -> str:
    """Parts with the same key plan the same rows: a sweep's parts over one source; every part of
    a pipeline (one input; a fan-out stage plans its own once it starts) or an in-context job."""
    return Path(entry["dir"]).name if kind == "models x sources" else ""


def workflow_progress(job_dir: Path, marker: dict[str, Any]) -> dict[str, Any]:
    kind = str(marker.get("kind", ""))
    parts: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []
    planned: dict[str, dict[str, int]] = {}
    for entry in marker.get("parts", []):
        report = run_report(job_dir / entry["dir"])
        reports.append(report)
        key = _sibling_key(kind, entry)
        if report.get("chunks") and key not in planned:
            planned[key] = {"rows": report["rows"], "chunks": report["chunks"]}
    for entry, report in zip(marker.get("parts", []), reports, strict=True):
        part = {"label": entry.get("label", entry["dir"]), "model": entry.get("model", ""),
                "state": report.get("state", "waiting"), **{key: int(report.get(key) or 0) for key in COUNTS}}
        if not report.get("chunks"):
            estimate = planned.get(_sibling_key(kind, entry))
            if estimate:
                part.update(estimate, estimated=True)
        part["rows_per_second"] = float(report.get("rows_per_second") or 0.0) if part["state"] in LIVE else 0.0
        parts.append(part)
    total: dict[str, Any] = {key: sum(part[key] for part in parts) for key in COUNTS}
    states = {part["state"] for part in parts}
    done = all(part["state"] in ("done", "done_with_errors") for part in parts) if parts else False
    total["state"] = "done" if done else next((s for s in ORDER if s in states), "running" if states else "waiting")
    rate = sum(part["rows_per_second"] for part in parts)
    total["rows_per_second"] = round(rate, 2)
    total["eta_seconds"] = round((total["rows"] - total["rows_done"]) / rate, 1) if rate else None
    total["servers"] = _servers(reports)
    total["servers_alive"] = sum(1 for server in total["servers"] if server.get("alive"))
    updated = [float(r["updated"]) for r in reports if r.get("updated")]
    if updated:
        total["updated"] = max(updated)
    return {**total, "kind": kind, "output": marker.get("output"), "parts": parts}


def _servers(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The running parts' servers, each address once; with none running, the most recent part's."""
    live = [r for r in reports if r.get("state") in LIVE and r.get("servers")]
    if not live:
        seen = sorted((r for r in reports if r.get("servers")), key=lambda r: float(r.get("updated") or 0))
        live = seen[-1:]
    merged: dict[str, dict[str, Any]] = {}
    for report in live:
        for server in report["servers"]:
            address = server.get("address", "")
            if address in merged:  # one fleet shared by two parts (an in-context job's runs): rows add up
                merged[address] = {**merged[address], "rows": int(merged[address].get("rows") or 0) + int(server.get("rows") or 0),
                                   "alive": bool(merged[address].get("alive") or server.get("alive"))}
            else:
                merged[address] = dict(server)
    return list(merged.values())
