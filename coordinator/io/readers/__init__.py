"""Input readers: one module per format, listed in base.MODULES and imported on first use."""

from . import base
from .base import MODULES, FieldInfo, InputError, Reader, register

__all__ = ["MODULES", "FieldInfo", "InputError", "Reader", "open_reader", "register"]


def open_reader(spec) -> Reader:
    """The reader of spec.format, opened (base.open_reader); several files (a list in input.path)
    read as one input (multi_file.py)."""
    if isinstance(spec.path, list):
        from .multi_file import open_files

        return open_files(spec, base.open_reader)
    return base.open_reader(spec)
