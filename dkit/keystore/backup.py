"""Key backups: one key's record and seeds, encrypted under a passphrase (``keys/SPEC-v1.md``, "Backup").

The header (format, version, name, time, scrypt parameters, a passphrase check) is authenticated
as AES-GCM associated data, so editing any byte of the file is caught. The check value tells a
wrong passphrase apart from a damaged file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from .. import jsonload
from ..derive import key_id
from ..errors import BackupError, PassphraseError
from ..home import atomic_write
from ..params import canonical_json
from ..secret import Seed
from . import sealed
from .records import KeyRecord, fmt_time, utcnow

FORMAT = "dkit-key-backup"
VERSION = 1


def _check_value(key: bytes) -> str:
    return sealed.b64e(hmac.new(key, b"dkit key backup check", hashlib.sha256).digest()[:16])


def write(path: Path, record: KeyRecord, seeds: dict[int, Seed], passphrase: str) -> None:
    passphrase = sealed.check_passphrase(passphrase, new=True)
    kdf = sealed.new_kdf()
    key = sealed.kdf_key(passphrase, kdf)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "name": record.name,
        "created": fmt_time(utcnow()),
        "kdf": kdf,
        "check": _check_value(key),
        "cipher": "AES-256-GCM",
    }
    body = {"record": record.to_dict(), "seeds": {str(v): sealed.b64e(s.expose()) for v, s in seeds.items()}}
    doc = dict(header, payload=sealed.encrypt(key, canonical_json(body), canonical_json(header)))
    try:
        atomic_write(Path(path), json.dumps(doc, indent=1).encode("utf-8") + b"\n")
    except OSError as e:
        raise BackupError(f"{path}: cannot write the backup ({e.strerror or e})") from None


def read(path: Path, passphrase: str) -> tuple[KeyRecord, dict[int, Seed]]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BackupError(f"{path}: no such file") from None
    except OSError as e:
        raise BackupError(f"{path}: cannot read ({e.strerror})") from None
    try:
        doc = jsonload.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError
    except ValueError:
        raise BackupError(f"{path}: not a dkit key backup, or truncated (not valid JSON)") from None
    if doc.get("format") != FORMAT:
        raise BackupError(f"{path}: not a dkit key backup")
    if doc.get("version") != VERSION:
        raise BackupError(f"{path}: backup version {doc.get('version')!r} is newer than this dkit; upgrade dkit")
    try:
        payload = doc.pop("payload")
        header = doc
        key = sealed.kdf_key(sealed.check_passphrase(passphrase, new=False), header["kdf"])
    except PassphraseError:
        raise
    except (KeyError, TypeError, ValueError):
        raise BackupError(f"{path}: the backup is damaged (its header is incomplete or altered)") from None
    if not hmac.compare_digest(str(header.get("check", "")), _check_value(key)):
        raise PassphraseError(f"wrong passphrase for the backup {path}")
    try:
        body = jsonload.loads(sealed.decrypt(key, payload, canonical_json(header)))
    except (sealed.InvalidTag, KeyError, TypeError, ValueError):
        raise BackupError(f"{path}: the backup was altered or damaged (authentication failed)") from None
    try:
        record = KeyRecord.from_dict(body["record"])
        seeds = {int(v): Seed(sealed.b64d(s)) for v, s in body["seeds"].items()}
    except Exception as e:  # a well-authenticated but malformed body: written by a broken dkit
        raise BackupError(f"{path}: the backup's content is malformed ({type(e).__name__})") from None
    if record.name != header.get("name"):
        raise BackupError(f"{path}: the backup's header and content name different keys")
    for v in record.versions:
        seed = seeds.get(v.version)
        if v.status == "destroyed":
            continue
        if seed is None:
            raise BackupError(f"{path}: version {v.version} of {record.name!r} has no secret in the backup")
        if key_id(seed, v.params) != v.key_id:
            raise BackupError(
                f"{path}: version {v.version} of {record.name!r} does not match its fingerprint {v.key_id}"
            )
    return record, seeds
