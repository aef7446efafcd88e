"""Driver memory at scale: ingest and inference of a large folder with a 1 GB driver. Prints JSON.

Writes an Oxford-layout folder of --count photos (500x375 JPEG like the release's; --distinct
different pets, repeated under distinct names, so writing 20,000 takes seconds), then runs
`petseg ingest` on it and `petseg infer` on its images/ folder (a nearly free 32x32 model, so the
figure is the data path's), each as its own process with spark.driver.memory=1g and executors in
their own JVMs (local-cluster), as spark-submit on a cluster would start them. It reports each
job's rows, seconds and seconds per 1,000 images, and the peak resident memory of the driver's JVM
(VmHWM). Run it at two counts: the per-image cost must not grow.

    python bench/scale.py [--count 20000] [--cores 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from petseg import env

DRIVER_MEMORY = "1g"
#: Each executor's memory (one core each), enough for a task's Arrow batches and the cached decode.
EXECUTOR_MB = 2048


def write_folder(root: Path, *, count: int, distinct: int) -> None:
    from petseg.data import render

    pets = [render.synthetic_pet(i, seed=0, test_fraction=0.5, size=(500, 375)) for i in range(distinct)]
    encoded = [(render.encode_jpeg(p.image), render.encode_png(p.trimap), p.split) for p in pets]
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    lists: dict[str, list[str]] = {"train": [], "test": []}
    for i in range(count):
        image, trimap, split = encoded[i % distinct]
        stem = f"pet_{i:07d}"
        (root / "images" / f"{stem}.jpg").write_bytes(image)
        (root / "annotations" / "trimaps" / f"{stem}.png").write_bytes(trimap)
        lists[split].append(f"{stem} 1 1 1")
    (root / "annotations" / "trainval.txt").write_text("\n".join(lists["train"]) + "\n")
    (root / "annotations" / "test.txt").write_text("\n".join(lists["test"]) + "\n")


def run_job(args: list[str], *, log: Path) -> dict:
    """``petseg <args>`` in its own process; its seconds, report lines and the driver JVM's peak RSS."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "petseg.cli", *args], stdout=out, stderr=subprocess.STDOUT)
        peak_kb = 0
        while proc.poll() is None:
            peak_kb = max(peak_kb, _jvm_peak_kb(proc.pid))
            time.sleep(0.5)
    lines = log.read_text().splitlines()
    if proc.returncode:
        raise SystemExit(f"petseg {args[0]} failed ({proc.returncode}): {lines[-1] if lines else ''}")
    return {"seconds": round(time.perf_counter() - start, 1), "driver_jvm_peak_mb": round(peak_kb / 1024),
            "report": [line for line in lines if line.startswith(("ingest:", "infer:", "  seconds"))]}


def _jvm_peak_kb(pid: int) -> int:
    """VmHWM of the driver JVM: the java process below ``pid`` with no java process between them
    (under local-cluster the executors' JVMs are the driver's children)."""
    for proc in Path("/proc").glob("[0-9]*"):
        chain = _ancestors(int(proc.name))
        if pid not in chain or not _is_java(int(proc.name)):
            continue
        if any(_is_java(p) for p in chain[:chain.index(pid)]):
            continue
        try:
            status = (proc / "status").read_text()
        except OSError:
            continue
        return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0)
    return 0


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
        chain.append(pid)
    return chain


def _is_java(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip() == "java"
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--distinct", type=int, default=200)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("conf", nargs="*", help="more key=value overrides for both jobs")
    args = parser.parse_args()

    env.prepare_process_environment(master=f"local[{args.cores}]")  # TF_USE_LEGACY_KERAS before TensorFlow
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from infer import FREE_DEPTH, FREE_SIZE, export_run  # bench/infer.py's nearly free model

    with tempfile.TemporaryDirectory() as tmp:
        root, run = Path(tmp) / "oxford", Path(tmp) / "run"
        write_folder(root, count=args.count, distinct=args.distinct)
        export_run(run, image_size=FREE_SIZE, n_depth=FREE_DEPTH)
        # Executors in their own JVMs, as on a cluster: the driver's 1 GB holds only what the driver does.
        common = [f"spark.master=local-cluster[{args.cores},1,{EXECUTOR_MB}]",
                  f"spark.conf.spark.driver.memory={DRIVER_MEMORY}",
                  f"spark.conf.spark.executor.memory={EXECUTOR_MB}m", *args.conf]
        ingest = run_job(["ingest", *common, "data.source=oxford", f"data.input={root}",
                          f"data.dataset={Path(tmp) / 'pets'}"], log=Path(tmp) / "ingest.log")
        infer = run_job(["infer", *common, f"infer.model={run}", f"infer.input={root / 'images'}",
                         f"infer.output={Path(tmp) / 'masks'}"], log=Path(tmp) / "infer.log")
    for job in (ingest, infer):
        job["seconds_per_1000_images"] = round(1000 * job["seconds"] / args.count, 2)
    print(json.dumps({"bench": "scale", "images": args.count, "driver_memory": DRIVER_MEMORY,
                      "spark_cores": args.cores, "ingest": ingest, "infer": infer}))


if __name__ == "__main__":
    main()
