"""Start or stop a real Spark standalone cluster on 127.0.0.1, from the pip pyspark's own launchers.

    python tools/standalone_cluster.py start --dir build/cluster [--workers 2 --cores 1 --memory 3g]
    python tools/standalone_cluster.py stop --dir build/cluster

``start`` runs one Master and the Workers with ``bin/spark-class`` (SPARK_HOME is the installed
pyspark package), waits until the master reports every worker alive, records their process ids
and command lines in ``<dir>/cluster.json`` and prints the master URL for ``spark-submit --master``.
``stop`` ends exactly those processes, by id, and only while each id still runs the command line it
started (an id the system has since given to another process is left alone). Every daemon, web UIs
included, listens on 127.0.0.1 only. Logs go to ``<dir>/logs``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

STATE_FILE = "cluster.json"
HOST = "127.0.0.1"


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def launch(args: list[str], *, log: Path, env: dict[str, str], state: dict, program: str = "spark-class") -> subprocess.Popen:
    """Start ``bin/<program> args`` in a session of its own and record its id and command line in ``state``."""
    command = [str(spark_home() / "bin" / program), *args]
    # spark-class (and spark-submit, through it) ends in `exec java ...`, so the id we record is the JVM's own.
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    state["pids"].append(process.pid)
    state["commands"][str(process.pid)] = command
    return process


def _still_ours(pid: int, command: list[str] | None) -> bool:
    """Whether process ``pid`` still runs ``command``: every argument it was given is on its command line.

    After spark-class's ``exec java`` the program and the options before the arguments differ, and
    spark-submit's launcher regroups its options, but each argument (unique ports and work folders
    among them) is still there.
    """
    if not command:
        return False
    try:
        running = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    left = list(running)
    for arg in command[1:]:
        if arg.encode() not in left:
            return False
        left.remove(arg.encode())
    return True


def _master_state(ui_port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{ui_port}/json/", timeout=2) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


def wait_until(ready: Callable[[], bool], process: subprocess.Popen, *, timeout: float, every: float = 0.5) -> bool:
    """Poll ``ready`` until it holds (True), ``process`` has exited or ``timeout`` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if process.poll() is not None:
            return False
        time.sleep(every)
    return False


def start(*, directory: Path, workers: int, cores: int, memory: str, timeout: float = 120.0) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / STATE_FILE).exists():
        raise SystemExit(f"{directory / STATE_FILE} exists: a cluster may be running; run `stop --dir {directory}` first")
    logs = directory / "logs"
    logs.mkdir(exist_ok=True)
    # --host binds the daemons' RPC; their web UIs bind SPARK_LOCAL_IP, else every interface.
    env = dict(os.environ, SPARK_HOME=str(spark_home()), SPARK_LOG_DIR=str(logs), SPARK_NO_DAEMONIZE="1",
               SPARK_LOCAL_IP=HOST)
    port, ui_port = free_port(), free_port()
    url = f"spark://{HOST}:{port}"
    state: dict = {"master_url": url, "master_ui": f"http://{HOST}:{ui_port}", "pids": [], "commands": {}}
    master = launch(
        ["org.apache.spark.deploy.master.Master", "--host", HOST, "--port", str(port), "--webui-port", str(ui_port)],
        log=logs / "master.log", env=env, state=state,
    )
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))  # written first, so `stop` can always clean up
    for i in range(workers):
        work_dir = directory / f"worker-{i}"
        work_dir.mkdir(exist_ok=True)
        launch(
            ["org.apache.spark.deploy.worker.Worker", "--host", HOST, "--cores", str(cores), "--memory", memory,
             "--work-dir", str(work_dir), "--webui-port", str(free_port()), url],
            log=logs / f"worker-{i}.log", env=env, state=state,
        )
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2))
    def ready() -> bool:
        seen = _master_state(ui_port)
        alive = [w for w in (seen or {}).get("workers", []) if w.get("state") == "ALIVE"]
        return bool(seen and seen.get("status") == "ALIVE" and len(alive) == workers)

    if wait_until(ready, master, timeout=timeout):
        return state
    stop(directory=directory)
    raise SystemExit(f"the standalone cluster did not come up within {timeout:.0f} s; see the logs in {logs}")


def stop(*, directory: Path, grace: float = 20.0) -> None:
    stop_recorded(directory / STATE_FILE, grace=grace)


def stop_recorded(state_file: Path, *, grace: float = 20.0) -> None:
    """End the processes ``state_file`` records, last started first, and the processes they started.

    Each was started in a session (and process group) of its own, so what is left of its group once
    it has ended (Python workers of its executors) is its own and is killed too.
    """
    if not state_file.exists():
        return
    state = json.loads(state_file.read_text())
    commands = state.get("commands", {})
    pids = []
    for pid in state["pids"]:
        if _still_ours(pid, commands.get(str(pid))):
            pids.append(pid)
        elif _running(pid):
            print(f"not signalling process {pid}: it no longer runs the command `start` gave it", file=sys.stderr)
    for pid in reversed(pids):  # workers first: each one ends its executors as it shuts down
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for pid in pids:
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.2)
        if _running(pid) and _still_ours(pid, commands.get(str(pid))):
            os.kill(pid, signal.SIGKILL)
        try:
            os.killpg(pid, signal.SIGKILL)  # the group's leader is gone: only its own descendants remain
        except (ProcessLookupError, PermissionError):
            pass
    state_file.unlink()


def _running(pid: int) -> bool:
    try:
        # Reap it if it is our child (the test's case); otherwise just probe it.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("start", "stop"))
    parser.add_argument("--dir", type=Path, default=Path("build/cluster"), help="state, logs and work folders")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cores", type=int, default=1, help="cores per worker")
    parser.add_argument("--memory", default="3g", help="memory per worker")
    args = parser.parse_args()
    if args.command == "start":
        state = start(directory=args.dir, workers=args.workers, cores=args.cores, memory=args.memory)
        print(state["master_url"])
    else:
        stop(directory=args.dir)


if __name__ == "__main__":
    sys.exit(main())
