"""Every backend module, imported once so each registers itself. Add new backends here."""

from . import python_model, torch_export, torchscript  # noqa: F401
