"""Job files from others: size-limited, and no YAML alias bomb ("billion laughs").

PyYAML shares aliased nodes, so a bomb loads small and explodes later, when the spec is
validated or dumped. Aliases are counted while parsing and the loaded tree's size (aliases
expanded) is bounded before anything walks it.

Nesting is bounded too (MAX_DEPTH), checked first by libyaml's event parser when it is there:
PyYAML's pure-Python scanner is quadratic in flow depth (50,000 nested `[` held a coordinator's
event loop for ~44 s, issue 28), libyaml refuses the same text in milliseconds. A mapping that
names a key twice is refused naming the key: YAML says keys are unique, PyYAML keeps the last.
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

#: Largest job spec accepted, in bytes (TENSORFLEET_MAX_SPEC_BYTES).
MAX_SPEC_BYTES = int(os.environ.get("TENSORFLEET_MAX_SPEC_BYTES", str(1024 * 1024)))
MAX_ALIASES = 100
MAX_NODES = 200_000
#: Deepest nesting of lists/mappings a job spec may have (real ones need under 10).
MAX_DEPTH = 64
_EVENT_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class SpecTooLarge(ValueError):
    """A spec over the size, alias or node limits; the message names the limit."""


class SpecMalformed(ValueError):
    """A spec nested deeper than MAX_DEPTH or naming a mapping key twice; the message says where."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping naming one key twice (merge keys `<<` may still override)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader says so itself below
                continue
            if duplicate:
                raise SpecMalformed(f"duplicate key '{key}' at line {key_node.start_mark.line + 1}, column "
                                    f"{key_node.start_mark.column + 1}; each key may appear once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:map", _UniqueKeyLoader.construct_yaml_map)


def load_yaml(text: str | bytes, source: str = "spec", max_bytes: int | None = None) -> Any:
    """yaml.safe_load with the limits above; raises SpecTooLarge or yaml.YAMLError."""
    limit = MAX_SPEC_BYTES if max_bytes is None else max_bytes
    size = len(text.encode() if isinstance(text, str) else text)
    if size > limit:
        raise SpecTooLarge(f"{source}: {size} bytes; job specs are limited to {limit} bytes "
                           "(TENSORFLEET_MAX_SPEC_BYTES)")
    if text.lstrip()[:1] in ("{", b"{"):  # JSON (what the SDK sends): a C parser, no pure-Python scanner
        data = _load_json(text, source)
        if data is not _NOT_JSON:
            _count_nodes(data, source)
            return data
    _check_events(text, source)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except SpecMalformed as error:
        raise SpecMalformed(f"{source}: {error}") from None
    _count_nodes(data, source)
    return data


_NOT_JSON = object()


def _load_json(text: str | bytes, source: str) -> Any:
    """A JSON spec with the same rules (unique keys, MAX_DEPTH); _NOT_JSON when it is YAML after all."""

    def unique(pairs: list[tuple[str, Any]]) -> dict:
        data: dict = {}
        for key, value in pairs:
            if key in data:
                raise SpecMalformed(f"{source}: duplicate key '{key}'; each key may appear once")
            data[key] = value
        return data

    try:
        data = json.loads(text, object_pairs_hook=unique)
    except RecursionError:
        raise SpecMalformed(f"{source}: lists and mappings nested over {MAX_DEPTH} deep; job specs need "
                            "far fewer") from None
    except ValueError as error:
        if isinstance(error, SpecMalformed):
            raise
        return _NOT_JSON
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_DEPTH:
                raise SpecMalformed(f"{source}: lists and mappings nested over {MAX_DEPTH} deep; job specs need "
                                    "far fewer")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return data


def _check_events(text: str | bytes, source: str) -> None:
    """Aliases and nesting depth from the event stream, stopping at the first limit passed."""
    aliases = depth = 0
    try:
        for event in yaml.parse(text, Loader=_EVENT_LOADER):
            if isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > MAX_ALIASES:
                    raise SpecTooLarge(f"{source}: over {MAX_ALIASES} YAML aliases (an alias bomb?)")
            elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise SpecMalformed(f"{source}: lists and mappings nested over {MAX_DEPTH} deep "
                                        f"(line {event.start_mark.line + 1}); job specs need far fewer")
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
    except yaml.YAMLError as error:
        if "maximum nesting depth" in str(error):  # libyaml's own bound (1000) on flow nesting
            raise SpecMalformed(f"{source}: lists and mappings nested over {MAX_DEPTH} deep; job specs need "
                                "far fewer") from None
        raise


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
