"""Ingest and inference at scale: 2 GB executors and a 1 GB driver, at several photo counts. Prints JSON.

For each of --counts, writes an Oxford-layout folder of that many photos (500x375 JPEG like the
release's; --distinct different pets, repeated under distinct names, so writing 100,000 takes a
minute), then runs `petseg ingest` on it (128x128 raw examples, the recipe's) and `petseg infer` on
its images/ folder (a nearly free 32x32 model, so the figure is the data path's), each as its own
process with spark.driver.memory=1g and two 1-core executors of 2 GB in their own JVMs
(local-cluster), as spark-submit on a cluster would start them. Per job: seconds and seconds per
1,000 images, the peak resident memory (VmHWM) of the driver's JVM and of the largest executor JVM,
and whether any executor ran out of heap or Spark warned of a task over its recommended 1,000 KiB.
Goals: every job passes; ingest's seconds per 1,000 images at the largest count no higher than at
the smallest.

    python bench/scale.py [--counts 4000 100000] [--cores 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
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


def run_job(args: list[str], *, log: Path, images: int) -> dict:
    """``petseg <args>`` in its own process: its seconds, report lines, and the peak RSS of the
    driver's JVM and of the largest executor JVM."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "petseg.cli", *args], stdout=out, stderr=subprocess.STDOUT)
        driver_kb = executor_kb = 0
        while proc.poll() is None:
            driver, executors = _jvm_peaks_kb(proc.pid)
            driver_kb, executor_kb = max(driver_kb, driver), max([executor_kb, *executors])
            time.sleep(0.5)
    seconds = time.perf_counter() - start
    text = log.read_text()
    lines = text.splitlines()
    failed = f"failed ({proc.returncode}): {lines[-1] if lines else ''}" if proc.returncode else None
    return {"passed": not proc.returncode, **({"failure": failed} if failed else {}),
            "seconds": round(seconds, 1), "seconds_per_1000_images": round(1000 * seconds / images, 2),
            "driver_jvm_peak_mb": round(driver_kb / 1024), "executor_jvm_peak_mb": round(executor_kb / 1024),
            "executor_oom": "OutOfMemoryError" in text,
            "task_size_warnings": text.count("contains a task of very large size"),
            "report": [line for line in lines if line.startswith(("ingest:", "infer:", "  seconds"))]}


def _jvm_peaks_kb(pid: int) -> tuple[int, list[int]]:
    """VmHWM of the driver JVM (the java process below ``pid`` with no java process between them) and
    of each executor JVM (java processes below the driver's: local-cluster's executors are its children)."""
    driver, executors = 0, []
    for proc in Path("/proc").glob("[0-9]*"):
        chain = _ancestors(int(proc.name))
        if pid not in chain or not _is_java(int(proc.name)):
            continue
        try:
            status = (proc / "status").read_text()
        except OSError:
            continue
        peak = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0)
        if any(_is_java(p) for p in chain[:chain.index(pid)]):
            executors.append(peak)
        else:
            driver = peak
    return driver, executors


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
    parser.add_argument("--counts", type=int, nargs="+", default=[4000, 100000], help="photo counts, in one run")
    parser.add_argument("--distinct", type=int, default=200)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("conf", nargs="*", help="more key=value overrides for both jobs")
    args = parser.parse_args()

    env.prepare_process_environment(master=f"local[{args.cores}]")  # TF_USE_LEGACY_KERAS before TensorFlow
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from infer import FREE_DEPTH, FREE_SIZE, export_run  # bench/infer.py's nearly free model

    # Executors in their own JVMs, as on a cluster: the driver's 1 GB holds only what the driver does.
    common = [f"spark.master=local-cluster[{args.cores},1,{EXECUTOR_MB}]",
              f"spark.conf.spark.driver.memory={DRIVER_MEMORY}",
              f"spark.conf.spark.executor.memory={EXECUTOR_MB}m", *args.conf]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        export_run(run, image_size=FREE_SIZE, n_depth=FREE_DEPTH)
        for count in args.counts:
            work = Path(tmp) / str(count)
            root = work / "oxford"
            started = time.perf_counter()
            write_folder(root, count=count, distinct=args.distinct)
            written = time.perf_counter() - started
            ingest = run_job(["ingest", *common, "data.source=oxford", f"data.input={root}",
                              f"data.dataset={work / 'pets'}"], log=work / "ingest.log", images=count)
            infer = run_job(["infer", *common, f"infer.model={run}", f"infer.input={root / 'images'}",
                             f"infer.output={work / 'masks'}"], log=work / "infer.log", images=count)
            results.append({"images": count, "folder_write_seconds": round(written, 1), "ingest": ingest, "infer": infer})
            print(json.dumps(results[-1]), file=sys.stderr)
            shutil.rmtree(work)  # 100,000 photos and their dataset are ~10 GB
    smallest, largest = results[0], results[-1]
    print(json.dumps({
        "bench": "scale", "driver_memory": DRIVER_MEMORY, "executor_mb": EXECUTOR_MB, "spark_cores": args.cores,
        "runs": results,
        "all_passed": all(r[job]["passed"] for r in results for job in ("ingest", "infer")),
        "ingest_per_1000_ratio_largest_to_smallest": round(
            largest["ingest"]["seconds_per_1000_images"] / smallest["ingest"]["seconds_per_1000_images"], 2),
        "goal_ratio_at_most": 1.0,
    }))


if __name__ == "__main__":
    main()
