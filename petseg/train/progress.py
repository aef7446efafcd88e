"""Progress lines from training workers to the driver's console and log while training runs.

spark-tensorflow-distributor's runner returns only partition 0's return value at the end, and worker
output lands in executor stderr. As Spark's own TorchDistributor does, the driver opens a small TCP
server; workers connect and send text lines, which the driver logs as they arrive.

What arrives ends up in the driver's log and in ``TrainResult.progress``, so the server listens only
on the address the driver's own sockets use, admits a connection only when its first line is the
run's secret (handed to the tasks with the address), and bounds what it keeps: line length, records
and connections. Anything else is dropped without a word on the console.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import secrets
import socket
import socketserver
import threading
import time
from typing import Any, Iterator, NamedTuple

log = logging.getLogger("petseg.train")

#: Longest line kept, in bytes: a line is one record (an epoch's metrics: a few hundred bytes).
MAX_LINE_BYTES = 1 << 16
#: Records kept per run: a few per worker plus one per epoch, with room to spare.
MAX_RECORDS = 10_000
#: Connections served at once: one per worker.
MAX_CONNECTIONS = 256
#: Seconds a new connection has to send the secret.
SECRET_TIMEOUT = 30.0
#: Characters of a message written to the driver's log.
MAX_LOGGED_CHARS = 2_000


class ProgressAddress(NamedTuple):
    """Where workers send progress, and the secret that admits their lines (plain data: it is pickled to tasks)."""

    host: str
    port: int
    secret: str

    def __repr__(self) -> str:
        return f"ProgressAddress(host={self.host!r}, port={self.port}, secret=...)"


class _LineHandler(socketserver.StreamRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        server = self.server
        if not server.slots.acquire(blocking=False):
            return
        try:
            self.connection.settimeout(SECRET_TIMEOUT)
            first = self.rfile.readline(len(server.secret) + 2).rstrip(b"\r\n")
            if not hmac.compare_digest(first, server.secret):
                log.debug("progress: dropped a connection from %s without the run's secret", self.client_address)
                return
            self.connection.settimeout(None)  # epochs may take hours between lines
            server.admitted(threading.current_thread(), True)
            while (line := _read_line(self.rfile, limit=server.max_line_bytes)) is not None:
                server.accept(line)
        except OSError:
            pass  # a timeout or a reset: the connection ends, the training goes on
        finally:
            server.admitted(threading.current_thread(), False)
            server.slots.release()


def _read_line(stream: Any, *, limit: int) -> bytes | None:
    """The next line (``b""`` for one over ``limit`` bytes, which is skipped), or None at the end."""
    raw = stream.readline(limit + 1)
    if not raw:
        return None
    if len(raw) <= limit or raw.endswith(b"\n"):
        return raw.rstrip(b"\r\n")
    while (rest := stream.readline(limit)) and not rest.endswith(b"\n"):
        pass
    log.warning("progress: dropped a line longer than %d bytes", limit)
    return b""


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], *, secret: str, max_records: int, max_line_bytes: int) -> None:
        super().__init__(address, _LineHandler)
        self.secret = secret.encode("ascii")
        self.max_records = max_records
        self.max_line_bytes = max_line_bytes
        self.records: list[dict[str, Any]] = []
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.handlers: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._dropped = 0

    def admitted(self, thread: threading.Thread, running: bool) -> None:
        """Track the handlers of admitted connections, whose lines the driver waits for on leaving."""
        with self._lock:
            (self.handlers.add if running else self.handlers.discard)(thread)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr by default: a peer must not reach the console.
        log.debug("progress: connection from %s failed", client_address, exc_info=True)

    def accept(self, raw: bytes) -> None:
        """Keep and log one line from an admitted worker: a JSON object with a ``message``, or plain text."""
        if not raw:
            return
        line = raw.decode("utf-8", "replace")
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict):
            record = {"message": line}
        if not isinstance(record.get("message"), str):
            record["message"] = line
        with self._lock:
            if len(self.records) >= self.max_records:
                self._dropped += 1
                if self._dropped == 1:
                    log.warning("progress: kept the first %d lines; dropping the rest", self.max_records)
                return
            self.records.append(record)
        log.info("%s", record["message"][:MAX_LOGGED_CHARS])

    def wait_for_handlers(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            handlers = list(self.handlers)
        for thread in handlers:
            thread.join(max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def progress_server(
    *,
    host: str,
    bind: str | None = None,
    max_records: int = MAX_RECORDS,
    max_line_bytes: int = MAX_LINE_BYTES,
    drain_timeout: float = 10.0,
) -> Iterator[tuple[ProgressAddress, list[dict[str, Any]]]]:
    """Serve on ``bind`` (default ``host``) and an ephemeral port; workers reach it at ``host``.

    Parameters
    ----------
    host
        The address executors use to reach the driver (``spark.driver.host``).
    bind
        The address the driver's sockets listen on (``spark.driver.bindAddress``; by default ``host``).
    max_records, max_line_bytes
        Lines kept per run, and the longest line kept; the rest are dropped.
    drain_timeout
        Seconds to wait on leaving for admitted connections to be read to their end (the workers
        have closed them by the time the runner returns).

    Yields
    ------
    ((host, port, secret), records)
        The address with the run's secret, for :class:`ProgressClient`; ``records`` collects every
        admitted line as a dict (JSON objects as sent, anything else as ``{"message": line}``).
    """
    secret = secrets.token_hex(16)
    server = _Server((bind or host, 0), secret=secret, max_records=max_records, max_line_bytes=max_line_bytes)
    thread = threading.Thread(target=server.serve_forever, name="petseg-progress", daemon=True)
    thread.start()
    try:
        yield ProgressAddress(host, server.server_address[1], secret), server.records
    finally:
        server.shutdown()
        server.server_close()
        server.wait_for_handlers(timeout=drain_timeout)


class ProgressClient:
    """Send lines to a :func:`progress_server`; never fails the training if the driver is unreachable."""

    def __init__(self, address: ProgressAddress | None, *, timeout: float = 10.0) -> None:
        self._sock: socket.socket | None = None
        if address is None:
            return
        try:
            self._sock = socket.create_connection((address.host, address.port), timeout=timeout)
            self._sock.sendall(address.secret.encode("ascii") + b"\n")
        except OSError as exc:
            self._sock = None
            logging.getLogger(__name__).warning("progress server %s:%s unreachable (%s); lines stay local",
                                                address.host, address.port, exc)

    @property
    def connected(self) -> bool:
        """Whether lines still go to the driver (False when unreachable, or after a failed send)."""
        return self._sock is not None

    def send(self, line: str) -> bool:
        """Send one line; return whether it went to the driver."""
        if self._sock is None:
            return False
        try:
            self._sock.sendall(line.rstrip("\n").encode("utf-8") + b"\n")
            return True
        except OSError:
            self._sock = None
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
