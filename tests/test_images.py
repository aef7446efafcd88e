import io

import numpy as np
import pytest
from PIL import Image

from petseg.data import decode, render
from petseg.errors import RejectedInput


def _bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pet():
    return render.synthetic_pet(3, seed=1, size=(200, 150))


@pytest.mark.parametrize(
    "mode,fmt",
    [("RGB", "JPEG"), ("RGB", "PNG"), ("P", "GIF"), ("L", "JPEG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("LA", "PNG")],
)
def test_decode_by_content_gives_rgb(pet, mode, fmt):
    data = _bytes(Image.fromarray(pet.image).convert(mode), fmt)
    rgb = decode.decode_rgb(data)
    assert rgb.shape == (150, 200, 3) and rgb.dtype == np.uint8
    if mode in ("RGB", "RGBA") and fmt == "PNG":
        np.testing.assert_array_equal(rgb, pet.image)  # lossless paths keep every pixel


def test_reduced_scale_jpeg_decode_keeps_min_side(pet):
    data = render.encode_jpeg(render.synthetic_pet(4, seed=1, size=(500, 375)).image)
    assert decode.decode_rgb(data, min_side=128).shape[:2] == (188, 250)  # libjpeg's 1/2 scale
    assert decode.decode_rgb(data).shape[:2] == (375, 500)


@pytest.mark.parametrize(
    "payload,reason",
    [(b"", "image_empty"), (None, "image_empty"), (b"GIF89a\x00\x00", "image_undecodable"), (b"hello", "image_undecodable")],
)
def test_bad_image_bytes_are_rejected_with_reason(payload, reason):
    with pytest.raises(RejectedInput) as err:
        decode.decode_rgb(payload)
    assert err.value.reason == reason


def test_mask_resize_is_nearest_and_keeps_label_set(pet):
    labels = pet.trimap - 1
    small = decode.resize_mask(labels, 64)
    assert set(np.unique(small)) <= {0, 1, 2}
    assert small.shape == (64, 64) and small.dtype == np.uint8
    # Every output pixel is a copy of some input pixel: the top-left one maps to the top-left.
    assert small[0, 0] == labels[0, 0]
    back = decode.resize_mask(small, (150, 200))
    assert back.shape == (150, 200)


def test_prepare_example(pet):
    ex = decode.prepare_example(render.encode_jpeg(pet.image), render.encode_png(pet.trimap), size=64)
    assert ex.image.shape == (64, 64, 3) and ex.mask.shape == (64, 64)
    assert (ex.height, ex.width) == (150, 200)
    np.testing.assert_array_equal(ex.mask, decode.resize_mask(pet.trimap - 1, 64))
    assert set(np.unique(ex.mask)) == {0, 1, 2}


def test_prepare_example_rejections(pet):
    jpeg = render.encode_jpeg(pet.image)
    wrong = render.encode_png(pet.trimap[:100, :120])
    with pytest.raises(RejectedInput, match="image is 200x150 but its mask is 120x100") as err:
        decode.prepare_example(jpeg, wrong, size=64)
    assert err.value.reason == "size_mismatch"
    bad = pet.trimap.copy()
    bad[0, 0], bad[1, 1] = 0, 9
    with pytest.raises(RejectedInput, match=r"values \[0, 9\]") as err:
        decode.prepare_example(jpeg, render.encode_png(bad), size=64)
    assert err.value.reason == "mask_values_out_of_range"
    color = np.stack([pet.trimap, pet.trimap, pet.trimap * 0 + 1], axis=-1)
    with pytest.raises(RejectedInput) as err:
        decode.prepare_example(jpeg, render.encode_png(color), size=64)
    assert err.value.reason == "mask_not_single_channel"
    gray3 = np.stack([pet.trimap] * 3, axis=-1)
    assert decode.prepare_example(jpeg, render.encode_png(gray3), size=64).mask.shape == (64, 64)
    with pytest.raises(RejectedInput) as err:
        decode.prepare_example(jpeg, None, size=64)
    assert err.value.reason == "mask_empty"
    # A 16-bit trimap: 258 must not wrap round to a valid 2; one holding 1..3 is fine.
    wide = pet.trimap.astype(np.uint16)
    assert decode.prepare_example(jpeg, _png16(wide), size=64).mask.max() == 2
    wide[5, 5] = 258
    with pytest.raises(RejectedInput, match="uint16 and holds values from 1 to 258") as err:
        decode.prepare_example(jpeg, _png16(wide), size=64)
    assert err.value.reason == "mask_values_out_of_range"


def _png16(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_synthetic_is_deterministic_and_has_three_classes():
    a, b = render.synthetic_pet(5, seed=2), render.synthetic_pet(5, seed=2)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.trimap, b.trimap)
    assert set(np.unique(a.trimap)) == {1, 2, 3}
    assert not np.array_equal(a.image, render.synthetic_pet(5, seed=3).image)
    splits = [render.split_for(i, test_fraction=0.25) for i in range(100)]
    assert splits.count("test") == 25


def test_images_over_the_pixel_limit_are_refused_from_the_header(pet):
    from conftest import png_bomb

    data = render.encode_png(pet.image)  # 200x150 = 30,000 pixels
    assert decode.decode_for_model(data, size=32, max_pixels=30_000)[1] == (150, 200)
    with pytest.raises(RejectedInput, match=r"image_too_large: the image is 200x150 = 30000 pixels, over "
                                            r"data.max_image_pixels=29999"):
        decode.decode_for_model(data, size=32, max_pixels=29_999)
    with pytest.raises(RejectedInput, match="mask_too_large"):
        decode.decode_trimap(render.encode_png(pet.trimap), max_pixels=29_999)
    # A header claiming 200 MP over a few bytes: refused by default, before Pillow inflates anything
    # (Pillow's own DecompressionBombError is a plain Exception, outside the decode errors).
    bomb = png_bomb(20_000, 10_000)
    for decode_bomb in (lambda: decode.decode_for_model(bomb, size=32), lambda: decode.decode_rgb(bomb),
                        lambda: decode.prepare_example(bomb, render.encode_png(pet.trimap), size=32)):
        with pytest.raises(RejectedInput, match="image_too_large: .*200000000 pixels"):
            decode_bomb()
    with pytest.raises(RejectedInput, match="image_too_large: the image is 9000x8000 = 72000000 pixels, over "
                                            "data.max_image_pixels=64000000"):
        decode.decode_rgb(png_bomb(9_000, 8_000))  # under Pillow's limit, over petseg's default


def _npy_header(shape: tuple[int, ...], *, descr: str = "|u1") -> bytes:
    """The header ``np.save`` writes for an array of ``shape``, without the array."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_npy_headers_are_checked_before_anything_is_allocated(pet):
    # 130 bytes named like a photo whose header claims 3 TB: np.load would allocate that first.
    claims_terabytes = _npy_header((10**6, 10**6, 3)) + b"\0\0"
    assert len(claims_terabytes) == 130
    for decode_it in (lambda: decode.decode_rgb(claims_terabytes),
                      lambda: decode.decode_for_model(claims_terabytes, size=32),
                      lambda: decode.prepare_example(claims_terabytes, render.encode_png(pet.trimap), size=32)):
        with pytest.raises(RejectedInput, match=r"image_too_large: .*shape \(1000000, 1000000, 3\) = 1000000000000 "
                                                r"pixels, over data.max_image_pixels=64000000") as err:
            decode_it()
        assert err.value.reason == "image_too_large"
    with pytest.raises(RejectedInput, match=r"mask_too_large: .*\(1000000, 1000000\)"):
        decode.decode_label_mask(_npy_header((10**6, 10**6)) + b"\0\0")
    # Within the limit but with the pixels missing: 48 MB claimed, 2 bytes present.
    with pytest.raises(RejectedInput, match=r"image_undecodable: .*\(4000, 4000, 3\) = 48000000 bytes, but only 2"):
        decode.decode_rgb(_npy_header((4000, 4000, 3)) + b"\0\0")
    with pytest.raises(RejectedInput, match=r"image_undecodable: .*dtype float32"):
        decode.decode_rgb(_npy_header((2, 2, 3), descr="<f4") + bytes(48))
    # np.save's own output still decodes, colour and grey.
    for array in (pet.image, pet.image[..., 1], np.asfortranarray(pet.image)):
        buf = io.BytesIO()
        np.save(buf, array)
        rgb = decode.decode_rgb(buf.getvalue())
        np.testing.assert_array_equal(rgb, array if array.ndim == 3 else np.stack([array] * 3, axis=-1))
    buf = io.BytesIO()
    np.save(buf, pet.trimap - 1)
    np.testing.assert_array_equal(decode.decode_label_mask(buf.getvalue()), pet.trimap - 1)


def test_running_out_of_memory_while_decoding_is_a_rejection(tmp_path):
    import subprocess
    import sys

    from conftest import png_bomb

    # 64 MP, within the default limit, decoded in a process allowed 64 MB more than it has mapped: Pillow
    # raises MemoryError allocating the pixels. A real limit, not a patched allocator.
    (tmp_path / "big.png").write_bytes(png_bomb(8_000, 8_000))
    script = """
import resource, sys
from petseg.data import decode
from petseg.errors import RejectedInput
data = open(sys.argv[1], "rb").read()
mapped = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + 64 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
for decode_it in (lambda: decode.decode_rgb(data), lambda: decode.decode_trimap(data)):
    try:
        decode_it()
    except RejectedInput as exc:
        print(exc)
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.png")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("image_too_large: decoding the 8000x8000 image ran out of memory")
    assert lines[1].startswith("mask_too_large: decoding the 8000x8000 mask ran out of memory")


def _gray16(level: int, *, mode: str, fmt: str) -> bytes:
    """A 12x10 grey image of 16-bit ``level`` in Pillow ``mode``, saved as ``fmt``."""
    samples = np.full((10, 12), level, np.uint16)
    img = {"I;16": lambda: Image.fromarray(samples), "I": lambda: Image.fromarray(samples.astype(np.int32)),
           "I;16B": lambda: Image.frombytes("I;16B", (12, 10), samples.astype(">u2").tobytes())}[mode]()
    assert img.mode == mode
    return _bytes(img, fmt)


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("I;16B", "TIFF"), ("I", "TIFF")])
def test_16_bit_grey_is_scaled_to_8_bits_not_clipped(pet, mode, fmt):
    data = _gray16(40_000, mode=mode, fmt=fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    rgb = decode.decode_rgb(data)
    assert rgb.shape == (10, 12, 3) and rgb.dtype == np.uint8
    assert (rgb == 156).all(), np.unique(rgb)  # 40000 / 256; clipping gave 255
    assert (decode.decode_for_model(data, size=8)[0] == 156).all()
    trimap = render.encode_png(np.full((10, 12), 2, np.uint8))
    assert (decode.prepare_example(data, trimap, size=8).image == 156).all()
    assert (decode.decode_rgb(_gray16(65_535, mode=mode, fmt=fmt)) == 255).all()
    assert (decode.decode_rgb(_gray16(255, mode=mode, fmt=fmt)) == 0).all()


def test_16_bit_masks_keep_their_label_values(pet):
    # Masks hold labels, not intensities: a 16-bit mask is read as its values, never scaled.
    labels = pet.trimap - 1
    decoded = decode.decode_label_mask(_png16(labels.astype(np.uint16)))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, labels)
    trimap = decode.decode_trimap(_png16(pet.trimap.astype(np.uint16)))
    assert trimap.dtype == np.uint8
    np.testing.assert_array_equal(trimap, pet.trimap)
    wide = labels.astype(np.uint16)
    wide[5, 5] = 258  # would wrap round to a valid-looking 2 in uint8
    with pytest.raises(RejectedInput, match="uint16 and holds values from 0 to 258") as err:
        decode.decode_label_mask(_png16(wide))
    assert err.value.reason == "mask_values_out_of_range"
    with pytest.raises(RejectedInput) as err:
        decode.decode_label_mask(render.encode_png(labels), max_pixels=29_999)
    assert err.value.reason == "mask_too_large"


