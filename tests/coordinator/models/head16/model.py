"""A fixed random projection and tanh: deterministic per row, whatever the batch."""

import numpy as np


class Model:
    def load(self, context):
        self.weights = np.random.default_rng(11).standard_normal((16, 4)).astype(np.float32)

    def predict(self, inputs):
        x = np.asarray(inputs["x"], dtype=np.float32)
        return {"y": np.tanh(np.einsum("bi,ij->bj", x, self.weights)).astype(np.float32)}
