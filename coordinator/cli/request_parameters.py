"""`--parameter NAME=VALUE` on the command line -> typed Open Inference Protocol request parameters.

The protocol carries a parameter as a bool, an int64, a double or a string; the value's text
picks the type the way a job file's YAML would: `true`/`false` a bool, `50` an int, `0.5` or
`1e-3` a float, anything else a string (quote it, `name='"50"'`, to send digits as a string).
"""

from __future__ import annotations

import json

from tensorfleet.core.parameters import ParameterValue

#: Parameter names the coordinator and servers use themselves (contexts, shared memory, ...).
RESERVED_PREFIX = "tensorfleet."
INT64 = (-(2**63), 2**63 - 1)


def parse_parameter(item: str) -> tuple[str, ParameterValue]:
    """One `NAME=VALUE`; ValueError naming the item and what was expected."""
    name, sep, text = item.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"--parameter '{item}': want NAME=VALUE, e.g. --parameter steps=50")
    if name.startswith(RESERVED_PREFIX) or name.startswith("shared_memory_"):
        raise ValueError(f"--parameter '{name}': names starting with '{RESERVED_PREFIX}' or 'shared_memory_' are "
                         "the protocol's own")
    return name, parameter_value(text)


def parameter_value(text: str) -> ParameterValue:
    """The typed value of a parameter's text (bool, int, float, else the text as a string)."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not INT64[0] <= value <= INT64[1]:
            raise ValueError(f"--parameter value {text}: outside int64; quote it to send it as a string")
        return value
    if isinstance(value, float):
        return value
    return text  # a JSON list or object: the protocol has no such parameter type, so it goes as text


def parse_parameters(items: list[str] | None) -> dict[str, ParameterValue]:
    """Every `--parameter`, in order; a name given twice is an error rather than a silent last-wins."""
    out: dict[str, ParameterValue] = {}
    for item in items or []:
        name, value = parse_parameter(item)
        if name in out:
            raise ValueError(f"--parameter '{name}' is given twice")
        out[name] = value
    return out