def _with_orientation(img: Image.Image, orientation: int, fmt: str) -> bytes:
    """``img`` saved as ``fmt`` with EXIF ``Orientation`` set to ``orientation``."""
    from PIL import ExifTags

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif)
    return buf.getvalue()


def _as_shown(data: bytes, *, draft: int | None = None) -> np.ndarray:
    """The pixels of ``data`` as viewers show them, by Pillow's own EXIF transposition."""
    from PIL import ImageOps

    img = Image.open(io.BytesIO(data))
    if draft is not None:
        img.draft("RGB", (draft, draft))
    return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_viewers_show_it(orientation):
    photo = Image.fromarray(render.synthetic_pet(8, seed=1, size=(40, 20)).image)  # 40 wide, 20 high
    data = _with_orientation(photo, orientation, "JPEG")
    shown = _as_shown(data)
    assert shown.shape == ((20, 40, 3) if orientation < 5 else (40, 20, 3))
    np.testing.assert_array_equal(decode.decode_rgb(data), shown)
    image, size = decode.decode_for_model(data, size=16)
    assert size == shown.shape[:2]
    np.testing.assert_array_equal(image, decode.resize_image(shown, 16))


def test_exif_orientation_with_reduced_scale_jpeg_decode():
    photo = Image.fromarray(render.synthetic_pet(9, seed=1, size=(400, 200)).image)
    data = _with_orientation(photo, 6, "JPEG")
    rotated = decode.decode_rgb(data, min_side=64)
    assert rotated.shape == (200, 100, 3)  # libjpeg's 1/2 scale, then turned upright
    np.testing.assert_array_equal(rotated, _as_shown(data, draft=64))
    assert decode.decode_for_model(data, size=64)[1] == (400, 200)


def test_exif_orientation_in_ingest_and_in_masks():
    pet = render.synthetic_pet(10, seed=1, size=(40, 20))
    data = _with_orientation(Image.fromarray(pet.image), 6, "JPEG")
    upright_trimap = np.ascontiguousarray(np.rot90(pet.trimap, k=-1))  # 20 wide, 40 high, as the photo is shown
    example = decode.prepare_example(data, render.encode_png(upright_trimap), size=16)
    assert (example.height, example.width) == (40, 20)
    np.testing.assert_array_equal(example.mask, decode.resize_mask(upright_trimap - 1, 16))
    # A mask with its own orientation tag is turned upright by it, as the photo is.
    tagged = _with_orientation(Image.fromarray(pet.trimap), 6, "PNG")
    np.testing.assert_array_equal(decode.decode_trimap(tagged), upright_trimap)
    tagged_labels = _with_orientation(Image.fromarray(pet.trimap - 1), 6, "PNG")
    np.testing.assert_array_equal(decode.decode_label_mask(tagged_labels), upright_trimap - 1)
    example = decode.prepare_example(data, tagged, size=16)
    np.testing.assert_array_equal(example.mask, decode.resize_mask(upright_trimap - 1, 16))
