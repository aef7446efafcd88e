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
