"""core/http_server.py from the server's side of a real loopback connection (issue 30).

The 44 ms a request came from Nagle's algorithm on accepted sockets (the listener was made with
protocol 0, so asyncio never set TCP_NODELAY) meeting the client's delayed ACK on a response
sent in two writes. These tests look at the accepted socket's option and at how many sends a
response takes, not at time (the timing is bench/rest.py's sequential rows)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest

from tensorfleet.core.http_protocol import CoalescingTransport
from tensorfleet.core.http_server import EmbeddedHttpServer, ListenError


async def small_app(scope, receive, send) -> None:
    body = b'{"ready":true}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Running:
    """An EmbeddedHttpServer in an event loop on a thread of this process."""

    def __init__(self, app, host: str = "127.0.0.1") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = EmbeddedHttpServer(app, host, 0, what="test")
        self.port = self.call(self.server.start())

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def connections(self) -> list:
        async def snapshot():
            return list(self.server._server.server_state.connections)
        return self.call(snapshot())

    def close(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture()
def running() -> Iterator[Running]:
    server = Running(small_app)
    try:
        yield server
    finally:
        server.close()


def _get(sock: socket.socket, path: str = "/v2/health/ready") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    reply = b""
    while not reply.endswith(b'{"ready":true}'):
        chunk = sock.recv(65536)
        assert chunk, reply
        reply += chunk
    return reply


def test_accepted_connections_have_tcp_nodelay(running):
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as client:
        # the client leaves Nagle on: the server's side must not depend on it
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        assert _get(client).startswith(b"HTTP/1.1 200")
        [connection] = running.connections()
        accepted = connection.transport.get_extra_info("socket")
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_listening_socket_is_made_as_tcp_so_asyncio_sets_nodelay_too(running):
    [listener] = running.server._server.servers[0].sockets
    assert listener.proto == socket.IPPROTO_TCP


def test_a_small_response_leaves_in_one_send(running):
    """uvicorn writes the head and the body separately; they reach the socket as one send."""
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as client:
        for expected in (1, 2, 3):  # keep-alive: one send per response, on one connection
            _get(client)
            [connection] = running.connections()
            assert isinstance(connection.transport, CoalescingTransport)
            assert connection.transport.flushes == expected


def test_ipv6_loopback_connections_have_nodelay_too():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        server = Running(small_app, host="::1")
    except ListenError as error:
        pytest.skip(f"no IPv6 loopback: {error}")
    try:
        with socket.create_connection(("::1", server.port), timeout=10) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n")
            assert client.recv(65536).startswith(b"HTTP/1.1 200")
            [connection] = server.connections()
            accepted = connection.transport.get_extra_info("socket")
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        server.close()


def test_a_port_in_use_is_a_listen_error_naming_the_address():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        server = EmbeddedHttpServer(small_app, "127.0.0.1", port, what="metrics")
        with pytest.raises(ListenError, match=f"cannot listen for metrics on 127.0.0.1:{port}: Address already in use"):
            asyncio.run(server.start())
