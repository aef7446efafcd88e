"""Deterministic synthetic pets: textured backgrounds, a pet-like shape, and an Oxford-style trimap.

Example ``i`` of seed ``s`` is the same on every machine and every run, so executors can generate
any slice of a dataset independently, and tests can rebuild the exact pixels they expect.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

#: Breed-like stems in the Oxford naming scheme: capitalised = cat, lower case = dog.
BREEDS = ("Abyssinian", "Bengal", "Persian", "Siamese", "beagle", "boxer", "pug", "samoyed")
#: Trimap values as stored by Oxford-IIIT: 1 pet, 2 background, 3 border.
PET, BACKGROUND, BORDER = 1, 2, 3


@dataclass(frozen=True)
class SyntheticPet:
    stem: str
    split: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    trimap: np.ndarray  # (H, W) uint8 with values 1..3


def stem_for(index: int) -> str:
    return f"{BREEDS[index % len(BREEDS)]}_{index}"


def split_for(index: int, *, test_fraction: float) -> str:
    """Spread exactly round(n * test_fraction) test examples evenly over the first n indices."""
    return "test" if math.floor((index + 1) * test_fraction) > math.floor(index * test_fraction) else "train"


def _texture(rng: np.random.Generator, height: int, width: int, base: np.ndarray, contrast: float) -> np.ndarray:
    coarse = rng.normal(0.0, contrast, (max(2, height // 24), max(2, width // 24), 3))
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    fine = rng.normal(0.0, contrast / 3, (height, width, 3))
    return base + smooth + fine


def synthetic_pet(
    index: int, *, seed: int, test_fraction: float = 0.2, size: tuple[int, int] | None = None
) -> SyntheticPet:
    """Render synthetic pet ``index``.

    Parameters
    ----------
    index, seed
        Together they fix every pixel.
    test_fraction
        Share of indices assigned to the test split.
    size
        ``(width, height)``; by default each pet gets its own size between 160 and 400 pixels a side,
        as real photos vary.
    """
    rng = np.random.default_rng([seed, index])
    if size is None:
        width, height = int(rng.integers(160, 401)), int(rng.integers(160, 401))
    else:
        width, height = size
    background = _texture(rng, height, width, rng.uniform(40, 215, 3), contrast=rng.uniform(10, 40))
    stripes = np.sin(np.arange(width) / rng.uniform(3, 12) + rng.uniform(0, 6.3))[None, :, None]
    image = background + stripes * rng.uniform(0, 25)

    # The pet: a body ellipse, a head disc and two ears, in one fur colour with its own texture.
    shape = np.zeros((height, width), np.uint8)
    side = min(width, height)
    cx, cy = int(width * rng.uniform(0.35, 0.65)), int(height * rng.uniform(0.4, 0.65))
    axes = (int(side * rng.uniform(0.18, 0.3)), int(side * rng.uniform(0.12, 0.22)))
    cv2.ellipse(shape, (cx, cy), axes, float(rng.uniform(-30, 30)), 0, 360, 1, -1)
    head_r = int(side * rng.uniform(0.09, 0.14))
    hx = int(np.clip(cx + rng.choice([-1, 1]) * axes[0] * 0.9, head_r, width - head_r))
    hy = int(np.clip(cy - axes[1] * 0.8, head_r * 2, height - head_r))
    cv2.circle(shape, (hx, hy), head_r, 1, -1)
    for dx in (-1, 1):
        ear = np.array(
            [[hx + dx * head_r // 3, hy - head_r // 2], [hx + dx * head_r, hy - head_r // 3], [hx + dx * head_r, hy - head_r * 2]],
            np.int32,
        )
        cv2.fillPoly(shape, [ear], 1)
    fur = _texture(rng, height, width, rng.uniform(20, 235, 3), contrast=rng.uniform(8, 25))
    inside = shape.astype(bool)
    # Soften the edge a little, as a camera would, so the border class is a real transition.
    alpha = cv2.GaussianBlur(shape.astype(np.float32), (0, 0), sigmaX=1.0)[..., None]
    image = image * (1 - alpha) + fur * alpha
    image = np.clip(image, 0, 255).astype(np.uint8)

    # Oxford trimaps mark a band along the outline as "not classified"; ~2% of the short side wide.
    band = max(1, side // 50)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    outline = cv2.dilate(shape, kernel).astype(bool) & ~cv2.erode(shape, kernel).astype(bool)
    trimap = np.full((height, width), BACKGROUND, np.uint8)
    trimap[inside] = PET
    trimap[outline] = BORDER
    return SyntheticPet(stem_for(index), split_for(index, test_fraction=test_fraction), image, trimap)


def encode_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def encode_png(array: np.ndarray) -> bytes:
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def write_oxford_layout(
    root: str | os.PathLike,
    *,
    count: int,
    seed: int = 0,
    test_fraction: float = 0.5,
    size: tuple[int, int] | None = None,
    keep: bool = True,
) -> list[SyntheticPet]:
    """Write ``count`` synthetic pets in the layout of the Oxford-IIIT Pet release.

    ``images/<stem>.jpg``, ``annotations/trimaps/<stem>.png``, and the split lists
    ``annotations/trainval.txt`` and ``annotations/test.txt`` (``<stem> <class> <species> <breed>``).
    Returns the pets written, for tests to compare against; with ``keep=False`` none, so that a
    large folder (20,000 photos of 500x375 hold 15 GB of pixels) is written one pet at a time.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
    pets = []
    lists: dict[str, list[str]] = {"train": [], "test": []}
    for i in range(count):
        pet = synthetic_pet(i, seed=seed, test_fraction=test_fraction, size=size)
        if keep:
            pets.append(pet)
        (root / "images" / f"{pet.stem}.jpg").write_bytes(encode_jpeg(pet.image))
        (root / "annotations" / "trimaps" / f"{pet.stem}.png").write_bytes(encode_png(pet.trimap))
        breed = i % len(BREEDS)
        species = 1 if BREEDS[breed][0].isupper() else 2
        lists[pet.split].append(f"{pet.stem} {breed + 1} {species} {breed + 1}")
    header = "#Image CLASS-ID SPECIES BREED ID\n"
    (root / "annotations" / "trainval.txt").write_text(header + "\n".join(lists["train"]) + "\n")
    (root / "annotations" / "test.txt").write_text(header + "\n".join(lists["test"]) + "\n")
    return pets
