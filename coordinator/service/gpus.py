"""This host's GPUs (NVML, when `pynvml` is importable and a driver answers) and which server uses
which: for `tensorfleet top` and the dashboard."""

from __future__ import annotations

import socket
from typing import Any


class Nvml:
    """This host's GPUs through NVML, when `pynvml` is importable and a driver answers; else none."""

    def __init__(self) -> None:
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:  # not installed, no driver, no GPU: top still works without it
            self._nvml = None

    def gpus(self) -> list[dict[str, Any]]:
        nvml = self._nvml
        if nvml is None:
            return []
        gpus = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                gpus.append({
                    "index": index, "name": name.decode() if isinstance(name, bytes) else name,
                    "utilization": nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                    "memory_used": int(memory.used), "memory_total": int(memory.total),
                    "pids": sorted(_gpu_pids(nvml, handle)),
                })
        except Exception:  # a driver hiccup costs this refresh's GPU columns, not the view
            return gpus
        return gpus

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass


def _gpu_pids(nvml: Any, handle: Any) -> set[int]:
    pids: set[int] = set()
    for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            pids.update(int(p.pid) for p in getattr(nvml, query)(handle))
        except Exception:
            continue
    return pids


def gpu_of(row: dict[str, Any], gpus: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The local GPU whose processes include the server's pid (a remote server never matches)."""
    if not gpus or not row.get("pid") or not row["device"].startswith("cuda") or not is_local(row["address"]):
        return None
    for gpu in gpus:
        if row["pid"] in gpu["pids"]:
            return {key: gpu[key] for key in ("index", "name", "utilization", "memory_used", "memory_total")}
    return None


def is_local(address: str) -> bool:
    """Whether host:port names this machine: loopback, or an address a socket can bind here."""
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((sockaddr[0], 0))
            return True
        except OSError:
            continue
    return False
