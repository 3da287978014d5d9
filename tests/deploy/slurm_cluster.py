"""A real one-node SLURM cluster (Debian's slurm-wlm) on this machine, for tests.

Everything lives in a temporary folder: slurm.conf (found by clients through SLURM_CONF),
state, spool, logs and pid files. Ports are picked free, so two test runs on one machine do
not meet. cgroups are off (proctrack/linuxproc, task/none) because the sandbox has none.
munged, slurmctld and slurmd are this cluster's own (munged on a private socket), and each
is stopped by its pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "srun", "sinfo", "munged"]


class SlurmUnavailable(Exception):
    """SLURM cannot be set up here; the message says why (tests skip with it)."""


def _run(command: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def ensure_installed() -> None:
    """apt-get install the daemons when missing (needs root and the Debian mirror)."""
    if all(shutil.which(name) or Path("/usr/sbin", name).exists() for name in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurm-wlm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm is not installed and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    done = _run(install, timeout=600, env=env)
    if done.returncode != 0:
        _run(["apt-get", "update"], timeout=600, env=env)
        done = _run(install, timeout=600, env=env)
    if done.returncode != 0:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed:\n{done.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie nobody reaps is gone for our purposes
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    return True


def _read_pid(path: Path, timeout: float = 10.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(path.read_text().strip())
        time.sleep(0.05)
    return None


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


@dataclass
class SlurmCluster:
    root: Path
    hostname: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for sbatch/srun/sinfo: SLURM_CONF points at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        memory = max(256, int(_memory_mb() * 0.8))
        lines = [
            "ClusterName=tftest",
            f"SlurmctldHost={self.hostname}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            "KillWait=10",
            f"NodeName={self.hostname} CPUs={self.cpus} RealMemory={memory} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def munge_dir(self) -> Path:
        return self.root / "munge"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    def _start_munge(self) -> None:
        """A private munged on its own socket: test runs side by side never share (or stop) one."""
        self.root.chmod(0o755)  # munged runs as 'munge' and checks every folder on the way
        self.munge_dir.mkdir(exist_ok=True)
        self.munge_dir.chmod(0o755)  # munged wants its socket folder searchable by all
        shutil.chown(self.munge_dir, "munge", "munge")
        pid_file = self.munge_dir / "munged.pid"
        done = _run([
            "runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={self.munge_socket}",
            f"--pid-file={pid_file}", f"--log-file={self.munge_dir / 'munged.log'}",
            f"--seed-file={self.munge_dir / 'munged.seed'}",
        ])
        if done.returncode != 0:
            raise SlurmUnavailable(f"munged would not start: {done.stderr.strip()}")
        pid = _read_pid(pid_file)
        if pid is None:
            raise SlurmUnavailable("munged started but wrote no pid file")
        self.pids["munged"] = pid
        check = subprocess.run(f"munge -n -S {self.munge_socket} | unmunge -S {self.munge_socket}",
                               shell=True, capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise SlurmUnavailable(f"munge does not work: {check.stderr.strip()}")

    def _start_daemon(self, name: str) -> None:
        done = _run([f"/usr/sbin/{name}", "-f", str(self.conf)], env=self.env)
        if done.returncode != 0:
            raise SlurmUnavailable(f"{name} would not start: {done.stderr.strip()}\n{self.logs()}")
        pid = _read_pid(self.root / f"{name}.pid")
        if pid is None:
            raise SlurmUnavailable(f"{name} started but wrote no pid file\n{self.logs()}")
        self.pids[name] = pid

    def start(self, timeout: float = 60.0) -> None:
        ensure_installed()
        self.write_conf()
        self._start_munge()
        self._start_daemon("slurmctld")
        self._start_daemon("slurmd")
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            done = _run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, timeout=30)
            state = done.stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return
            for name in ("slurmctld", "slurmd"):
                if not _pid_alive(self.pids[name]):
                    raise SlurmUnavailable(f"{name} exited during start-up\n{self.logs()}")
            time.sleep(0.25)
        raise SlurmUnavailable(f"node not idle after {timeout}s (sinfo: {state!r})\n{self.logs()}")

    def logs(self) -> str:
        texts = []
        for path in sorted((self.root / "log").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-20:]
            texts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(texts)

    def stop(self) -> None:
        """Stop what this cluster started, by pid: slurmd, slurmctld, then munged."""
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
