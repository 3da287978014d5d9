"""Cell embedder for the .h5ad example: log1p(CP10k) counts times a fixed projection."""

import numpy as np


class Model:
    def load(self, context):
        genes = context.config.inputs[0].shape[0]
        width = context.config.outputs[0].shape[0]
        rng = np.random.default_rng(0)
        self.projection = (rng.standard_normal((genes, width)) / np.sqrt(genes)).astype(np.float32)

    def predict(self, inputs):
        counts = inputs["counts"]
        totals = counts.sum(axis=1, keepdims=True)
        normalised = np.log1p(counts / np.maximum(totals, 1.0) * 1e4)
        embedding = normalised @ self.projection
        norms = np.linalg.norm(embedding, axis=1, keepdims=True)
        return {"embedding": (embedding / np.maximum(norms, 1e-12)).astype(np.float32)}
