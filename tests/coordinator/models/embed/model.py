"""Test embedder: hashed 2-mer counts times a fixed random projection (one matmul per batch).

Env (read at load): TF_TEST_ROW_LOG appends every computed sequence (one line each);
TF_TEST_DELAY_MS sleeps per batch; a sequence holding '!' fails its whole batch;
TF_TEST_CRASH_ON=TEXT: a batch with a sequence holding TEXT ends the server process at once, as
a segfault or the OOM killer would; TF_TEST_HANG_ON=TEXT: such a batch never returns (a stuck
kernel, a deadlock); TF_TEST_DEVICE_FAIL_FILE=PATH: while PATH exists, the next batch deletes it
and, from then on in this process, every batch raises CUDA's illegal-address error (a GPU that
failed: sticky until the process ends); TF_TEST_DEVICE_ASSERT_ON=TEXT: a batch with a sequence
holding TEXT fails the device so (a device-side assert set off by a row); TF_TEST_FAIL_ON=TEXT:
a batch with a sequence holding TEXT fails (a failure that goes away when the variable does);
with TF_TEST_FAIL_FILE=PATH too, it fails only while PATH exists (the test removes it to fix
the "model"); TF_TEST_WAIT_ON=TEXT with TF_TEST_WAIT_FILE=PATH: a batch with a sequence holding
TEXT waits while PATH exists (a job held running, mid-way, for as long as a test looks at it).
"""

import os
import time
import zlib

import numpy as np


class Model:
    def load(self, context):
        self.projection = np.random.default_rng(7).standard_normal((64, 16)).astype(np.float32)
        self.log = os.environ.get("TF_TEST_ROW_LOG")
        self.delay = float(os.environ.get("TF_TEST_DELAY_MS", "0")) / 1000
        self.crash_on = os.environ.get("TF_TEST_CRASH_ON", "").encode()
        self.hang_on = os.environ.get("TF_TEST_HANG_ON", "").encode()
        self.device_fail_file = os.environ.get("TF_TEST_DEVICE_FAIL_FILE")
        self.device_failed = False
        self.assert_on = os.environ.get("TF_TEST_DEVICE_ASSERT_ON", "").encode()
        self.fail_on = os.environ.get("TF_TEST_FAIL_ON", "").encode()
        self.fail_file = os.environ.get("TF_TEST_FAIL_FILE")
        self.wait_on = os.environ.get("TF_TEST_WAIT_ON", "").encode()
        self.wait_file = os.environ.get("TF_TEST_WAIT_FILE")

    def predict(self, inputs):
        if self.device_fail_file and os.path.exists(self.device_fail_file):
            os.unlink(self.device_fail_file)
            self.device_failed = True
        if self.device_failed:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        sequences = [bytes(s) for s in inputs["sequence"]]
        if self.assert_on and any(self.assert_on in s for s in sequences):
            self.device_failed = True
            raise RuntimeError("CUDA error: device-side assert triggered")
        if any(b"!" in s for s in sequences):
            raise ValueError("poison row: sequence holds '!'")
        while self.wait_on and self.wait_file and any(self.wait_on in s for s in sequences) \
                and os.path.exists(self.wait_file):
            time.sleep(0.05)
        failing = self.fail_on and (not self.fail_file or os.path.exists(self.fail_file))
        if failing and any(self.fail_on in s for s in sequences):
            raise ValueError("a passing failure (TF_TEST_FAIL_ON)")
        if self.crash_on and any(self.crash_on in s for s in sequences):
            os._exit(70)
        while self.hang_on and any(self.hang_on in s for s in sequences):
            time.sleep(3600)
        counts = np.zeros((len(sequences), 64), dtype=np.float32)
        for row, sequence in enumerate(sequences):
            for i in range(len(sequence) - 1):
                counts[row, zlib.crc32(sequence[i : i + 2]) % 64] += 1.0
            counts[row] /= max(len(sequence), 1)
        if self.delay:
            time.sleep(self.delay)
        if self.log:
            with open(self.log, "a") as handle:
                handle.write("".join(s.decode() + "\n" for s in sequences))
        return {"embedding": np.tanh(counts @ self.projection)}
