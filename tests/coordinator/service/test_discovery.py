"""Fleet discovery for real: a `dns:` name that resolves to three loopback addresses.

The name resolves through TENSORFLEET_HOSTS_FILE (an /etc/hosts-style file the test writes),
which the resolver reads before the system's. The third address is added mid-job: it is
found by re-resolution and gets work.
"""

from __future__ import annotations

import socket
import sqlite3

from tensorfleet.client.coordinator_client import job_state
from tensorfleet.coordinator.fleet.discovery import expand
from tests.coordinator.helpers import MODELS, chunks_done, make_fasta, wait_for, write_job
from tests.serving import launch_server

from .helpers import running_coordinator

NAME = "fleet.tensorfleet.test"
HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


def free_port_on_all(hosts: list[str]) -> int:
    """A port free on every loopback address (servers of one DNS name share their port)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every loopback address")


def test_expand_reads_the_hosts_override_and_hostfiles(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.2 {NAME}\n127.0.0.3 other {NAME} # comment\n")
    monkeypatch.setenv("TENSORFLEET_HOSTS_FILE", str(hosts))
    hostfile = tmp_path / "servers"
    hostfile.write_text("node1:9000\nnode2\n\n# none\nnode1:9000\n")
    assert expand([f"dns:{NAME}:7000", f"hostfile:{hostfile}", "a:1"]) == [
        "127.0.0.2:7000", "127.0.0.3:7000", "node1:9000", "node2:8001", "a:1",
    ]


def test_a_dns_name_with_three_addresses_uses_all_including_one_that_joins_mid_job(tmp_path):
    port = free_port_on_all(HOSTS)
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("".join(f"{host} {NAME}\n" for host in HOSTS[:2]))
    slow = {"TF_TEST_DELAY_MS": "60"}
    fleet = [launch_server(MODELS, "--host", host, "--port", str(port), env=slow) for host in HOSTS]
    try:
        make_fasta(tmp_path / "in.fasta", 3000)
        job = write_job(
            tmp_path / "job.yaml", input={"path": "in.fasta"}, model={"name": "embed", "servers": [f"dns:{NAME}:{port}"]},
            output={"path": "out.h5"}, chunking={"chunk_rows": 32, "batch_rows": 8}, policy={"window": 2},
        )
        job_dir = tmp_path / "out.h5.tfjob"
        env = {"TENSORFLEET_HOSTS_FILE": str(hosts_file)}
        with running_coordinator(tmp_path / "state", env=env) as coordinator, coordinator.client() as client:
            job_id = client.submit(job).job_id
            wait_for(lambda: chunks_done(job_dir) >= 2, what="two committed chunks")
            hosts_file.write_text("".join(f"{host} {NAME}\n" for host in HOSTS))  # a server joins
            expected = {f"{host}:{port}" for host in HOSTS}

            def listed() -> set[str]:
                return {s.address for s in client.servers() if job_id in s.sources and s.reachable}

            wait_for(lambda: listed() == expected, what="ListServers to show all three servers")
            for entry in client.servers():
                assert entry.info.device == "cpu"
                assert "embed" in {model.name for model in entry.info.models}
            done = client.wait(job_id)
            assert (job_state(done), done.exit_code) == ("SUCCEEDED", 0)
            assert {server.address for server in done.servers} == expected
        with sqlite3.connect(job_dir / "manifest.sqlite") as db:
            used = {row[0] for row in db.execute("SELECT DISTINCT server FROM chunks WHERE done = 1")}
        assert used == expected
    finally:
        for server in fleet:
            server.stop()
