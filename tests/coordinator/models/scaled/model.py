"""Test model that reads its request parameters: y = x * scale, steps = steps (defaults 1 and 0)."""

import numpy as np


class Model:
    def load(self, context):
        pass

    def predict(self, inputs, parameters):
        x = inputs["x"]
        scale = float(parameters.get("scale", 1.0))
        steps = float(parameters.get("steps", 0))
        return {"y": x * np.float32(scale), "steps": np.full(x.shape[0], steps, dtype=np.float32)}
