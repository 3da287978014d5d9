"""In-context test model: each query row plus the mean of the prompt rows (the job's context).

TF_TEST_WAIT_FILE=PATH: a batch holding a query row whose first value is negative waits while
PATH exists (an in-context job held running, mid-way, for as long as a test looks at it).
"""

import os
import time

import numpy as np


class Model:
    def load(self, context):
        self.wait_file = os.environ.get("TF_TEST_WAIT_FILE")

    def predict(self, inputs):
        if "prompt" not in inputs:
            raise ValueError("no prompt: send the prompt rows as context")
        query = np.asarray(inputs["query"], dtype=np.float32)
        while self.wait_file and (query[:, 0] < 0).any() and os.path.exists(self.wait_file):
            time.sleep(0.05)
        return {"prediction": query + np.asarray(inputs["prompt"], dtype=np.float32).mean(axis=0)}
