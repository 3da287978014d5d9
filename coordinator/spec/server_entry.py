"""The three forms of a `model.servers` entry, checked when a job file is read (no resolution here).

The job spec checks an entry's form; coordinator/fleet/discovery.py (the fleet) resolves it, again and
again while a job runs. Kept apart so the spec needs nothing from the fleet.
"""

from __future__ import annotations

DNS_PREFIX = "dns:"
HOSTFILE_PREFIX = "hostfile:"


class DiscoveryError(Exception):
    """An entry that cannot name servers (bad form, unreadable hostfile)."""


def is_dynamic(entry: str) -> bool:
    """Whether the entry's servers can change while a job runs."""
    return entry.startswith((DNS_PREFIX, HOSTFILE_PREFIX))


def check_entry(entry: str) -> None:
    """DiscoveryError unless `entry` has one of the three forms (resolution is not tried)."""
    if entry.startswith(HOSTFILE_PREFIX):
        if not entry[len(HOSTFILE_PREFIX):]:
            raise DiscoveryError(f"'{entry}': give hostfile:PATH")
        return
    body = entry[len(DNS_PREFIX):] if entry.startswith(DNS_PREFIX) else entry
    host, sep, port = body.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DiscoveryError(f"server '{entry}' is not host:port, dns:NAME:PORT or hostfile:PATH")
