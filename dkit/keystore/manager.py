"""The key store: named keys with numbered versions, a primary, and Tink's status machine.

    keygen -> version 1 (enabled, primary)
    rotate -> version n+1 (enabled, primary); older versions stay enabled for old models
    promote NAME@V  (enabled only)      disable NAME@V (never the primary)
    enable NAME@V   (disabled only)     destroy NAME@V (never the primary; secret deleted, record kept)

Every change holds a file lock on the dkit home, so concurrent dkit processes serialise, and
every change and every use of a key version is appended to the hash-chained audit log.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

from filelock import FileLock, Timeout

from ..derive import KeyMaterial, derive, key_id
from ..errors import (
    DkitError,
    KeyExists,
    KeyStateError,
    ParameterError,
    SecretBackendError,
    StoreCorrupt,
)
from ..home import default_home, ensure_home
from ..params import KeyParams
from ..secret import Sealed, Seed
from . import audit, backup, journal
from .backends import FILE_STORE_NAME, FileBackend, open_backend
from .records import (
    STORE_NAME,
    KeyRecord,
    StoreState,
    VersionRecord,
    check_name,
    fmt_time,
    load_state,
    parse_ref,
    parse_time,
    utcnow,
)

LOCK_NAME = ".lock"
LOCK_TIMEOUT_S = 60


def parse_age(text: str) -> timedelta:
    """``90d``, ``12w``, ``36h`` -> a timedelta."""
    m = re.fullmatch(r"\s*([0-9]+)\s*([dhw])\s*", str(text))
    if not m:
        raise ParameterError(f"malformed age {text!r}: expected a number and a unit, such as 90d, 12w or 36h")
    n, unit = int(m.group(1)), m.group(2)
    return {"d": timedelta(days=n), "w": timedelta(weeks=n), "h": timedelta(hours=n)}[unit]


class LoadedKey(Sealed):
    """A usable key version: its public record and its derived material (``Sealed``: no pickling,
    ``vars`` or ``dataclasses.asdict``)."""

    __slots__ = ("name", "record", "material")
    name: str
    record: VersionRecord
    material: KeyMaterial

    def __init__(self, *, name: str, record: VersionRecord, material: KeyMaterial):
        self._init(name=name, record=record, material=material)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.record.version}"

    @property
    def version(self) -> int:
        return self.record.version

    @property
    def key_id(self) -> str:
        return self.record.key_id

    @property
    def params(self) -> KeyParams:
        return self.record.params

    def __repr__(self) -> str:
        return f"LoadedKey({self.ref}, key_id={self.key_id})"


@dataclass
class AuditReport:
    versions: list[dict] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)
    lines: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {"ok": self.ok, "log_lines": self.lines, "versions": self.versions, "findings": self.findings}


class Keystore:
    """The key store of one dkit home. Cheap to create; the secret backend opens on first need."""

    def __init__(
        self,
        home: str | Path | None = None,
        *,
        backend=None,
        backend_kind: str | None = None,
        passphrase: Callable[..., str | None] | None = None,
        clock: Callable[[], datetime] = utcnow,
        on_recover: Callable[[str], None] | None = None,
    ):
        self.home = Path(home) if home is not None else default_home()
        self._backend = backend
        self._backend_kind = backend_kind
        # A store given here is used for everything; otherwise each version's secret is read from the
        # store its record names, and $DKIT_KEYSTORE only chooses where new keys go.
        self._pinned = backend is not None or backend_kind is not None
        self._passphrase = passphrase
        self._clock = clock
        self.recovered: str | None = None  # what the last recovery of an interrupted change did
        self._on_recover = on_recover

    def __repr__(self) -> str:
        return f"Keystore({str(self.home)!r})"

    def __reduce_ex__(self, protocol):
        raise TypeError("a Keystore cannot be pickled (an unlocked file store holds its key); open one in each process")

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def backend(self):
        if self._backend is None:
            self._backend = open_backend(self._backend_kind, self.home, self._passphrase)
        return self._backend

    @property
    def _store_path(self) -> Path:
        return self.home / STORE_NAME

    @property
    def _log_path(self) -> Path:
        return self.home / audit.LOG_NAME

    def _now(self) -> str:
        return fmt_time(self._clock())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[journal.Change]:
        """Hold the home's lock, end any change a crash interrupted, and yield a change to fill in;
        if the block finishes, the change is committed crash-consistently (see ``journal``)."""
        ensure_home(self.home)
        lock = FileLock(str(self.home / LOCK_NAME), timeout=LOCK_TIMEOUT_S, mode=0o600)
        try:
            lock.acquire()
        except Timeout:
            raise SecretBackendError(
                f"{self.home}: another dkit process holds the key store lock for over {LOCK_TIMEOUT_S}s"
            ) from None
        try:
            self._recover()
            change = journal.Change(load_state(self._store_path))
            yield change
            if not change.empty:
                journal.commit(self.home, change, self.backend if change.sets or change.deletes else None)
        finally:
            lock.release()

    def _recover(self) -> None:
        def backend_for(kind: str):
            self._use_store(kind)
            return self.backend

        try:
            done = journal.recover(self.home, backend_for, self._now())
        except DkitError as e:
            raise type(e)(
                f"{self.home}: a key store change was interrupted, and finishing it failed: {e.message}",
                hint=e.hint,
            ) from None
        if done:
            self.recovered = done
            if self._on_recover:
                self._on_recover(done)

    def _state(self) -> StoreState:
        return load_state(self._store_path)

    def _log(self, change: journal.Change, event: str, name: str, v: VersionRecord | None, **data) -> None:
        fields = {"time": self._now(), "event": event, "key": name}
        if v is not None:
            fields.update(version=v.version, key_id=v.key_id)
        if data:
            fields["data"] = data
        change.log(fields)

    def _label(self, state: StoreState, name: str, version: int) -> str:
        return f"{state.store_id}/{name}@{version}"

    def _use_store(self, kind: str) -> None:
        """Switch to the store ``kind`` (a record's), unless this key store was given one."""
        if self._pinned or (self._backend is not None and self._backend.name == kind):
            return
        if kind in ("keyring", "file"):
            self._backend = open_backend(kind, self.home, self._passphrase)

    def _check_store(self, v: VersionRecord, name: str) -> None:
        self._use_store(v.secret_store)
        if v.secret_store != self.backend.name:
            raise SecretBackendError(
                f"the secret of {name}@{v.version} is kept in the {v.secret_store} store, "
                f"but this dkit is using the {self.backend.name} store",
                hint=f"set DKIT_KEYSTORE={v.secret_store}",
            )

    def _new_version(self, change: journal.Change, name: str, number: int, params: KeyParams) -> VersionRecord:
        seed = Seed.generate()
        kid = key_id(seed, params)
        change.set_secret(self._label(change.state, name, number), seed, kid, params)
        now = self._now()
        return VersionRecord(
            version=number,
            status="enabled",
            created=now,
            key_id=kid,
            params=params,
            secret_store=self.backend.name,
            changed=now,
        )

    # -- reading ----------------------------------------------------------------------------
    def list(self) -> list[KeyRecord]:
        return [r for _, r in sorted(self._state().keys.items())]

    def get(self, name: str) -> KeyRecord:
        return self._state().get(check_name(name))

    def resolve(self, ref: str) -> tuple[KeyRecord, VersionRecord]:
        name, number = parse_ref(ref)
        rec = self.get(name)
        return rec, rec.version(number)

    # -- lifecycle --------------------------------------------------------------------------
    def keygen(self, name: str, params: KeyParams) -> KeyRecord:
        check_name(name)
        params.validate()
        with self._locked() as change:
            state = change.state
            if name in state.keys:
                raise KeyExists(f"a key named {name!r} exists already", hint="use dkit keys rotate to add a version")
            v = self._new_version(change, name, 1, params)
            rec = KeyRecord(name=name, created=v.created, primary=1, versions=(v,))
            state.keys[name] = rec
            self._log(change, "keygen", name, v, params=params.to_dict())
        return rec

    def rotate(self, name: str) -> VersionRecord:
        with self._locked() as change:
            state = change.state
            rec = state.get(check_name(name))
            self._use_store(rec.version(None).secret_store)  # a key's versions stay in one store
            v = self._new_version(change, name, rec.latest + 1, rec.version(None).params)
            state.keys[name] = KeyRecord(rec.name, rec.created, v.version, rec.versions + (v,))
            self._log(change, "rotate", name, v)
        return v

    def _set_status(self, ref: str, event: str, change) -> VersionRecord:
        name, number = parse_ref(ref)
        if number is None:
            raise ParameterError(f"{event} needs an explicit version: {name}@VERSION")
        with self._locked() as ch:
            rec = ch.state.get(name)
            old = rec.version(number)
            new_rec, new_v = change(ch, rec, old)
            if new_rec is not rec:
                ch.state.keys[name] = new_rec
                self._log(ch, event, name, new_v)
        return new_v

    def promote(self, ref: str) -> VersionRecord:
        def change(state, rec, v):
            if v.status != "enabled":
                raise KeyStateError(f"{rec.name}@{v.version} is {v.status}; only an enabled version can be primary")
            if rec.primary == v.version:
                return rec, v
            return KeyRecord(rec.name, rec.created, v.version, rec.versions), v

        return self._set_status(ref, "promote", change)

    def disable(self, ref: str) -> VersionRecord:
        def change(state, rec, v):
            if rec.primary == v.version:
                raise KeyStateError(
                    f"{rec.name}@{v.version} is the primary version and cannot be disabled",
                    hint="promote another version first (dkit keys promote NAME@V), or rotate",
                )
            if v.status == "destroyed":
                raise KeyStateError(f"{rec.name}@{v.version} is destroyed")
            if v.status == "disabled":
                return rec, v
            nv = _with_status(v, "disabled", self._now())
            return rec.with_version(nv), nv

        return self._set_status(ref, "disable", change)

    def enable(self, ref: str) -> VersionRecord:
        def change(state, rec, v):
            if v.status == "destroyed":
                raise KeyStateError(
                    f"{rec.name}@{v.version} is destroyed and its secret is gone",
                    hint="restore it from a backup with dkit keys import FILE (it comes back disabled)",
                )
            if v.status == "enabled":
                return rec, v
            nv = _with_status(v, "enabled", self._now())
            return rec.with_version(nv), nv

        return self._set_status(ref, "enable", change)

    def destroy(self, ref: str) -> VersionRecord:
        def change(ch, rec, v):
            if rec.primary == v.version:
                raise KeyStateError(
                    f"{rec.name}@{v.version} is the primary version and cannot be destroyed",
                    hint="rotate or promote another version first",
                )
            if v.status == "destroyed":
                return rec, v
            self._check_store(v, rec.name)
            ch.delete_secret(self._label(ch.state, rec.name, v.version))
            nv = _with_status(v, "destroyed", self._now())
            return rec.with_version(nv), nv

        return self._set_status(ref, "destroy", change)

    # -- use --------------------------------------------------------------------------------
    def load(self, ref: str, *, use: str | None = None, **details) -> LoadedKey:
        """The derived material of an enabled version; records the use in the audit log if ``use``."""
        name, number = parse_ref(ref)
        state = self._state()
        rec = state.get(name)
        v = rec.version(number)
        seed = self._usable_seed(state, name, v)
        material = derive(seed, v.params)
        if material.key_id != v.key_id:
            raise StoreCorrupt(f"the secret of {name}@{v.version} does not match its recorded key ID")
        if use:
            with self._locked() as locked:  # the version may have changed since it was read
                now = locked.state.get(name)
                _check_usable(name, now.version(v.version))
                self._log(locked, "use", name, v, action=use, primary=now.primary == v.version, **details)
        return LoadedKey(name=name, record=v, material=material)

    def seed(self, key: LoadedKey) -> Seed:
        """The seed of a loaded key, for handing it to worker processes that derive the key
        themselves (``dkit disguise --engine ray``): fewer bytes in flight than the material.
        The version must still be usable and still the one the key was loaded from (the caller
        that hands the seed on checks it derives the key's ID, as ``disguise_with_ray`` does)."""
        state = self._state()
        v = state.get(key.name).version(key.version)
        if v.key_id != key.key_id:
            raise StoreCorrupt(f"{key.ref}'s record no longer has the key ID {key.key_id} it was loaded with")
        return self._usable_seed(state, key.name, v)

    def _usable_seed(self, state, name: str, v: VersionRecord) -> Seed:
        _check_usable(name, v)
        self._check_store(v, name)
        seed = self.backend.get(self._label(state, name, v.version))
        if seed is None:
            raise SecretBackendError(
                f"the secret of {name}@{v.version} is missing from the {self.backend.name} store",
                hint="restore it from a backup with dkit keys import FILE",
            )
        return seed

    # -- backup -----------------------------------------------------------------------------
    def export(self, name: str, path: str | Path, passphrase: str) -> KeyRecord:
        with self._locked() as change:
            state = change.state
            rec = state.get(check_name(name))
            seeds: dict[int, Seed] = {}
            for v in rec.versions:
                if v.status == "destroyed":
                    continue
                self._check_store(v, name)
                seed = self.backend.get(self._label(state, name, v.version))
                if seed is None:
                    raise SecretBackendError(f"the secret of {name}@{v.version} is missing; cannot export it")
                seeds[v.version] = seed
            backup.write(Path(path), rec, seeds, passphrase)
            self._log(change, "export", name, None, versions=sorted(seeds))
        return rec

    def import_(self, path: str | Path, passphrase: str, *, name: str | None = None) -> KeyRecord:
        record, seeds = backup.read(Path(path), passphrase)
        target = check_name(name) if name else record.name
        with self._locked() as change:
            state = change.state
            local = state.keys.get(target)
            if local is not None:
                for v in record.versions:
                    mine = next((m for m in local.versions if m.version == v.version), None)
                    if mine is not None and mine.key_id != v.key_id:
                        raise KeyExists(
                            f"a different key named {target!r} exists here (version {v.version} differs)",
                            hint="import under another name with --name NEW",
                        )
            restored = []
            merged = local or KeyRecord(target, record.created, record.primary, ())
            for v in record.versions:
                mine = next((m for m in merged.versions if m.version == v.version), None)
                status = (mine or v).status
                if v.version not in seeds:  # destroyed before the backup was made
                    if mine is None:
                        merged = merged.with_version(v)
                    continue
                if status == "destroyed":
                    status = "disabled"  # a version destroyed here comes back disabled: enable it on purpose
                change.set_secret(self._label(state, target, v.version), seeds[v.version], v.key_id, v.params)
                restored.append(v.version)
                nv = replace(
                    v,
                    status=status,
                    secret_store=self.backend.name,
                    changed=self._now() if mine is not None and mine.status != status else (mine or v).changed,
                )
                merged = merged.with_version(nv)
            state.keys[target] = merged
            self._log(change, "import", target, None, versions=restored)
        return merged

    # -- audit ------------------------------------------------------------------------------
    def orphans(self, state: StoreState | None = None) -> list[str]:
        """Secrets of this store with no record of an enabled or disabled version (left by a crash
        of a dkit before the journal, or by lost records), as ``name@version``. Only stores that can
        list their entries (the file store) are searched: the OS keyring cannot be listed portably."""
        state = state or self._state()
        if self._pinned:
            lister = getattr(self.backend, "labels", None)
        else:  # the file store, if this home has one, whichever store DKIT_KEYSTORE names
            path = self.home / FILE_STORE_NAME
            lister = FileBackend(path, lambda **_: None).labels if path.exists() else None
        if lister is None:
            return []
        prefix = f"{state.store_id}/"
        return [
            label[len(prefix) :] for label in lister() if label.startswith(prefix) and not journal.named(state, label)
        ]

    def repair(self, *, delete_orphans: bool = False) -> dict:
        """End an interrupted change (as every locked use does), and delete orphaned secrets if asked."""
        with self._locked() as change:
            found = self.orphans(change.state)
            if delete_orphans and found:
                self._use_store("file")
                for ref in found:
                    change.delete_secret(f"{change.state.store_id}/{ref}")
                self._log(change, "repair", "", None, deleted_orphans=found)
        return {"recovered": self.recovered, "orphans": found, "deleted": found if delete_orphans else []}

    def audit(self, max_age: timedelta | None = None) -> AuditReport:
        report = AuditReport()
        with self._locked() as change:
            state = change.state
            entries, problems = audit.read(self._log_path, state.audit_head)
            try:
                orphans = self.orphans(state)
            except DkitError as e:
                orphans = []
                report.findings.append({"kind": "secret-store", "message": f"cannot list the secrets ({e.message})"})
        for ref in orphans:
            report.findings.append(
                {
                    "kind": "orphan-secret",
                    "message": f"{ref}: a secret with no key record in the file store; "
                    "dkit keys repair --delete-orphans removes it",
                }
            )
        report.lines = len(entries)
        for p in problems:
            report.findings.append(
                {"kind": "chain", "line": p.line, "message": f"{audit.LOG_NAME} line {p.line}: {p.problem}"}
            )
        now = self._clock()
        uses: dict[tuple[str, int], list[tuple[int, dict]]] = {}  # (key, version) -> [(line, data)]
        made: dict[tuple[str, int], tuple[int, str]] = {}  # (key, version) -> (line, key ID) of keygen/rotate
        for line, e in enumerate(entries, start=1):
            key, number, data = e.get("key"), e.get("version"), e.get("data")
            if not isinstance(key, str) or not isinstance(number, int):  # an edited line: the chain names it
                continue
            if e.get("event") == "use":
                uses.setdefault((key, number), []).append((line, data if isinstance(data, dict) else {}))
            elif e.get("event") in ("keygen", "rotate"):
                made[(key, number)] = (line, str(e.get("key_id")))
        for name, rec in sorted(state.keys.items()):
            for v in rec.versions:
                age = now - parse_time(v.created)
                vuses = uses.get((name, v.version), [])
                report.versions.append(
                    {
                        "key": name,
                        "version": v.version,
                        "status": v.status,
                        "primary": rec.primary == v.version,
                        "created": v.created,
                        "age_days": round(age.total_seconds() / 86400, 2),
                        "key_id": v.key_id,
                        "uses": len(vuses),
                        "use_actions": sorted({str(u.get("action", "?")) for _, u in vuses}),
                    }
                )
                ref = f"{name}@{v.version}"
                line_made = made.get((name, v.version))
                if line_made and line_made[1] != v.key_id:
                    report.findings.append(
                        {
                            "kind": "record-edited",
                            "key": name,
                            "version": v.version,
                            "line": line_made[0],
                            "message": f"{ref}: keys.json says key ID {v.key_id}, but {audit.LOG_NAME} line "
                            f"{line_made[0]} recorded {line_made[1][:40]} when it was made",
                        }
                    )
                if max_age is not None and v.status == "enabled" and age > max_age:
                    report.findings.append(
                        {
                            "kind": "age",
                            "key": name,
                            "version": v.version,
                            "message": f"{ref} is {age.days} days old, older than the policy's {max_age.days} days"
                            + (" (rotate the key)" if rec.primary == v.version else " (disable or destroy it)"),
                        }
                    )
                if v.status != "destroyed":
                    try:
                        self._use_store(v.secret_store)
                        other = v.secret_store != self.backend.name
                        seed = None if other else self.backend.get(self._label(state, name, v.version))
                        missing = not other and seed is None
                        if seed is not None and key_id(seed, v.params) != v.key_id:
                            report.findings.append(
                                {
                                    "kind": "record-edited",
                                    "key": name,
                                    "version": v.version,
                                    "message": f"{ref}: its secret does not give its recorded key ID "
                                    "(the key ID or the parameters in keys.json were edited)",
                                }
                            )
                    except DkitError as e:
                        missing, other = False, False
                        report.findings.append(
                            {
                                "kind": "secret-store",
                                "key": name,
                                "version": v.version,
                                "message": f"{ref}: cannot check its secret ({e.message})",
                            }
                        )
                    if missing:
                        report.findings.append(
                            {
                                "kind": "missing-secret",
                                "key": name,
                                "version": v.version,
                                "message": f"{ref} is {v.status} but its secret is missing "
                                f"from the {self.backend.name} store",
                            }
                        )
                    if other:
                        report.findings.append(
                            {
                                "kind": "secret-store",
                                "key": name,
                                "version": v.version,
                                "message": f"{ref}: its secret is in the {v.secret_store} store, "
                                f"not checked with DKIT_KEYSTORE={self.backend.name}",
                            }
                        )
                for n, u in vuses:
                    action = u.get("action")
                    if action != "disguise":
                        continue
                    if v.status != "enabled":
                        report.findings.append(
                            {
                                "kind": "disabled-artifact",
                                "key": name,
                                "version": v.version,
                                "line": n,
                                "message": f"{audit.LOG_NAME} line {n}: data disguised with {ref}, which is now "
                                f"{v.status}; models trained on it cannot predict",
                            }
                        )
                    elif not u.get("primary", True):
                        report.findings.append(
                            {
                                "kind": "non-primary-artifact",
                                "key": name,
                                "version": v.version,
                                "line": n,
                                "message": f"{audit.LOG_NAME} line {n}: data disguised with {ref}, which was not "
                                "the primary version at the time",
                            }
                        )
        return report


def _with_status(v: VersionRecord, status: str, now: str) -> VersionRecord:
    return replace(v, status=status, changed=now)


def _check_usable(name: str, v: VersionRecord) -> None:
    if v.status != "enabled":
        hint = (
            f"enable it with dkit keys enable {name}@{v.version}"
            if v.status == "disabled"
            else "its secret is gone; restore it from a backup with dkit keys import FILE (it comes back disabled)"
        )
        raise KeyStateError(f"key {name}@{v.version} is {v.status} and cannot be used", hint=hint)
