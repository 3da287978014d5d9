"""Which `pip install 'tensorfleet[EXTRA]'` brings a module a feature needs.

Every "install X" message names the extra, so a user fixes a missing library with the project's
own pins (pyproject.toml's optional dependencies) rather than guessing a package and version.
"""

from __future__ import annotations

#: top-level module -> (the pyproject extra that installs it, the package it comes from)
EXTRAS: dict[str, tuple[str, str]] = {
    "torch": ("torch", "torch"),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "h5py": ("io", "h5py"),
    "anndata": ("io", "anndata"),
    "pyarrow": ("io", "pyarrow"),
    "scipy": ("io", "scipy"),
    "fsspec": ("io", "fsspec"),
    "s3fs": ("s3", "s3fs"),
    "gcsfs": ("gcs", "gcsfs"),
    "pynvml": ("gpu", "nvidia-ml-py"),
}

#: object-store URL scheme -> the module fsspec needs for it
URL_MODULES: dict[str, str] = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


def install_hint(module: str | None) -> str:
    """`pip install 'tensorfleet[io]' (brings h5py)` for a known module; a plain pip line otherwise."""
    top = (module or "").partition(".")[0]
    if top in EXTRAS:
        extra, package = EXTRAS[top]
        return f"pip install 'tensorfleet[{extra}]' (brings {package})"
    return f"pip install {top}" if top else "pip install the missing package"


def missing_module_message(error: ImportError, needed_for: str) -> str:
    """`{needed_for} needs h5py, which is not installed: pip install 'tensorfleet[io]' (brings h5py)`."""
    name = (error.name or "").partition(".")[0]
    if not name:
        return f"{needed_for}: {error}"
    return f"{needed_for} needs {name}, which is not installed: {install_hint(name)}"
