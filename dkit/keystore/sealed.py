"""Passphrase encryption shared by key backups and the file store: scrypt, then AES-256-GCM.

Both come from ``cryptography``. The scrypt parameters travel with the ciphertext and are
bounded on read, so a crafted file cannot make dkit allocate gigabytes.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..errors import PassphraseError

SCRYPT_N = 1 << 15
SCRYPT_R = 8
SCRYPT_P = 1
MAX_SCRYPT_N = 1 << 20
MAX_SCRYPT_MEMORY = 256 << 20  # bytes: scrypt needs 128 * r * n
MAX_SCRYPT_WORK = 1 << 22  # n * r * p: 16 times the default's cost
MIN_PASSPHRASE = 8


def b64e(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def b64d(s: str) -> bytes:
    return base64.b64decode(s.encode("ascii"), validate=True)


def check_passphrase(passphrase: str | None, *, new: bool) -> str:
    if not passphrase:
        raise PassphraseError(
            "a passphrase is needed",
            hint="set DKIT_PASSPHRASE or run in a terminal to be prompted",
        )
    if new and len(passphrase) < MIN_PASSPHRASE:
        raise PassphraseError(f"the passphrase must be at least {MIN_PASSPHRASE} characters")
    return passphrase


def new_kdf() -> dict:
    return {"name": "scrypt", "salt": b64e(os.urandom(16)), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}


def _field(doc, name: str, kind: type):
    """``doc[name]`` if ``doc`` is a dict and the value has the right type; ValueError otherwise."""
    if not isinstance(doc, dict):
        raise ValueError("expected an object")
    value = doc.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{name!r} is missing or malformed")
    return value


def kdf_key(passphrase: str, kdf: dict) -> bytes:
    """The 256-bit key for ``passphrase`` under ``kdf``. Raises ValueError on bad parameters."""
    if _field(kdf, "name", str) != "scrypt":
        raise ValueError(f"unknown key derivation {kdf.get('name')!r}")
    n, r, p = (_field(kdf, k, int) for k in ("n", "r", "p"))
    salt = b64d(_field(kdf, "salt", str))
    if not (2 <= n <= MAX_SCRYPT_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        raise ValueError("scrypt parameters out of bounds")
    if 128 * r * n > MAX_SCRYPT_MEMORY or n * r * p > MAX_SCRYPT_WORK:
        raise ValueError("scrypt parameters out of bounds (memory or work too large)")
    if len(salt) < 16:
        raise ValueError("scrypt salt too short")
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> dict:
    nonce = os.urandom(12)
    return {"nonce": b64e(nonce), "ct": b64e(AESGCM(key).encrypt(nonce, plaintext, aad))}


def decrypt(key: bytes, blob: dict, aad: bytes) -> bytes:
    """Raises InvalidTag for a wrong key or any change to the ciphertext or ``aad``, and ValueError
    for a malformed blob."""
    nonce, ct = b64d(_field(blob, "nonce", str)), b64d(_field(blob, "ct", str))
    if len(nonce) != 12:
        raise ValueError("malformed nonce")
    return AESGCM(key).decrypt(nonce, ct, aad)


__all__ = ["InvalidTag", "b64d", "b64e", "check_passphrase", "decrypt", "encrypt", "kdf_key", "new_kdf"]
