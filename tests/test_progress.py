"""The driver's progress server, over real sockets: only the run's workers get a line in."""

from __future__ import annotations

import json
import logging
import socket
import threading
from typing import Iterator

import pytest

from petseg.train.progress import ProgressClient, progress_server

#: Seconds a wait may take before the test fails: a safety net against a server that never keeps the
#: line, not a pace the server must keep; a wait normally ends within milliseconds of the line. Also
#: the servers' drain_timeout: leaving waits for the connections' last lines to be read, not a fixed time.
SAFETY_TIMEOUT = 300.0


class _ServerLog(logging.Handler):
    """Wakes a waiting test whenever the progress server logs: it logs each line it keeps right after
    keeping it (on its own threads), so a wait ends as soon as the line is there."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self._logged = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._logged:
            self._logged.notify_all()

    def wait_for(self, records: list, count: int) -> None:
        """Return once the server has kept ``count`` records; fail after :data:`SAFETY_TIMEOUT` seconds."""
        with self._logged:
            kept = self._logged.wait_for(lambda: len(records) >= count, timeout=SAFETY_TIMEOUT)
        assert kept, f"the server kept {len(records)} lines, not {count}, in {SAFETY_TIMEOUT} s: {records}"


@pytest.fixture
def server_log() -> Iterator[_ServerLog]:
    """A :class:`_ServerLog` on the progress server's logger, which logs at every level meanwhile."""
    logger = logging.getLogger("petseg.train")
    handler, level = _ServerLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # else a kept line's INFO record never reaches the handler
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def _raw(address, *lines: bytes) -> None:
    """Connect as anyone may, send ``lines`` and close."""
    with socket.create_connection((address[0], address[1]), timeout=10) as sock:
        sock.sendall(b"".join(lines))


def test_only_a_connection_with_the_secret_reaches_the_log_and_the_records(caplog, capfd, server_log):
    caplog.set_level(logging.DEBUG)
    with progress_server(host="127.0.0.1", drain_timeout=SAFETY_TIMEOUT) as (address, records):
        forged = json.dumps({"message": "epoch 9/9 forged"}).encode() + b"\n"
        _raw(address, forged, b"forged plain text\n")  # no secret at all
        _raw(address, b"0" * 32 + b"\n", forged)  # a wrong secret of the right length
        _raw(address, b"\n", forged)  # an empty first line
        client = ProgressClient(address)
        assert client.send(json.dumps({"message": "epoch 1/2 loss=0.5", "epoch": 1}))
        server_log.wait_for(records, 1)
        client.send("epoch 2/2 as plain text")
        client.close()
    assert records == [{"message": "epoch 1/2 loss=0.5", "epoch": 1}, {"message": "epoch 2/2 as plain text"}]
    shown = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert shown == ["epoch 1/2 loss=0.5", "epoch 2/2 as plain text"]
    out, err = capfd.readouterr()
    assert "forged" not in out + err and "Traceback" not in out + err


def test_a_line_that_is_not_a_json_object_does_not_end_the_connection(server_log):
    with progress_server(host="127.0.0.1", drain_timeout=SAFETY_TIMEOUT) as (address, records):
        client = ProgressClient(address)
        client.send("first")
        server_log.wait_for(records, 1)
        for line in ("[1, 2]", "null", "7", '"text"', '{"message": 3}', "[" * 5000 + "]" * 5000, "last"):
            client.send(line)
        client.close()
    assert [r["message"] for r in records] == [
        "first", "[1, 2]", "null", "7", '"text"', '{"message": 3}', "[" * 5000 + "]" * 5000, "last"
    ]


def test_an_over_long_line_is_dropped_and_the_next_one_kept(server_log):
    with progress_server(host="127.0.0.1", max_line_bytes=100, drain_timeout=SAFETY_TIMEOUT) as (address, records):
        client = ProgressClient(address)
        client.send("first")
        server_log.wait_for(records, 1)
        client.send("x" * 100)  # at the bound: kept
        client.send("y" * 1000)  # over it: dropped whole, not cut into pieces
        client.send("after")
        client.close()
    assert [r["message"] for r in records] == ["first", "x" * 100, "after"]


def test_records_are_bounded_and_the_first_ones_kept(caplog, server_log):
    with progress_server(host="127.0.0.1", max_records=5, drain_timeout=SAFETY_TIMEOUT) as (address, records):
        client = ProgressClient(address)
        client.send("line 0")
        server_log.wait_for(records, 1)
        for i in range(1, 50):
            client.send(f"line {i}")
        client.close()
    assert [r["message"] for r in records] == [f"line {i}" for i in range(5)]
    assert sum("dropping the rest" in r.getMessage() for r in caplog.records) == 1


def test_the_server_listens_only_on_the_address_it_is_given():
    with progress_server(host="127.0.0.1") as (address, _):
        listening = _listening_sockets(address[1])
    assert listening == ["127.0.0.1"]


def _listening_sockets(port: int) -> list[str]:
    """Local addresses of TCP sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            host_hex, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                if len(host_hex) == 8:
                    found.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(host_hex)[::-1]))
                else:
                    found.append(host_hex)
    return found


def test_a_client_without_a_server_keeps_its_lines_local():
    from petseg.train.progress import ProgressAddress

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once this socket is closed
    client = ProgressClient(ProgressAddress("127.0.0.1", port, "secret"))
    assert not client.connected and client.send("epoch 1/1") is False
