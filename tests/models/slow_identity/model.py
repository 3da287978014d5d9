"""Identity that takes `delay_ms` per batch: keeps requests in flight for drain and batching tests."""

import time


class Model:
    def load(self, context):
        self.delay = float(context.parameters.get("delay_ms", 50)) / 1000

    def predict(self, inputs):
        time.sleep(self.delay)
        return {"y": inputs["x"].copy()}
