"""Output writers: one module per format, listed in base.MODULES and imported on first use."""

from .base import MODULES, Column, Ragged, WriteContext, Writer, open_writer, register

__all__ = ["MODULES", "Column", "Ragged", "WriteContext", "Writer", "open_writer", "register"]
