"""Sleeps `ms_per_row` per row, like a device busy for a fixed time per row, then echoes."""

import time


class Model:
    def load(self, context):
        self.seconds_per_row = float(context.parameters.get("ms_per_row", 2.0)) / 1000

    def predict(self, inputs):
        x = inputs["x"]
        time.sleep(self.seconds_per_row * len(x))
        return {"y": x.copy()}
