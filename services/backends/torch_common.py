"""What the TorchScript and torch.export backends share: device placement, precision, I/O mapping."""

from __future__ import annotations

from typing import Any

import numpy as np

from tensorfleet.client.errors import InternalError

from .base import Backend

_PRECISION_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


class TorchProgramBackend(Backend):
    """Runs a torch program whose positional inputs follow the config's input order."""

    program: Any = None

    def _torch(self) -> Any:
        import torch

        return torch

    @property
    def device(self) -> Any:
        return self._torch().device(self.context.device)

    def _compute_dtype(self) -> Any:
        name = _PRECISION_DTYPES.get(self.context.precision)
        return getattr(self._torch(), name) if name else None

    def _to_device(self, array: np.ndarray) -> Any:
        torch = self._torch()
        if not array.flags.writeable:  # zero-copy views of request bytes are read-only
            array = array.copy()
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        dtype = self._compute_dtype()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch()
        args = [self._to_device(inputs[spec.name]) for spec in self.context.config.inputs]
        with torch.inference_mode():
            result = self.program(*args)
        return self._outputs(result)

    def _outputs(self, result: Any) -> dict[str, np.ndarray]:
        specs = self.context.config.outputs
        if isinstance(result, dict):
            tensors = [result[spec.name] for spec in specs]
        elif isinstance(result, (list, tuple)):
            tensors = list(result)
        else:
            tensors = [result]
        if len(tensors) != len(specs):
            raise InternalError(
                f"model '{self.context.config.name}' returned {len(tensors)} tensors, "
                f"config lists {len(specs)} outputs"
            )
        out = {}
        for spec, tensor in zip(specs, tensors, strict=True):
            tensor = tensor.detach()
            if tensor.dtype in (self._torch().float16, self._torch().bfloat16):
                tensor = tensor.float()
            out[spec.name] = tensor.cpu().numpy()
        return out

    def unload(self) -> None:
        self.program = None
        if self.device.type == "cuda":
            self._torch().cuda.empty_cache()

    def device_memory(self) -> tuple[int, int]:
        if self.device.type != "cuda":
            return 0, 0
        free, total = self._torch().cuda.mem_get_info(self.device)
        return total - free, total

    def _place(self, module: Any) -> Any:
        module = module.to(self.device)
        dtype = self._compute_dtype()
        if dtype is not None:
            module = module.to(dtype)
        return module
