"""Input readers. Each format registers itself in its own module; this list is the one place."""

from . import fasta, h5ad, hdf5, npy, parquet  # noqa: F401  (imports register the readers)
from .base import FieldInfo, InputError, Reader, open_reader, register

__all__ = ["FieldInfo", "InputError", "Reader", "open_reader", "register"]
