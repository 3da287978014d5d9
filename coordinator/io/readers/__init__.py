"""Input readers: one module per format, listed in base.MODULES and imported on first use."""

from .base import MODULES, FieldInfo, InputError, Reader, open_reader, register

__all__ = ["MODULES", "FieldInfo", "InputError", "Reader", "open_reader", "register"]
