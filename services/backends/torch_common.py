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

    def predict(
        self, inputs: dict[str, np.ndarray], outputs: frozenset[str] | None = None
    ) -> dict[str, np.ndarray]:
        torch = self._torch()
        args = [self._to_device(inputs[spec.name]) for spec in self.context.config.inputs]
        with torch.inference_mode():
            result = self.program(*args)
        return self._outputs(result, outputs)

    def _outputs(self, result: Any, wanted: frozenset[str] | None = None) -> dict[str, np.ndarray]:
        """The program's outputs on the host; those no request wants stay on the device."""
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
        return {
            spec.name: self._to_host(tensor, spec.datatype)
            for spec, tensor in zip(specs, tensors, strict=True)
            if wanted is None or spec.name in wanted
        }

    def _to_host(self, tensor: Any, datatype: str) -> np.ndarray:
        """Narrow to the declared datatype on the device, then copy: an FP16 or BF16 output
        crosses to the host at half the bytes and needs no cast pass on the server's CPU."""
        torch = self._torch()
        tensor = tensor.detach()
        if datatype == "FP16":
            return tensor.to(torch.float16).cpu().numpy()
        if datatype == "BF16":  # numpy has no bfloat16: the raw words, as the wire carries them
            return tensor.to(torch.bfloat16).view(torch.int16).cpu().numpy().view("<u2")
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        return tensor.cpu().numpy()

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
