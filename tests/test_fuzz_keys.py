"""Fuzzing the key store's files: ``keys.json`` (the records), a key backup, and the journal of an
interrupted change. Seeded mutants (JSON-aware edits, byte flips, truncations, deep nesting), each
run through a real ``dkit`` command in a forked child with time and memory limits: every mutant
ends in success (the file is still valid) or a one-line dkit error, never a traceback, a signal,
a hang or a blow-up. A few mutants of each kind run by default; ``-m slow`` runs them all."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from fuzzing import failures, preload, run_cli, tally

PHRASE = "fuzzing the key store 31c9"
BACKUP_PHRASE = "fuzzing the key backups 6a0e"
FULL = {"records": 400, "backup": 200, "journal": 100, "log": 200}
QUICK = {"records": 30, "backup": 15, "journal": 10, "log": 15}

ODD_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    2**31,
    2**63,
    -(2**63),
    1e308,
    float("nan"),
    "",
    "x" * 5000,
    [],
    {},
    "\x1b]52;c;",
]


def env(home):
    return {
        "DKIT_HOME": str(home),
        "DKIT_KEYSTORE": "file",
        "DKIT_PASSPHRASE": PHRASE,
        "DKIT_BACKUP_PASSPHRASE": BACKUP_PHRASE,
    }


def ok(argv, home):
    o = run_cli(argv, env=env(home))
    assert o.kind == "ok", o
    return o


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """A home with key k (three versions, one destroyed), its backup, and a journal left by a crash."""
    preload()
    root = tmp_path_factory.mktemp("fuzzkeys")
    home = root / "home"
    ok(["keygen", "k", "--shape", "8x8x3", "--block", "4", "--pipeline", "perm,rmt", "--noise", "10"], home)
    ok(["keys", "rotate", "k"], home)
    ok(["keys", "rotate", "k"], home)
    ok(["keys", "destroy", "k@1", "--yes"], home)
    ok(["keys", "export", "k", "-o", str(root / "k.backup")], home)
    # a journal as a crash leaves it: kill a rotation after its journal is written
    from dkit.keystore import Keystore, journal

    ks = Keystore(home, backend_kind="file", passphrase=lambda **_: PHRASE)
    real_commit = journal.commit

    def crash(home_, change, backend):
        doc_path = home_ / journal.JOURNAL_NAME
        try:
            real_commit(home_, change, _Dying(backend))
        except _Crash:
            assert doc_path.exists()

    journal.commit = crash
    try:
        ks.rotate("k")
    finally:
        journal.commit = real_commit
    saved = root / "journal.json"
    shutil.copy(home / journal.JOURNAL_NAME, saved)
    (home / journal.JOURNAL_NAME).unlink()
    return root


class _Crash(BaseException):
    pass


class _Dying:
    """A backend that 'crashes' on its first write: the journal stays behind, as after a SIGKILL."""

    def __init__(self, backend):
        self.name = backend.name

    def set(self, *a):
        raise _Crash()

    def delete(self, *a):
        raise _Crash()


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _set(doc, path, value, delete=False):
    if not path:
        return value
    node = doc
    for p in path[:-1]:
        node = node[p]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One seeded mutant of a JSON file: (what was done, the bytes)."""
    kind = rng.choice(["value", "value", "value", "delete", "rename", "nest", "flip", "truncate", "junk"])
    if kind == "flip":
        b = bytearray(data)
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
        return f"flip byte {i}", bytes(b)
    if kind == "truncate":
        n = rng.randrange(len(data))
        return f"truncate to {n}", data[:n]
    if kind == "junk":
        return "junk", rng.choice([b"", b"\x00" * 64, b"\xff\xfe", b"null", b"[]", b"{}", b'"x"', b"1e999"])
    doc = json.loads(data)
    path = rng.choice([p for p in _paths(doc) if p])
    if kind == "nest":
        depth = rng.choice([100, 5000, 200000])
        text = json.dumps(_set(doc, path, "@@"))
        return f"nest {depth} at {path}", text.replace('"@@"', "[" * depth + "]" * depth).encode()
    if kind == "delete":
        return f"delete {path}", json.dumps(_set(doc, path, None, delete=True)).encode()
    if kind == "rename" and isinstance(path[-1], str):
        parent = _set(doc, (), doc)
        node = parent
        for p in path[:-1]:
            node = node[p]
        node["renamed" + path[-1]] = node.pop(path[-1])
        return f"rename {path}", json.dumps(parent).encode()
    value = rng.choice(ODD_VALUES)
    return f"set {path} = {str(value)[:20]!r}", json.dumps(_set(doc, path, value)).encode()


RECORD_COMMANDS = [
    ["keys", "list"],
    ["keys", "show", "k"],
    ["keys", "audit"],
    ["keys", "rotate", "k"],
    ["keys", "disable", "k@2"],
]


