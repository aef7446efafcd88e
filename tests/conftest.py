"""Shared fixtures: one local[2] SparkSession for the whole run, and generated input data."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from petseg import config, env
from petseg.data import render

ROOT = Path(__file__).resolve().parents[1]

#: The Spark 4 environment (make spark4-env): Python 3.12, pyspark 4.0, pyarrow 21, numpy 2, no petastorm.
SPARK4_VENV = ROOT / ".venv-spark4"

#: Skips a Spark 4 module where the environment was not built, except in CI, where it must be there.
needs_spark4 = pytest.mark.skipif(
    not (SPARK4_VENV / "bin" / "python").exists() and not os.environ.get("CI"),
    reason="the Spark 4 environment is missing: run `make spark4-env` (make test builds it)",
)


def run_spark4(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command of the Spark 4 environment (``petseg``, ``python``: its bin/ is searched first), with
    none of this environment's Python or Spark variables; MLflow's local file stores allowed, as the
    tests use them."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "SPARK_", "PYTHON"))}
    command = [str(SPARK4_VENV / "bin" / args[0]) if (SPARK4_VENV / "bin" / args[0]).exists() else args[0], *args[1:]]
    return subprocess.run(command, cwd=ROOT, env={**clean, "MLFLOW_ALLOW_FILE_STORE": "true", **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    env.prepare_process_environment(master="local[2]")
    from pyspark.sql import SparkSession

    warehouse = tmp_path_factory.mktemp("warehouse")
    session = (
        SparkSession.builder.master("local[2]")
        .appName("petseg-tests")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "64")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.warehouse.dir", str(warehouse))
        .config("spark.driver.extraJavaOptions", f"-Dderby.system.home={warehouse}")
        # The tests' MLflow stores are local folders, which MLflow 3 opens only behind this switch:
        # the UDFs' workers fetch registered models from them.
        .config("spark.executorEnv.MLFLOW_ALLOW_FILE_STORE", "true")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


class OxfordFixture:
    """A small Oxford-layout folder with good pairs and every known kind of bad input.

    ``expected_reasons`` maps stem -> reason for every input that must be rejected;
    ``accepted`` maps stem -> split for every input that must be written.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pets = render.write_oxford_layout(root, count=12, seed=7, test_fraction=0.5)
        self.accepted: dict[str, str] = {p.stem: p.split for p in self.pets}
        self.expected_reasons: dict[str, str] = {}
        images, trimaps = root / "images", root / "annotations" / "trimaps"

        def add_pair(stem: str, image_bytes: bytes, trimap: np.ndarray | bytes, split: str | None = "train") -> None:
            (images / f"{stem}.jpg").write_bytes(image_bytes)
            data = trimap if isinstance(trimap, bytes) else render.encode_png(trimap)
            (trimaps / f"{stem}.png").write_bytes(data)
            if split:
                name = "trainval.txt" if split == "train" else "test.txt"
                with open(root / "annotations" / name, "a") as f:
                    f.write(f"{stem} 1 1 1\n")

        pet = render.synthetic_pet(100, seed=7, size=(90, 70))
        rgb = Image.fromarray(pet.image)
        # Decodable by content although the extension lies, or unusual colour modes: all accepted.
        add_pair("Gif_1", _encode(rgb.convert("P"), "GIF"), pet.trimap)
        add_pair("Pngjpg_1", _encode(rgb, "PNG"), pet.trimap, split="test")
        add_pair("Gray_1", _encode(rgb.convert("L"), "JPEG"), pet.trimap)
        add_pair("Rgba_1", _encode(rgb.convert("RGBA"), "PNG"), pet.trimap)
        add_pair("Cmyk_1", _encode(rgb.convert("CMYK"), "JPEG"), pet.trimap, split="test")
        for stem, split in [("Gif_1", "train"), ("Pngjpg_1", "test"), ("Gray_1", "train"), ("Rgba_1", "train"), ("Cmyk_1", "test")]:
            self.accepted[stem] = split
        self.modes_pet = pet

        jpeg = render.encode_jpeg(pet.image)
        add_pair("Broken_1", b"this is not an image at all", pet.trimap)
        add_pair("Empty_1", b"", pet.trimap)
        add_pair("Truncated_1", jpeg[: len(jpeg) // 3], pet.trimap)
        add_pair("Emptymask_1", jpeg, b"")
        add_pair("Badmask_1", jpeg, b"\x89PNG garbage")
        add_pair("Mismatch_1", jpeg, render.synthetic_pet(101, seed=7, size=(60, 50)).trimap)
        bad_values = pet.trimap.copy()
        bad_values[0, :5] = 7
        add_pair("Values_1", jpeg, bad_values)
        add_pair("Unlisted_1", jpeg, pet.trimap, split=None)
        add_pair("Both_1", jpeg, pet.trimap, split="train")
        with open(root / "annotations" / "test.txt", "a") as f:
            f.write("Both_1 1 1 1\n")
        (images / "Nomask_1.jpg").write_bytes(jpeg)
        with open(root / "annotations" / "trainval.txt", "a") as f:
            f.write("Nomask_1 1 1 1\n")
        (trimaps / "Noimage_1.png").write_bytes(render.encode_png(pet.trimap))
        with open(root / "annotations" / "trainval.txt", "a") as f:
            f.write("Ghost_1 1 1 1\n")
        # Files the real release carries that are not examples: skipped, not rejected.
        (images / "Abyssinian_100.mat").write_bytes(b"MATLAB 5.0")
        (trimaps / "._Gif_1.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
        self.expected_reasons.update(
            {
                "Broken_1": "image_undecodable",
                "Empty_1": "image_empty",
                "Truncated_1": "image_undecodable",
                "Emptymask_1": "mask_empty",
                "Badmask_1": "mask_undecodable",
                "Mismatch_1": "size_mismatch",
                "Values_1": "mask_values_out_of_range",
                "Unlisted_1": "not_in_split_lists",
                "Both_1": "in_both_split_lists",
                "Nomask_1": "mask_missing",
                "Noimage_1": "image_missing",
                "Ghost_1": "listed_files_missing",
            }
        )


@pytest.fixture(scope="session")
def oxford_dir(tmp_path_factory) -> OxfordFixture:
    return OxfordFixture(tmp_path_factory.mktemp("oxford"))


def data_config(**overrides) -> config.DataConfig:
    """A validated data section from base.yaml plus ``overrides`` (key -> value)."""
    items = [f"data.{k}={v}" for k, v in overrides.items()]
    return config.load(overrides=items).data


def synthetic_dataset(spark, folder: Path, **overrides) -> str:
    """Ingest synthetic pets into ``folder/pets`` with data ``overrides``; return the dataset URL."""
    from petseg.ingest import run_ingest

    data = data_config(source="synthetic", dataset=str(folder / "pets"), **overrides)
    run_ingest(spark, data=data)
    return data.dataset


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory) -> Path:
    """A training run's folder as inference reads it: a small untrained 32x32 U-Net and its metadata."""
    env.prepare_process_environment(master="local[2]")  # tf-keras, before TensorFlow is imported
    from petseg.model import artifact, build_unet

    run = tmp_path_factory.mktemp("run")
    model = build_unet(image_size=32, n_depth=2, encoder_weights="none", seed=3)
    model.save(str(run / artifact.MODEL_FOLDER), include_optimizer=False)
    artifact.write_metadata(run, image_size=32, preprocessing="unit_scale", run_id="run-under-test")
    return run


def write_pet_photos(folder: Path, *, count: int = 4, seed: int = 6, size: tuple[int, int] = (48, 40)) -> list:
    """``count`` synthetic pets as ``folder/p<i>.png``; the pets, for the masks to be checked against."""
    folder.mkdir()
    pets = [render.synthetic_pet(i, seed=seed, size=size) for i in range(count)]
    for i, pet in enumerate(pets):
        (folder / f"p{i}.png").write_bytes(render.encode_png(pet.image))
    return pets


def assert_masks_are_a_fresh_predict(spark, output: Path, *, model, pets: list, preprocessing: str, version: str) -> None:
    """Every row :func:`write_pet_photos`' photos got in the inference ``output`` carries ``version`` and the
    mask a local ``model.predict`` gives, at the photo's own size."""
    import cv2

    from petseg.data import decode
    from petseg.model import preprocess

    size = model.input_shape[1]
    pixels = preprocess(np.stack([decode.resize_image(p.image, size) for p in pets]), preprocessing)
    expected = np.argmax(model.predict(pixels, verbose=0), axis=-1).astype(np.uint8)
    rows = spark.read.parquet(str(output)).collect()
    assert len(rows) == len(pets)
    for row in rows:
        i = int(row["path"].rsplit("/p", 1)[1].split(".")[0])
        assert row["model_version"] == version
        mask = cv2.imdecode(np.frombuffer(row["mask_png"], np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(mask, decode.resize_mask(expected[i], pets[i].image.shape[:2]))


def load_job_config(job: str, *overrides: str) -> config.Config:
    """A validated config from base.yaml plus ``key=value`` overrides, checked for ``job``."""
    return config.load(overrides=list(overrides), job=job)


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels over a few bytes of data: what a
    decompression bomb looks like to a decoder that trusts the header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")
