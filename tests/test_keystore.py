"""The key store's state machine, backups, audit log and failure modes (in-memory and file stores)."""

from __future__ import annotations

import json
import multiprocessing
import stat
from datetime import timedelta

import pytest

from dkit.errors import (
    BackupError,
    KeyExists,
    KeyNotFound,
    KeyStateError,
    ParameterError,
    PassphraseError,
    SecretBackendError,
    StoreCorrupt,
)
from dkit.keystore import KeyringBackend, Keystore, MemoryBackend, parse_age
from dkit.keystore import backup as backup_mod
from dkit.keystore.records import utcnow
from dkit.params import KeyParams

P = KeyParams.create("32x32x3", 4, "perm,rmt")
PHRASE = "correct horse battery"


def snapshot(home):
    return {p.name: p.read_bytes() for p in sorted(home.iterdir()) if p.is_file() and p.name != ".lock"}


def test_tink_state_machine(keystore, memory_backend):
    keystore.keygen("k", P)
    v2 = keystore.rotate("k")
    assert v2.version == 2 and keystore.get("k").primary == 2
    assert keystore.load("k").version == 2
    assert keystore.load("k@1").version == 1  # old versions stay usable
    with pytest.raises(KeyStateError, match="primary version and cannot be disabled"):
        keystore.disable("k@2")
    with pytest.raises(KeyStateError, match="primary version and cannot be destroyed"):
        keystore.destroy("k@2")
    keystore.disable("k@1")
    with pytest.raises(KeyStateError, match="k@1 is disabled"):
        keystore.load("k@1")
    with pytest.raises(KeyStateError, match="only an enabled version"):
        keystore.promote("k@1")
    keystore.enable("k@1")
    keystore.promote("k@1")
    assert keystore.get("k").primary == 1
    keystore.promote("k@2")
    keystore.destroy("k@1")
    rec = keystore.get("k")
    assert rec.version(1).status == "destroyed" and rec.version(1).key_id  # tombstone keeps the record
    assert all(not label.endswith("k@1") for label in memory_backend._items)
    with pytest.raises(KeyStateError, match="destroyed"):
        keystore.load("k@1")
    with pytest.raises(KeyStateError, match="destroyed"):
        keystore.enable("k@1")
    with pytest.raises(ParameterError, match="explicit version"):
        keystore.disable("k")


def test_unknown_keys_and_versions(keystore):
    keystore.keygen("k", P)
    with pytest.raises(KeyNotFound, match="no key named 'nope'"):
        keystore.load("nope")
    with pytest.raises(KeyNotFound, match="has no version 7"):
        keystore.load("k@7")
    with pytest.raises(ParameterError):
        keystore.load("k@zero")
    with pytest.raises(KeyExists):
        keystore.keygen("k", P)
    with pytest.raises(ParameterError, match="invalid key name"):
        keystore.keygen("../evil", P)


def test_files_are_private(keystore, isolated_home):
    keystore.keygen("k", P)
    for p in isolated_home.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE(isolated_home.stat().st_mode) == 0o700


def test_export_import_round_trip(keystore, tmp_path):
    keystore.keygen("k", P)
    keystore.rotate("k")
    keystore.rotate("k")
    keystore.destroy("k@1")
    before = {v: keystore.load(f"k@{v}").material for v in (2, 3)}
    keystore.export("k", tmp_path / "k.backup", PHRASE)
    other = Keystore(tmp_path / "other-home", backend=MemoryBackend())
    rec = other.import_(tmp_path / "k.backup", PHRASE)
    assert [v.status for v in rec.versions] == ["destroyed", "enabled", "enabled"] and rec.primary == 3
    for v, m in before.items():
        got = other.load(f"k@{v}").material
        assert got.key_id == m.key_id and (got.perm == m.perm).all() and (got.matrices == m.matrices).all()
    # Importing again restores a lost secret of the same key, and a different key of that name is refused.
    other.backend._items.clear()
    other.import_(tmp_path / "k.backup", PHRASE)
    assert other.load("k@2").key_id == before[2].key_id
    # A version destroyed here after the backup comes back from it, disabled until enabled on purpose.
    other.destroy("k@2")
    with pytest.raises(KeyStateError, match="destroyed"):
        other.load("k@2")
    rec = other.import_(tmp_path / "k.backup", PHRASE)
    assert rec.version(2).status == "disabled" and rec.version(1).status == "destroyed"
    other.enable("k@2")
    assert other.load("k@2").key_id == before[2].key_id
    third = Keystore(tmp_path / "third", backend=MemoryBackend())
    third.keygen("k", P)
    with pytest.raises(KeyExists, match="different key named 'k'"):
        third.import_(tmp_path / "k.backup", PHRASE)
    third.import_(tmp_path / "k.backup", PHRASE, name="k-restored")
    assert third.load("k-restored@3").key_id == before[3].key_id


