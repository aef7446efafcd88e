"""Progress lines from training workers to the driver's console and log while training runs.

spark-tensorflow-distributor's runner returns only partition 0's return value at the end, and worker
output lands in executor stderr. As Spark's own TorchDistributor does, the driver opens a small TCP
server; workers connect and send text lines, which the driver logs as they arrive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import socketserver
import threading
from typing import Iterator

log = logging.getLogger("petseg.train")


class _LineHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for raw in self.rfile:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                record = json.loads(line)
            except ValueError:
                record = {"message": line}
            self.server.records.append(record)  # type: ignore[attr-defined]
            log.info("%s", record.get("message", line))


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _LineHandler)
        self.records: list[dict] = []


@contextlib.contextmanager
def progress_server(*, host: str) -> Iterator[tuple[tuple[str, int], list[dict]]]:
    """Serve on ``host`` (the address executors use to reach the driver) and an ephemeral port.

    Lines are JSON objects with a ``message``, which the driver logs as it arrives (plain text is
    accepted too). Yields ``((host, port), records)``; ``records`` collects every line received.
    """
    server = _Server(("0.0.0.0", 0))
    thread = threading.Thread(target=server.serve_forever, name="petseg-progress", daemon=True)
    thread.start()
    try:
        yield (host, server.server_address[1]), server.records
    finally:
        server.shutdown()
        server.server_close()


class ProgressClient:
    """Send lines to a :func:`progress_server`; never fails the training if the driver is unreachable."""

    def __init__(self, address: tuple[str, int] | None, *, timeout: float = 10.0) -> None:
        self._sock: socket.socket | None = None
        if address is None:
            return
        try:
            self._sock = socket.create_connection(tuple(address), timeout=timeout)
        except OSError as exc:
            logging.getLogger(__name__).warning("progress server %s unreachable (%s); lines stay local", address, exc)

    def send(self, line: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendall(line.rstrip("\n").encode("utf-8") + b"\n")
        except OSError:
            self._sock = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
