"""Crash-consistent changes to the key store: journal first, then secrets, log and records.

A change touches three places that cannot be written at once: the secret store (a seed set or
deleted), the audit log (lines appended) and ``keys.json`` (the records and the log's head). A
SIGKILL between two of them used to leave a secret without a record, or a log line the records
did not expect, which every later ``keys audit`` reported as tampering. Now each change runs:

1. write ``journal.json`` (atomically): the labels to set and delete (never a secret), the log's
   size before the change, the lines to append and the new ``keys.json``;
2. set and delete the secrets;
3. append the lines; 4. write ``keys.json``; 5. remove the journal.

The next process to take the lock finds any journal left behind and ends the change one way or
the other: forward when every secret to set is in the store with its recorded key ID (steps 3-5
are redone: the log is cut back to its old size first, so no line is written twice), back
otherwise (the new secrets that no record names are deleted, the log is cut back). Either way it
appends a ``recover`` line saying what happened, so an interrupted change is told apart from
tampering, and the audit chain stays intact. Leftover temporary files of atomic writes are
removed at the same time: under the lock, no writer is at work.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import jsonload
from ..derive import key_id
from ..errors import StoreCorrupt
from ..home import append_line, atomic_write
from ..params import KeyParams
from ..secret import Seed
from . import audit
from .records import SECRET_STORES, STORE_NAME, StoreState, load_state, parse_doc, save_state

JOURNAL_NAME = "journal.json"
FORMAT = "dkit-key-journal"
VERSION = 1


@dataclass
class Change:
    """What one locked block changes. Nothing reaches the secret store or the log before ``commit``."""

    state: StoreState
    sets: list[tuple[str, Seed, str, KeyParams]] = field(default_factory=list)  # label, seed, key ID, params
    deletes: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)

    def set_secret(self, label: str, seed: Seed, kid: str, params: KeyParams) -> None:
        self.sets.append((label, seed, kid, params))

    def delete_secret(self, label: str) -> None:
        self.deletes.append(label)

    def log(self, fields: dict) -> None:
        self.events.append(fields)

    @property
    def empty(self) -> bool:
        return not (self.sets or self.deletes or self.events)


def commit(home: Path, change: Change, backend) -> None:
    """Apply ``change`` in the order above. The caller holds the home's lock. If the secret store
    refuses a write, the change is undone here and the error raised."""
    log = home / audit.LOG_NAME
    state = change.state
    lines = []
    for fields in change.events:
        line, state.audit_head = audit.entry_line(state.audit_head, fields)
        lines.append(line.decode("utf-8"))
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "event": change.events[0]["event"] if change.events else "",
        "key": change.events[0].get("key", "") if change.events else "",
        "store": backend.name if backend is not None else None,
        "set": [{"label": lbl, "key_id": kid, "params": p.to_dict()} for lbl, _, kid, p in change.sets],
        "delete": list(change.deletes),
        "log_size": log.stat().st_size if log.exists() else 0,
        "lines": lines,
        "state": json.loads(state.to_bytes()),
    }
    path = home / JOURNAL_NAME
    atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8") + b"\n")
    try:
        pairs = [(label, seed) for label, seed, _, _ in change.sets]
        if pairs and hasattr(backend, "set_many"):  # the file store: one write for all
            backend.set_many(pairs)
        else:
            for label, seed in pairs:
                backend.set(label, seed)
        for label in change.deletes:
            backend.delete(label)
    except BaseException:
        with contextlib.suppress(Exception):  # the error being raised is the one to report
            _back(home, doc, backend)
            path.unlink()
        raise
    _finish(home, state, lines, doc["log_size"])
    path.unlink()


def recover(home: Path, backend_for: Callable[[str], object], now: str) -> str | None:
    """End a change that a crash interrupted, if any; returns what was done ("rolled forward" or
    "rolled back"), or None. The caller holds the home's lock."""
    for tmp in home.glob(".*.tmp"):  # atomic writes that never reached their rename
        with contextlib.suppress(OSError):
            tmp.unlink()
    path = home / JOURNAL_NAME
    if not path.exists():
        return None
    doc = read(path)
    backend = backend_for(doc["store"]) if doc["set"] or doc["delete"] else None
    if all(_present(backend, s) for s in doc["set"]):
        for label in doc["delete"]:
            backend.delete(label)
        state, lines, outcome = parse_doc(doc["state"], path), list(doc["lines"]), "rolled forward"
    else:
        state, lines, outcome = _back(home, doc, backend), [], "rolled back"
    fields = {"time": now, "event": "recover", "key": doc["key"], "data": {"change": doc["event"], "outcome": outcome}}
    line, state.audit_head = audit.entry_line(state.audit_head, fields)
    _finish(home, state, [*lines, line.decode("utf-8")], doc["log_size"])
    path.unlink()
    return f"an interrupted {doc['event'] or 'change'} of {doc['key'] or 'the key store'} was {outcome}"


def read(path: Path) -> dict:
    try:
        doc = jsonload.loads(path.read_bytes())
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise ValueError("not a dkit key journal")
        for k, t in (("set", list), ("delete", list), ("lines", list), ("state", dict), ("log_size", int)):
            if not isinstance(doc.get(k), t) or isinstance(doc.get(k), bool):
                raise ValueError(f"{k} is malformed")
        if doc["log_size"] < 0 or not isinstance(doc.get("event"), str) or not isinstance(doc.get("key"), str):
            raise ValueError("its header is malformed")
        if doc.get("store") not in (None, *SECRET_STORES) or ((doc["set"] or doc["delete"]) and not doc["store"]):
            raise ValueError("its secret store is missing or unknown")
        for s in doc["set"]:
            KeyParams.from_dict(s["params"])
            if not isinstance(s["label"], str) or not isinstance(s["key_id"], str):
                raise ValueError("a secret entry is malformed")
        if not all(isinstance(x, str) for x in [*doc["delete"], *doc["lines"]]):
            raise ValueError("a label or line is malformed")
        return doc
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise StoreCorrupt(
            f"{path}: the journal of an interrupted change is damaged ({e})",
            hint="dkit never writes a damaged journal; if nobody edited it, report a bug. Moving it away "
            "leaves the change half done: check with dkit keys audit",
        ) from None


def _present(backend, entry: dict) -> bool:
    seed = backend.get(entry["label"])
    return seed is not None and key_id(seed, KeyParams.from_dict(entry["params"])) == entry["key_id"]


def _back(home: Path, doc: dict, backend) -> StoreState:
    """Undo the secrets of a change that did not finish; returns the records as they were."""
    old = load_state(home / STORE_NAME)
    for s in doc["set"]:
        if not named(old, s["label"]):
            backend.delete(s["label"])
    return old


def named(state: StoreState, label: str) -> bool:
    """Does a record that still has its secret name this label (``store_id/name@version``)?"""
    store_id, _, ref = label.partition("/")
    name, _, number = ref.rpartition("@")
    rec = state.keys.get(name)
    if store_id != state.store_id or rec is None or not number.isdigit():
        return False
    return any(v.version == int(number) and v.status != "destroyed" for v in rec.versions)


def _finish(home: Path, state: StoreState, lines: list[str], log_size: int) -> None:
    log = home / audit.LOG_NAME
    if log.exists() and log.stat().st_size > log_size:
        os.truncate(log, log_size)  # lines of this change that made it before the crash
    for line in lines:
        append_line(log, line.encode("utf-8"))
    save_state(home / STORE_NAME, state)
