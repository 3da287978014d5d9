"""An .npy input read once through does not stay resident in the coordinator (io/readers/npy.py).

The reader copies rows out of a memory map; the pages it copied are given back, so a 10^7-row
input does not add its size to the coordinator's RSS. Checked on the process's own VmRSS."""

from __future__ import annotations

import numpy as np

from tensorfleet.coordinator.io.readers import open_reader
from tensorfleet.coordinator.spec import InputSpec


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_rows_read_through_leave_no_file_pages_resident(tmp_path):
    rows, width = 1_000_000, 16  # 64 MB
    np.save(tmp_path / "x.npy", np.arange(rows * width, dtype=np.float32).reshape(rows, width))
    before = resident_mb()
    with open_reader(InputSpec(path=str(tmp_path / "x.npy"))) as reader:
        last = None
        for start in range(0, rows, 4096):
            block = reader.read("array", start, min(rows, start + 4096))
            assert block[0, 0] == start * width  # the values, not zeros from a dropped page
            last = block
        grown = resident_mb() - before
        again = reader.read("array", 0, 2)  # pages given back are read again from the file
    assert last is not None and last[-1, -1] == rows * width - 1
    np.testing.assert_array_equal(again, np.arange(32, dtype=np.float32).reshape(2, 16))
    assert grown < 16, f"reading a 64 MB input left {grown:.0f} MB resident"
