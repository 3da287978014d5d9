"""Behaves like a device that runs out of memory on batches larger than `max_rows` rows."""

from tensorfleet.services.backends.base import OutOfMemory


class Model:
    def load(self, context):
        self.max_rows = int(context.parameters.get("max_rows", 4))
        self.batch_sizes = []

    def predict(self, inputs):
        x = inputs["x"]
        if x.shape[0] > self.max_rows:
            raise OutOfMemory(f"{x.shape[0]} rows do not fit (limit {self.max_rows})")
        self.batch_sizes.append(x.shape[0])
        return {"y": x + 1}