@pytest.fixture
def backup_file(keystore, tmp_path):
    keystore.keygen("k", P)
    path = tmp_path / "k.backup"
    keystore.export("k", path, PHRASE)
    return path


def test_import_wrong_passphrase(backup_file, tmp_path):
    other = Keystore(tmp_path / "o", backend=MemoryBackend())
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        other.import_(backup_file, "not the passphrase")
    assert not (tmp_path / "o" / "keys.json").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip-ciphertext", "edit-name", "edit-created", "not-json", "empty"])
def test_import_damaged_backup(backup_file, tmp_path, damage):
    raw = backup_file.read_bytes()
    doc = json.loads(raw)
    if damage == "truncate":
        backup_file.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip-ciphertext":
        ct = bytearray(backup_mod.sealed.b64d(doc["payload"]["ct"]))
        ct[10] ^= 1
        doc["payload"]["ct"] = backup_mod.sealed.b64e(bytes(ct))
        backup_file.write_text(json.dumps(doc))
    elif damage == "edit-name":
        doc["name"] = "other"
        backup_file.write_text(json.dumps(doc))
    elif damage == "edit-created":
        doc["created"] = "2020-01-01T00:00:00Z"
        backup_file.write_text(json.dumps(doc))
    elif damage == "not-json":
        backup_file.write_bytes(b"\x00\x01garbage")
    else:
        backup_file.write_bytes(b"")
    other = Keystore(tmp_path / "o", backend=MemoryBackend())
    with pytest.raises(BackupError) as e:
        other.import_(backup_file, PHRASE)
    assert str(backup_file) in str(e.value)
    assert not (tmp_path / "o" / "keys.json").exists()


def test_import_checks_fingerprints(keystore, tmp_path):
    rec = keystore.keygen("k", P)
    v = rec.versions[0]
    forged = rec.with_version(type(v)(v.version, v.status, v.created, "0" * 32, v.params, v.secret_store, v.changed))
    from dkit.secret import Seed

    backup_mod.write(tmp_path / "forged", forged, {1: Seed.generate()}, PHRASE)
    with pytest.raises(BackupError, match="does not match its fingerprint"):
        Keystore(tmp_path / "o", backend=MemoryBackend()).import_(tmp_path / "forged", PHRASE)


@pytest.mark.parametrize(
    "kdf",
    [
        "x",
        [1],
        {"name": "scrypt", "salt": "AAAAAAAAAAAAAAAAAAAAAA==", "n": 1 << 20, "r": 32, "p": 1},  # 4 GiB of memory
        {"name": "scrypt", "salt": "AAAAAAAAAAAAAAAAAAAAAA==", "n": 1 << 15, "r": 16, "p": 16},  # 32x the default work
        {"name": "scrypt", "salt": 5, "n": 1 << 15, "r": 8, "p": 1},
        {"name": "scrypt", "salt": "AAAAAAAAAAAAAAAAAAAAAA==", "n": "32768", "r": 8, "p": 1},
    ],
)
def test_import_refuses_crafted_kdf(backup_file, tmp_path, kdf):
    doc = json.loads(backup_file.read_text())
    doc["kdf"] = kdf
    backup_file.write_text(json.dumps(doc))
    with pytest.raises(BackupError, match="damaged"):
        Keystore(tmp_path / "o", backend=MemoryBackend()).import_(backup_file, PHRASE)
    assert not (tmp_path / "o" / "keys.json").exists()


