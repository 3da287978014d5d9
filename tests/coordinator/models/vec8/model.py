"""Test model on numeric rows: y = tanh(x @ W), norm = |x|. A row with a negative x[0] below -100 fails."""

import numpy as np


class Model:
    def load(self, context):
        self.weights = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)

    def predict(self, inputs):
        x = inputs["x"]
        if (x[:, 0] < -100).any():
            raise ValueError("x[0] below -100")
        return {"y": np.tanh(x @ self.weights), "norm": np.sqrt((x * x).sum(axis=1))}
