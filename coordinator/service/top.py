"""`tensorfleet top`: a live terminal view of jobs and servers, for operators.

Sources: a coordinator service (`--coordinator`: ListJobs and ListServers) and/or model servers
asked directly (`--servers`: tensorfleet.v1.ServerControl/GetServerInfo). Jobs show state,
progress, rows/s and ETA; servers show device, models, queue depth, rows/s and memory. Where
`pynvml` can be imported and a server runs on this host, its GPU's utilisation and memory come
from NVML (matched by the server's pid); otherwise the server's own memory figures are shown.

The screen is redrawn with plain ANSI escapes (no curses). `--once` prints one snapshot (text,
or JSON with `--json`) and exits: 0 when every source answered, 2 when one did not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from tensorfleet.core.exit_codes import EXIT_FATAL, EXIT_OK

from .gpus import Nvml, gpu_of

PROBE_TIMEOUT_S = 3.0
CLEAR = "\x1b[H\x1b[2J"
ALT_SCREEN_ON, ALT_SCREEN_OFF = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"


@dataclass
class Snapshot:
    """One refresh: what `--json` prints and the screen draws."""

    time: float
    jobs: list[dict[str, Any]] = field(default_factory=list)
    servers: list[dict[str, Any]] = field(default_factory=list)
    gpus: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def add_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `tensorfleet top`; the parser's `handler` default runs it (returns an exit code)."""
    from .client_options import connection_args

    parser = subparsers.add_parser(
        "top", help="live view of jobs (progress, ETA) and servers (rows/s, queue depth, GPU)",
        description="Refresh a view of the coordinator's jobs and the servers' load every few seconds.",
    )
    parser.add_argument("--coordinator", help="host:port of the coordinator service (jobs and its servers)")
    parser.add_argument("--servers", default="", help="comma-separated host:port of model servers to ask directly")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--json", action="store_true", help="JSON: one document with --once, else one line per refresh")
    parser.add_argument("--server-token", help="bearer token of the servers in --servers (default: --token; "
                        "visible in ps: prefer --server-token-file)")
    parser.add_argument("--server-token-file", help="file holding the servers' bearer token")
    connection_args(parser)
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from .client_options import DEFAULT_COORDINATOR, connection_options

    servers = [s.strip() for s in (args.servers or "").split(",") if s.strip()]
    coordinator = args.coordinator or (None if servers else DEFAULT_COORDINATOR)
    options = connection_options(args)
    server_options = connection_options(argparse.Namespace(**{**vars(args), **_server_token(args)}))
    session = TopSession(coordinator, servers, options, server_options)
    try:
        if args.once:
            snapshot = session.refresh()
            print(json.dumps(asdict(snapshot), indent=1) if args.json else render(snapshot))
            return EXIT_FATAL if snapshot.errors else EXIT_OK
        return _live(session, max(args.interval, 0.1), args.json)
    finally:
        session.close()


def _server_token(args: argparse.Namespace) -> dict[str, str | None]:
    """The servers' token: --server-token, else --server-token-file, else the coordinator's."""
    if args.server_token or args.server_token_file:
        return {"token": args.server_token, "token_file": args.server_token_file}
    return {}


def _live(session: TopSession, interval: float, as_json: bool) -> int:
    """Refresh until Ctrl-C (SIGINT). The signal only sets a flag: raised as KeyboardInterrupt
    inside a gRPC call it could leave the channel unable to close, and the process hung."""
    screen = sys.stdout.isatty() and not as_json
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    if screen:
        sys.stdout.write(ALT_SCREEN_ON)
    try:
        while not stop.is_set():
            snapshot = session.refresh()
            if as_json:
                print(json.dumps(asdict(snapshot)), flush=True)
            elif screen:
                size = shutil.get_terminal_size()
                lines = render(snapshot, interval).splitlines()[: size.lines - 1]
                sys.stdout.write(CLEAR + "\n".join(line[: size.columns] for line in lines) + "\n")
                sys.stdout.flush()
            else:
                print(render(snapshot, interval) + "\n", flush=True)
            stop.wait(interval)
        return EXIT_OK
    except BrokenPipeError:  # the reader went away (`top --json | head`)
        return EXIT_OK
    finally:
        signal.signal(signal.SIGINT, previous)
        if screen:
            sys.stdout.write(ALT_SCREEN_OFF)
            sys.stdout.flush()


