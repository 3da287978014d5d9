"""Test model with a declared max_length (40): returns each sequence's length as received, and
refuses a longer one, so a test sees whether the coordinator applied the limit before sending."""

import numpy as np


class Model:
    def load(self, context):
        self.limit = context.config.input("sequence").max_length

    def predict(self, inputs):
        lengths = np.array([len(bytes(s)) for s in inputs["sequence"]], dtype=np.int64)
        if (lengths > self.limit).any():
            raise ValueError(f"sequence longer than {self.limit} reached the model")
        return {"length": lengths}
