"""Key derivation, spec version 1 (``keys/SPEC-v1.md``).

Everything secret except the seed is derived here: the block permutation, the RMT matrices, the
AES keys, and the public key ID. The only primitives are HKDF-SHA256, HMAC-SHA256 and the AES-256
CTR keystream from ``cryptography``, so the derived material does not depend on numpy's or
torch's random generators (which may change their streams between releases). numpy is used only
for arithmetic that IEEE-754 pins down to the last bit or two (log, cos, sin, sqrt, QR), which is
why matrices are specified to 1e-12 while permutations and AES keys are exact.
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .params import KeyParams
from .secret import Sealed, Seed

SPEC_VERSION = 1
SALT = b"dkit/derive/v1"
KEY_ID_BYTES = 16
PROJECTION_COND_PER_SIDE = 20.0  # accept cond(G) <= 20 m; the median for Gaussian G is about 3.5 m
PROJECTION_MAX_TRIES = 1000

_TWO_POW_64 = 1 << 64
_INV_2_53 = 2.0**-53


def subkey(seed: Seed, label: str) -> bytes:
    """HKDF-SHA256(IKM=seed, salt="dkit/derive/v1", info=label), 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=SALT, info=label.encode("ascii")).derive(seed.expose())


class Stream:
    """The keystream of AES-256-CTR under ``subkey(seed, label)``, counter block starting at zero."""

    __slots__ = ("_enc",)

    def __init__(self, key: bytes, counter: bytes = bytes(16)):
        self._enc = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()

    @classmethod
    def for_label(cls, seed: Seed, label: str) -> Stream:
        return cls(subkey(seed, label))

    def __repr__(self) -> str:
        return "Stream(<redacted>)"

    def read(self, n: int) -> bytes:
        return self._enc.update(bytes(n))

    def uint64(self, n: int) -> np.ndarray:
        """n unsigned 64-bit integers, little-endian, in stream order."""
        return np.frombuffer(self.read(8 * n), dtype="<u8").astype(np.uint64)

    def uniform(self, n: int) -> np.ndarray:
        """n floats in [0, 1): the top 53 bits of each uint64, times 2^-53."""
        return (self.uint64(n) >> np.uint64(11)).astype(np.float64) * _INV_2_53

    def gaussian(self, n: int) -> np.ndarray:
        """n standard normal floats by Box-Muller; each pair uses two uint64 (a, b).

        u1 = ((a >> 11) + 0.5) * 2^-53 (never 0), u2 = (b >> 11) * 2^-53,
        r = sqrt(-2 ln u1), z0 = r cos(2 pi u2), z1 = r sin(2 pi u2); output z0, z1, z0, z1, ...
        """
        pairs = (n + 1) // 2
        raw = (self.uint64(2 * pairs) >> np.uint64(11)).astype(np.float64)
        u1 = (raw[0::2] + 0.5) * _INV_2_53
        u2 = raw[1::2] * _INV_2_53
        r = np.sqrt(-2.0 * np.log(u1))
        theta = 2.0 * np.pi * u2
        out = np.empty(2 * pairs, dtype=np.float64)
        out[0::2] = r * np.cos(theta)
        out[1::2] = r * np.sin(theta)
        return out[:n]

    def below(self, n: int) -> int:
        """A uniform integer in [0, n) by rejection: draw x until x < 2^64 - (2^64 mod n)."""
        limit = _TWO_POW_64 - (_TWO_POW_64 % n)
        while True:
            x = int.from_bytes(self.read(8), "little")
            if x < limit:
                return x % n


def permutation(seed: Seed, t: int) -> np.ndarray:
    """Fisher-Yates over [0, t) from the stream "perm". Output block j comes from input block perm[j]."""
    s = Stream.for_label(seed, "perm")
    p = list(range(t))
    for i in range(t - 1, 0, -1):
        j = s.below(i + 1)
        p[i], p[j] = p[j], p[i]
    return np.asarray(p, dtype=np.int64)


