"""What a job submitted to the coordinator service may touch: a job is data, never code.

The service's operator names the folders jobs may read (`--data-root`), write (`--output-root`,
plus the state folder) and load models from (`--model-root`), and the object-store prefixes
(`--allow-url-prefix`). Every path in a spec is resolved (symlinks, `..`) before it is checked.
Without a model root, a submitted job may not start servers (`model.local`); it names running
ones (`model.servers`). `local.args` may hold only the server flags in ALLOWED_SERVER_FLAGS.

The walk is generic: any field named like a path, at any depth (stages, models, sources),
is checked against the roots of the nearest section it sits in (input-like or output-like).
`tensorfleet run` never calls this: on one's own machine a job keeps its freedom.

A tool stage (`command:`) runs a program on the coordinator's host. A submitted job may name
only the executables the operator allow-listed (`--allow-tool PATH`, resolved to real absolute
paths when the service starts); without any, no tool stage is accepted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Server flags a submitted job may pass to the servers it starts (`model.local.args`), with
#: whether each takes a value. Everything else (--model-repository, --host, --token...) is refused.
ALLOWED_SERVER_FLAGS: dict[str, bool] = {
    "--model": True, "--threads": True, "--drain-seconds": True, "--log-level": True,
    "--max-message-mb": True, "--max-concurrent-rpcs": True, "--max-streams-per-connection": True,
    "--max-stream-in-flight": True,
}

#: Sections whose paths are read (data roots) or written (output roots); the nearest one wins.
_READ_SECTIONS = {"input", "inputs", "source", "sources", "prompt", "prompts", "context", "reference"}
_WRITE_SECTIONS = {"output", "outputs"}
#: Field names that hold a filesystem path or URL.
_PATH_FIELDS = {"path", "paths", "file", "files", "dir", "folder"}
_OUTPUT_FIELDS = {"job_dir", "parts", "work_dir"}
_MODEL_FIELDS = {"repository"}
#: Mappings of tensor names, not paths: never walked.
_NAME_MAPS = {"tensors", "ragged"}


class PolicyError(ValueError):
    """A submitted job that asks for more than the service allows; the message names the field."""


@dataclass
class JobPolicy:
    model_roots: list[Path] = field(default_factory=list)
    data_roots: list[Path] = field(default_factory=list)
    output_roots: list[Path] = field(default_factory=list)
    url_prefixes: list[str] = field(default_factory=list)
    #: Jobs carry no secrets: the service's --server-token-file reaches the servers instead.
    allow_inline_tokens: bool = False
    #: Executables a submitted job's tool stages may run (real absolute paths); empty: none.
    allowed_tools: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.allowed_tools = [allowed_tool(t) for t in self.allowed_tools]
        self.model_roots = [Path(r).resolve() for r in self.model_roots]
        self.data_roots = [Path(r).resolve() for r in self.data_roots]
        self.output_roots = [Path(r).resolve() for r in self.output_roots]

    def check(self, spec: dict[str, Any]) -> None:
        """Raise PolicyError for the first field the job may not have; `spec` is the resolved dump."""
        for where, key, value, section in _walk(spec, (), None):
            self._check_field(where, key, value, section)

    def _check_field(self, where: str, key: str, value: Any, section: str | None) -> None:
        if key == "command" and value is not None:
            self._check_tool(where, value)
        elif key == "local" and value is not None:
            if not self.model_roots:
                raise PolicyError(
                    f"{where}: this coordinator starts no servers for submitted jobs (it has no --model-root); "
                    "name running servers in model.servers instead"
                )
            check_server_args(where + ".args", (value or {}).get("args") or [])
            for chooser in ("python", "launcher"):
                if (value or {}).get(chooser):
                    raise PolicyError(f"{where}.{chooser}: a submitted job cannot choose the program that runs its "
                                      "servers; the coordinator starts them with its own interpreter")
        elif key == "token" and value and not self.allow_inline_tokens:
            raise PolicyError(f"{where}: a submitted job carries no secrets; the coordinator passes its "
                              "--server-token-file to the servers")
        elif key == "servers" and isinstance(value, list):
            for index, entry in enumerate(value):
                if isinstance(entry, str) and entry.startswith("hostfile:"):
                    self._check_path(f"{where}[{index}]", entry.removeprefix("hostfile:"), "read")
        elif key in _MODEL_FIELDS and isinstance(value, str):
            self._check_path(where, value, "model")
        elif key in _OUTPUT_FIELDS and isinstance(value, str):
            self._check_path(where, value, "write")
        elif key in _PATH_FIELDS:
            mode = "write" if section in _WRITE_SECTIONS else "read"
            for index, item in enumerate(value if isinstance(value, list) else [value]):
                if isinstance(item, str):
                    self._check_path(where if not isinstance(value, list) else f"{where}[{index}]", item, mode)

    def _check_tool(self, where: str, command: Any) -> None:
        if not isinstance(command, list) or not command or not isinstance(command[0], str):
            raise PolicyError(f"{where}: a tool stage's command is a list of strings, the executable first")
        if not self.allowed_tools:
            raise PolicyError(f"{where}: this coordinator runs no tool stages for submitted jobs (it was started "
                              "without --allow-tool); run the job with `tensorfleet run` on your own machine, or ask "
                              "the operator to allow the tool")
        program = command[0]
        real = Path(os.path.realpath(program)) if os.path.isabs(program) else None
        if real is None or real not in self.allowed_tools:
            shown = ", ".join(str(t) for t in self.allowed_tools)
            raise PolicyError(f"{where}[0]: '{program}'" + (f" (resolved: {real})" if real else " (not found on PATH)")
                              + f" is not a tool this coordinator allows (--allow-tool: {shown})")

    def _check_path(self, where: str, value: str, mode: str) -> None:
        if "\0" in value:
            raise PolicyError(f"{where}: a NUL byte in a path")
        if "://" in value and not value.startswith("file://"):
            scheme, _, rest = value.partition("://")
            if any(segment in (".", "..") for segment in rest.split("/")):
                raise PolicyError(f"{where}: '{value}' has '.' or '..' segments; name object-store URLs plainly")
            if not any(_under_prefix(value, prefix) for prefix in self.url_prefixes):
                allowed = ", ".join(self.url_prefixes) or "none (see --allow-url-prefix)"
                raise PolicyError(f"{where}: '{value}' is outside the object-store prefixes this coordinator "
                                  f"allows: {allowed}")
            return
        roots = {"read": self.data_roots, "write": self.output_roots, "model": self.model_roots}[mode]
        flag = {"read": "--data-root", "write": "--output-root", "model": "--model-root"}[mode]
        path = Path(value.removeprefix("file://"))
        if not path.is_absolute():
            raise PolicyError(f"{where}: '{value}' must be absolute once resolved")
        real = Path(os.path.realpath(path))
        if not any(real == root or real.is_relative_to(root) for root in roots):
            shown = ", ".join(str(r) for r in roots) or f"none (the coordinator was started without {flag})"
            raise PolicyError(f"{where}: '{value}' (resolved: {real}) is outside the folders this coordinator "
                              f"allows ({flag}: {shown})")


def allowed_tool(path: Path | str) -> Path:
    """An --allow-tool entry as the policy compares it: the real absolute path of an executable file."""
    real = Path(os.path.realpath(path))
    if not real.is_file() or not os.access(real, os.X_OK):
        raise ValueError(f"--allow-tool {path}: not an executable file (resolved: {real})")
    return real


def _under_prefix(url: str, prefix: str) -> bool:
    """`url` is `prefix` or below it, on a segment boundary (`s3://b/a` covers `s3://b/a/x`, not `s3://b/ab`)."""
    return url == prefix or url.startswith(prefix if prefix.endswith("/") else prefix + "/")


def check_server_args(where: str, args: list[str]) -> None:
    """Refuse any server flag outside ALLOWED_SERVER_FLAGS (and stray positional arguments)."""
    index = 0
    while index < len(args):
        item = str(args[index])
        flag, has_value, _ = item.partition("=")
        if flag not in ALLOWED_SERVER_FLAGS:
            raise PolicyError(f"{where}: server argument '{flag}' is not allowed for submitted jobs; "
                              f"allowed: {', '.join(sorted(ALLOWED_SERVER_FLAGS))}")
        if ALLOWED_SERVER_FLAGS[flag] and not has_value:
            index += 1  # the flag's value
        index += 1


def _walk(node: Any, where: tuple[str, ...], section: str | None) -> Iterator[tuple[str, str, Any, str | None]]:
    """(dotted field, key, value, nearest read/write section) for every field, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            key = str(key)
            inner = key if key in _READ_SECTIONS | _WRITE_SECTIONS else section
            yield ".".join((*where, key)), key, value, inner
            if key not in _NAME_MAPS:
                yield from _walk(value, (*where, key), inner)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _walk(item, (*where[:-1], f"{where[-1]}[{index}]") if where else (f"[{index}]",), section)
