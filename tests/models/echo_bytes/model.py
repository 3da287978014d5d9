"""Echoes BYTES rows upper-cased, with each row's length as INT64."""

import numpy as np


class Model:
    def load(self, context):
        pass

    def predict(self, inputs):
        text = inputs["text"]
        upper = np.empty(text.shape, dtype=object)
        upper[:] = [item.upper() for item in text.reshape(-1)]
        lengths = np.array([len(item) for item in text.reshape(-1)], dtype=np.int64)
        return {"upper": upper, "length": lengths.reshape(text.shape)}
