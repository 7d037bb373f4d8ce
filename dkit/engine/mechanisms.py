"""The mechanisms as small objects with ``apply`` and, where one exists, ``invert``.

They act on the block layout ``(N, t, d)`` (see ``geometry``) and say exactly what each mechanism
does (``keys/SPEC-v1.md``, "Disguise"). A pipeline applies the block transform (RMT or AES) at each
original position, then the permutation; noise is added to the assembled image. The fused kernels
in ``kernels_np`` and ``kernels_torch`` compute the same thing faster; the tests hold them to these.

This is the low-level layer: a mechanism holds raw key material. Use ``dkit.engine.Disguise``.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..params import AES_BLOCK_BYTES


class Mechanism:
    name = "mechanism"
    invertible = True

    def apply(self, blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def invert(self, blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<key material redacted>)"

    def __reduce__(self):
        raise TypeError("mechanisms hold key material and cannot be pickled")


class Identity(Mechanism):
    """No disguise: the plaintext baseline made by the same code."""

    name = "identity"

    def apply(self, blocks):
        return blocks.copy()

    def invert(self, blocks):
        return blocks.copy()

    def __repr__(self) -> str:
        return "Identity()"


class Permutation(Mechanism):
    """Output position j holds input block perm[j]."""

    name = "perm"

    def __init__(self, perm: np.ndarray):
        self.perm = np.asarray(perm, dtype=np.int64)
        self.inverse = np.argsort(self.perm)

    def apply(self, blocks):
        return blocks[:, self.perm]

    def invert(self, blocks):
        return blocks[:, self.inverse]


def block_matrices(matrices: np.ndarray, channels: str, block: tuple[int, int], c: int) -> np.ndarray:
    """The d x d matrix that acts on a flattened block, for each position.

    Joint keys store it directly. Shared keys store the papers' BW x BW matrix R, which acts on each
    channel's BH x BW pixel matrix from the right; on the (row, column, channel) vector that is
    kron(I_BH, kron(R, I_C)). This expanded form is for references and naive loops only: it has
    (BH * C)^2 times the entries of R, and the kernels multiply by R over the column axis instead.
    """
    if channels == "joint":
        return matrices
    bh, _ = block
    eye_h, eye_c = np.eye(bh), np.eye(c)
    return np.stack([np.kron(eye_h, np.kron(r, eye_c)) for r in matrices])


class RMT(Mechanism):
    """Block i becomes X_i R_i (a row vector times the position's matrix); noise is added later.

    ``compact`` holds the key's matrices as stored (d x d for joint, BW x BW for shared) and
    ``inverse_matrices`` their inverses, in the same form: that is what the kernels use. ``matrices``
    is the d x d form on the flattened block (built on first use, for ``apply``/``invert`` here and
    for naive reference loops).
    """

    name = "rmt"

    def __init__(
        self,
        matrices: np.ndarray,
        channels: str,
        block: tuple[int, int],
        c: int,
        noise: float,
        kind: str = "orthogonal",
    ):
        self.compact = np.asarray(matrices, dtype=np.float64)
        self.channels = channels
        self.block = (int(block[0]), int(block[1]))
        self.c = int(c)
        self.kind = kind
        self.noise = float(noise)
        self._matrices = self.compact if channels == "joint" else None
        self._inverse = None

    @property
    def shared(self) -> bool:
        return self.channels != "joint"

    @property
    def matrices(self) -> np.ndarray:
        """The d x d matrix on the flattened block, per position (expanded from R for shared keys)."""
        if self._matrices is None:
            self._matrices = block_matrices(self.compact, self.channels, self.block, self.c)
        return self._matrices

    @property
    def inverse_matrices(self) -> np.ndarray:
        """The inverses of ``compact`` (d x d for joint, BW x BW for shared)."""
        if self._inverse is None:
            if self.kind == "orthogonal":
                self._inverse = np.ascontiguousarray(self.compact.transpose(0, 2, 1))
            else:
                self._inverse = np.linalg.inv(self.compact)
        return self._inverse

    def apply(self, blocks):
        return np.einsum("ntd,tde->nte", blocks.astype(np.float64), self.matrices)

    def invert(self, blocks):
        inv = block_matrices(self.inverse_matrices, self.channels, self.block, self.c)
        return np.einsum("ntd,tde->nte", blocks.astype(np.float64), inv)


def aes_rows(rows: np.ndarray, key: bytes, *, decrypt: bool = False) -> np.ndarray:
    """AES on each row of a (n, d) uint8 array, d >= 16, deterministic and length-preserving.

    Encryption: ECB on the 16-byte chunks [0, 16), [16, 32), ... that fit, then, when d is not a
    multiple of 16, ECB once more on the last 16 bytes [d - 16, d) (which overlap the previous
    chunk's ciphertext). Decryption undoes the two steps in reverse order. Equal rows give equal
    output: this is the leak that lets a network learn, and what an attacker's codebook uses.
    """
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    n, d = rows.shape
    full = d - d % AES_BLOCK_BYTES
    out = rows.copy()
    if n == 0:
        return out

    def ecb(chunk: np.ndarray) -> np.ndarray:
        chunk = np.ascontiguousarray(chunk)
        ctx = Cipher(algorithms.AES(key), modes.ECB())
        op = ctx.decryptor() if decrypt else ctx.encryptor()
        return np.frombuffer(op.update(chunk.tobytes()) + op.finalize(), dtype=np.uint8).reshape(chunk.shape)

    if not decrypt:
        out[:, :full] = ecb(out[:, :full])
        if full != d:
            out[:, d - AES_BLOCK_BYTES :] = ecb(out[:, d - AES_BLOCK_BYTES :])
    else:
        if full != d:
            out[:, d - AES_BLOCK_BYTES :] = ecb(out[:, d - AES_BLOCK_BYTES :])
        out[:, :full] = ecb(out[:, :full])
    return out


class AES(Mechanism):
    """Each block's bytes under AES-256 (one key, or the key of its original position)."""

    name = "aes"

    def __init__(self, keys: tuple[bytes, ...]):
        self.keys = tuple(keys)

    @property
    def single_key(self) -> bytes | None:
        """The one key of ``aes.keys = shared`` (every position uses it), else None."""
        return self.keys[0] if len(self.keys) == 1 else None

    def key_for(self, position: int) -> bytes:
        return self.keys[0] if len(self.keys) == 1 else self.keys[position]

    def _each(self, blocks, decrypt):
        if blocks.dtype != np.uint8:
            blocks = np.rint(blocks).astype(np.uint8)
        out = np.empty_like(blocks)
        for i in range(blocks.shape[1]):
            out[:, i] = aes_rows(blocks[:, i], self.key_for(i), decrypt=decrypt)
        return out

    def apply(self, blocks):
        return self._each(blocks, decrypt=False)

    def invert(self, blocks):
        return self._each(blocks, decrypt=True)
