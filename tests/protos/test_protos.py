"""The protobuf contract: generated code is current, the wire matches Triton's, the SDK stays light.

Triton's generated modules (tritonclient.grpc.service_pb2, model_config_pb2) and ours both
register package `inference` in protobuf's default pool, so they can never share a process:
each descriptor set is dumped by its own subprocess and compared here as plain data.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTOS_DIR = REPO_ROOT / "protos"

# Walks every message, enum and service in the given modules' file descriptors and prints
# {full_name: description} as JSON. Runs in a fresh interpreter (see the module docstring).
_DUMP_SCRIPT = r"""
import importlib, json, sys

def field_info(field):
    target = field.message_type or field.enum_type
    oneof = field.containing_oneof
    return {
        "name": field.name,
        "type": field.type,
        "repeated": field.label == field.LABEL_REPEATED,
        "type_name": target.full_name if target else "",
        "oneof": oneof.name if oneof is not None else "",
    }

def walk_message(message, out):
    out["message " + message.full_name] = {
        str(field.number): field_info(field) for field in message.fields
    }
    for nested in message.nested_types:
        walk_message(nested, out)
    for enum in message.enum_types:
        walk_enum(enum, out)

def walk_enum(enum, out):
    out["enum " + enum.full_name] = {str(value.number): value.name for value in enum.values}

def walk_service(service, out):
    out["service " + service.full_name] = {
        method.name: {
            "input": method.input_type.full_name,
            "output": method.output_type.full_name,
            "client_streaming": method.client_streaming,
            "server_streaming": method.server_streaming,
        }
        for method in service.methods
    }

out = {}
for module_name in sys.argv[1:]:
    file = importlib.import_module(module_name).DESCRIPTOR
    for message in file.message_types_by_name.values():
        walk_message(message, out)
    for enum in file.enum_types_by_name.values():
        walk_enum(enum, out)
    for service in file.services_by_name.values():
        walk_service(service, out)
print(json.dumps(out, sort_keys=True))
"""


def _dump(*modules: str) -> dict[str, dict]:
    result = subprocess.run(
        [sys.executable, "-c", _DUMP_SCRIPT, *modules],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"descriptor dump of {modules} failed:\n{result.stderr}"
    return json.loads(result.stdout)


def _generated_files() -> list[Path]:
    return sorted(
        path
        for pattern in ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")
        for path in PROTOS_DIR.glob(pattern)
    )


def test_generated_modules_are_current() -> None:
    # protoc runs in its own process: in a worker that has loaded TensorFlow, grpc_tools'
    # bundled protobuf crashes the interpreter.
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "tensorfleet.protos.generate", "--out", tmp],
            check=True,
            capture_output=True,
            timeout=120,
        )
        fresh = {path.name: path.read_bytes() for path in Path(tmp).iterdir()}
    committed = {path.name: path.read_bytes() for path in _generated_files()}
    assert fresh, "the generator wrote nothing"
    stale = sorted(
        name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name)
    )
    assert not stale, (
        f"generated protobuf modules are stale or missing: {stale}; "
        "run python -m tensorfleet.protos.generate"
    )


@pytest.fixture(scope="module")
def ours() -> dict[str, dict]:
    return _dump("tensorfleet.protos.model_config_pb2", "tensorfleet.protos.inference_pb2")


@pytest.fixture(scope="module")
def triton() -> dict[str, dict]:
    return _dump("tritonclient.grpc.model_config_pb2", "tritonclient.grpc.service_pb2")


def test_dumps_cover_the_oip_messages(ours: dict, triton: dict) -> None:
    # Guards the comparison below against an empty or wrong dump passing vacuously.
    for key in ("message inference.ModelInferRequest", "service inference.GRPCInferenceService"):
        assert key in ours and key in triton
    assert sum(1 for key in ours if key.startswith("message ")) >= 30


# tensorfleet's own additions to Triton's messages, at field numbers Triton does not use: a
# Triton client skips them. Each is checked below to be absent from Triton's descriptors.
EXTENSION_FIELDS = {"message inference.ModelStatistics": {"1000": "stage_stats"}}
EXTENSION_TYPES = {"message inference.ModelStatistics.StageStatsEntry"}  # the map's entry type


def test_our_extensions_use_numbers_and_types_triton_does_not(ours: dict, triton: dict) -> None:
    for key, fields in EXTENSION_FIELDS.items():
        for number, name in fields.items():
            assert ours[key][number]["name"] == name
            assert number not in triton[key], f"{key} #{number} is Triton's own field: pick another"
    for key in EXTENSION_TYPES:
        assert key in ours and key not in triton


def test_every_message_and_enum_we_define_matches_triton(ours: dict, triton: dict) -> None:
    problems: list[str] = []
    for key, mine in sorted(ours.items()):
        if key.startswith("service ") or key in EXTENSION_TYPES:
            continue
        mine = {n: d for n, d in mine.items() if n not in EXTENSION_FIELDS.get(key, {})}
        theirs = triton.get(key)
        if theirs is None:
            problems.append(f"{key}: Triton has no such type")
            continue
        for number, description in sorted(mine.items()):
            if number not in theirs:
                problems.append(
                    f"{key} #{number} {description}: Triton has no field/value {number}"
                )
            elif theirs[number] != description:
                problems.append(f"{key} #{number}: ours {description} != Triton {theirs[number]}")
    assert not problems, "wire incompatibilities with Triton:\n" + "\n".join(problems)


def test_every_rpc_we_define_matches_triton(ours: dict, triton: dict) -> None:
    key = "service inference.GRPCInferenceService"
    mine, theirs = ours[key], triton[key]
    assert len(mine) == 15  # the 12 core and repository rpcs and the 3 system shared-memory ones
    for method, signature in mine.items():
        assert theirs.get(method) == signature, (
            f"rpc {method}: ours {signature}, Triton {theirs.get(method)}"
        )


def test_client_import_pulls_in_neither_torch_nor_tensorflow() -> None:
    script = (
        "import sys, json, tensorfleet.client\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow'))\n"
        "print(json.dumps(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
