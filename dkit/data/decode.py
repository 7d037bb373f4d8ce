"""Image files to uint8 arrays in the key's geometry, with explicit, reported conversions.

Decoding uses ``torchvision.io`` (libjpeg-turbo, libpng, libwebp, giflib: fast) and falls back to
Pillow for other formats (BMP, TIFF, PNM) and for CMYK JPEGs. Before any pixel is decoded the header
is read and an image larger than ``max_pixels`` is refused, so a decompression bomb never allocates.

Conversions (only with ``convert=True``, the default; each is noted and counted):
grey -> RGB (repeat), RGB -> grey (ITU-R 601-2 luma, exactly as Pillow's "L"), alpha dropped, 16-bit ->
8-bit (rounded, v / 257), palette -> RGB, CMYK -> RGB (Pillow), animated GIF -> first frame.
Sizes follow ``fit``: ``none`` (a mismatch is an error naming the file), ``resize`` (stretch to HxW),
``crop`` (centre crop, the image must be large enough) or ``resize-crop`` (scale the shorter side,
then centre crop).
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
FITS = ("none", "resize", "crop", "resize-crop")
DEFAULT_MAX_PIXELS = 1 << 26  # 67 megapixels

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they still work, and Pillow is
# the fallback. Silence that one notice (once, by its text) rather than on every call.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class DecodeError(InputError):
    """One input image cannot be used; ``name`` is the file (or array row) and ``problem`` the reason."""

    def __init__(self, name: str, problem: str, *, hint: str | None = None):
        super().__init__(f"{name}: {problem}", hint=hint)
        self.name = name
        self.problem = problem


@dataclass(frozen=True)
class Policy:
    """How inputs become the key's geometry."""

    shape: tuple[int, int, int]
    convert: bool = True
    fit: str = "none"
    max_pixels: int = DEFAULT_MAX_PIXELS
    float_range: str | None = None  # float pixels: None (whole numbers in 0..255 only), "0-1" or "0-255"

    def __post_init__(self):
        if self.fit not in FITS:
            raise InputError(f"unknown fit {self.fit!r}: choose " + ", ".join(FITS))
        if self.float_range not in FLOAT_RANGES:
            raise InputError(f"unknown float range {self.float_range!r}: choose 0-1 or 0-255")


FLOAT_RANGES = (None, "0-1", "0-255")
FLOAT_HINT = (
    "say what the floats mean: --float-range 0-1 (scaled by 255, then rounded) or --float-range 0-255 "
    "(rounded); in Python Policy(float_range=...)"
)


def sniff(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "other"


@dataclass
class Header:
    width: int
    height: int
    mode: str  # grey, grey+alpha, rgb, rgba, palette, cmyk, or "" when unknown
    bits: int = 8


def _png_header(data: bytes) -> Header:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ValueError("truncated PNG header")
    w, h, bits, ctype = struct.unpack(">IIBB", data[16:26])
    mode = {0: "grey", 2: "rgb", 3: "palette", 4: "grey+alpha", 6: "rgba"}.get(ctype)
    if mode is None:
        raise ValueError(f"PNG colour type {ctype}")
    return Header(w, h, mode, bits)


def _jpeg_header(data: bytes) -> Header:
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            raise ValueError("corrupt JPEG marker")
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9 or i + 2 > n:
            break
        length = struct.unpack(">H", data[i : i + 2])[0]
        if marker in _JPEG_SOF:
            if i + 8 > n:
                break
            bits, h, w, comps = struct.unpack(">BHHB", data[i + 2 : i + 8])
            return Header(w, h, {1: "grey", 3: "rgb", 4: "cmyk"}.get(comps, f"{comps} components"), bits)
        i += length
    raise ValueError("no frame header (truncated or corrupt JPEG)")


def _gif_header(data: bytes) -> Header:
    if len(data) < 10:
        raise ValueError("truncated GIF header")
    w, h = struct.unpack("<HH", data[6:10])
    return Header(w, h, "palette")


def read_header(data: bytes, kind: str) -> Header:
    if kind == "png":
        return _png_header(data)
    if kind == "jpeg":
        return _jpeg_header(data)
    if kind == "gif":
        return _gif_header(data)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header only
        w, h = im.size
        mode = {
            "L": "grey",
            "LA": "grey+alpha",
            "RGB": "rgb",
            "RGBA": "rgba",
            "P": "palette",
            "CMYK": "cmyk",
            "1": "grey",
            "I;16": "grey",
            "I;16B": "grey",
            "I": "grey",
        }.get(im.mode, im.mode)
        bits = 16 if im.mode.startswith("I;16") or im.mode == "I" else 8
    return Header(w, h, mode, bits)


def decode(data: bytes | bytearray, name: str, policy: Policy) -> tuple[np.ndarray, tuple[str, ...]]:
    """One encoded image -> ((H, W, C) uint8 in the key's geometry, notes on what was converted)."""
    if not data:
        raise DecodeError(name, "empty file (0 bytes)")
    kind = sniff(data)
    try:
        head = read_header(data, kind)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for non-images
        if kind == "other":
            raise DecodeError(name, "not an image, or a format dkit cannot read") from None
        raise DecodeError(name, f"corrupt or truncated {kind.upper()} ({_reason(e)})") from None
    if head.width < 1 or head.height < 1:
        raise DecodeError(name, f"invalid size {head.width}x{head.height}")
    if head.width * head.height > policy.max_pixels:
        raise DecodeError(
            name,
            f"{head.width}x{head.height} pixels exceeds the limit of {policy.max_pixels:,} "
            "(a possible decompression bomb)",
            hint="raise --max-pixels if the image is genuine",
        )
    notes: list[str] = []
    try:
        img = _pixels(data, kind, head, notes)
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise RuntimeError, OSError, ValueError, ...
        raise DecodeError(
            name, f"corrupt or truncated {kind.upper() if kind != 'other' else 'image'} ({_reason(e)})"
        ) from None
    img = _to_channels(img, head, policy, name, notes)
    img = _fit(img, policy, name, notes)
    return img, tuple(notes)


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    text = text[-1] if text else type(e).__name__
    return text[:120]


_OP = None


def _decode_op(data, mode):
    """torchvision's decoder op, called directly (its Python wrapper costs as much as the decode of
    a 32x32 JPEG); the public function is the fallback if the op's signature ever changes."""
    global _OP
    if _OP is None:
        import torch
        from torchvision.io import decode_image

        try:
            op = torch.ops.image.decode_image
            op(torch.frombuffer(bytearray(_PROBE_PNG), dtype=torch.uint8), 0, False)
            _OP = lambda d, m: op(d, m.value, False)  # noqa: E731
        except Exception:  # noqa: BLE001
            _OP = lambda d, m: decode_image(d, mode=m)  # noqa: E731
    return _OP(data, mode)


def warm() -> None:
    """Import and set up the decoders now (in a parent process, so that forked workers inherit them
    instead of each paying for the import)."""
    import torch
    from torchvision.io import ImageReadMode

    _decode_op(torch.frombuffer(bytearray(_PROBE_PNG), dtype=torch.uint8), ImageReadMode.UNCHANGED)


# A 1x1 grey PNG, to check that the direct op call works.
_PROBE_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010800000000"
    "3a7e9b550000000a49444154789c636000000002000148afa4710000000049454e44ae426082"
)


