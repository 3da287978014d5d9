"""A second sequence model for the models x sources tests: each sequence's length, spread over 16 floats."""

import numpy as np


class Model:
    def load(self, context):
        self.scales = np.arange(1, 17, dtype=np.float32)

    def predict(self, inputs):
        lengths = np.array([len(bytes(s)) for s in inputs["sequence"]], dtype=np.float32)
        return {"embedding": np.outer(lengths, 1.0 / self.scales).astype(np.float32)}
