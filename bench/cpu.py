"""CPU seconds of a process tree between two moments, by kind of process, from Linux's /proc.

A job on local Spark runs in several processes: the driver's Python, the JVM it starts, the Python
workers the JVM starts (``pyspark.daemon`` and the workers it forks). Their CPU time over a job is
the difference between two :func:`snapshot` s of the driver and all its descendants, taken right
before and right after it (:func:`cpu_seconds`):

* a process alive at both counts its own user and system time, and that of its children it reaped
  in between (``cutime``, ``cstime``): a Python worker that exits during the job is counted in the
  daemon that forked it;
* a process started in between counts from zero;
* a process that exited in between is counted by its parent, which reaped it (in the parent's kind),
  so what it had used before the first snapshot is taken off the parent's again.

Processes are told apart by pid and start time, so a pid reused in between is a new process.

That needs parents that account for the children they reap, as pyspark's daemon does. Ray's raylet
ignores SIGCHLD, so the kernel reaps its workers and their CPU time goes nowhere when they exit (Ray
Data ends its actors at the end of every run): :class:`Sampler` follows such a tree on a thread
instead, and counts a process that exits as last seen.

Within the JVM, :func:`thread_ticks` and :func:`jvm_thread_seconds` split its CPU by what its threads
do (the JIT compilers, the garbage collector, Spark's task threads), from /proc/<pid>/task.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

#: Clock ticks per second, the unit of /proc/<pid>/stat's times (100 on Linux: 10 ms resolution).
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    #: Start time in ticks since boot: with the pid, the process's identity.
    start: int
    #: utime + stime: its own CPU ticks.
    own: int
    #: cutime + cstime: the CPU ticks of the children it reaped.
    reaped: int
    comm: str
    cmdline: str

    @property
    def key(self) -> tuple[int, int]:
        return self.pid, self.start


def _parse_stat(stat: str) -> tuple[str, list[str]]:
    """A /proc stat line's name and its fields from the 3rd of proc(5) on: state=0, ppid=1, utime=11,
    stime=12, cutime=13, cstime=14, starttime=19. The name is in parentheses and may hold spaces and
    parentheses: the fields follow the last ")"."""
    return stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()


def _read(pid: int) -> Process | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None  # exited between the listing and the read
    comm, fields = _parse_stat(stat)
    return Process(pid=pid, ppid=int(fields[1]), start=int(fields[19]), own=int(fields[11]) + int(fields[12]),
                   reaped=int(fields[13]) + int(fields[14]), comm=comm, cmdline=cmdline)


def snapshot(root: int | None = None) -> dict[tuple[int, int], Process]:
    """``root`` (default: this process) and all its descendants, by (pid, start time)."""
    root = os.getpid() if root is None else root
    every = [p for p in (_read(int(d)) for d in os.listdir("/proc") if d.isdigit()) if p is not None]
    children: dict[int, list[Process]] = {}
    for p in every:
        children.setdefault(p.ppid, []).append(p)
    tree = [p for p in every if p.pid == root]
    for p in tree:  # grows while it is walked: breadth first
        tree.extend(children.get(p.pid, []))
    return {p.key: p for p in tree}


def spark_kind(process: Process, *, driver: int | None = None) -> str:
    """``driver`` (this process), ``jvm``, ``python_workers`` (pyspark's daemon and its workers) or ``other``."""
    if process.pid == (os.getpid() if driver is None else driver):
        return "driver"
    if process.comm == "java":
        return "jvm"
    if "python" in process.comm and ("pyspark.daemon" in process.cmdline or "pyspark.worker" in process.cmdline):
        return "python_workers"
    return "other"


def cpu_seconds(
    before: dict[tuple[int, int], Process],
    after: dict[tuple[int, int], Process],
    kind: Callable[[Process], str],
) -> dict[str, float]:
    """CPU seconds each kind of process used between two snapshots of the same tree (see the module's doc)."""
    ticks: dict[str, int] = {}
    for key, p in after.items():
        was = before.get(key)
        used = p.own + p.reaped - (was.own + was.reaped if was else 0)
        ticks[kind(p)] = ticks.get(kind(p), 0) + used
    by_pid = {p.pid: p for p in [*before.values(), *after.values()]}
    for key, p in before.items():
        if key not in after:  # exited: its whole life is in its parent's reaped ticks, so is its share
            parent = kind(by_pid[p.ppid]) if p.ppid in by_pid else kind(p)
            ticks[parent] = ticks.get(parent, 0) - (p.own + p.reaped)
    return {k: round(v / TICKS, 2) for k, v in sorted(ticks.items())}


class Sampler:
    """The CPU seconds of a tree whose processes may exit unaccounted for, sampled every ``interval`` s.

    Each process counts its own user and system time from the snapshot on entering (or from zero)
    to the last sample it was seen in, the one on exiting included; what it used after its last
    sample, and processes born and gone between two samples, are not counted. The sampling thread's
    own CPU time is taken off the root's. Use as a context manager around the run, then
    :meth:`cpu_seconds`.
    """

    def __init__(self, *, interval: float = 0.25, root: int | None = None) -> None:
        self.interval = interval
        self.root = os.getpid() if root is None else root
        self.before: dict[tuple[int, int], Process] = {}
        self.last: dict[tuple[int, int], Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="cpu-sampler", daemon=True)
        self._thread_cpu = 0.0

    def _sample(self) -> None:
        start = time.thread_time()
        while not self._stop.wait(self.interval):
            self.last.update(snapshot(self.root))
        self._thread_cpu = time.thread_time() - start

    def __enter__(self) -> "Sampler":
        self.before = snapshot(self.root)
        self.last = dict(self.before)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.last.update(snapshot(self.root))

    def cpu_seconds(self, kind: Callable[[Process], str]) -> dict[str, float]:
        """CPU seconds each kind of process used while sampled."""
        ticks: dict[str, int] = {}
        for key, p in self.last.items():
            was = self.before.get(key)
            ticks[kind(p)] = ticks.get(kind(p), 0) + p.own - (was.own if was else 0)
        seconds = {k: v / TICKS for k, v in ticks.items()}
        root = next(kind(p) for p in self.last.values() if p.pid == self.root)
        seconds[root] -= self._thread_cpu
        return {k: round(v, 2) for k, v in sorted(seconds.items())}


#: What a JVM thread does, by the start of its name (Linux keeps a thread's first 15 characters).
JVM_THREAD_KINDS = (
    ("C1 CompilerThre", "jit_compilers"),
    ("C2 CompilerThre", "jit_compilers"),
    ("GC Thread", "garbage_collector"),
    ("G1 ", "garbage_collector"),
    ("VM Thread", "garbage_collector"),  # safepoints, mostly for the collector
    ("Executor task l", "task_threads"),
    # py4j's threads are unnamed: one runs each action the driver's Python calls (its planning,
    # code generation and commit) while the driver waits for it.
    ("Thread-", "unnamed_py4j"),
)


def thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """Each thread of process ``pid``: its name and the CPU ticks it used, by thread id."""
    threads = {}
    try:
        ids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return threads
    for tid in ids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited between the listing and the read
        name, fields = _parse_stat(stat)
        threads[int(tid)] = (name, int(fields[11]) + int(fields[12]))
    return threads


def jvm_thread_seconds(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]) -> dict[str, float]:
    """CPU seconds of a JVM's threads between two :func:`thread_ticks`, by :data:`JVM_THREAD_KINDS`
    (``other`` for the rest). A thread that exited in between is not counted."""
    ticks: dict[str, int] = {}
    for tid, (name, used) in after.items():
        kind = next((k for prefix, k in JVM_THREAD_KINDS if name.startswith(prefix)), "other")
        was = before.get(tid)
        ticks[kind] = ticks.get(kind, 0) + used - (was[1] if was and was[0] == name else 0)
    return {k: round(v / TICKS, 2) for k, v in sorted(ticks.items())}


def jvm_pid(processes: dict[tuple[int, int], Process]) -> int | None:
    """The pid of the one JVM among ``processes`` (a :func:`snapshot`), None if there is none."""
    pids = [p.pid for p in processes.values() if p.comm == "java"]
    return pids[0] if len(pids) == 1 else None