def test_export_to_a_missing_folder(keystore, tmp_path):
    keystore.keygen("k", P)
    target = tmp_path / "no" / "such" / "k.backup"
    with pytest.raises(BackupError, match="cannot write the backup") as e:
        keystore.export("k", target, PHRASE)
    assert str(target) in str(e.value)


def test_short_passphrase_refused(keystore, tmp_path):
    keystore.keygen("k", P)
    with pytest.raises(PassphraseError, match="at least 8"):
        keystore.export("k", tmp_path / "b", "short")
    assert not (tmp_path / "b").exists()


def test_corrupt_record_store(keystore, isolated_home):
    keystore.keygen("k", P)
    store = isolated_home / "keys.json"
    for content in [
        b"{not json",
        b'{"format": "something-else"}',
        b'{"format": "dkit-keystore", "version": 1}',
        b'{"format": "dkit-keystore", "version": 99}',
    ]:
        store.write_bytes(content)
        before = snapshot(isolated_home)
        with pytest.raises(StoreCorrupt) as e:
            keystore.rotate("k")
        assert str(store) in str(e.value)
        assert snapshot(isolated_home) == before  # nothing changed


class RefusingKeyring:
    """A keyring backend that refuses every write, as a locked collection does."""

    priority = 1

    def get_password(self, service, user):
        return None

    def set_password(self, service, user, password):
        from keyring.errors import PasswordSetError

        raise PasswordSetError("Failed to unlock the collection!")

    def delete_password(self, service, user):
        from keyring.errors import PasswordDeleteError

        raise PasswordDeleteError("no")


class DroppingKeyring(RefusingKeyring):
    def set_password(self, service, user, password):
        pass  # accepts and forgets, like keyring's null backend


@pytest.mark.parametrize("kr,words", [(RefusingKeyring(), "refused to store"), (DroppingKeyring(), "did not keep it")])
def test_keyring_that_refuses_changes_nothing(isolated_home, kr, words):
    ks = Keystore(isolated_home, backend=KeyringBackend(kr))
    with pytest.raises(SecretBackendError, match=words) as e:
        ks.keygen("k", P)
    assert "DKIT_KEYSTORE=file" in e.value.hint
    assert not (isolated_home / "keys.json").exists() and not (isolated_home / "audit.jsonl").exists()


def test_null_and_fail_keyrings_are_refused():
    from keyring.backends import fail, null

    for kr in (null.Keyring(), fail.Keyring()):
        with pytest.raises(SecretBackendError, match="no usable OS keyring") as e:
            KeyringBackend(kr)
        assert "DKIT_KEYSTORE=file" in e.value.hint


def test_file_store(isolated_home, monkeypatch):
    ks = Keystore(isolated_home, backend_kind="file", passphrase=lambda **_: PHRASE)
    ks.keygen("k", P)
    m = ks.load("k").material
    path = isolated_home / "secrets.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["format"] == "dkit-file-store" and len(doc["entries"]) == 1
    # A fresh process with the passphrase reads it back; a wrong passphrase is named as such.
    assert Keystore(isolated_home, backend_kind="file", passphrase=lambda **_: PHRASE).load("k").key_id == m.key_id
    with pytest.raises(PassphraseError, match="wrong passphrase for the file store"):
        Keystore(isolated_home, backend_kind="file", passphrase=lambda **_: "another passphrase").load("k")
    with pytest.raises(PassphraseError, match="a passphrase is needed"):
        Keystore(isolated_home, backend_kind="file", passphrase=lambda **_: None).load("k")
    # Swapping entries between labels is caught (the label is authenticated).
    ks.rotate("k")
    doc = json.loads(path.read_text())
    (a, va), (b, vb) = sorted(doc["entries"].items())
    doc["entries"][a], doc["entries"][b] = vb, va
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreCorrupt, match="damaged"):
        Keystore(isolated_home, backend_kind="file", passphrase=lambda **_: PHRASE).load("k@1")
    # A key kept in the file store is not silently looked up elsewhere.
    with pytest.raises(SecretBackendError, match="kept in the file store") as e:
        Keystore(isolated_home, backend=MemoryBackend()).load("k@2")
    assert e.value.hint == "set DKIT_KEYSTORE=file"


