"""Public key records (``keys/SPEC-v1.md``, "Key record") and the file that holds them.

``$DKIT_HOME/keys.json`` holds every key's record: name, versions, status, primary, times, the
public parameters and the key ID. No secret is ever written here.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from .. import jsonload
from ..errors import KeyNotFound, ParameterError, StoreCorrupt
from ..home import atomic_write
from ..params import KeyParams

STORE_NAME = "keys.json"
STORE_FORMAT = "dkit-keystore"
STORE_VERSION = 1
STATUSES = ("enabled", "disabled", "destroyed")
SECRET_STORES = ("keyring", "file", "memory")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def fmt_time(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ParameterError(
            f"invalid key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"name"`` -> (name, None) meaning the primary; ``"name@3"`` -> (name, 3)."""
    name, sep, ver = str(ref).partition("@")
    check_name(name)
    if not sep:
        return name, None
    if not ver.isdigit() or int(ver) < 1:
        raise ParameterError(f"invalid key reference {ref!r}: expected NAME or NAME@VERSION (VERSION >= 1)")
    return name, int(ver)


@dataclass(frozen=True)
class VersionRecord:
    version: int
    status: str
    created: str
    key_id: str
    params: KeyParams
    secret_store: str
    changed: str

    @property
    def usable(self) -> bool:
        return self.status == "enabled"

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "status": self.status,
            "created": self.created,
            "changed": self.changed,
            "key_id": self.key_id,
            "secret_store": self.secret_store,
            "params": self.params.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> VersionRecord:
        v = cls(
            version=int(d["version"]),
            status=str(d["status"]),
            created=str(d["created"]),
            key_id=str(d["key_id"]),
            params=KeyParams.from_dict(d["params"]),
            secret_store=str(d["secret_store"]),
            changed=str(d.get("changed", d["created"])),
        )
        if not _count(d["version"]):
            raise ValueError(f"version number {d['version']!r} is not a whole number of 1 or more")
        if v.status not in STATUSES:
            raise ValueError(f"unknown status {v.status!r}")
        if v.secret_store not in SECRET_STORES:
            raise ValueError(f"version {v.version}: unknown secret store {v.secret_store[:40]!r}")
        if not re.fullmatch(r"[0-9a-f]{32}", v.key_id):
            raise ValueError(f"version {v.version}: malformed key ID")
        parse_time(v.created)
        parse_time(v.changed)
        return v


@dataclass(frozen=True)
class KeyRecord:
    name: str
    created: str
    primary: int
    versions: tuple[VersionRecord, ...] = field(default_factory=tuple)

    def version(self, number: int | None) -> VersionRecord:
        n = self.primary if number is None else number
        for v in self.versions:
            if v.version == n:
                return v
        raise KeyNotFound(
            f"key {self.name!r} has no version {n}",
            hint=f"its versions are {', '.join(str(v.version) for v in self.versions)}",
        )

    @property
    def latest(self) -> int:
        return max(v.version for v in self.versions)

    def with_version(self, new: VersionRecord) -> KeyRecord:
        others = tuple(v for v in self.versions if v.version != new.version)
        return replace(self, versions=tuple(sorted(others + (new,), key=lambda v: v.version)))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "created": self.created,
            "primary": self.primary,
            "versions": [v.to_dict() for v in self.versions],
        }

    @classmethod
    def from_dict(cls, d: dict) -> KeyRecord:
        rec = cls(
            name=check_name(d["name"]),
            created=str(d["created"]),
            primary=int(d["primary"]),
            versions=tuple(sorted((VersionRecord.from_dict(v) for v in d["versions"]), key=lambda v: v.version)),
        )
        numbers = [v.version for v in rec.versions]
        if not numbers or len(set(numbers)) != len(numbers) or not _count(d["primary"]):
            raise ValueError(f"key {rec.name!r}: its version numbers are missing, repeated, or malformed")
        if rec.version(rec.primary).status != "enabled":  # the primary must exist and be usable
            raise ValueError(
                f"key {rec.name!r}: its primary version {rec.primary} is {rec.version(rec.primary).status}"
            )
        parse_time(rec.created)
        return rec


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class StoreState:
    """The whole content of keys.json."""

    store_id: str
    keys: dict[str, KeyRecord]
    audit_head: dict | None

    @classmethod
    def new(cls) -> StoreState:
        return cls(store_id=secrets.token_hex(8), keys={}, audit_head=None)

    def get(self, name: str) -> KeyRecord:
        try:
            return self.keys[name]
        except KeyError:
            raise KeyNotFound(f"no key named {name!r}", hint="dkit keys list shows the keys") from None

    def to_bytes(self) -> bytes:
        doc = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "store_id": self.store_id,
            "keys": {n: r.to_dict() for n, r in sorted(self.keys.items())},
            "audit_head": self.audit_head,
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode("utf-8") + b"\n"


def load_state(path: Path) -> StoreState:
    if not path.exists():
        return StoreState.new()
    try:
        doc = jsonload.loads(path.read_bytes())
    except ValueError:
        raise StoreCorrupt(
            f"{path}: not valid JSON (the key record store is damaged)",
            hint="restore it from a backup, or re-import your key backups into a new DKIT_HOME",
        ) from None
    return parse_doc(doc, path)


def parse_doc(doc, path: Path) -> StoreState:
    """The records of a parsed ``keys.json`` document (``path`` names it in errors)."""
    if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT:
        raise StoreCorrupt(f"{path}: not a dkit key record store")
    if doc.get("version") != STORE_VERSION:
        raise StoreCorrupt(f"{path}: key store version {doc.get('version')!r} is not known to this dkit; upgrade dkit")
    try:
        keys = {n: KeyRecord.from_dict(r) for n, r in doc["keys"].items()}
        for n, r in keys.items():
            if r.name != n:
                raise ValueError(f"record {n!r} names itself {r.name!r}")
        head = doc.get("audit_head")
        if head is not None and not (isinstance(head.get("n"), int) and isinstance(head.get("hash"), str)):
            raise ValueError("malformed audit head")
        return StoreState(store_id=str(doc["store_id"]), keys=keys, audit_head=head)
    except (KeyError, TypeError, ValueError, AttributeError, ParameterError, KeyNotFound) as e:
        raise StoreCorrupt(
            f"{path}: the key record store is damaged ({e})",
            hint="restore it from a backup, or re-import your key backups into a new DKIT_HOME",
        ) from None


def save_state(path: Path, state: StoreState) -> None:
    atomic_write(path, state.to_bytes())
