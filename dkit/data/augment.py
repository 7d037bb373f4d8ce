"""Augmentation by the owner: ``dkit disguise --augment flip,crop --copies T``.

A flip or a shift of the plain image does not commute with a disguise (blocks move, and each block
position has its own key), so the cloud cannot augment disguised images; the owner does it before
disguising. Each image gets T rows, consecutive: copy 0 is the image as it is, copies 1..T-1 are
augmented. Every row is disguised with its own noise (addressed as image x T + copy).

- ``flip``: a left-right mirror, with probability 1/2;
- ``crop``: the image shifted by up to an eighth of its side in each direction (at least 1 pixel),
  the uncovered edge black: a random crop of the zero-padded image, as in CIFAR training.

The choices come from the run's random source (label ``augment``), like the noise: they are not
stored, and are reproducible for a resumed run.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

KINDS = ("flip", "crop")
LABEL = "augment"
DRAW_BYTES = 4  # per row: flip, vertical shift, horizontal shift, unused


def parse(spec: str | None) -> tuple[str, ...]:
    """``"flip,crop"`` -> ("flip", "crop"), in the canonical order; "" or None -> ()."""
    if not spec:
        return ()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise InputError(f"unknown --augment {unknown[0]!r}: choose from " + ", ".join(KINDS))
    return tuple(k for k in KINDS if k in names)


def pad_of(side: int) -> int:
    return max(1, round(side / 8))


def shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``img`` (H, W, C) moved down by dy and right by dx, the uncovered edge 0."""
    h, w = img.shape[:2]
    out = np.zeros_like(img)
    out[max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)] = img[
        max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)
    ]
    return out


def draws(rng, start: int, n: int, copies: int, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flip, dy, dx), each (n, copies), for images start..start+n-1."""
    b = rng.bytes_at(LABEL, start * copies * DRAW_BYTES, n * copies * DRAW_BYTES).reshape(n, copies, DRAW_BYTES)
    ph, pw = pad_of(shape[0]), pad_of(shape[1])
    flip = (b[..., 0] & 1).astype(bool)
    dy = b[..., 1].astype(np.int64) % (2 * ph + 1) - ph
    dx = b[..., 2].astype(np.int64) % (2 * pw + 1) - pw
    return flip, dy, dx


def expand(x: np.ndarray, copies: int, kinds: tuple[str, ...], rng, start: int) -> np.ndarray:
    """(n, H, W, C) -> (n x copies, H, W, C): each image's copies, consecutive, copy 0 unchanged."""
    n = len(x)
    out = np.repeat(x, copies, axis=0)
    if not kinds or copies == 1:
        return out
    flip, dy, dx = draws(rng, start, n, copies, x.shape[1:3])
    for i in range(n):
        for c in range(1, copies):
            img = x[i]
            if "flip" in kinds and flip[i, c]:
                img = img[:, ::-1]
            if "crop" in kinds:
                img = shift(img, int(dy[i, c]), int(dx[i, c]))
            out[i * copies + c] = img
    return out
