"""Bearer-token auth with roles, shared by the model servers and the coordinator service.

A token is read from a file (`--token-file`, `TENSORFLEET_TOKEN_FILE`) so it never shows in
`ps`. Each rpc needs a role; a token grants its role and every role below it (ROLES order).
Tokens are compared in constant time. Health stays open: probes carry no token.
`check_token` is the one decision, callable by any front end (gRPC here, REST elsewhere).
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

import grpc

READ, SUBMIT = "read", "submit"
#: Roles from weakest to strongest; a token for one role may do what the ones before it may.
ROLES = (READ, SUBMIT)
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
TOKEN_FILE_ENV = "TENSORFLEET_TOKEN_FILE"
#: The model servers' token for an engine (`tensorfleet run`, the service's jobs) whose spec has none.
SERVER_TOKEN_FILE_ENV = "TENSORFLEET_SERVER_TOKEN_FILE"
#: Set by the coordinator service for its jobs' engines: the `--servers` entries its operator named
#: (comma-separated, may be empty). When set, the server token goes only to those servers (issue 28 #1).
OPERATOR_SERVERS_ENV = "TENSORFLEET_OPERATOR_SERVERS"
MAX_TOKEN_BYTES = 4096
#: Shortest token a token file may hold: a one-character token is guessed in a few tries (issue 28 #12).
MIN_TOKEN_CHARS = 12
DENIED = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the file and why."""


def read_token_file(path: str | Path) -> str:
    """The token in `path`: its text without surrounding whitespace; empty or huge files refused."""
    path = Path(path)
    try:
        data = path.read_bytes()[: MAX_TOKEN_BYTES + 1]
    except OSError as error:
        raise TokenFileError(f"token file {path}: {error.strerror or error}") from None
    if len(data) > MAX_TOKEN_BYTES:
        raise TokenFileError(f"token file {path}: over {MAX_TOKEN_BYTES} bytes; it should hold one token")
    token = data.decode(errors="strict").strip()
    if not token or any(c.isspace() for c in token):
        raise TokenFileError(f"token file {path}: want one token (no spaces) on one line")
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenFileError(f"token file {path}: a {len(token)}-character token is too easy to guess; use at least "
                             f"{MIN_TOKEN_CHARS} (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    _check_mode(path)
    return token


def _check_mode(path: Path) -> None:
    """Refuse a token file others may write (anyone could put their own token in); warn, loudly, when
    others may read it. Not refused: Kubernetes mounts Secrets 0644 unless told `defaultMode`, and a
    read-only file owned by root is still a secret on a single-user host."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise TokenFileError(f"token file {path}: writable by group or others (mode {stat.S_IMODE(mode):04o}); "
                             f"chmod 600 {path}")
    if mode & stat.S_IROTH:
        logging.getLogger("tensorfleet.auth").warning(
            "token file %s is readable by every user of this host (mode %04o): chmod 600 %s", path,
            stat.S_IMODE(mode), path)


def token_from(token: str | None, token_file: str | Path | None, use_env: bool = True) -> str | None:
    """The token a command uses: --token, else --token-file, else $TENSORFLEET_TOKEN_FILE."""
    if token:
        return token
    if not token_file and use_env:
        token_file = os.environ.get(TOKEN_FILE_ENV) or None
    return read_token_file(token_file) if token_file else None


class TokenAuth:
    """Which token grants which role; `check` answers for one request's authorization header.

    With `api_key_header` (e.g. `X-Api-Key`, what API gateways send), the token may also come as
    that header's whole value; both are compared in constant time, every token, always."""

    def __init__(self, tokens: Mapping[str, str], api_key_header: str | None = None) -> None:
        """`tokens`: role -> token (roles not given have no token of their own)."""
        unknown = set(tokens) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}; roles are {ROLES}")
        self._granted = [(f"Bearer {token}".encode(), token.encode(), role) for role, token in tokens.items() if token]
        #: The header (lower case, as gRPC metadata and HTTP/2 carry it) that may hold the bare token.
        self.api_key_header = check_api_key_header(api_key_header) if api_key_header else None

    def role_of(self, header: str | bytes | None, api_key: str | bytes | None = None) -> str | None:
        """The strongest role the `authorization` header's token (or the api-key header's value)
        grants, or None. Compares every token, always."""
        given = _as_bytes(header)
        key = _as_bytes(api_key) if self.api_key_header else b""
        best = None
        for bearer, raw, role in self._granted:
            matched = hmac.compare_digest(given, bearer)
            matched = hmac.compare_digest(key, raw) | matched if self.api_key_header else matched
            if matched and (best is None or ROLES.index(role) > ROLES.index(best)):
                best = role
        return best

    def role_in(self, headers: Mapping[str, str | bytes]) -> str | None:
        """role_of for a request's headers or metadata, looked up by lower-case name."""
        key = headers.get(self.api_key_header) if self.api_key_header else None
        return self.role_of(headers.get("authorization"), key)

    def check(self, header: str | bytes | None, role: str, api_key: str | bytes | None = None) -> bool:
        """True when the header's token grants `role` (or a stronger one)."""
        granted = self.role_of(header, api_key)
        return granted is not None and ROLES.index(granted) >= ROLES.index(role)