def test_file_store_asks_to_confirm_a_new_passphrase(isolated_home):
    asked = []

    def ask(*, new=False):
        asked.append(new)
        return PHRASE

    Keystore(isolated_home, backend_kind="file", passphrase=ask).keygen("k", P)
    assert asked == [True]  # creating the store: the prompt confirms the passphrase
    asked.clear()
    Keystore(isolated_home, backend_kind="file", passphrase=ask).load("k")
    assert asked == [False]


@pytest.mark.parametrize("damage", ["kdf", "check"])
def test_file_store_with_malformed_fields(isolated_home, damage):
    Keystore(isolated_home, backend_kind="file", passphrase=lambda **_: PHRASE).keygen("k", P)
    path = isolated_home / "secrets.json"
    doc = json.loads(path.read_text())
    doc[damage] = [1]
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreCorrupt, match="secrets.json"):
        Keystore(isolated_home, backend_kind="file", passphrase=lambda **_: PHRASE).load("k")


def test_use_rechecks_the_status_under_the_lock(keystore, isolated_home, monkeypatch):
    keystore.keygen("k", P)
    keystore.rotate("k")
    stale = keystore._state()
    keystore.disable("k@1")  # by another process, after this one read the records
    monkeypatch.setattr(keystore, "_state", lambda: stale)
    with pytest.raises(KeyStateError, match="k@1 is disabled"):
        keystore.load("k@1", use="disguise")
    log = (isolated_home / "audit.jsonl").read_text().splitlines()
    assert not [line for line in log if json.loads(line)["event"] == "use"]


def test_unknown_keystore_kind(isolated_home, monkeypatch):
    monkeypatch.setenv("DKIT_KEYSTORE", "plaintext")
    with pytest.raises(SecretBackendError, match="unknown key store 'plaintext'"):
        Keystore(isolated_home).keygen("k", P)


def test_parse_age():
    assert parse_age("90d") == timedelta(days=90)
    assert parse_age("2w") == timedelta(weeks=2)
    assert parse_age("36h") == timedelta(hours=36)
    with pytest.raises(ParameterError):
        parse_age("ninety days")


def test_audit_findings(isolated_home, memory_backend):
    clock = [utcnow() - timedelta(days=200)]
    ks = Keystore(isolated_home, backend=memory_backend, clock=lambda: clock[0])
    ks.keygen("old", P)
    ks.keygen("j", P)
    ks.rotate("j")
    ks.load("j@1", use="disguise", output="a.h5")  # made with a non-primary version
    ks.keygen("k", P)
    ks.load("k@1", use="disguise")
    ks.rotate("k")
    ks.load("k@2", use="disguise")
    ks.load("k@2", use="predict")
    ks.disable("k@1")  # data disguised with k@1 can no longer be used
    clock[0] = utcnow()
    report = ks.audit(max_age=timedelta(days=90))
    found = sorted((f["kind"], f["key"], f["version"]) for f in report.findings)
    assert found == [
        ("age", "j", 1),
        ("age", "j", 2),
        ("age", "k", 2),
        ("age", "old", 1),
        ("disabled-artifact", "k", 1),
        ("non-primary-artifact", "j", 1),
    ], report.findings
    by = {(v["key"], v["version"]): v for v in report.versions}
    assert by[("k", 2)]["uses"] == 2 and by[("k", 2)]["use_actions"] == ["disguise", "predict"]
    assert ks.audit().findings and not any(f["kind"] == "age" for f in ks.audit().findings)
    # A secret that vanished from the store is a finding.
    memory_backend._items.clear()
    assert {"missing-secret"} <= {f["kind"] for f in ks.audit().findings}