def _fuzz_home_file(root, n, what, name, data, commands):
    """Mutants of one file of the dkit home (``name``), each followed by a command on that home."""
    home = root / "home"
    rng = random.Random(f"dkit fuzz {what}")
    outcomes = []
    for i in range(n):
        edit, mutant = mutate(data, rng)
        work = root / f"{what}-{i}"
        shutil.copytree(home, work)
        (work / name).write_bytes(mutant)
        argv = rng.choice(commands)
        outcomes.append((f"{name} {edit} | dkit {' '.join(argv)}", run_cli(argv, env=env(work))))
        shutil.rmtree(work)
    return outcomes


def _fuzz_records(root, n):
    return _fuzz_home_file(root, n, "records", "keys.json", (root / "home" / "keys.json").read_bytes(), RECORD_COMMANDS)


def _fuzz_backup(root, n):
    data = (root / "k.backup").read_bytes()
    rng = random.Random("dkit fuzz backup")
    outcomes = []
    for i in range(n):
        what, mutant = mutate(data, rng)
        work = root / f"bk-{i}"
        work.mkdir()
        (work / "b.backup").write_bytes(mutant)
        argv = ["keys", "import", str(work / "b.backup"), "--name", "restored"]
        outcomes.append((f"backup {what}", run_cli(argv, env=env(work / "home"))))
        shutil.rmtree(work)
    return outcomes


def _fuzz_journal(root, n):
    commands = [["keys", "audit"], ["keys", "rotate", "k"]]
    return _fuzz_home_file(root, n, "journal", "journal.json", (root / "journal.json").read_bytes(), commands)


def _fuzz_log(root, n):
    """The audit log: one line edited (as the other files are), or lines dropped, repeated or swapped."""
    home = root / "home"
    lines = (home / "audit.jsonl").read_bytes().splitlines(keepends=True)
    rng = random.Random("dkit fuzz log")
    outcomes = []
    for i in range(n):
        work = root / f"log-{i}"
        shutil.copytree(home, work)
        edited = list(lines)
        at = rng.randrange(len(edited))
        kind = rng.choice(["line", "line", "line", "drop", "repeat", "swap"])
        if kind == "line":
            what, mutant = mutate(edited[at].rstrip(b"\n"), rng)
            edited[at] = mutant + b"\n"
        elif kind == "drop":
            what = "drop"
            del edited[at]
        elif kind == "repeat":
            what = "repeat"
            edited.insert(at, edited[at])
        else:
            what, j = "swap", rng.randrange(len(edited))
            edited[at], edited[j] = edited[j], edited[at]
        (work / "audit.jsonl").write_bytes(b"".join(edited))
        o = run_cli(["keys", "audit"], env=env(work))
        if o.kind == "ok" and b"".join(edited) != b"".join(lines):
            o.kind = "missed"  # an edited log that audit passes
        outcomes.append((f"audit.jsonl line {at + 1}: {what} | dkit keys audit", o))
        shutil.rmtree(work)
    return outcomes


FUZZERS = {"records": _fuzz_records, "backup": _fuzz_backup, "journal": _fuzz_journal, "log": _fuzz_log}


def _check(outcomes, what):
    counts = tally(outcomes)
    print(f"{what}: {len(outcomes)} mutants: {dict(counts)}")
    bad = failures(outcomes) + [f"{name}: {o}" for name, o in outcomes if o.kind == "missed"]
    assert not bad, "\n".join(bad[:10])
    assert counts["clean"] > 0  # the mutants reach the parsers


@pytest.mark.parametrize("what", sorted(FUZZERS))
def test_key_store_files_fuzz_quick(seeds, what):
    _check(FUZZERS[what](seeds, QUICK[what]), what)


@pytest.mark.slow
@pytest.mark.parametrize("what", sorted(FUZZERS))
def test_key_store_files_fuzz_full(seeds, what):
    _check(FUZZERS[what](seeds, FULL[what]), what)


def test_a_journal_left_by_a_crash_is_recovered(seeds, tmp_path):
    """The seed journal itself (the secret was never stored): the next command rolls it back and says so."""
    work = tmp_path / "home"
    shutil.copytree(seeds / "home", work)
    shutil.copy(seeds / "journal.json", work / "journal.json")
    o = run_cli(["keys", "audit", "--json"], env=env(work))
    assert o.kind == "ok", o
    assert not (work / "journal.json").exists()
    entries = [json.loads(line) for line in (work / "audit.jsonl").read_text().splitlines()]
    assert entries[-1]["event"] == "recover" and entries[-1]["data"] == {"change": "rotate", "outcome": "rolled back"}
    o = run_cli(["keys", "show", "k", "--json"], env=env(work))
    assert [v["version"] for v in json.loads(o.stderr[o.stderr.index("{") :])["versions"]] == [1, 2, 3]
