"""Checking images against a key's geometry, and the block layout of ``keys/SPEC-v1.md``.

Images are channels-last: ``(N, H, W, C)`` or one image ``(H, W, C)``; for grey keys also
``(N, H, W)``. Values are pixel units in 0..255, as uint8 or float. The block layout is
``(N, t, d)``: position ``i = r * (W / BW) + c``, each block flattened in (row, column, channel) order.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..params import KeyParams

FLOAT_DTYPES = {"float32": np.float32, "float16": np.float16}


SCALED_01 = "float values in 0..1 look like images scaled to 0..1, which the disguise would treat as black"
SCALED_01_HINT = "pass pixel values in 0..255 (multiply 0..1 images by 255)"


def out_dtype(dtype) -> np.dtype:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in FLOAT_DTYPES:
        raise InputError(f"output dtype {name!r}: choose float32 (default) or float16")
    return np.dtype(FLOAT_DTYPES[name])


def batch_shape(shape: tuple, params: KeyParams, what: str) -> tuple[int, bool]:
    """(N, unbatched) for an input of ``shape``, or a clear error naming the expected geometry."""
    h, w, c = params.shape
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4 and shape[1:] == (h, w, c):
        return shape[0], False
    if len(shape) == 3 and shape == (h, w, c):
        return 1, True
    if len(shape) == 3 and c == 1 and shape[1:] == (h, w):
        return shape[0], False
    got = "x".join(map(str, shape[-3:])) if len(shape) >= 3 else "x".join(map(str, shape))
    if len(shape) in (3, 4) and shape[-3:-1] == (h, w):
        problem = f"{shape[-1]} channels, but the key expects {c}"
        hint = "convert the images (grey/RGB) to the key's channel count"
    elif len(shape) in (3, 4):
        problem = f"images of {got}, but the key expects {h}x{w}x{c}"
        hint = "resize or crop the images to the key's geometry"
    else:
        problem = f"an array of shape {shape}; expected (N, {h}, {w}, {c}) or ({h}, {w}, {c})"
        hint = None
    raise InputError(f"{what}: {problem}", hint=hint)


def check_values_np(x: np.ndarray, what: str, *, need_bytes: bool = False) -> None:
    """uint8 passes; other types must hold finite values in 0..255 (whole numbers if ``need_bytes``)."""
    if x.dtype == np.uint8:
        return
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise InputError(f"{what}: dtype {x.dtype} is not supported; use uint8 or float pixel values in 0..255")
    if x.size == 0:
        return
    lo, hi = x.min(), x.max()
    if np.issubdtype(x.dtype, np.floating) and not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(f"{what}: the images contain NaN or infinite values")
    if lo < 0 or hi > 255:
        raise InputError(
            f"{what}: values must lie in 0..255, found {float(lo):g}..{float(hi):g}",
            hint="pass raw pixel values (not values scaled to 0..1 or normalised)",
        )
    if np.issubdtype(x.dtype, np.floating) and 0 < hi <= 1 and not np.array_equal(x, np.round(x)):
        raise InputError(f"{what}: {SCALED_01}", hint=SCALED_01_HINT)
    if need_bytes and np.issubdtype(x.dtype, np.floating) and not np.array_equal(x, np.round(x)):
        raise InputError(f"{what}: aes encrypts bytes, so pixel values must be whole numbers")


def to_blocks(x: np.ndarray, params: KeyParams) -> np.ndarray:
    """(N, H, W, C) -> (N, t, d), a copy."""
    n = x.shape[0]
    h, w, c = params.shape
    bh, bw = params.block
    gh, gw = params.grid
    return x.reshape(n, gh, bh, gw, bw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * gw, bh * bw * c)


def from_blocks(b: np.ndarray, params: KeyParams) -> np.ndarray:
    """(N, t, d) -> (N, H, W, C), a copy."""
    n = b.shape[0]
    h, w, c = params.shape
    bh, bw = params.block
    gh, gw = params.grid
    return b.reshape(n, gh, gw, bh, bw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)