class TopSession:
    """Channels kept open across refreshes, and the previous counts that rows/s is derived from."""

    def __init__(self, coordinator: str | None, servers: list[str], options: Any, server_options: Any) -> None:
        self.coordinator_address = coordinator
        self.server_addresses = servers
        self.options = options
        self.server_options = server_options
        self._coordinator = None
        self._stubs: dict[str, Any] = {}
        self._channels: list[Any] = []
        self._rows: dict[tuple[str, str], tuple[float, int]] = {}
        self._pool = ThreadPoolExecutor(max_workers=min(16, len(servers) + 1))
        self._nvml = Nvml()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        if self._coordinator is not None:
            self._coordinator.close()
        for channel in self._channels:
            channel.close()
        self._nvml.close()

    def refresh(self) -> Snapshot:
        snapshot = Snapshot(time=time.time())
        direct = list(self._pool.map(self._probe, self.server_addresses))
        by_address: dict[str, dict[str, Any]] = {}
        if self.coordinator_address:
            try:
                jobs, entries = self._ask_coordinator()
            except Exception as error:  # unreachable or refused: shown, and --once exits 2
                snapshot.errors.append(f"coordinator {self.coordinator_address}: {_message(error)}")
            else:
                snapshot.jobs = [job_row(job) for job in jobs]
                for entry in entries:
                    by_address[entry.address] = server_row(
                        entry.address, entry.info if entry.reachable else None, entry.error, list(entry.sources)
                    )
                    by_address[entry.address]["job_rows"] = entry.job_rows
        for row in direct:
            known = by_address.get(row["address"])
            row["sources"] = (known["sources"] if known else []) + ["direct"]
            row["job_rows"] = known["job_rows"] if known else 0
            by_address[row["address"]] = row
            if not row["reachable"]:
                snapshot.errors.append(f"server {row['address']}: {row['error']}")
        snapshot.gpus = self._nvml.gpus()
        now = time.monotonic()
        for row in by_address.values():
            self._derive_rates(row, now)
            row["gpu"] = gpu_of(row, snapshot.gpus)
        snapshot.servers = list(by_address.values())
        return snapshot

    def _ask_coordinator(self) -> tuple[list[Any], list[Any]]:
        from tensorfleet.client import CoordinatorClient

        if self._coordinator is None:
            self._coordinator = CoordinatorClient(self.coordinator_address, options=self.options, timeout=10.0)
        return self._coordinator.jobs(), self._coordinator.servers()

    def _probe(self, address: str) -> dict[str, Any]:
        import grpc

        from tensorfleet.client.channel import sync_channel
        from tensorfleet.protos import tensorfleet_pb2 as tf
        from tensorfleet.protos import tensorfleet_pb2_grpc as tf_grpc

        stub = self._stubs.get(address)
        if stub is None:
            channel = sync_channel(address, self.server_options)
            self._channels.append(channel)
            stub = self._stubs[address] = tf_grpc.ServerControlStub(channel)
        try:
            info = stub.GetServerInfo(
                tf.GetServerInfoRequest(), timeout=PROBE_TIMEOUT_S, metadata=self.server_options.metadata()
            )
        except grpc.RpcError as error:
            return server_row(address, None, f"{error.code().name}: {error.details()}", [])
        return server_row(address, info, "", [])

    def _derive_rates(self, row: dict[str, Any], now: float) -> None:
        """rows/s from rows done since the previous refresh, where the server reports none."""
        for model in row["models"]:
            key = (row["address"], model["name"])
            previous = self._rows.get(key)
            self._rows[key] = (now, model["rows_done"])
            if not model["rows_per_second"] and previous is not None and now > previous[0]:
                model["rows_per_second"] = max(model["rows_done"] - previous[1], 0) / (now - previous[0])
        rates = [m["rows_per_second"] for m in row["models"] if m["rows_per_second"] is not None]
        row["rows_per_second"] = sum(rates) if rates else None


def job_row(job: Any) -> dict[str, Any]:
    from tensorfleet.client.coordinator_client import job_state

    return {
        "job_id": job.job_id, "name": job.name, "state": job_state(job),
        "rows": job.rows, "rows_done": job.rows_done, "rows_failed": job.rows_failed,
        "chunks": job.chunks, "chunks_done": job.chunks_done,
        "progress": job.rows_done / job.rows if job.rows else 0.0,
        "rows_per_second": job.rows_per_second, "eta_seconds": job.eta_seconds or None,
        "servers_alive": sum(1 for s in job.servers if s.alive), "servers": len(job.servers),
        "attempts": job.attempts, "error": job.error, "engine_state": job.engine_state,
        # a workflow's stages / model x source runs / in-context runs, each with its own counts and rows/s
        "parts": [{"label": p.label, "model": p.model, "state": p.state, "rows": p.rows, "rows_done": p.rows_done,
                   "rows_failed": p.rows_failed, "chunks": p.chunks, "chunks_done": p.chunks_done,
                   "rows_per_second": p.rows_per_second, "estimated": p.estimated} for p in job.parts],
    }