def test_clean_audit(keystore):
    keystore.keygen("k", P)
    keystore.rotate("k")
    keystore.load("k", use="disguise")
    r = keystore.audit(max_age=timedelta(days=1))
    assert r.ok and r.lines == 3


@pytest.mark.parametrize(
    "tamper", ["edit", "edit-and-rehash", "delete-middle", "cut-tail", "garble", "rehash-last", "append-chained"]
)
def test_audit_chain_names_the_tampered_line(keystore, isolated_home, tamper):
    from dkit.keystore.audit import entry_hash
    from dkit.params import canonical_json

    keystore.keygen("k", P)
    for _ in range(4):
        keystore.rotate("k")  # lines 1..5
    log = isolated_home / "audit.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    assert len(lines) == 5 and keystore.audit().ok
    if tamper == "edit":
        lines[2] = lines[2].replace(b'"rotate"', b'"keygen"')
        expect = 3
    elif tamper == "edit-and-rehash":
        e = json.loads(lines[2])
        e["time"] = "2020-01-01T00:00:00Z"
        e["hash"] = entry_hash(e)
        lines[2] = canonical_json(e) + b"\n"
        expect = 4  # line 3 is self-consistent now, but line 4's link no longer matches
    elif tamper == "delete-middle":
        del lines[1]
        expect = 2
    elif tamper == "cut-tail":
        del lines[4]
        expect = 5
    elif tamper == "garble":
        lines[0] = b"garbage\n"
        expect = 1
    elif tamper == "rehash-last":
        e = json.loads(lines[4])
        e["data"] = {"forged": True}
        e["hash"] = entry_hash(e)
        lines[4] = canonical_json(e) + b"\n"
        expect = 5  # caught by the head recorded in keys.json
    else:  # a well-formed line chained onto the last one, but past the recorded head
        last = json.loads(lines[4])
        e = {"n": 6, "time": last["time"], "event": "use", "key": "k", "prev": last["hash"]}
        e["hash"] = entry_hash(e)
        lines.append(canonical_json(e) + b"\n")
        expect = 6
    log.write_bytes(b"".join(lines))
    report = keystore.audit()
    chain = [f for f in report.findings if f["kind"] == "chain"]
    assert chain and chain[0]["line"] == expect, chain
    assert f"line {expect}" in chain[0]["message"]


def _rotate_many(home, n):
    ks = Keystore(home, backend_kind="file", passphrase=lambda **_: PHRASE)
    for _ in range(n):
        ks.rotate("k")


def test_concurrent_processes_leave_a_consistent_store(isolated_home):
    ks = Keystore(isolated_home, backend_kind="file", passphrase=lambda **_: PHRASE)
    ks.keygen("k", P)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rotate_many, args=(isolated_home, 6)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rec = ks.get("k")
    assert [v.version for v in rec.versions] == list(range(1, 14)) and rec.primary == 13
    assert ks.audit().ok and ks.audit().lines == 13
    keys = json.loads((isolated_home / "secrets.json").read_text())["entries"]
    assert len(keys) == 13
    assert len({ks.load(f"k@{v}").key_id for v in range(1, 14)}) == 13


def test_a_file_store_key_is_found_without_dkit_keystore(isolated_home, monkeypatch):
    """The record says where its secret is: no DKIT_KEYSTORE=file needed in every shell (issue 10)."""
    monkeypatch.delenv("DKIT_KEYSTORE", raising=False)
    made = Keystore(isolated_home, backend_kind="file", passphrase=lambda **_: PHRASE)
    made.keygen("k", KeyParams.create("8x8", 4, "perm,rmt"))
    plain = Keystore(isolated_home, passphrase=lambda **_: PHRASE)  # no store named: follows the record
    assert plain.load("k").key_id == made.load("k").key_id
    v = plain.rotate("k")
    assert v.secret_store == "file" and plain.load("k@2").key_id == v.key_id
    assert plain.audit().ok


