"""A corpus of awkward and malformed images: each is converted as documented or refused with a
message that names the file and the problem."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dkit.data.decode import DecodeError, Policy, convert_array, decode

RGB = Policy((16, 16, 3))
GREY = Policy((16, 16, 1))


def encode(arr_or_img, fmt, **kw) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


RNG = np.random.default_rng(0)
RGB_PIX = RNG.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
GREY_PIX = RNG.integers(0, 256, size=(16, 16), dtype=np.uint8)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid PNG header for a huge image over a few bytes of data (the classic bomb shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + png_chunk(b"IEND", b"")
    )


def test_plain_rgb_png_and_jpeg():
    img, notes = decode(encode(RGB_PIX, "PNG"), "a.png", RGB)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and np.array_equal(img, RGB_PIX) and notes == ()
    jpeg = encode(RGB_PIX, "JPEG", quality=95)
    img, notes = decode(jpeg, "a.jpg", RGB)
    pil = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)
    assert img.shape == (16, 16, 3) and np.abs(img.astype(int) - pil).mean() < 2 and notes == ()


@pytest.mark.parametrize(
    "name,data,policy,note,check",
    [
        (
            "grey.png",
            encode(GREY_PIX, "PNG"),
            RGB,
            "grey->RGB",
            lambda a: np.array_equal(a, np.repeat(GREY_PIX[:, :, None], 3, 2)),
        ),
        (
            "rgb-to-grey.png",
            encode(RGB_PIX, "PNG"),
            GREY,
            "RGB->grey",
            lambda a: np.array_equal(a[:, :, 0], np.asarray(Image.fromarray(RGB_PIX).convert("L"))),
        ),
        (
            "rgba.png",
            encode(np.dstack([RGB_PIX, GREY_PIX]), "PNG"),
            RGB,
            "alpha dropped",
            lambda a: np.array_equal(a, RGB_PIX),
        ),
        (
            "grey-alpha.png",
            encode(Image.fromarray(np.dstack([GREY_PIX, GREY_PIX])), "PNG"),
            GREY,
            "alpha dropped",
            lambda a: np.array_equal(a[:, :, 0], GREY_PIX),
        ),
        (
            "16bit.png",
            encode(Image.fromarray(GREY_PIX.astype(np.uint16) * 257), "PNG"),
            GREY,
            "16-bit->8-bit",
            lambda a: np.array_equal(a[:, :, 0], GREY_PIX),
        ),
        (
            "palette.png",
            encode(Image.fromarray(RGB_PIX).convert("P"), "PNG"),
            RGB,
            "palette->RGB",
            lambda a: np.array_equal(a, np.asarray(Image.fromarray(RGB_PIX).convert("P").convert("RGB"))),
        ),
        (
            "palette.gif",
            encode(Image.fromarray(RGB_PIX).convert("P"), "GIF"),
            RGB,
            None,
            lambda a: a.shape == (16, 16, 3),
        ),
        (
            "cmyk.jpg",
            encode(Image.fromarray(RGB_PIX).convert("CMYK"), "JPEG", quality=95),
            RGB,
            "CMYK->RGB",
            lambda a: a.shape == (16, 16, 3) and a.std() > 20,
        ),
        ("image.bmp", encode(RGB_PIX, "BMP"), RGB, None, lambda a: np.array_equal(a, RGB_PIX)),
        ("image.tiff", encode(RGB_PIX, "TIFF"), RGB, None, lambda a: np.array_equal(a, RGB_PIX)),
        ("image.webp", encode(RGB_PIX, "WEBP", lossless=True), RGB, None, lambda a: np.array_equal(a, RGB_PIX)),
    ],
)
def test_conversions_are_applied_and_reported(name, data, policy, note, check):
    img, notes = decode(data, name, policy)
    assert img.shape == policy.shape and img.dtype == np.uint8
    assert check(img)
    if note:
        assert note in notes, notes
        strict = Policy(policy.shape, convert=False)
        with pytest.raises(DecodeError, match="needs conversion") as e:
            decode(data, name, strict)
        assert e.value.name == name and "--convert" in e.value.hint


def test_animated_gif_uses_the_first_frame():
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (10, 200)]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    img, notes = decode(b.getvalue(), "anim.gif", RGB)
    assert "animated, first frame" in notes and abs(int(img.mean()) - 10) <= 2


JPEG = encode(RGB_PIX, "JPEG")
PNG = encode(RGB_PIX, "PNG")


@pytest.mark.parametrize(
    "name,data,words",
    [
        ("empty.jpg", b"", "empty file (0 bytes)"),
        ("notes.jpg", b"these are my notes, not a picture\n", "not an image"),
        ("truncated.jpg", JPEG[: len(JPEG) // 2], "corrupt or truncated JPEG"),
        ("header-only.jpg", JPEG[:40], "corrupt or truncated JPEG"),
        ("truncated.png", PNG[: len(PNG) // 2], "corrupt or truncated PNG"),
        ("short-header.png", PNG[:20], "corrupt or truncated PNG"),
        (
            "garbage.jpg",
            b"\xff\xd8\xff" + bytes(RNG.integers(0, 256, 500, dtype=np.uint8)),
            "corrupt or truncated JPEG",
        ),
        ("bomb.png", bomb_png(), "exceeds the limit"),
        ("zero-size.png", bomb_png(0, 10), "invalid size 0x10"),
    ],
)
def test_bad_files_are_refused_with_their_name(name, data, words):
    with pytest.raises(DecodeError) as e:
        decode(data, f"/data/{name}", RGB)
    assert e.value.name == f"/data/{name}"
    assert words in str(e.value) and str(e.value).startswith(f"/data/{name}: ")


def test_bomb_is_refused_before_decoding(monkeypatch):
    import dkit.data.decode as dec

    def boom(*a, **k):
        raise AssertionError("the pixels of a bomb must never be decoded")

    monkeypatch.setattr(dec, "_pixels", boom)
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode(bomb_png(), "bomb.png", RGB)
    with pytest.raises(DecodeError, match="exceeds the limit of 100"):
        decode(PNG, "small-limit.png", Policy((16, 16, 3), max_pixels=100))


def test_sizes_follow_the_fit_policy():
    big = np.zeros((40, 30, 3), np.uint8)
    big[10:30, 7:23] = 255
    data = encode(big, "PNG")
    with pytest.raises(DecodeError, match=r"size 30x40 \(WxH\), but the key expects 16x16") as e:
        decode(data, "big.png", RGB)
    assert "--fit" in e.value.hint
    img, notes = decode(data, "big.png", Policy((16, 16, 3), fit="resize"))
    assert img.shape == (16, 16, 3) and "resize 30x40->16x16" in notes
    img, notes = decode(data, "big.png", Policy((16, 16, 3), fit="crop"))
    assert img.shape == (16, 16, 3) and img.min() == 255  # the centre 16x16 is inside the white patch
    img, notes = decode(data, "big.png", Policy((16, 16, 3), fit="resize-crop"))
    assert img.shape == (16, 16, 3) and any(n.startswith("resize-crop") for n in notes)
    tiny = encode(np.zeros((2, 2, 3), np.uint8), "PNG")
    with pytest.raises(DecodeError, match="size 2x2"):
        decode(tiny, "tiny.png", RGB)
    with pytest.raises(DecodeError, match="too small to crop"):
        decode(tiny, "tiny.png", Policy((16, 16, 3), fit="crop"))
    assert decode(tiny, "tiny.png", Policy((16, 16, 3), fit="resize"))[0].shape == (16, 16, 3)


def test_arrays_convert_like_files():
    img, notes = convert_array(GREY_PIX, "x[0]", RGB)
    assert img.shape == (16, 16, 3) and "grey->RGB" in notes
    img, _ = convert_array(RGB_PIX.astype(np.float32), "x[1]", RGB)
    assert np.array_equal(img, RGB_PIX)
    for bad, words in [
        (np.full((16, 16, 3), 300.0), "0..255"),
        (np.full((16, 16, 3), np.nan), "finite"),
        (np.zeros((16, 16, 5)), "not an image"),
        (np.zeros((16, 16, 3), bool), "not an image type"),
    ]:
        with pytest.raises(DecodeError, match=words):
            convert_array(bad, "x[2]", RGB)


def test_pil_images_convert_like_files():
    """A torchvision dataset's PIL images go through the same conversions as files: noted, and refused
    without --convert (TorchvisionSource)."""
    from dkit.data.sources import TorchvisionSource

    palette = Image.fromarray(RGB_PIX).convert("P")
    cmyk = Image.fromarray(RGB_PIX).convert("CMYK")
    source = TorchvisionSource([(palette, 0), (cmyk, 1), (Image.fromarray(RGB_PIX), 1)])
    assert source.labels.tolist() == [0, 1, 1]
    for i, (img, fmt, note) in enumerate([(palette, "PNG", "palette->RGB"), (cmyk, "TIFF", "CMYK->RGB")]):
        got, notes = source.load(i, RGB)
        assert notes == (note,) and np.array_equal(got, decode(encode(img, fmt), "f", RGB)[0])
        with pytest.raises(DecodeError, match=f"needs conversion .*{note}") as e:
            source.load(i, Policy((16, 16, 3), convert=False))
        assert e.value.name == f"list[{i}]" and "--convert" in e.value.hint
    img, notes = source.load(2, Policy((16, 16, 3), convert=False))
    assert np.array_equal(img, RGB_PIX) and notes == ()
