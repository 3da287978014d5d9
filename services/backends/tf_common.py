"""What the two TensorFlow backends share: the lazy import, device placement, dtype mapping.

TensorFlow is an optional extra. It is imported only when a TensorFlow model loads, so a
server without it starts and serves its other models; the TF model alone fails to load.
Device visibility is process-wide in TensorFlow and fixed once its runtime starts; every TF
model of a server asks for the same device (a server owns one), so asking again is harmless.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from tensorfleet.core.errors import FailedPrecondition, InvalidArgument
from tensorfleet.core.extras import install_hint

from ..model_config import ModelConfig, TensorSpec

INSTALL_HINT = f"tensorflow is not installed: {install_hint('tensorflow')}"

_lock = threading.Lock()


def import_tensorflow() -> Any:
    """The tensorflow module, or a clear load error when it is not installed."""
    # keep TensorFlow's C++ start-up chatter out of server logs
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as error:
        raise FailedPrecondition(f"{INSTALL_HINT} ({error})") from None
    return tf


def configure_device(tf: Any, device: str) -> str:
    """Make only the server's device visible to TensorFlow; return the TF device name to run on.

    `cpu` hides every GPU. `cuda:N` keeps only GPU N visible (it becomes TF's `/GPU:0`) and
    turns on memory growth, so TensorFlow takes memory as it needs it instead of the whole GPU.
    """
    with _lock:
        gpus = tf.config.list_physical_devices("GPU")
        wanted = []
        if device != "cpu":
            index = int(device.partition(":")[2])
            if index >= len(gpus):
                hint = (
                    ""
                    if gpus
                    else "; tensorflow-cpu has no GPU support: install tensorflow[and-cuda]"
                )
                raise FailedPrecondition(
                    f"--device {device}: TensorFlow sees {len(gpus)} GPU(s){hint}"
                )
            wanted = [gpus[index]]
        try:
            tf.config.set_visible_devices(wanted, "GPU")
            for gpu in wanted:
                tf.config.experimental.set_memory_growth(gpu, True)
        # RuntimeError: the TF runtime already started (e.g. a python model's own code ran TF);
        # that is fine only if it started with the devices this server wants.
        except RuntimeError as error:
            if tf.config.get_visible_devices("GPU") != wanted:
                raise FailedPrecondition(f"cannot place TensorFlow on {device}: {error}") from None
        return _tf_device_name(device)


def _tf_device_name(device: str) -> str:
    return "/CPU:0" if device == "cpu" else "/GPU:0"


def device_memory(tf: Any, device: str) -> tuple[int, int]:
    """(bytes TensorFlow holds on the GPU, 0); TF does not report the device's total."""
    if device == "cpu":
        return 0, 0
    try:
        return int(tf.config.experimental.get_memory_info("GPU:0")["current"]), 0
    except (ValueError, RuntimeError):
        return 0, 0


def reject_reduced_precision(config: ModelConfig, backend: str, how: str) -> None:
    """fp16/bf16 cannot be applied to a saved TF program from outside; say so at load."""
    if config.precision != "fp32":
        raise InvalidArgument(
            f"model '{config.name}': precision {config.precision} is not supported by backend "
            f"'{backend}': {how}"
        )


def check_shape(
    config: ModelConfig, spec: TensorSpec, dims: list[int | None] | None, where: str
) -> None:
    """The config's per-row shape (plus the batch axis) must fit the saved tensor's shape."""
    if dims is None:  # unknown rank: nothing to check
        return
    expected = ([-1] if config.batched else []) + list(spec.shape)
    problem = ""
    if len(dims) != len(expected):
        problem = f"rank {len(dims)} {_show(dims)}, config implies rank {len(expected)} {expected}"
    elif config.batched and dims[0] is not None:
        problem = f"a fixed batch dimension {dims[0]}; export it with a None batch dimension"
    else:
        for axis, (saved, wanted) in enumerate(zip(dims, expected, strict=True)):
            if saved is not None and wanted != saved:
                problem = f"dimension {axis} = {saved}, config says {wanted}"
                break
    if problem:
        raise InvalidArgument(f"model '{config.name}': {where} '{spec.name}' has {problem}")


def _show(dims: list[int | None]) -> list[int]:
    return [-1 if d is None else d for d in dims]


def to_tensor(tf: Any, spec: TensorSpec, array: np.ndarray, dtype: Any) -> Any:
    """A numpy batch as a tensor of the saved program's dtype (BF16 arrives as uint16 words)."""
    if spec.datatype == "BF16":
        tensor = tf.bitcast(tf.constant(np.ascontiguousarray(array, dtype=np.uint16)), tf.bfloat16)
    else:
        tensor = tf.constant(array)
    return tensor if tensor.dtype == dtype else tf.cast(tensor, dtype)


def to_numpy(value: Any) -> np.ndarray:
    """A result tensor as numpy; half floats widen to float32 (the batcher casts to the config)."""
    array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    if array.dtype == np.float16 or array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return array