def _as_bytes(value: str | bytes | None) -> bytes:
    if isinstance(value, str):
        return value.encode(errors="replace")
    return value or b""


#: Header names that carry something else: the token's own header, HTTP/2 pseudo-headers and gRPC's.
_RESERVED_HEADERS = ("authorization", "host", "content-type", "content-length", "te", "user-agent", "cookie")


def check_api_key_header(name: str) -> str:
    """`--api-key-header NAME`, checked and in lower case: an HTTP header name that gRPC metadata
    can carry as text (not `-bin`, not `grpc-*`), and not one that holds something else."""
    lowered = name.strip().lower()
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")
    if not lowered or not set(lowered) <= allowed or lowered.startswith(("grpc-", ":")) or lowered.endswith("-bin"):
        raise ValueError(f"--api-key-header '{name}': want a header name of letters, digits, '-', '_' or '.' "
                         "(not grpc-*, not *-bin), e.g. X-Api-Key")
    if lowered in _RESERVED_HEADERS:
        raise ValueError(f"--api-key-header '{name}': that header carries something else; pick another, e.g. X-Api-Key")
    return lowered


def check_token(auth: TokenAuth | None, header: str | bytes | None, role: str,
                api_key: str | bytes | None = None) -> bool:
    """For non-gRPC front ends: may a request with this `authorization` header (or this value of
    the auth's api-key header) act as `role`?

    No auth configured (loopback or mTLS only) lets everything through."""
    return auth is None or auth.check(header, role, api_key)


def check_request(auth: TokenAuth | None, headers: Mapping[str, str | bytes], role: str) -> bool:
    """check_token for a request's headers (a case-insensitive mapping, or lower-case names)."""
    if auth is None:
        return True
    granted = auth.role_in(headers)
    return granted is not None and ROLES.index(granted) >= ROLES.index(role)


def _deny(code: grpc.StatusCode, message: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def unary(request, context):
        await context.abort(code, message)

    async def stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    streams_out = handler.unary_stream is not None or handler.stream_stream is not None
    streams_in = handler.stream_unary is not None or handler.stream_stream is not None
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(streams_in, streams_out)]
    return factory(stream if streams_out else unary, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a valid token; PERMISSION_DENIED when the token's role is too weak.

    `method_roles` maps full method names (or service prefixes ending in '/') to the role they
    need; anything unlisted needs `default_role`."""

    def __init__(self, auth: TokenAuth, method_roles: Mapping[str, str] | None = None,
                 default_role: str = SUBMIT) -> None:
        self.auth = auth
        self.method_roles = dict(method_roles or {})
        self.default_role = default_role

    def role_for(self, method: str) -> str:
        if method in self.method_roles:
            return self.method_roles[method]
        service = method.rsplit("/", 1)[0] + "/"
        return self.method_roles.get(service, self.default_role)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        granted = self.auth.role_in(dict(handler_call_details.invocation_metadata or ()))
        if granted is None:
            return _deny(grpc.StatusCode.UNAUTHENTICATED, DENIED, handler)
        needed = self.role_for(method)
        if ROLES.index(granted) < ROLES.index(needed):
            name = method.rsplit("/", 1)[-1]
            return _deny(grpc.StatusCode.PERMISSION_DENIED,
                         f"{name} needs the {needed} token; this token may only {granted}", handler)
        return handler
