"""Secure by default: what a server may listen on, given the protection it has.

Loopback needs nothing. Any other address needs a token or mutual TLS, or an explicit
`--insecure`, which is logged at start and reported by the server.
"""

from __future__ import annotations

import ipaddress
import logging

log = logging.getLogger("tensorfleet.security")

DEFAULT_HOST = "127.0.0.1"


class ExposureError(ValueError):
    """A bind that would expose an unprotected server; the message names the ways out."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; a name or wildcard address is not loopback."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, *, token: bool, mutual_tls: bool, insecure: bool, what: str = "server") -> None:
    """Refuse an unprotected non-loopback bind; warn whenever `insecure` is given without protection."""
    protected = token or mutual_tls
    if insecure and not protected:
        log.warning("INSECURE: the %s listens on %s with no token and no mutual TLS (--insecure); "
                    "anyone who can reach the port may use it", what, host)
        return
    if is_loopback(host) or protected:
        return
    raise ExposureError(
        f"refusing to serve the {what} on {host} without authentication: anyone who can reach it could "
        "use it. Give --token-file FILE (bearer token), or --tls-cert/--tls-key with --tls-ca CA "
        "(mutual TLS), or --insecure to accept the risk; or bind --host 127.0.0.1"
    )
