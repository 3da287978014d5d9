"""Fleet discovery: turn `model.servers` entries into server addresses, again and again.

An entry is one of
- `host:port`: one server, as written;
- `dns:NAME:PORT`: every address NAME resolves to (A and AAAA), each with PORT. A headless
  Kubernetes Service is such a name. Re-resolved while a job runs, so servers that join get work;
- `hostfile:PATH`: one server per line (`host:port`, or `host` with port 8001; `#` comments), as
  SLURM jobs write them (`scontrol show hostnames`, or tensorfleet's own server hostfile).
  Re-read while a job runs.

`TENSORFLEET_HOSTS_FILE` names an /etc/hosts-style file (`ADDRESS NAME [NAME...]` per line)
that is consulted before the system resolver: every line naming NAME contributes its address.
It lets tests, and hosts without a DNS server, control what a `dns:` name resolves to.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from ..spec.server_entry import DNS_PREFIX, HOSTFILE_PREFIX, DiscoveryError, is_dynamic

HOSTS_FILE_ENV = "TENSORFLEET_HOSTS_FILE"
DEFAULT_PORT = 8001


def _format(host: str, port: int | str) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def _hosts_override(name: str) -> list[str] | None:
    path = os.environ.get(HOSTS_FILE_ENV)
    if not path:
        return None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and name in fields[1:] and fields[0] not in found:
            found.append(fields[0])
    return found or None


def resolve_name(name: str) -> list[str]:
    """Every address `name` resolves to, in a stable order; [] when it does not resolve (yet)."""
    override = _hosts_override(name)
    if override is not None:
        return override
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in addresses:
            addresses.append(address)
    return sorted(addresses)


def read_hostfile(path: str) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise DiscoveryError(f"cannot read hostfile {path}: {error}") from None
    servers = []
    for line in lines:
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        server = item if sep and port.isdigit() and host else _format(item, DEFAULT_PORT)
        if server not in servers:
            servers.append(server)
    return servers


def expand(entries: list[str]) -> list[str]:
    """The servers the entries name right now, each once, in entry order."""
    servers: list[str] = []
    for entry in entries:
        if entry.startswith(HOSTFILE_PREFIX):
            found = read_hostfile(entry[len(HOSTFILE_PREFIX):])
        elif entry.startswith(DNS_PREFIX):
            name, _, port = entry[len(DNS_PREFIX):].rpartition(":")
            found = [_format(address, port) for address in resolve_name(name)]
        else:
            found = [entry]
        servers.extend(server for server in found if server not in servers)
    return servers


class Discovery:
    """Re-expands dynamic entries every `interval` seconds and reports servers not seen before."""

    def __init__(self, entries: list[str], known: list[str], interval: float = 2.0) -> None:
        self.entries = list(entries)
        self.known = list(known)
        self.interval = interval
        self.dynamic = any(is_dynamic(entry) for entry in entries)
        self._last = 0.0

    def poll(self, now: float) -> list[str]:
        """New servers since the last poll (never removes any: a vanished server just fails probes)."""
        if not self.dynamic or now - self._last < self.interval:
            return []
        self._last = now
        try:
            current = expand(self.entries)
        except DiscoveryError:
            return []
        new = [server for server in current if server not in self.known]
        self.known.extend(new)
        return new
