"""tools/standalone_cluster.py on real processes: `stop` signals only what `start` started, UIs on loopback."""

from __future__ import annotations

import importlib.util
import json
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "tools" / "standalone_cluster.py"


def _load_cluster_script():
    spec = importlib.util.spec_from_file_location("standalone_cluster", CLUSTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: A process that says when it runs its own command line, then sleeps until it is ended.
SLEEPER = [sys.executable, "-c", "import time; print('running', flush=True); time.sleep(300)"]
#: Seconds to wait for it to say so: a safety net for a machine too busy to start Python, not a pace.
SAFETY_TIMEOUT = 120


@pytest.fixture
def sleeper():
    # Popen returns once the child's exec has begun; from a large parent (this test process, after
    # others) /proc still shows the parent's name and an empty command line for a moment after. The
    # child's own first line comes from its own program: by then /proc shows its command line.
    process = subprocess.Popen(SLEEPER, stdout=subprocess.PIPE, text=True)
    try:
        said, _, _ = select.select([process.stdout], [], [], SAFETY_TIMEOUT)
        assert said and process.stdout.readline() == "running\n", f"{SLEEPER} did not start in {SAFETY_TIMEOUT} s"
        yield process
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def _record(directory: Path, pid: int, command: list[str]) -> None:
    """The state file as `start` writes it, for one process."""
    state = {"master_url": "spark://127.0.0.1:1", "pids": [pid], "commands": {str(pid): command}}
    (directory / "cluster.json").write_text(json.dumps(state))


def test_stop_signals_a_process_that_still_runs_its_command(sleeper, tmp_path):
    _record(tmp_path, sleeper.pid, SLEEPER)
    _load_cluster_script().stop(directory=tmp_path, grace=30)
    with pytest.raises(ProcessLookupError):  # ended (and reaped: it is this process's child)
        os.kill(sleeper.pid, 0)
    assert not (tmp_path / "cluster.json").exists()


def test_stop_leaves_alone_a_process_whose_id_now_runs_another_command(sleeper, tmp_path, capsys):
    # As if the recorded process had ended and the system had given its id to this one.
    _record(tmp_path, sleeper.pid, ["spark-class", "org.apache.spark.deploy.master.Master", "--port", "7077"])
    _load_cluster_script().stop(directory=tmp_path, grace=1)
    assert sleeper.poll() is None  # still running: never signalled
    assert f"not signalling process {sleeper.pid}" in capsys.readouterr().err
    assert not (tmp_path / "cluster.json").exists()


def _listening_addresses(pid: int) -> list[str]:
    """Local addresses of the TCP sockets process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                # /proc prints each 32-bit word of the address in host (little-endian) order.
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append(socket.inet_ntop(family, raw))
    return found


@pytest.mark.cluster
def test_every_daemon_listens_on_loopback_only(tmp_path):
    started = subprocess.run([sys.executable, str(CLUSTER), "start", "--dir", str(tmp_path), "--workers", "1",
                              "--memory", "1g"], capture_output=True, text=True, timeout=240)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        pids = json.loads((tmp_path / "cluster.json").read_text())["pids"]
        listening = {pid: _listening_addresses(pid) for pid in pids}
    finally:
        subprocess.run([sys.executable, str(CLUSTER), "stop", "--dir", str(tmp_path)], check=True, timeout=120)
    # Master: RPC and web UI; worker: RPC and web UI. None on 0.0.0.0 or ::.
    assert [len(found) >= 2 for found in listening.values()] == [True, True], listening
    assert {address for found in listening.values() for address in found} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