def _pixels(data: bytes, kind: str, head: Header, notes: list[str]) -> np.ndarray:
    """Decoded pixels as (H, W, C) uint8 or uint16, C in 1..4, before any conversion."""
    if kind in ("png", "jpeg", "gif", "webp") and not (kind == "jpeg" and head.mode not in ("grey", "rgb")):
        import torch
        from torchvision.io import ImageReadMode

        mode = ImageReadMode.RGB if head.mode == "palette" and kind == "png" else ImageReadMode.UNCHANGED
        buf = data if isinstance(data, bytearray) else bytearray(data)
        t = _decode_op(torch.frombuffer(buf, dtype=torch.uint8), mode)
        if t.ndim == 4:  # animated GIF: frames first
            if t.shape[0] > 1:
                notes.append("animated, first frame")
            t = t[0]
        arr = t.permute(1, 2, 0).numpy()
        if head.mode == "palette":
            head.mode = "rgb" if arr.shape[2] == 3 else "rgba"
            notes.append("palette->RGB")
        return arr
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return _pil_pixels(im, head, notes)


def _pil_pixels(im, head: Header, notes: list[str]) -> np.ndarray:
    """A loaded PIL image's pixels as ``_pixels`` returns them, noting palette and CMYK conversions."""
    if im.mode == "CMYK":
        notes.append("CMYK->RGB")
        head.mode = "rgb"
        return np.asarray(im.convert("RGB"))
    if im.mode == "P":
        notes.append("palette->RGB")
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im).astype(np.uint32)
        return np.clip(arr, 0, 65535).astype(np.uint16)[:, :, None]
    arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _to_channels(img: np.ndarray, head: Header, policy: Policy, name: str, notes: list[str]) -> np.ndarray:
    want = policy.shape[2]
    have = img.shape[2]
    changes = list(notes)
    if img.dtype == np.uint16:
        changes.append("16-bit->8-bit")
    if have in (2, 4):
        changes.append("alpha dropped")
    base = 1 if have in (1, 2) else 3
    if base != want:
        changes.append("grey->RGB" if want == 3 else "RGB->grey")
    if changes and not policy.convert:
        raise DecodeError(
            name,
            f"needs conversion to the key's {'RGB' if want == 3 else 'grey'} 8-bit pixels ({', '.join(changes)})",
            hint="pass --convert to convert such images",
        )
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if have in (2, 4):
        img = img[:, :, : have - 1]
    if base != want:
        if want == 3 and base == 1:
            img = np.repeat(img, 3, axis=2)
        elif want == 1 and base == 3:
            rgb = img.astype(np.uint32)  # Pillow's "L": (19595 R + 38470 G + 7471 B + 2^15) >> 16
            luma = (rgb[:, :, 0] * 19595 + rgb[:, :, 1] * 38470 + rgb[:, :, 2] * 7471 + 0x8000) >> 16
            img = luma.astype(np.uint8)[:, :, None]
        else:
            raise DecodeError(name, f"{base} channels cannot be converted to the key's {want}")
    notes[:] = [c for c in changes]
    return np.ascontiguousarray(img)


