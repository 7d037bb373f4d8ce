"""InstaHide (Huang et al. 2020): mix k images, then flip every pixel's sign at random.

Each encoding e draws from its own CSPRNG stream (``RandomSource.stream("instahide", e)``), in this
order (``keys/SPEC-v1.md``, "Disguise"):

1. partners: k - 1 indices ``below(P)`` into the pool (P images; the private set itself for
   ``inside``, a public set for ``cross``);
2. coefficients, in rounds: k gaussians g, lambda = |g| / sum |g|, until max lambda <= bound;
3. signs: ceil(H*W*C / 8) bytes, bits least significant first; a 1 bit flips the pixel's sign.

The encoding is ``sign * (lambda_1 x_n + sum_j lambda_j pool[p_j])`` with pixels scaled to [-1, 1]
(x / 127.5 - 1). Soft labels: ``sum_j lambda_j onehot(label_j)`` over the private images in the mix
(for ``cross``, only the first). Masks come from a CSPRNG: the official code's 32-bit seeded
generator is what made its brute-force break possible.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .mechanisms import Mechanism
from .randomness import RandomSource

MAX_ROUNDS = 10_000


class InstaHide(Mechanism):
    name = "instahide"
    invertible = False

    def __init__(self, k: int, bound: float, mix: str):
        self.k, self.bound, self.mix = int(k), float(bound), mix

    def __repr__(self) -> str:
        return f"InstaHide(k={self.k}, bound={self.bound}, mix={self.mix!r})"

    def draw(self, rng: RandomSource, index: int, pool_size: int, pixels: int):
        """(partners (k-1,), coefficients (k,), signs (pixels,) of +-1) for encoding ``index``."""
        s = rng.stream("instahide", index)
        partners = np.array([s.below(pool_size) for _ in range(self.k - 1)], dtype=np.int64)
        for _ in range(MAX_ROUNDS):
            g = np.abs(s.gaussian(self.k))
            lam = g / g.sum()
            if lam.max() <= self.bound:
                break
        else:  # pragma: no cover - probability ~ 0 for a valid bound
            raise RuntimeError("no admissible InstaHide coefficients")
        bits = np.unpackbits(np.frombuffer(s.read((pixels + 7) // 8), dtype=np.uint8), bitorder="little")
        signs = 1.0 - 2.0 * bits[:pixels].astype(np.float32)
        return partners, lam, signs

    def encode(
        self,
        x: np.ndarray,
        labels: np.ndarray | None,
        num_classes: int,
        *,
        encodings: int = 1,
        pool: np.ndarray | None = None,
        pool_labels: np.ndarray | None = None,
        rng: RandomSource | None = None,
        start: int = 0,
        dtype=np.float32,
    ):
        """Encode each image ``encodings`` times. Returns (images (N*T, H, W, C), soft labels (N*T, K) or None).

        ``x`` is a batch of private images in 0..255 and ``start`` its index in the whole set (so
        chunked runs draw what one run would). ``pool`` is the set partners come from: the whole
        private set (with ``pool_labels``) for ``inside``, a public set for ``cross``.
        """
        rng = rng or RandomSource()
        n = x.shape[0]
        if pool is None:
            if self.mix == "cross" and self.k > 1:
                raise InputError("cross-dataset InstaHide needs a public image set to mix with")
            pool, pool_labels = x, labels
        if len(pool) == 0 and self.k > 1:
            raise InputError("InstaHide needs a non-empty pool of images to mix with")
        if labels is not None and self.mix == "inside" and self.k > 1:
            pool_labels = _check_pool_labels(pool_labels, len(pool), num_classes)
        pixels = int(np.prod(x.shape[1:]))
        t = int(encodings)
        total = n * t
        m = max(self.k - 1, 0)
        partners = np.zeros((total, m), dtype=np.int64)
        lam = np.zeros((total, self.k), dtype=np.float64)
        signs = np.empty((total, pixels), dtype=np.float32)
        for row in range(total):
            i, tau = divmod(row, t)
            partners[row], lam[row], signs[row] = self.draw(rng, (start + i) * t + tau, len(pool), pixels)
        out = np.empty((total, pixels), dtype=dtype)
        own = np.repeat(np.arange(n), t)
        step = 512
        for r0 in range(0, total, step):
            r1 = min(total, r0 + step)
            acc = _scaled(x[own[r0:r1]].reshape(r1 - r0, pixels)) * lam[r0:r1, :1].astype(np.float32)
            for j in range(m):
                acc += _scaled(pool[partners[r0:r1, j]].reshape(r1 - r0, pixels)) * lam[r0:r1, j + 1 : j + 2].astype(
                    np.float32
                )
            np.multiply(acc, signs[r0:r1], out=out[r0:r1], casting="same_kind")
        soft = None
        if labels is not None:
            soft = np.zeros((total, num_classes), dtype=np.float32)
            rows = np.arange(total)
            np.add.at(soft, (rows, np.asarray(labels, dtype=np.int64)[own]), lam[:, 0])
            if self.mix == "inside" and m:
                pl = np.asarray(pool_labels, dtype=np.int64)
                for j in range(m):
                    np.add.at(soft, (rows, pl[partners[:, j]]), lam[:, j + 1])
        return out.reshape((total,) + x.shape[1:]), soft


def _check_pool_labels(pool_labels, pool_size: int, num_classes: int) -> np.ndarray:
    """The pool's labels for ``inside`` mixing with labels: one per pool image, each a class in range.
    Without them the partners' shares of the soft labels would be lost (labels not summing to 1)."""
    if pool_labels is None:
        raise InputError(
            "instahide mix 'inside' with labels: a pool was given without pool_labels",
            hint="pass pool_labels (one label per pool image), or no pool to mix within the batch",
        )
    pl = np.asarray(pool_labels)
    if pl.shape != (pool_size,):
        raise InputError(f"pool_labels: expected {pool_size} labels (one per pool image), got shape {pl.shape}")
    if pool_size and not np.issubdtype(pl.dtype, np.integer):
        if not (np.issubdtype(pl.dtype, np.floating) and np.array_equal(pl, np.round(pl))):
            raise InputError(f"pool_labels must be whole class numbers, got dtype {pl.dtype}")
    pl = pl.astype(np.int64)
    if pool_size and (pl.min() < 0 or pl.max() >= num_classes):
        raise InputError(
            f"pool_labels must lie in 0..{num_classes - 1}, found {pl.min()}..{pl.max()}",
            hint="pass num_classes covering every class of the pool",
        )
    return pl


def _scaled(a: np.ndarray) -> np.ndarray:
    """Pixels 0..255 to [-1, 1], float32."""
    return a.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
