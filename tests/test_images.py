"""Image decoding: every odd or bad kind of input gives the expected pixels or a clear error."""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from benchmarks.synthetic import bomb_png
from dinoserve.errors import (
    DataError,
    DinoserveError,
    ImageDecodeError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    InputTypeError,
)
from dinoserve.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    l2_normalize,
    load_image,
    preprocess,
    fit_image,
    preprocess_batch,
    resize_and_crop,
    walk_images,
)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def test_rgb_png_roundtrips_exactly(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    p = tmp_path / "a.png"
    Image.fromarray(arr).save(p)
    for src in (p, str(p), p.read_bytes(), Image.open(p), arr):
        np.testing.assert_array_equal(rgb(load_image(src)), arr)


def test_grayscale_inputs_become_three_equal_channels():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    for src in (gray, gray[:, :, None], encode(Image.fromarray(gray, "L"))):
        out = rgb(load_image(src))
        assert out.shape == (3, 4, 3)
        for c in range(3):
            np.testing.assert_array_equal(out[:, :, c], gray)


def test_alpha_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    out = rgb(load_image(encode(Image.fromarray(rgba, "RGBA"))))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert 120 <= out[1, 0, 0] <= 135 and len(set(out[1, 0])) == 1
    # the same through a numpy array input
    np.testing.assert_array_equal(rgb(load_image(rgba)), out)


def test_palette_with_transparency_and_grey_alpha():
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    out = rgb(load_image(encode(pal, transparency=1)))
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[0, 1]) == (255, 255, 255)
    la = Image.new("LA", (1, 1), (0, 0))  # black, fully transparent
    assert tuple(rgb(load_image(encode(la)))[0, 0]) == (255, 255, 255)


def test_cmyk_jpeg_converts_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = rgb(load_image(encode(cmyk, "JPEG", quality=95)))
    r, g, b = out[4, 4].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_png_keeps_the_top_byte():
    arr16 = np.array([[0, 256 * 100 + 17, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr16)  # mode I;16
    out = rgb(load_image(encode(img)))
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255])
    np.testing.assert_array_equal(rgb(load_image(arr16))[0, :, 1], [0, 100, 255])


def test_exif_orientation_is_applied():
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = 255  # white left half, landscape
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = rgb(load_image(encode(img, "JPEG", exif=exif, quality=100)))
    assert out.shape == (20, 10, 3)  # now portrait
    assert out[2, 5].mean() > 200 and out[-3, 5].mean() < 50  # white on top


def test_missing_empty_and_non_image_files_name_the_input(tmp_path):
    with pytest.raises(ImageNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty.jpg.*empty"):
        load_image(empty)
    text = tmp_path / "notes.png"
    text.write_text("hello, not an image")
    with pytest.raises(ImageDecodeError, match="notes.png"):
        load_image(text)


def test_a_folder_passed_as_an_image_is_called_a_folder(tmp_path):
    (tmp_path / "photos.jpg").mkdir()
    with pytest.raises(ImageNotFoundError) as e:
        load_image(tmp_path / "photos.jpg")
    assert "is a folder, not an image file" in str(e.value) and "no such" not in str(e.value)


def test_truncated_file_is_refused(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(arr), "JPEG", quality=90)
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="cut.jpg.*truncated"):
        load_image(p)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(bomb_png(30000, 30000))  # 900 megapixels
    assert p.stat().st_size < 2_000_000
    with pytest.raises(ImageTooLargeError, match="bomb.png.*megapixels") as e:
        load_image(p)
    # One limit, ours, in one unit (Pillow refuses at twice its own limit and says so in pixels).
    message = str(e.value)
    assert re.findall(r"limit of ([\d.]+) megapixels", message) == [f"{MAX_PIXELS / 1e6:.3g}"]
    assert "900 megapixels" in message and "pixels)" not in message and "178956970" not in message
    # A smaller limit applies to ordinary images too.
    small = encode(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageTooLargeError):
        load_image(small, max_pixels=5000)


def test_bad_array_inputs():
    with pytest.raises(ImageError, match="float32"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageError, match="channels-first"):
        load_image(np.zeros((3, 4, 4, 2), np.uint8))
    with pytest.raises(InputTypeError, match="unsupported input type"):
        load_image(12345)


def test_batch_never_skips_a_value_that_is_not_an_image():
    good = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(InputTypeError, match=r"image #1: .*unsupported input type NoneType"):
        preprocess_batch([good, None, b"junk"], 16, on_error="skip")


def test_resize_and_crop_follows_the_evaluation_protocol():
    img = Image.new("RGB", (300, 200))
    out = resize_and_crop(img, 224)
    assert out.size == (224, 224)
    arr = preprocess(np.full((50, 80, 3), 7, np.uint8), 32)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.uint8 and (arr == 7).all()