def _fit(img: np.ndarray, policy: Policy, name: str, notes: list[str]) -> np.ndarray:
    h, w, _ = policy.shape
    ih, iw = img.shape[:2]
    if (ih, iw) == (h, w):
        return img
    if policy.fit == "none":
        raise DecodeError(
            name,
            f"size {iw}x{ih} (WxH), but the key expects {w}x{h}",
            hint="choose a size policy: --fit resize, crop or resize-crop",
        )
    if policy.fit == "crop":
        if ih < h or iw < w:
            raise DecodeError(name, f"size {iw}x{ih} is too small to crop to {w}x{h}")
        top, left = (ih - h) // 2, (iw - w) // 2
        notes.append(f"cropped {iw}x{ih}->{w}x{h}")
        return np.ascontiguousarray(img[top : top + h, left : left + w])
    import torch
    from torchvision.transforms.v2 import functional as F

    t = torch.from_numpy(img).permute(2, 0, 1)
    if policy.fit == "resize":
        t = F.resize(t, [h, w], antialias=True)
    else:
        scale = max(h / ih, w / iw)
        t = F.resize(t, [max(h, round(ih * scale)), max(w, round(iw * scale))], antialias=True)
        t = F.center_crop(t, [h, w])
    notes.append(f"{policy.fit} {iw}x{ih}->{w}x{h}")
    return np.ascontiguousarray(t.permute(1, 2, 0).numpy())


def convert_pil(im, name: str, policy: Policy) -> tuple[np.ndarray, tuple[str, ...]]:
    """A PIL image (as torchvision datasets give) -> the key's geometry, converted as the same image
    in a file would be: palette and CMYK conversions are noted, and refused without ``convert``."""
    notes: list[str] = []
    arr = _pil_pixels(im, Header(im.width, im.height, ""), notes)
    return _convert(arr, name, policy, notes)


def convert_array(img: np.ndarray, name: str, policy: Policy) -> tuple[np.ndarray, tuple[str, ...]]:
    """An in-memory image (H, W[, C]) of uint8/uint16, integers in 0..255, or floats (whole pixel values,
    or scaled as ``policy.float_range`` says) -> the key's geometry."""
    return _convert(img, name, policy, [])


def _float_pixels(arr: np.ndarray, name: str, policy: Policy, notes: list[str]) -> np.ndarray:
    """Float pixels -> whole numbers in 0..255, never by a guess: without ``float_range`` only floats
    that already are whole pixel values pass; 0..1 floats (which rounding would turn black) and any
    other fractions are refused with a hint. A conversion that changes values is noted (reported)."""
    if arr.size and not np.isfinite(arr).all():
        raise DecodeError(name, "float pixels must be finite (found NaN or infinity)")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if policy.float_range == "0-1":
        if lo < 0 or hi > 1:
            raise DecodeError(name, f"float pixels lie in {lo:g}..{hi:g}, not 0..1", hint=FLOAT_HINT)
        notes.append("float 0..1 scaled x255")
        return np.rint(arr.astype(np.float64) * 255)
    if lo < 0 or hi > 255:
        raise DecodeError(name, f"float pixels lie in {lo:g}..{hi:g}, outside 0..255", hint=FLOAT_HINT)
    whole = np.array_equal(arr, np.rint(arr))
    if policy.float_range == "0-255":
        if not whole:
            notes.append("float 0..255 rounded")
        return np.rint(arr)
    if not whole:
        looks = "look scaled to 0..1" if hi <= 1 else "are not whole pixel values"
        raise DecodeError(name, f"float pixels {looks} ({lo:g}..{hi:g}); dkit does not guess a scale", hint=FLOAT_HINT)
    if 0 < hi <= 1:
        raise DecodeError(name, "float pixels are all 0 or 1: a 0..1 image would turn black as 0..255", hint=FLOAT_HINT)
    return arr


def _convert(img, name: str, policy: Policy, notes: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise DecodeError(name, f"array of shape {arr.shape} is not an image (H, W) or (H, W, C)")
    if arr.dtype not in (np.uint8, np.uint16):
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise DecodeError(name, f"dtype {arr.dtype} is not an image type")
        if np.issubdtype(arr.dtype, np.floating):
            arr = _float_pixels(arr, name, policy, notes)
        elif arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DecodeError(name, f"values must lie in 0..255, found {arr.min()}..{arr.max()}")
        arr = arr.astype(np.uint8)
    mode = {1: "grey", 2: "grey+alpha", 3: "rgb", 4: "rgba"}[arr.shape[2]]
    head = Header(arr.shape[1], arr.shape[0], mode, 16 if arr.dtype == np.uint16 else 8)
    arr = _to_channels(arr, head, policy, name, notes)
    return _fit(arr, policy, name, notes), tuple(notes)
