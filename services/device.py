"""Which device a server owns, and how much of its memory is in use."""

from __future__ import annotations

import platform
import sys
from typing import Any

from tensorfleet.core.errors import InvalidArgument


def parse_device(text: str) -> str:
    """'cpu', 'cuda' or 'cuda:N' -> canonical form; anything else is a clear error."""
    if text == "cpu":
        return "cpu"
    if text == "cuda":
        return "cuda:0"
    if text.startswith("cuda:") and text[5:].isdigit():
        return text
    raise InvalidArgument(f"--device {text!r}: expected cpu, cuda or cuda:N")


def check_device_available(device: str) -> None:
    """Fail at start-up, not at the first request, when the GPU is not there."""
    if device == "cpu":
        return
    try:
        import torch
    except ImportError:  # a TensorFlow-only install: its backend checks its own devices at load
        return

    index = int(device.partition(":")[2])
    if not torch.cuda.is_available():
        raise InvalidArgument(f"--device {device}: CUDA is not available on this machine")
    if index >= torch.cuda.device_count():
        raise InvalidArgument(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")


def describe_device(device: str, entries: list[Any]) -> tuple[str, int, int]:
    """(name, used bytes, total bytes)."""
    if device.startswith("cuda") and "torch" in sys.modules:
        import torch

        index = int(device.partition(":")[2])
        free, total = torch.cuda.mem_get_info(index)
        return torch.cuda.get_device_name(index), total - free, total
    return platform.processor() or platform.machine(), 0, 0
