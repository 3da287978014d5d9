"""Backend `torchscript`: a `torch.jit.save`d program (config `model_file`)."""

from __future__ import annotations

from tensorfleet.core.errors import InvalidArgument

from .torch_common import TorchProgramBackend


class TorchScriptBackend(TorchProgramBackend):
    def load(self) -> None:
        torch = self._torch()
        name = self.context.config.model_file or "model.pt"
        path = self.context.artifact(name)
        if not path.is_file():
            raise InvalidArgument(f"model '{self.context.config.name}': TorchScript file {path} not found")
        program = torch.jit.load(str(path), map_location=self.device)
        self.program = self._place(program).eval()
