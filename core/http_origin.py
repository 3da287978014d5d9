"""Browser guard for an HTTP face with no token: no foreign Host, no cross-origin state change (issue 28.11).

A server with no token trusts whoever reaches its port, and on loopback that includes every web
page the user's browser opens. Two browser tricks reach it:

- a page on another origin POSTs with `mode: "no-cors"` (the reply is opaque, the request is
  not): refused when the request says it comes from elsewhere, by `Sec-Fetch-Site`
  (`cross-site`, `same-site`) or by an `Origin` that is not this server's own;
- DNS rebinding: the attacker's name is pointed at 127.0.0.1, so the page is "same origin"
  and can read replies; the request then carries the attacker's name as `Host`. Accepted Host
  names: IP literals (a rebinding needs a name), `localhost` and `*.localhost` (browsers resolve
  them to loopback themselves), the bound host, and the allow-list (`--http-allow-host`,
  `$TENSORFLEET_HTTP_ALLOW_HOSTS`; `*` turns the Host check off).

Clients that are not browsers send no Origin or Sec-Fetch-Site and name the address they dialled,
so curl, tritonclient and the SDK pass. Jupyter guards its token-less mode the same way.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ALLOW_HOSTS_ENV = "TENSORFLEET_HTTP_ALLOW_HOSTS"


def host_name(authority: str) -> str:
    """`name`, `name:port`, `[v6]:port` -> the name, lower case, without a trailing dot or brackets."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    if authority.count(":") == 1:
        authority = authority.split(":", 1)[0]
    return authority.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


def allowed_hosts_from_env() -> list[str]:
    return [name.strip() for name in os.environ.get(ALLOW_HOSTS_ENV, "").split(",") if name.strip()]


class BrowserGuard:
    """ASGI middleware: 403 for a foreign Host and for a cross-origin request that is not a plain read."""

    def __init__(self, app: Any, bound_host: str, allow_hosts: Iterable[str] = ()) -> None:
        self.app = app
        self.allow_any_host = "*" in allow_hosts
        self.hosts = {host_name(name) for name in allow_hosts if name != "*"} | {"localhost"}
        if bound_host and not _is_ip(bound_host):
            self.hosts.add(host_name(bound_host))

    def host_allowed(self, name: str) -> bool:
        return self.allow_any_host or _is_ip(name) or name in self.hosts or name.endswith(".localhost")

    def refusal(self, method: str, headers: dict[str, str]) -> str | None:
        """Why this request is refused, or None."""
        host = headers.get("host")
        if host is not None and not self.host_allowed(host_name(host)):
            return (f"Host '{host}' is not a name of this server (a server with no token answers only "
                    f"loopback names, IP addresses and its --host; allow more with --http-allow-host)")
        if method in SAFE_METHODS:
            return None
        site = headers.get("sec-fetch-site")
        if site in ("cross-site", "same-site"):
            return f"cross-origin request refused (Sec-Fetch-Site: {site}); a server with no token takes " \
                   f"changes only from its own origin and from clients that are not browsers"
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            if origin == "null" or host is None or parts.netloc.lower() != host.strip().lower():
                return f"cross-origin request refused (Origin: {origin}); a server with no token takes " \
                       f"changes only from its own origin and from clients that are not browsers"
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        problem = self.refusal(scope["method"], headers)
        if problem is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": problem}).encode()
        await send({"type": "http.response.start", "status": 403, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        ]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})
