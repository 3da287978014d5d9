"""Every backend module, imported once so each registers itself. Add new backends here."""

from . import python_model, tf_graph, tf_savedmodel, torch_export, torchscript  # noqa: F401
