"""tensorfleet coordinator, one package per layer (docs/coordinator.md, "Code layout").

cli -> service -> workflows -> engine -> io, fleet -> spec: a module imports its own layer or
a lower one, never a higher one, and io and fleet not each other (tests/coordinator/test_import_graph.py).
"""
