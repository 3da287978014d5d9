"""Triton-style `simple` model in INT64: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""

import numpy as np


class Model:
    def load(self, context):
        self.dtype = np.dtype("<i8")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return {"OUTPUT0": (a + b).astype(self.dtype), "OUTPUT1": (a - b).astype(self.dtype)}
