"""The local fleet's supervisor, on real server processes: a server that dies is started again
on its port until model.local.max_restarts is spent, and stop() leaves no process behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tensorfleet.client import InferenceClient
from tensorfleet.coordinator.fleet.local_fleet import LocalFleet

from .helpers import MODELS, wait_for


def _gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" in status.read_text()


def test_a_dead_server_comes_back_on_its_port_until_the_budget_is_spent(tmp_path):
    fleet = LocalFleet(MODELS, "embed", 1, "cpu", tmp_path / "servers", [], max_restarts=1)
    pids = []
    try:
        [address] = fleet.start(120)
        server = fleet.servers[0]
        pids.append(server.process.pid)
        os.kill(server.process.pid, signal.SIGKILL)
        wait_for(lambda: server.process.pid != pids[0] and server.port_file.exists(), what="a restarted server", timeout=60)
        pids.append(server.process.pid)
        with InferenceClient(address) as client:  # the same address answers again
            assert client.is_model_ready("embed")
        assert fleet.restarts == 1
        assert f'"pid": {pids[1]}' in (tmp_path / "servers" / "servers.json").read_text()
        os.kill(server.process.pid, signal.SIGKILL)
        wait_for(lambda: server.given_up, what="the supervisor giving up", timeout=30)
        time.sleep(1.0)  # two supervisor rounds: nothing more is started
        assert server.process.pid == pids[1] and fleet.restarts == 1
        assert (tmp_path / "servers" / "server-0.log").read_text().count("SERVING on port") == 2
    finally:
        fleet.stop()
    assert all(_gone(pid) for pid in pids)
