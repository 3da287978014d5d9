"""Says what the server told it: `told` is how many outputs the batch asked for (0: all), and
`big` is only computed when wanted, as a model skips per-residue states a job does not keep."""

import numpy as np


class Model:
    def load(self, context):
        pass

    def predict(self, inputs, outputs=None):
        rows = len(inputs["x"])
        result = {"told": np.full(rows, 0 if outputs is None else len(outputs), dtype=np.int32)}
        if outputs is None or "big" in outputs:
            result["big"] = inputs["x"] * 2
        return result
