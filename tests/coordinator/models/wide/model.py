"""Memory-test model: one number in, 16 KiB of output per row out."""

import numpy as np


class Model:
    def load(self, context):
        self.ramp = np.arange(4096, dtype=np.float32)

    def predict(self, inputs):
        return {"wide": inputs["x"] + self.ramp}