def _edit_records(home, edit):
    doc = json.loads((home / "keys.json").read_text())
    edit(doc)
    (home / "keys.json").write_text(json.dumps(doc))


def test_audit_blind_spots_are_flagged(keystore, isolated_home):
    keystore.keygen("k", P)
    keystore.rotate("k")
    keystore.load("k", use="disguise")
    assert keystore.audit().ok
    saved = (isolated_home / "keys.json").read_bytes()
    kinds = lambda: {f["kind"] for f in keystore.audit().findings}  # noqa: E731

    (isolated_home / "keys.json").unlink()  # deleted records: a fresh store must not read as clean
    assert "chain" in kinds()

    (isolated_home / "keys.json").write_bytes(saved)
    _edit_records(isolated_home, lambda d: d.update(audit_head=None))  # a null head no longer hides a cut
    assert "chain" in kinds()

    (isolated_home / "keys.json").write_bytes(saved)
    _edit_records(isolated_home, lambda d: d["keys"]["k"]["versions"][0].update(key_id="0" * 32))
    assert kinds() == {"record-edited"}  # its secret gives another ID, and the log recorded another

    (isolated_home / "keys.json").write_bytes(saved)
    _edit_records(isolated_home, lambda d: d["keys"]["k"]["versions"][0]["params"].update(block=[8, 8]))
    assert kinds() == {"record-edited"}

    for edit in (
        lambda d: d["keys"]["k"]["versions"][0].update(version=0),
        lambda d: d["keys"]["k"]["versions"][0].update(version=2),  # two versions 2
        lambda d: d["keys"]["k"]["versions"][1].update(status="disabled"),  # the primary
        lambda d: d["keys"]["k"]["versions"][1].update(status="destroyed"),
    ):
        (isolated_home / "keys.json").write_bytes(saved)
        _edit_records(isolated_home, edit)
        with pytest.raises(StoreCorrupt):
            keystore.audit()

    (isolated_home / "keys.json").write_bytes(saved)
    log = isolated_home / "audit.jsonl"
    lines = log.read_text().splitlines()
    use = json.loads(lines[-1])
    for data in ([], "x", None, {"action": ["disguise"]}):  # an edited use line: named, never a crash
        log.write_text("\n".join([*lines[:-1], json.dumps({**use, "data": data})]) + "\n")
        report = keystore.audit()
        assert [f["line"] for f in report.findings if f["kind"] == "chain"] == [len(lines)]


def test_objects_holding_secrets_refuse_pickling_asdict_and_vars(isolated_home, monkeypatch):
    """Tink's handle rules: an unlocked Keystore, its file store, a loaded key and its material never
    hand their secrets to pickle, dataclasses.asdict, vars or copy."""
    import copy
    import dataclasses
    import pickle

    from dkit.keystore import FileBackend

    phrase = "handle rules passphrase 5c1"
    ks = Keystore(isolated_home, backend_kind="file", passphrase=lambda **_: phrase)
    ks.keygen("k", P)
    loaded = ks.load("k")  # the file store is unlocked now: it holds the scrypt key
    secrets_ = [loaded.material.source_key, loaded.material.perm.tobytes(), loaded.material.matrices.tobytes()]
    for obj in (ks, ks.backend, loaded, loaded.material):
        with pytest.raises(TypeError, match="pickle"):
            pickle.dumps(obj)
    for obj in (loaded, loaded.material):
        with pytest.raises(TypeError):
            dataclasses.asdict(obj)
        with pytest.raises(TypeError):
            vars(obj)
        assert copy.deepcopy(obj) is obj
        with pytest.raises(AttributeError):
            obj.name = "x"  # read-only
    assert isinstance(ks.backend, FileBackend)
    shown = repr(vars(ks.backend)) + repr(vars(ks)) + repr(loaded) + repr(loaded.material)
    assert not any(s.hex() in shown or repr(s) in shown for s in (secrets_[0],))
    assert "redacted" in repr(vars(ks.backend)["_key"])


