"""A loopback TCP proxy for the chaos bench: forwards to one server, and on demand resets its
connections, delays every block, or black-holes traffic (holds it, then resets).

Threads, not asyncio: two pumps per connection, so a held pump stalls only its direction.
Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time


class ChaosProxy:
    def __init__(self, target_port: int, refuse: set[int] | frozenset[int] = frozenset()) -> None:
        """`refuse`: the accepted connections (1 = the first) reset at once, for tests that need
        a connection to drop at a known step."""
        self.target_port = target_port
        self.refuse = set(refuse)
        self.accepted = 0
        self.delay_s = 0.0
        self._hold_until = 0.0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # --- faults ----------------------------------------------------------------------
    def reset(self) -> int:
        """Reset every open connection (RST); returns how many."""
        with self._lock:
            victims = list(self._connections)
            self._connections.clear()
        for sock in victims:
            _abort(sock)
        return len(victims)

    def delay(self, seconds: float, for_s: float) -> None:
        """Every forwarded block waits `seconds`, for the next `for_s` seconds."""
        self.delay_s = seconds
        timer = threading.Timer(for_s, lambda: setattr(self, "delay_s", 0.0))
        timer.daemon = True
        timer.start()

    def black_hole(self, for_s: float) -> None:
        """Nothing gets through for `for_s` seconds; then the stalled connections are reset."""
        self._hold_until = time.monotonic() + for_s
        timer = threading.Timer(for_s, self.reset)
        timer.daemon = True
        timer.start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.reset()

    # --- forwarding ------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted in self.refuse:
                _abort(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _abort(client)  # the server is down: the caller sees a refused/reset connection
                continue
            with self._lock:
                self._connections.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                while time.monotonic() < self._hold_until:
                    time.sleep(0.02)
                if self.delay_s:
                    time.sleep(self.delay_s)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections.discard(source)
                self._connections.discard(sink)
            _abort(source)
            _abort(sink)


def _abort(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
