"""status.json's peak_rss_bytes is the coordinator's own peak, not the process that started it.

getrusage's ru_maxrss keeps, across exec, the largest RSS of the memory the process had before
it, which after a fork is the parent's: a coordinator started by a large process reported the
parent's size. The figure now comes from /proc/self/status's VmHWM, which exec resets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tensorfleet.coordinator.engine.progress import peak_rss_bytes

REPO_ROOT = Path(__file__).resolve().parents[2]
BIG = 512 << 20  # what the parent holds, touched, when it starts the child

CHILD = """
from tensorfleet.coordinator.engine.progress import peak_rss_bytes
with open("/proc/self/status") as status:
    rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
print(peak_rss_bytes(), rss)
"""

PARENT = f"""
import subprocess, sys
held = bytearray(b"x") * {BIG}  # written, so every page is resident
print(subprocess.run([sys.executable, "-c", {CHILD!r}], capture_output=True, text=True, check=True).stdout)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux's /proc")
def test_a_child_of_a_large_process_reports_its_own_peak_not_its_parents():
    out = subprocess.run([sys.executable, "-c", PARENT], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    peak, rss = map(int, out.split())
    assert rss <= peak < BIG // 2, f"child peak {peak >> 20} MiB (its RSS {rss >> 20} MiB; its parent held {BIG >> 20})"


def test_where_proc_has_no_figure_getrusage_stands_in(tmp_path):
    empty = tmp_path / "status"
    empty.write_text("Name:\tpython\n")
    import resource

    fallback = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak_rss_bytes(str(empty)) >= fallback * (1 if sys.platform == "darwin" else 1024)
    assert peak_rss_bytes(str(tmp_path / "missing")) > 0