def test_orphaned_secrets_are_reported_and_repaired(isolated_home, cli, memory_backend):
    """A secret without a record (left by a crash of a dkit before the journal): audit names it,
    keys repair lists it, and deletes it only when asked."""
    from dkit.secret import Seed

    assert cli("keygen", "k", "--shape", "8x8x3", "--block", "4").exit_code == 0
    ks = Keystore(isolated_home, backend=memory_backend)
    store_id = ks._state().store_id
    memory_backend.set(f"{store_id}/k@7", Seed.generate())
    memory_backend.set("another-store/k@1", Seed.generate())  # not this home's: left alone
    report = ks.audit()
    assert [f["kind"] for f in report.findings] == ["orphan-secret"] and "k@7" in report.findings[0]["message"]
    r = cli("keys", "repair")
    assert r.exit_code == 0 and "k@7" in r.stdout and "--delete-orphans" in r.stdout
    assert memory_backend.get(f"{store_id}/k@7") is not None
    r = cli("keys", "repair", "--delete-orphans", input="n\n")
    assert r.exit_code == 1 and memory_backend.get(f"{store_id}/k@7") is not None
    r = cli("keys", "repair", "--delete-orphans", "--yes", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["deleted"] == ["k@7"]
    assert memory_backend.get(f"{store_id}/k@7") is None and memory_backend.get("another-store/k@1") is not None
    assert ks.audit().ok and ks.load("k").key_id == ks.get("k").version(1).key_id
    assert "nothing to repair" in cli("keys", "repair").stdout


def test_the_file_store_lists_its_labels_without_a_passphrase(isolated_home):
    from dkit.keystore import FileBackend

    ks = Keystore(isolated_home, backend_kind="file", passphrase=lambda **_: "labels passphrase 8d2")
    ks.keygen("k", P)
    ks.rotate("k")
    store_id = ks._state().store_id
    labels = FileBackend(isolated_home / "secrets.json", lambda **_: None).labels()
    assert labels == [f"{store_id}/k@1", f"{store_id}/k@2"]
    assert Keystore(isolated_home).orphans() == []  # found through the file store, whatever DKIT_KEYSTORE says


def test_resource_bounds(isolated_home, monkeypatch, tmp_path, cli):
    """Keys too large to derive, too many prediction samples, and an import that rewrote the file
    store once per version (5,000 versions took 124 s) are bounded or linear."""
    from dkit.errors import ParameterError
    from dkit.keystore import backends
    from dkit.params import MAX_POSITIONS

    for shape, block in (("16384x16384x64", 1), ("4096x4096", 1)):
        with pytest.raises(ParameterError, match=f"dkit derives at most {MAX_POSITIONS:,}"):
            KeyParams.create(shape, block, "perm")
    KeyParams.create("4096x4096", 4, "perm")  # 2^20 positions: the most
    r = cli("predict", tmp_path, tmp_path, "--key", "k", "--samples", "100000")
    assert r.exit_code == 2 and "less than or equal to 64" in r.stderr

    phrase = "bounds passphrase 41a"
    ks = Keystore(isolated_home, backend_kind="file", passphrase=lambda **_: phrase)
    ks.keygen("many", KeyParams.create("8x8", 4, "perm"))
    versions = 150
    for _ in range(versions - 1):
        ks.rotate("many")
    ks.export("many", tmp_path / "many.backup", "backup passphrase 7f")
    writes = []
    real = backends.atomic_write
    monkeypatch.setattr(
        backends, "atomic_write", lambda path, data, **kw: (writes.append(path), real(path, data, **kw))
    )
    other = Keystore(tmp_path / "other", backend_kind="file", passphrase=lambda **_: phrase)
    rec = other.import_(tmp_path / "many.backup", "backup passphrase 7f")
    assert len(rec.versions) == versions and other.audit().ok
    assert len(writes) == 1  # the file store is written once for all 150 secrets
