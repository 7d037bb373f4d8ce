"""Per-image randomness (noise, masks, mixing choices) from a CSPRNG, addressable by image index.

A ``RandomSource`` has a 256-bit root: fresh from ``os.urandom`` by default, or fixed in tests
(the private seam that makes golden outputs exact). Each use draws from the AES-256-CTR keystream
of ``HKDF(root, label)``, at an offset given by the global index of the image. So splitting a
batch, streaming in chunks, or resuming after a crash draws exactly the same values as one call,
and no two images share randomness. Nothing here uses numpy's or torch's generators.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..derive import Stream

_SALT = b"dkit/random/v1"
_ZEROS = b""


def _zeros(n: int) -> memoryview:
    """A read-only view of n zero bytes (the keystream is the encryption of zeros)."""
    global _ZEROS
    z = _ZEROS  # one read: another thread may replace the global between any two reads of it
    if len(z) < n:
        z = bytes(max(n, 2 * len(z)))
        _ZEROS = z
    return memoryview(z)[:n]


class RandomSource:
    """Randomness for one disguise run. Not printable, not picklable."""

    __slots__ = ("_root", "_keys")

    def __init__(self, root: bytes | None = None):
        root = os.urandom(32) if root is None else bytes(root)
        if len(root) != 32:
            raise ValueError("a random source root is 32 bytes")
        self._root = root
        self._keys: dict[str, bytes] = {}

    @classmethod
    def fixed(cls, value: int | bytes) -> RandomSource:
        """Deterministic randomness, for tests and golden vectors only."""
        if isinstance(value, int):
            value = value.to_bytes(32, "little")
        return cls(value)

    def __repr__(self) -> str:
        return "RandomSource(<redacted>)"

    def __reduce__(self):
        raise TypeError("a RandomSource cannot be pickled")

    def _key(self, label: str) -> bytes:
        key = self._keys.get(label)
        if key is None:
            key = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=label.encode("ascii")).derive(self._root)
            self._keys[label] = key
        return key

    def bytes_at(self, label: str, offset: int, n: int) -> np.ndarray:
        """``n`` keystream bytes of ``label`` from byte ``offset``, as a uint8 array."""
        block, skip = divmod(int(offset), 16)
        enc = Cipher(algorithms.AES(self._key(label)), modes.CTR(block.to_bytes(16, "big"))).encryptor()
        if skip:
            enc.update(bytes(skip))
        buf = np.empty(n + 16, dtype=np.uint8)  # update_into wants room for one more block
        if n:
            enc.update_into(_zeros(n), buf)
        return buf[:n]

    def stream(self, label: str, index: int) -> Stream:
        """A sequential stream for draws with rejection, one per ``index`` (e.g. an InstaHide encoding).

        It is the keystream of ``label`` with the counter block starting at ``index * 2^64``, so the
        streams of different indices never overlap.
        """
        return Stream(self._key(label), (int(index) << 64).to_bytes(16, "big"))