def orthogonal(stream: Stream, m: int) -> np.ndarray:
    """Haar-random orthogonal m x m: QR of a Gaussian matrix (row-major fill), columns of Q times sign(diag R)."""
    g = stream.gaussian(m * m).reshape(m, m)
    q, r = np.linalg.qr(g)
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    return q * signs[None, :]


def projection(stream: Stream, m: int) -> np.ndarray:
    """A random full-rank m x m matrix: Gaussian / sqrt(m), redrawn from the same stream while cond > 20 m."""
    for _ in range(PROJECTION_MAX_TRIES):
        g = stream.gaussian(m * m).reshape(m, m) / np.sqrt(m)
        if np.linalg.cond(g) <= PROJECTION_COND_PER_SIDE * m:
            return g
    raise RuntimeError("no well-conditioned projection matrix found")  # probability ~ 0


def rmt_matrices(seed: Seed, params: KeyParams) -> np.ndarray:
    """The secret matrices R_i, i = 0..t-1 (original block positions), shape (t, m, m), float64."""
    m = params.matrix_side
    make = orthogonal if params.rmt_kind == "orthogonal" else projection
    out = np.empty((params.positions, m, m), dtype=np.float64)
    for i in range(params.positions):
        out[i] = make(Stream.for_label(seed, f"rmt/{i}"), m)
    return out


def aes_keys(seed: Seed, params: KeyParams) -> list[bytes]:
    """AES-256 keys: one ("aes/shared") or one per original block position ("aes/block/i")."""
    if params.aes_keys == "shared":
        return [subkey(seed, "aes/shared")]
    return [subkey(seed, f"aes/block/{i}") for i in range(params.positions)]


def key_id(seed: Seed, params: KeyParams) -> str:
    """The public fingerprint: HMAC-SHA256(subkey "key-id", canonical params), first 16 bytes, hex."""
    mac = hmac.new(subkey(seed, "key-id"), params.canonical(), hashlib.sha256).digest()
    return mac[:KEY_ID_BYTES].hex()


class KeyMaterial(Sealed):
    """All secret material of one key version, derived once. Never printed, never pickled, never
    exposed by ``vars`` or ``dataclasses.asdict`` (``Sealed``)."""

    __slots__ = ("params", "key_id", "perm", "matrices", "aes", "source_key")
    params: KeyParams
    key_id: str
    perm: np.ndarray | None
    matrices: np.ndarray | None
    aes: tuple[bytes, ...] | None
    source_key: bytes  # keys the hashes of source file names stored in datasets (section 6)

    def __init__(self, *, params, key_id, perm, matrices, aes, source_key):
        self._init(params=params, key_id=key_id, perm=perm, matrices=matrices, aes=aes, source_key=source_key)

    def __repr__(self) -> str:
        return f"KeyMaterial(key_id={self.key_id!r}, <redacted>)"


def derive(seed: Seed, params: KeyParams) -> KeyMaterial:
    """Derive every piece of key material that ``params`` calls for."""
    perm = permutation(seed, params.positions) if params.has("perm") else None
    mats = rmt_matrices(seed, params) if params.has("rmt") else None
    aes = tuple(aes_keys(seed, params)) if params.has("aes") else None
    if perm is not None:
        perm.setflags(write=False)
    if mats is not None:
        mats.setflags(write=False)
    return KeyMaterial(
        params=params,
        key_id=key_id(seed, params),
        perm=perm,
        matrices=mats,
        aes=aes,
        source_key=subkey(seed, "source-id"),
    )


def source_id(material: KeyMaterial, name: str) -> bytes:
    """The keyed hash of a source item's name: HMAC-SHA256(subkey "source-id", UTF-8 name)[0:16]."""
    return hmac.new(material.source_key, name.encode("utf-8"), hashlib.sha256).digest()[:16]