def test_centre_crop_keeps_the_centre():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 255  # a white centre band one third wide
    out = preprocess(arr, 64, crop_pct=1.0)
    # The crop is the central 100x100 square, all white but for bicubic ringing at its edges
    # (where the black sides begin); a left- or right-aligned crop would be half black.
    assert (out[:, :, 3:-3] >= 250).all()


def test_pad_fit_keeps_the_whole_object_trimmed_and_centred():
    # a 40x10 red bar off-centre on a wide white canvas: "pad" trims the white, scales the
    # bar's longer side to the full width and centres it on white; "crop" cuts the bar off
    canvas = np.full((100, 300, 3), 255, np.uint8)
    canvas[10:20, 200:240] = (200, 0, 0)
    out = preprocess(canvas, 64, fit="pad")
    red = (out[0] > 150) & (out[1] < 100)
    rows, cols = np.nonzero(red)
    assert cols.min() <= 1 and cols.max() >= 62  # the bar spans the width
    assert 24 <= rows.min() and rows.max() <= 40  # 64 * 10/40 = 16 rows, centred
    assert (out[:, :20] >= 250).all() and (out[:, -20:] >= 250).all()  # padded with white
    cropped = preprocess(canvas, 64, fit="crop")
    assert not ((cropped[0] > 150) & (cropped[1] < 100)).any()  # the centre crop misses the bar


def test_pad_fit_of_an_image_without_border_is_a_letterbox():
    img = Image.new("RGB", (80, 40), (10, 20, 30))
    out = np.asarray(fit_image(img, 32, fit="pad"))
    assert out.shape == (32, 32, 3)
    assert (out[8:24] == (10, 20, 30)).all() and (out[:8] == 255).all() and (out[24:] == 255).all()
    blank = np.asarray(fit_image(Image.new("RGB", (50, 20), "white"), 16, fit="pad"))
    assert (blank == 255).all()  # all background: nothing to trim, still a white square


def test_unknown_fit_names_the_choices():
    with pytest.raises(ValueError, match="crop, pad.*'squash'"):
        preprocess(np.zeros((8, 8, 3), np.uint8), 8, fit="squash")
    with pytest.raises(ValueError, match="'squash'"):
        preprocess_batch([np.zeros((8, 8, 3), np.uint8)], 8, fit="squash")


def test_batch_names_the_position_or_skips():
    good = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ImageDecodeError, match="image #1"):
        preprocess_batch([good, b"junk", good], 16)
    batch, kept, skipped = preprocess_batch([good, b"junk", good], 16, on_error="skip")
    assert batch.shape == (2, 3, 16, 16) and kept == [0, 2] and skipped[0][0] == 1


def test_l2_normalize_gives_unit_rows_and_keeps_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float64)
    out = l2_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


# --- the one folder rule ------------------------------------------------------------------------
def _png(path, value: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value, value, value)).save(path, "PNG")
    return path


def test_walk_images_follows_the_one_folder_rule(tmp_path):
    root = tmp_path / "photos"
    _png(root / "b.png")
    _png(root / "A.PNG")  # extensions in any case
    _png(root / "sub" / "c.jpg", 1)
    _png(root / "sub" / "deeper" / "d.webp", 2)
    (root / "notes.txt").write_text("not an image")
    _png(root / ".hidden.png")  # hidden file
    _png(root / ".cache" / "e.png")  # hidden folder
    outside = _png(tmp_path / "elsewhere" / "f.png", 3)
    os.symlink(root / "b.png", root / "a_link_to_b.png")  # the same file twice: listed once, by its own path
    os.symlink(outside, root / "link_to_outside.png")  # a linked file counts
    os.symlink(tmp_path / "elsewhere", root / "linked_folder")  # a linked folder is not entered
    os.symlink(root / "missing.png", root / "dangling.png")
    os.symlink(root, root / "sub" / "loop")  # would loop forever if followed

    got = [str(p.relative_to(root)) for p in walk_images(root)]
    assert got == ["A.PNG", "b.png", "link_to_outside.png", "sub/c.jpg", "sub/deeper/d.webp"]
    assert walk_images(root) == sorted(walk_images(root), key=str)
    assert [p.name for p in walk_images(root, exclude=root / "sub")] == ["A.PNG", "b.png", "link_to_outside.png"]
    assert {".png", ".jpg", ".jpeg", ".webp"} <= IMAGE_EXTENSIONS


def test_walk_images_two_links_to_one_file_keep_the_first(tmp_path):
    outside = _png(tmp_path / "elsewhere" / "f.png")
    root = tmp_path / "photos"
    root.mkdir()
    os.symlink(outside, root / "y.png")
    os.symlink(outside, root / "x.png")
    assert [p.name for p in walk_images(root)] == ["x.png"]


def test_walk_images_refuses_what_is_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such folder"):
        walk_images(tmp_path / "nowhere")
    assert issubclass(DataError, DinoserveError)
