"""Output writers. Each format registers itself in its own module; this list is the one place."""

from . import h5ad, hdf5, parquet  # noqa: F401  (imports register the writers)
from .base import Column, WriteContext, Writer, open_writer, register

__all__ = ["Column", "WriteContext", "Writer", "open_writer", "register"]
