"""Backend `torch_export`: a `torch.export.save`d ExportedProgram (config `model_file`)."""

from __future__ import annotations

from tensorfleet.core.errors import InvalidArgument

from .torch_common import TorchProgramBackend


class TorchExportBackend(TorchProgramBackend):
    def load(self) -> None:
        torch = self._torch()
        name = self.context.config.model_file or "model.pt2"
        path = self.context.artifact(name)
        if not path.is_file():
            raise InvalidArgument(f"model '{self.context.config.name}': exported program {path} not found")
        exported = torch.export.load(str(path))
        self.program = self._place(exported.module())