def server_row(address: str, info: Any, error: str, sources: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"address": address, "reachable": info is not None, "error": error, "sources": sources}
    if info is None:
        return {**row, "device": "", "device_name": "", "memory_used": 0, "memory_total": 0, "pid": 0,
                "draining": False, "models": [], "queue_depth": 0}
    models = [
        {"name": m.name, "state": m.state, "version": m.version, "queue_depth": m.queue_depth,
         "rows_done": m.rows_done, "rows_per_second": m.rows_per_second or None}
        for m in info.models
    ]
    return {
        **row, "device": info.device, "device_name": info.device_name, "memory_used": info.device_memory_used,
        "memory_total": info.device_memory_total, "pid": info.host_pid, "draining": info.draining,
        "models": models, "queue_depth": sum(m["queue_depth"] for m in models),
    }


def render(snapshot: Snapshot, interval: float | None = None) -> str:
    """The plain-text view: a header, the jobs table, the servers table, this host's GPUs."""
    from ..engine.progress import format_duration

    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snapshot.time))
    running = sum(1 for job in snapshot.jobs if job["state"] == "RUNNING")
    queued = sum(1 for job in snapshot.jobs if job["state"] == "QUEUED")
    up = sum(1 for s in snapshot.servers if s["reachable"])
    header = f"tensorfleet top  {stamp}  jobs: {running} running, {queued} queued  servers: {up}/{len(snapshot.servers)} up"
    lines = [header + (f"  (every {interval:g}s, Ctrl-C quits)" if interval else ""), ""]
    lines += [f"! {error}" for error in snapshot.errors]
    if snapshot.errors:
        lines.append("")
    job_rows = [
        [job["job_id"], job["state"], f"{_bar(job['progress'])} {job['progress']:6.1%}",
         f"{job['rows_done']}/{job['rows']}" + (f" ({job['rows_failed']} failed)" if job["rows_failed"] else ""),
         _rate(job["rows_per_second"] or None), f"{job['servers_alive']}/{job['servers']}" if job["servers"] else "",
         format_duration(job["eta_seconds"]) if job["state"] == "RUNNING" else "", job["name"]]
        for job in snapshot.jobs
    ]
    if snapshot.jobs or not snapshot.servers:
        lines += _table(["JOB", "STATE", "PROGRESS", "ROWS", "ROWS/S", "SERVERS UP", "ETA", "NAME"], job_rows) + [""]
    server_rows = []
    for server in snapshot.servers:
        if not server["reachable"]:
            error = server["error"] if len(server["error"]) <= 48 else server["error"][:45] + "..."
            server_rows.append([server["address"], "unreachable", error, "", "", "", ""])
            continue
        models = server["models"] or [{"name": "-", "state": "", "queue_depth": 0, "rows_per_second": None}]
        for i, model in enumerate(models):
            first = i == 0
            server_rows.append([
                server["address"] if first else "", (_device(server) + (" draining" if server["draining"] else "")) if first else "",
                f"{model['name']} {model['state']}".strip(), str(model["queue_depth"]), _rate(model["rows_per_second"]),
                _gpu_util(server) if first else "", _memory(server) if first else "",
            ])
    if snapshot.servers:
        lines += _table(["SERVER", "DEVICE", "MODEL", "QUEUE", "ROWS/S", "GPU%", "MEMORY"], server_rows) + [""]
    if snapshot.gpus:
        gpu_rows = [[str(g["index"]), g["name"], f"{g['utilization']}%", _bytes_pair(g["memory_used"], g["memory_total"])]
                    for g in snapshot.gpus]
        lines += _table(["GPU", "NAME", "UTIL", "MEMORY"], gpu_rows)
    return "\n".join(lines).rstrip()


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]


def _bar(fraction: float, width: int = 12) -> str:
    filled = int(round(max(0.0, min(fraction, 1.0)) * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _device(server: dict[str, Any]) -> str:
    name = server["device_name"]
    return f"{server['device']} ({name})" if name and name != server["device"] else server["device"]


def _gpu_util(server: dict[str, Any]) -> str:
    return f"{server['gpu']['utilization']}%" if server.get("gpu") else "-"


def _memory(server: dict[str, Any]) -> str:
    gpu = server.get("gpu")
    if gpu:
        return _bytes_pair(gpu["memory_used"], gpu["memory_total"])
    if server["memory_total"]:
        return _bytes_pair(server["memory_used"], server["memory_total"])
    return "-"


def _bytes_pair(used: int, total: int) -> str:
    return f"{used / 2**30:.1f}/{total / 2**30:.1f} GiB"


def _message(error: Exception) -> str:
    return getattr(error, "message", None) or str(error) or type(error).__name__
