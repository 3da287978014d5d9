"""STACK stand-in (python backend, torch): query cells predicted in the context of prompt cells.

STACK predicts each query cell's expression under the condition its prompt cells show. This
stand-in keeps the interface: every query cell (log1p counts over G genes) attends over the
prompt cells through a fixed-seed random projection and gets the prompt's attended shift
added, so the prediction depends on the prompt. `prompt` is a context input (optional in the
config): the coordinator puts it on the server once per job, not with every batch. `query`
declares `sparse: csr`: counts cross the wire as CSR (their zeros left out) and are made
dense here, on the server.
"""

from __future__ import annotations

import numpy as np
import torch


class Model:
    def load(self, context) -> None:
        self.device = torch.device(context.device)
        weights = np.load(context.artifact("projection.npy"))
        self.projection = torch.from_numpy(weights).to(self.device)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "prompt" not in inputs:
            raise ValueError("no prompt: send the prompt cells as context (tensorfleet.context)")
        query_rows = inputs["query"]
        if hasattr(query_rows, "toarray"):  # `sparse: csr`: the cells' counts arrive as scipy CSR rows
            query_rows = query_rows.toarray()
        with torch.inference_mode():
            query = torch.log1p(torch.from_numpy(np.asarray(query_rows, dtype=np.float32)).to(self.device))
            prompt = torch.log1p(torch.from_numpy(np.asarray(inputs["prompt"], dtype=np.float32)).to(self.device))
            q, k = query @ self.projection, prompt @ self.projection
            attention = torch.softmax(q @ k.T / q.shape[1] ** 0.5, dim=1)
            shift = attention @ prompt - prompt.mean(dim=0, keepdim=True)
            return {"prediction": (query + shift).cpu().numpy()}
