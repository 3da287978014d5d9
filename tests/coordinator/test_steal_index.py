"""The job's tail: a server with room takes requests waiting in other servers' chunks.

`StealIndex` (engine/steal_index.py) replaced a scan of every server's leases on each take
(servers x servers in the tail). The first test drives the index through the dispatcher's
lease life (leases, ids read, owners sending from the front, replies, hand-offs, requests put
back, servers lost with their chunks going back, isolating chunks) and checks every take
against that scan: the same chunk and request each time. The second runs a job whose chunks
are fewer than its servers on real loopback servers, so most requests are taken from other
servers' chunks, and checks every row came back once, in order."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from bench.sim_devices import SimModel, sim_fleet
from tensorfleet.coordinator.engine.leases import ServerState, Work
from tensorfleet.coordinator.engine.planner import Chunk
from tensorfleet.coordinator.engine.steal_index import StealIndex

REPO_ROOT = Path(__file__).resolve().parents[2]


def scanned(servers: list[ServerState], thief: ServerState) -> tuple[Work, tuple[int, int]] | None:
    """The rule as the dispatcher scanned for it before the index: the first chunk, by server
    then lease order, with a request waiting, its ids read, not handed off, not isolating."""
    for other in servers:
        if other is thief:
            continue
        for work in other.leases:
            if work.pending and work.ids is not None and not work.handed_off and not work.isolating:
                return work, work.pending[-1]
    return None


class Fleet:
    """The dispatcher's lease bookkeeping in miniature, with the index kept as it keeps it."""

    def __init__(self, rng: random.Random, servers: int, chunks: int) -> None:
        self.rng = rng
        self.index = StealIndex()
        self.servers = [ServerState(f"s{i}", i) for i in range(servers)]
        self.queue = []
        for i in range(chunks):
            requests = rng.randint(1, 6)
            work = Work(Chunk(i, i * 100, i * 100 + requests * 10, tuple(i * 100 + 10 * k for k in range(requests + 1))))
            work.reset()
            self.queue.append(work)
        self.reading: dict[str, Work] = {}  # a lease whose ids are being read (the dispatcher awaits them)
        self.inflight: list[tuple[ServerState, Work, int, int, int]] = []
        self.takes = 0

    def lease(self) -> None:
        server = self.rng.choice(self.servers)
        if not self.queue or server.address in self.reading:
            return
        work = self.queue.pop(self.rng.randrange(len(self.queue)))
        work.owner = server
        server.leases.append(work)
        if work.ids is None:
            self.reading[server.address] = work  # ids arrive later: not takeable until then
        else:
            self.index.leased(work, server.position)

    def ids_read(self) -> None:
        if self.reading:
            address = self.rng.choice(sorted(self.reading))
            work = self.reading.pop(address)
            work.ids = np.arange(work.chunk.start, work.chunk.stop)
            self.index.leased(work, work.owner.position)

    def send_own(self) -> None:
        server = self.rng.choice(self.servers)
        for work in server.leases:
            if work.pending and work.ids is not None:  # an isolating chunk's too (one at a time there)
                start, stop = work.pending.popleft()
                work.inflight += 1
                self.inflight.append((server, work, start, stop, work.generation))
                return

    def take(self) -> None:
        thieves = [s for s in self.servers if not any(w.pending for w in s.leases)]
        if not thieves:
            return
        thief = self.rng.choice(thieves)
        expected = scanned(self.servers, thief)
        taken = self.index.take()
        if expected is None:
            assert taken is None
            return
        work, request = expected
        assert taken is not None and taken[0] is work and taken[1:] == request
        self.takes += 1
        self.inflight.append((thief, work, *request, work.generation))

    def answer(self, put_back: bool) -> None:
        if not self.inflight:
            return
        _, work, start, stop, generation = self.inflight.pop(self.rng.randrange(len(self.inflight)))
        if generation != work.generation or work.handed_off:
            return  # sent before its chunk went back to the queue: ignored
        work.inflight -= 1
        if put_back:  # RESOURCE_EXHAUSTED, a row failure halved, a thief's stream ended
            work.pending.appendleft((start, stop))
            self.index.refilled(work)
        elif work.complete:
            work.owner.leases.remove(work)
            work.handed_off = True
            self.index.dropped(work)

    def lose_server(self) -> None:
        server = self.rng.choice(self.servers)
        if server.address in self.reading:
            return
        for work in server.leases:
            self.index.dropped(work)
            work.isolating = work.isolating or self.rng.random() < 0.2
            work.reset()
            self.queue.append(work)
        server.leases = []

    def step(self) -> None:
        action = self.rng.choices(
            [self.lease, self.ids_read, self.send_own, self.take, lambda: self.answer(False),
             lambda: self.answer(True), self.lose_server],
            weights=[3, 3, 6, 8, 8, 2, 0.3],
        )[0]
        action()


@pytest.mark.parametrize("seed", range(12))
def test_the_index_takes_what_a_scan_of_every_server_would(seed):
    rng = random.Random(seed)
    fleet = Fleet(rng, servers=rng.choice([2, 5, 17]), chunks=rng.choice([60, 150]))
    for _ in range(4000):
        fleet.step()
    assert fleet.takes > 20  # the tail was reached and taken from, not only planned
    live = {id(w) for s in fleet.servers for w in s.leases if not w.handed_off}
    assert len(fleet.index) <= len(live)  # a finished or returned chunk is never held


@pytest.mark.timeout(180)
def test_a_job_with_fewer_chunks_than_servers_is_shared_and_every_row_comes_back_once(tmp_path):
    """2 chunks of 8 requests, 8 servers sending 2 at a time: the queue is empty from the
    first two leases on, so the other servers' requests are all taken from those two chunks."""
    rows = 256
    data = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    np.save(tmp_path / "in.npy", data)
    model = SimModel("null_rows", 16, "FP32", (4,), "echo")
    with sim_fleet(8, 20.0, model) as fleet:  # 16 rows x 20 ms: each request takes a device 0.32 s
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump({
            "name": "tail", "input": {"path": str(tmp_path / "in.npy")},
            "model": {"name": "null_rows", "servers": fleet.addresses},
            "output": {"path": str(tmp_path / "out.h5")},
            "chunking": {"batch_rows": 16, "chunk_rows": 128},
            "policy": {"window": 2, "shared_memory": False},
        }))
        run = subprocess.run([sys.executable, "-m", "tensorfleet.coordinator", "run", str(job)],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]
    with h5py.File(tmp_path / "out.h5") as out:
        np.testing.assert_array_equal(out["y"][:], data)
        assert out["ok"][:].all() and len(out["ids"]) == rows
    status = json.loads((tmp_path / "out.h5.tfjob" / "status.json").read_text())
    computed = [server["rows"] for server in status["servers"]]
    assert sum(computed) == rows  # each request computed once: nothing sent twice
    assert sum(1 for n in computed if n) > 2  # servers without a chunk computed rows of the two
