"""Where seeds live: the OS keyring (default), or a passphrase-encrypted file store.

A backend stores one 32-byte seed per label. Labels are ``<store id>/<key name>@<version>`` so that
two dkit homes never share an entry. There is no plaintext backend, and keyring's null and fail
backends are refused with a message that names the alternatives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from .. import jsonload
from ..errors import PassphraseError, SecretBackendError, StoreCorrupt
from ..home import atomic_write
from ..secret import Seed
from . import sealed

ENV_KEYSTORE = "DKIT_KEYSTORE"
ENV_PASSPHRASE = "DKIT_PASSPHRASE"
SERVICE = "dkit"
KEYRING_PREFIX = "dkit-seed-v1:"
FILE_STORE_NAME = "secrets.json"

NO_KEYRING_HINT = (
    "options: (1) run a keyring service (GNOME Keyring or KWallet through Secret Service, the macOS "
    "Keychain, the Windows Credential Manager); on a headless Linux machine: dbus-run-session, then "
    "gnome-keyring-daemon --unlock --components=secrets; (2) use dkit's passphrase-encrypted file "
    "store: export DKIT_KEYSTORE=file (the passphrase comes from a prompt or DKIT_PASSPHRASE)"
)


class SecretBackend(Protocol):
    name: str

    def get(self, label: str) -> Seed | None: ...

    def set(self, label: str, seed: Seed) -> None: ...

    def delete(self, label: str) -> None: ...


class MemoryBackend:
    """Secrets in this process only. For tests and throw-away demos; nothing is written."""

    name = "memory"

    def __init__(self):
        self._items: dict[str, Seed] = {}

    def __repr__(self) -> str:
        return f"MemoryBackend({len(self._items)} entries)"

    def get(self, label):
        return self._items.get(label)

    def set(self, label, seed):
        self._items[label] = seed

    def delete(self, label):
        self._items.pop(label, None)

    def labels(self) -> list[str]:
        return sorted(self._items)


class KeyringBackend:
    """The OS keyring through the ``keyring`` package (Secret Service, Keychain, Credential Manager)."""

    name = "keyring"

    def __init__(self, kr=None):
        import keyring
        from keyring.backends import chainer, fail, null

        kr = kr if kr is not None else keyring.get_keyring()
        unusable = isinstance(kr, (fail.Keyring, null.Keyring)) or (
            isinstance(kr, chainer.ChainerBackend) and not kr.backends
        )
        if unusable:
            raise SecretBackendError(
                f"no usable OS keyring backend (keyring chose {type(kr).__module__}.{type(kr).__name__})",
                hint=NO_KEYRING_HINT,
            )
        self._kr = kr

    def __repr__(self) -> str:
        return f"KeyringBackend({type(self._kr).__name__})"

    def _call(self, what: str, label: str, fn, *args):
        try:
            return fn(SERVICE, label, *args)
        except Exception as e:  # keyring and its backends raise many types (dbus, secretstorage, ...)
            from keyring.errors import PasswordDeleteError

            if what == "delete" and isinstance(e, PasswordDeleteError):
                return None
            raise SecretBackendError(
                f"the OS keyring refused to {what} the secret of {label.split('/', 1)[-1]} "
                f"({type(e).__name__}: {_short(e)})",
                hint=NO_KEYRING_HINT,
            ) from None

    def get(self, label):
        text = self._call("read", label, self._kr.get_password)
        if text is None:
            return None
        if not text.startswith(KEYRING_PREFIX):
            raise StoreCorrupt(f"the keyring entry for {label.split('/', 1)[-1]} was not written by dkit")
        try:
            return Seed(sealed.b64d(text[len(KEYRING_PREFIX) :]))
        except ValueError:
            raise StoreCorrupt(f"the keyring entry for {label.split('/', 1)[-1]} is malformed") from None

    def set(self, label, seed):
        self._call("store", label, self._kr.set_password, KEYRING_PREFIX + sealed.b64e(seed.expose()))
        # Read back: some backends accept a write and drop it (a locked or null collection).
        back = self.get(label)
        if back is None or back != seed:
            raise SecretBackendError(
                f"the OS keyring accepted the secret of {label.split('/', 1)[-1]} but did not keep it",
                hint=NO_KEYRING_HINT,
            )

    def delete(self, label):
        self._call("delete", label, self._kr.delete_password)


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text[:160]


class FileBackend:
    """Seeds encrypted with AES-256-GCM under a scrypt key from a passphrase, in one JSON file.

    Each entry is bound to its label (associated data), so entries cannot be swapped. A check
    entry tells a wrong passphrase from a damaged file.
    """

    name = "file"
    _CHECK = b"dkit file store"

    def __init__(self, path: Path, passphrase: Callable[..., str | None]):
        self.path = Path(path)
        self._passphrase = passphrase
        self._key: Seed | None = None  # the scrypt key once unlocked, in a redacted holder
        self._cache: tuple | None = None  # (file stamp, parsed document): no secret, entries are sealed

    def __repr__(self) -> str:
        return f"FileBackend({str(self.path)!r})"

    def __reduce_ex__(self, protocol):
        raise TypeError("a file store cannot be pickled (once unlocked it holds its key); open one in each process")

    def _read(self) -> dict | None:
        """The store's document (a fresh copy each time: callers change it); parsed again only when
        the file changed, so reading many secrets (an audit) stays linear."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._cache is None or self._cache[0] != stamp:
            self._cache = (stamp, self._parse())
        doc = self._cache[1]
        return {**doc, "entries": dict(doc["entries"])}

    def _parse(self) -> dict:
        try:
            doc = jsonload.loads(self.path.read_bytes())
            if doc.get("format") != "dkit-file-store":
                raise ValueError("not a dkit file store")
            if doc.get("version") != 1:
                raise StoreCorrupt(
                    f"{self.path}: file store version {doc.get('version')} is newer than this dkit; upgrade dkit"
                )
            doc["kdf"], doc["check"]  # noqa: B018 - presence check
            if not isinstance(doc["entries"], dict):
                raise TypeError("entries")
            return doc
        except StoreCorrupt:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreCorrupt(f"{self.path}: the file store is damaged ({type(e).__name__})") from None

    def _unlock(self, doc: dict | None) -> tuple[bytes, dict]:
        if doc is None:
            phrase = sealed.check_passphrase(self._passphrase(new=True), new=True)
            kdf = sealed.new_kdf()
            key = sealed.kdf_key(phrase, kdf)
            doc = {
                "format": "dkit-file-store",
                "version": 1,
                "kdf": kdf,
                "check": sealed.encrypt(key, self._CHECK, b"check"),
                "entries": {},
            }
            self._key = Seed(key)
            return key, doc
        if self._key is None:
            phrase = sealed.check_passphrase(self._passphrase(new=False), new=False)
            try:
                key = sealed.kdf_key(phrase, doc["kdf"])
            except ValueError as e:
                raise StoreCorrupt(f"{self.path}: {e}") from None
            try:
                sealed.decrypt(key, doc["check"], b"check")
            except sealed.InvalidTag:
                raise PassphraseError(f"wrong passphrase for the file store {self.path}") from None
            except ValueError as e:
                raise StoreCorrupt(f"{self.path}: the file store is damaged ({e})") from None
            self._key = Seed(key)
        return self._key.expose(), doc

    def get(self, label):
        doc = self._read()
        if doc is None or label not in doc["entries"]:
            return None
        key, doc = self._unlock(doc)
        try:
            return Seed(sealed.decrypt(key, doc["entries"][label], label.encode("utf-8")))
        except (sealed.InvalidTag, ValueError, KeyError):
            raise StoreCorrupt(f"{self.path}: the entry for {label.split('/', 1)[-1]} is damaged") from None

    def set(self, label, seed):
        self.set_many([(label, seed)])

    def set_many(self, items) -> None:
        """Store several (label, seed) pairs with one write of the file (an import of many versions
        stays linear in their number)."""
        key, doc = self._unlock(self._read())
        for label, seed in items:
            doc["entries"][label] = sealed.encrypt(key, seed.expose(), label.encode("utf-8"))
        atomic_write(self.path, json.dumps(doc, indent=1, sort_keys=True).encode())

    def labels(self) -> list[str]:
        """The labels of every stored secret (no passphrase needed: labels are not secret)."""
        doc = self._read()
        return sorted(doc["entries"]) if doc else []

    def delete(self, label):
        doc = self._read()
        if doc is None or label not in doc["entries"]:
            return
        del doc["entries"][label]
        atomic_write(self.path, json.dumps(doc, indent=1, sort_keys=True).encode())


def env_passphrase(*, new: bool = False) -> str | None:
    return os.environ.get(ENV_PASSPHRASE) or None


def open_backend(kind: str | None, home: Path, passphrase: Callable[..., str | None] | None = None):
    """The backend named by ``kind`` (or ``$DKIT_KEYSTORE``, default ``keyring``). ``passphrase(new=...)``
    gives the file store's passphrase; ``new`` is true when the store is being created (confirm it)."""
    kind = (kind or os.environ.get(ENV_KEYSTORE) or "keyring").strip().lower()
    if kind == "keyring":
        return KeyringBackend()
    if kind == "file":
        return FileBackend(home / FILE_STORE_NAME, passphrase or env_passphrase)
    raise SecretBackendError(
        f"unknown key store {kind!r} in {ENV_KEYSTORE}: choose keyring (the OS keyring) or file "
        "(a passphrase-encrypted file)"
    )
