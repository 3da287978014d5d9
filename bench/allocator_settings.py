"""What each of services/allocator.py's mallopt settings buys: page faults per batch, one left out at a time.

Each case is a fresh interpreter (a mallopt setting cannot be undone) that applies the tuned
settings but one, then allocates a batch's activations the way torch does on the CPU (three
blocks alive together, sizes varying from batch to batch, up to 1, 8 or 48 MiB) for 30
batches, on the main thread (where the event loop runs) and on another thread (where the
model runs: since issue 25 that thread has its own glibc arena, whose heaps hold at most
64 MiB each). It prints the minor page faults per batch over the last 10 batches: a block
that went back to the kernel is faulted in again page by page.

    python -m bench.allocator_settings
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

from bench.common import REPO_ROOT, emit, machine

PROBE = """
import ctypes, json, resource, sys, threading
from tensorfleet.services import allocator
left_out = sys.argv[1]
if left_out != "all":
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    for parameter, value, label in allocator.TUNED_SETTINGS:
        if label != left_out:
            assert mallopt(parameter, value) == 1, label
import torch
faults = {}
def batches(where, mib):
    for batch in range(30):
        if batch == 20:
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        blocks = [torch.ones(((mib << 18) * (1 + (batch * 7) % 5)) // 5) for _ in range(3)]
        del blocks
    faults[f"{where} {mib} MiB"] = (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) // 10
for mib in (1, 8, 48, 128):
    batches("main", mib)
    thread = threading.Thread(target=batches, args=("thread", mib))
    thread.start()
    thread.join()
print(json.dumps(faults))
"""


def main(argv: list[str] | None = None) -> int:
    if not sys.platform.startswith("linux"):
        raise SystemExit("mallopt is glibc's: Linux only")
    from tensorfleet.services.allocator import TUNED_SETTINGS

    cases = ["none", *(label for _, _, label in TUNED_SETTINGS), "all"]
    results = {}
    for case in cases:
        done = subprocess.run([sys.executable, "-c", PROBE, case], capture_output=True, text=True,
                              cwd=REPO_ROOT, env={**os.environ, "TENSORFLEET_MALLOC": "default"}, check=True)
        results[f"without {case}"] = json.loads(done.stdout)
    emit({
        "bench": "allocator_settings",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "machine": machine(),
        "minor_faults_per_batch": results,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
