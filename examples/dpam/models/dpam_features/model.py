"""DPAM stage 1 (python backend, torch): per-domain hit signals -> DOMASS feature rows.

In DPAM the steps before DOMASS turn alignments (HHsearch, DALI, ...) into 13 numbers per
candidate domain. This stand-in does that with a small torch MLP over 24 hit signals;
its weights come from a fixed seed (`examples/dpam/build.py`), no download.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

SIGNALS, HIDDEN, FEATURES = 24, 32, 13


def network() -> nn.Module:
    return nn.Sequential(nn.Linear(SIGNALS, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, FEATURES))


class Model:
    def load(self, context) -> None:
        self.device = torch.device(context.device)
        self.net = network()
        self.net.load_state_dict(torch.load(context.artifact("features.pt"), map_location="cpu", weights_only=True))
        self.net.to(self.device).eval()

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            hits = torch.from_numpy(np.ascontiguousarray(inputs["hits"], dtype=np.float32)).to(self.device)
            return {"features": self.net(hits).float().cpu().numpy()}
