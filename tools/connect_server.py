"""Start or stop a local Spark Connect server, from the pip pyspark 4 that runs this script.

    .venv-spark4/bin/python tools/connect_server.py start --dir build/connect [--master local[2]]
    .venv-spark4/bin/python tools/connect_server.py stop --dir build/connect

pyspark 4.0's wheel carries the Connect server (``jars/spark-connect_2.13-*.jar``) but not Spark's
``sbin/start-connect-server.sh``, so ``start`` runs ``bin/spark-submit`` with the server's class,
as that script does. The server's Python workers run this interpreter, so they import the same
petseg and TensorFlow as the client; like serverless executors, they get no TF_USE_LEGACY_KERAS.
``start`` waits until the server accepts connections, records its process id and command line in
``<dir>/server.json`` and prints its ``sc://`` URL on the last line; ``stop`` ends exactly that
process and its workers, only while the id still runs the command it started. The server listens
on 127.0.0.1 only; its log is ``<dir>/server.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from standalone_cluster import HOST, free_port, launch, spark_home, stop_recorded, wait_until

STATE_FILE = "server.json"
#: The server class that Spark's sbin/start-connect-server.sh submits.
SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def start(*, directory: Path, master: str, timeout: float = 180.0) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / STATE_FILE).exists():
        raise SystemExit(f"{directory / STATE_FILE} exists: a server may be running; run `stop --dir {directory}` first")
    # The workers run this interpreter. TF_USE_LEGACY_KERAS is left out on purpose: serverless and
    # standard-access executors take no spark.executorEnv, so petseg's tasks must select tf-keras
    # themselves, and this server shows whether they do.
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env.update(SPARK_HOME=str(spark_home()), SPARK_LOCAL_IP=HOST, PYSPARK_PYTHON=sys.executable)
    port = free_port()
    url = f"sc://{HOST}:{port}"
    state: dict = {"url": url, "pids": [], "commands": {}}
    args = [
        "--class", SERVER_CLASS, "--name", "petseg Spark Connect server", "--master", master,
        "--conf", f"spark.connect.grpc.binding.address={HOST}", "--conf", f"spark.connect.grpc.binding.port={port}",
        "--conf", f"spark.driver.host={HOST}", "--conf", f"spark.driver.bindAddress={HOST}",
        "--conf", "spark.ui.enabled=false", "--conf", f"spark.pyspark.python={sys.executable}",
        "--conf", f"spark.local.dir={directory / 'tmp'}",
    ]
    server = launch(args, program="spark-submit", log=directory / "server.log", env=env, state=state)
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))  # written first, so `stop` can always clean up
    if wait_until(lambda: _accepts(port), server, timeout=timeout):
        return state
    stop(directory=directory)
    raise SystemExit(f"the Spark Connect server did not come up within {timeout:.0f} s; see {directory / 'server.log'}")


def stop(*, directory: Path) -> None:
    stop_recorded(directory / STATE_FILE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("start", "stop"))
    parser.add_argument("--dir", type=Path, default=Path("build/connect"), help="state and log folder")
    parser.add_argument("--master", default="local[2]", help="the server's Spark master")
    args = parser.parse_args()
    if args.command == "start":
        print(start(directory=args.dir.resolve(), master=args.master)["url"])
    else:
        stop(directory=args.dir.resolve())


if __name__ == "__main__":
    sys.exit(main())
