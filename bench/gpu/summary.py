"""bench/gpu/run.sh's bookkeeping: one record per step, then DIR/summary.json and DIR/summary.md.

    python -m bench.gpu.summary record DIR NAME RC SECONDS LIMIT OUTPUT_FILE -- COMMAND...
    python -m bench.gpu.summary write DIR --mode MODE

A step's results are the JSON lines its output printed (each bench prints one); pytest's
are its counts. Stdlib only.
"""

from __future__ import annotations

import json
import platform
import re
import sys
import time
from pathlib import Path

STEPS_FILE = "steps.jsonl"
TAIL_LINES = 30
# what GNU timeout exits with when the limit is hit (124), or when it had to KILL (137)
TIMED_OUT = {124, 137}


def json_lines(text: str) -> list[dict]:
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


def pytest_counts(text: str) -> dict[str, int]:
    """{'passed': 7, 'skipped': 2, ...} from pytest's last summary line, if any."""
    summaries = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    if not summaries:
        return {}
    return {kind: int(count) for count, kind in re.findall(r"(\d+) (\w+)", summaries[-1])}


def record(folder: Path, name: str, rc: int, seconds: float, limit: int, output: Path, command: list[str]) -> dict:
    text = output.read_text(errors="replace") if output.exists() else ""
    status = ("passed" if rc == 0 else "timed out" if rc in TIMED_OUT
              else "skipped: the run's time was spent" if rc == -1 else "failed")
    entry = {
        "name": name, "status": status, "rc": rc, "seconds": round(seconds, 1), "limit_s": limit,
        "command": " ".join(command), "results": json_lines(text), "tests": pytest_counts(text),
        "tail": text.splitlines()[-TAIL_LINES:] if rc else [],
    }  # fmt: skip
    with (folder / STEPS_FILE).open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
    return entry


def write(folder: Path, mode: str) -> dict:
    path = folder / STEPS_FILE
    steps = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    summary = {
        "mode": mode, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
        "passed": all(s["status"] == "passed" for s in steps) and bool(steps),
        "total_seconds": round(sum(s["seconds"] for s in steps), 1), "steps": steps,
    }  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (folder / "summary.md").write_text(markdown(summary))
    return summary


def _brief(result: dict) -> str:
    keys = ("bench", "ratio", "served_seq_per_s", "inprocess_seq_per_s", "max_abs_diff", "device", "name")
    shown = {k: result[k] for k in keys if k in result}
    return json.dumps(shown or result)[:300]


def markdown(summary: dict) -> str:
    lines = [
        f"# GPU kit: {summary['mode']} run, {summary['date']} on {summary['host']}",
        "",
        f"All steps passed: **{'yes' if summary['passed'] else 'no'}**; {summary['total_seconds']} s in steps.",
        "",
        "| step | status | seconds (limit) | result |",
        "|---|---|---|---|",
    ]
    for step in summary["steps"]:
        tests = ", ".join(f"{v} {k}" for k, v in step["tests"].items())
        results = "; ".join(_brief(r) for r in step["results"])
        lines.append(f"| {step['name']} | {step['status']} | {step['seconds']} ({step['limit_s']}) | "
                     f"{tests or results or ''} |")
    for step in summary["steps"]:
        lines += ["", f"## {step['name']}", "", f"`{step['command']}`", ""]
        lines += [f"    {json.dumps(r)}" for r in step["results"]]
        if step["tail"]:
            lines += ["", "Last lines of its output:", "", *[f"    {line}" for line in step["tail"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["record"] and "--" in args:
        cut = args.index("--")
        _, folder, name, rc, seconds, limit, output = args[:cut]
        record(Path(folder), name, int(rc), float(seconds), int(limit), Path(output), args[cut + 1 :])
        return 0
    if args[:1] == ["write"] and len(args) == 4 and args[2] == "--mode":
        summary = write(Path(args[1]), args[3])
        print(f"summary: {Path(args[1]) / 'summary.md'} (all passed: {summary['passed']})")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
