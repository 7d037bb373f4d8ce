"""Versioned keys: records in the dkit home, seeds in the OS keyring or a passphrase-encrypted file."""

from .backends import FileBackend, KeyringBackend, MemoryBackend, open_backend
from .manager import AuditReport, Keystore, LoadedKey, parse_age
from .records import KeyRecord, VersionRecord, parse_ref

__all__ = [
    "AuditReport",
    "FileBackend",
    "KeyRecord",
    "KeyringBackend",
    "Keystore",
    "LoadedKey",
    "MemoryBackend",
    "VersionRecord",
    "open_backend",
    "parse_age",
    "parse_ref",
]
