"""Output writers: one module per format, listed in base.MODULES and imported on first use."""

from .base import MODULES, Column, WriteContext, Writer, open_writer, register

__all__ = ["MODULES", "Column", "WriteContext", "Writer", "open_writer", "register"]
