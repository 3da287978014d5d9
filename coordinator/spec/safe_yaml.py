"""Job files from others: size-limited, and no YAML alias bomb ("billion laughs").

PyYAML shares aliased nodes, so a bomb loads small and explodes later, when the spec is
validated or dumped. Aliases are counted while parsing and the loaded tree's size (aliases
expanded) is bounded before anything walks it.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

#: Largest job spec accepted, in bytes (TENSORFLEET_MAX_SPEC_BYTES).
MAX_SPEC_BYTES = int(os.environ.get("TENSORFLEET_MAX_SPEC_BYTES", str(1024 * 1024)))
MAX_ALIASES = 100
MAX_NODES = 200_000


class SpecTooLarge(ValueError):
    """A spec over the size, alias or node limits; the message names the limit."""


def load_yaml(text: str | bytes, source: str = "spec", max_bytes: int | None = None) -> Any:
    """yaml.safe_load with the limits above; raises SpecTooLarge or yaml.YAMLError."""
    limit = MAX_SPEC_BYTES if max_bytes is None else max_bytes
    size = len(text.encode() if isinstance(text, str) else text)
    if size > limit:
        raise SpecTooLarge(f"{source}: {size} bytes; job specs are limited to {limit} bytes "
                           "(TENSORFLEET_MAX_SPEC_BYTES)")
    aliases = sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader))
    if aliases > MAX_ALIASES:
        raise SpecTooLarge(f"{source}: {aliases} YAML aliases; at most {MAX_ALIASES} (an alias bomb?)")
    data = yaml.safe_load(text)
    _count_nodes(data, source)
    return data


def _count_nodes(data: Any, source: str) -> None:
    """Walk the tree as a consumer would (aliases expanded), stopping past MAX_NODES."""
    seen, stack = 0, [data]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise SpecTooLarge(f"{source}: expands to over {MAX_NODES} values (a YAML alias bomb?)")
        if isinstance(node, dict):
            stack.extend(node.values())
            stack.extend(node.keys())
        elif isinstance(node, list):
            stack.extend(node)
