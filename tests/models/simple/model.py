"""Triton-style `simple` model: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1, in any dtype."""

import numpy as np


class Model:
    def load(self, context):
        self.context = context

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}
