"""A plain torch MLP (Linear+GELU stack) built from a fixed seed: compute that grows with batch rows."""

import numpy as np
import torch


class Model:
    def load(self, context):
        p = context.parameters
        torch.manual_seed(int(p.get("seed", 0)))
        width, hidden, out = int(p["width"]), int(p["hidden"]), int(p["out"])
        layers, size = [], width
        for _ in range(int(p.get("layers", 2))):
            layers += [torch.nn.Linear(size, hidden), torch.nn.GELU()]
            size = hidden
        layers.append(torch.nn.Linear(size, out))
        self.device = torch.device(context.device)
        self.net = torch.nn.Sequential(*layers).to(self.device).eval()

    def warmup(self):
        self.predict({"x": np.zeros((2, self.net[0].in_features), np.float32)})

    def predict(self, inputs):
        with torch.inference_mode():
            x = torch.tensor(
                inputs["x"], device=self.device
            )  # a copy: inputs may be read-only views
            return {"y": self.net(x).cpu().numpy()}
