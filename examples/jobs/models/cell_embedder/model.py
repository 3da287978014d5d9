"""Cell embedder for the .h5ad example: log1p(CP10k) counts times a fixed projection.

The input declares `sparse: csr`, so `counts` arrives as a `scipy.sparse.csr_matrix` (the 95%
of zeros never cross the wire); dense rows (a config without `sparse`) take the same steps on
an array. log1p(0) = 0, so the sparse path transforms only the stored values.
"""

import numpy as np
import scipy.sparse


class Model:
    def load(self, context):
        genes = context.config.inputs[0].shape[0]
        width = context.config.outputs[0].shape[0]
        rng = np.random.default_rng(0)
        self.projection = (rng.standard_normal((genes, width)) / np.sqrt(genes)).astype(np.float32)

    def predict(self, inputs):
        counts = inputs["counts"]
        if scipy.sparse.issparse(counts):
            counts = scipy.sparse.csr_matrix(counts, dtype=np.float32)
            totals = np.asarray(counts.sum(axis=1), dtype=np.float32).ravel()
            row_of = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
            scaled = counts.data / np.maximum(totals, np.float32(1.0))[row_of] * np.float32(1e4)
            normalised = scipy.sparse.csr_matrix((np.log1p(scaled), counts.indices, counts.indptr), shape=counts.shape)
            embedding = np.asarray(normalised @ self.projection, dtype=np.float32)
        else:
            totals = counts.sum(axis=1, keepdims=True)
            normalised = np.log1p(counts / np.maximum(totals, 1.0) * 1e4)
            embedding = normalised @ self.projection
        norms = np.linalg.norm(embedding, axis=1, keepdims=True)
        return {"embedding": (embedding / np.maximum(norms, 1e-12)).astype(np.float32)}
