"""Start a process, wait for its port file, stop it by pid: the one handshake every server uses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tensorfleet.core.process import (
    ProcessStartError,
    read_port_file,
    server_command,
    start_and_wait,
    start_process,
    stop_process,
    wait_for_port_files,
    write_port_file,
)

#: Writes its port file through write_port_file after a short start-up, then sleeps until signalled.
READY_LATER = """
import sys, time
from tensorfleet.core.process import write_port_file
print("loading", flush=True)
time.sleep(0.3)
write_port_file(sys.argv[1], 4321)
time.sleep(600)
"""


def test_port_file_round_trip_and_absence(tmp_path: Path) -> None:
    path = tmp_path / "port"
    assert read_port_file(path) is None
    path.write_text("")
    assert read_port_file(path) is None  # created but not written yet
    write_port_file(path, 50051)
    assert read_port_file(path) == 50051
    assert not Path(f"{path}.tmp").exists()


def test_server_command_puts_arguments_first_and_a_free_port_unless_given(tmp_path: Path) -> None:
    free = server_command("coordinator", "serve", port_file=tmp_path / "p", module="tensorfleet.coordinator")
    assert free[1:] == ["-m", "tensorfleet.coordinator", "coordinator", "serve", "--port", "0",
                        "--port-file", str(tmp_path / "p")]
    fixed = server_command("--port", "9000", port_file=tmp_path / "p")
    assert fixed.count("--port") == 1 and fixed[fixed.index("--port") + 1] == "9000"


def test_start_and_wait_returns_the_written_port_and_stop_signals_by_pid(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    process, port = start_and_wait([sys.executable, "-c", READY_LATER, str(port_file)], port_file,
                                   tmp_path / "log", timeout=60)
    assert port == 4321
    assert process.poll() is None
    assert stop_process(process, signal.SIGTERM, timeout=30) == -signal.SIGTERM  # not SIGKILL
    assert "loading" in (tmp_path / "log").read_text()


def test_a_process_that_exits_first_fails_at_once_with_its_log(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import sys; print('weights are corrupt'); sys.exit(3)"]
    with pytest.raises(ProcessStartError, match=r"exited with 3 before it was ready(.|\n)*weights are corrupt"):
        start_and_wait(command, tmp_path / "port", tmp_path / "log", timeout=120)


def test_a_silent_process_times_out_and_is_killed(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import time; time.sleep(600)"]
    with pytest.raises(ProcessStartError, match="not ready after 1s") as caught:
        start_and_wait(command, tmp_path / "port", tmp_path / "log", timeout=1)
    assert caught.value.process.poll() is not None  # not left running


def test_many_started_together_fail_on_the_first_that_exits(tmp_path: Path) -> None:
    ready = start_process([sys.executable, "-c", READY_LATER, str(tmp_path / "a")], tmp_path / "a.log")
    dying = start_process([sys.executable, "-c", "import sys; sys.exit(5)"], tmp_path / "b.log")
    try:
        with pytest.raises(ProcessStartError, match="exited with 5"):
            wait_for_port_files([(ready, tmp_path / "a", tmp_path / "a.log"),
                                 (dying, tmp_path / "b", tmp_path / "b.log")], timeout=120)
        assert wait_for_port_files([(ready, tmp_path / "a", None)], timeout=60) == [4321]
    finally:
        stop_process(ready, timeout=30)


PARENT = """
import sys, time
import time
from pathlib import Path
from tensorfleet.core.process import start_process
child = start_process([sys.executable, "-m", "sleeper", sys.argv[1]], Path(sys.argv[1]) / "child.log",
                      env={"PYTHONPATH": sys.argv[1]}, tie_to_parent=True)
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_tied_child_runs_its_module_and_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    (tmp_path / "sleeper.py").write_text(
        "import os, sys, time\n"
        "open(os.path.join(sys.argv[1], 'child-argv'), 'w').write(' '.join(sys.argv[1:]))\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 60
        while not (tmp_path / "child-argv").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "child-argv").read_text() == str(tmp_path)  # its own arguments, not the launcher's
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child_pid)
    finally:
        stop_process(parent, signal.SIGKILL, timeout=5)
        if _alive(child_pid := locals().get("child_pid", 0)):
            os.kill(child_pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running and not a zombie (a killed orphan is reaped by init, but not at once)."""
    try:
        return pid > 0 and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_tie_to_parent_needs_a_module_command(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="python -m MODULE"):
        start_process([sys.executable, "-c", "pass"], tmp_path / "log", tie_to_parent=True)
