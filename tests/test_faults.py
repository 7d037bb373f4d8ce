"""SIGKILL at random points of keygen, rotate, import, destroy and disguise, and eight rotations at once.

Each killed command runs as a real ``dkit`` process with the passphrase-encrypted file store (the
one store whose every write can be counted). A small driver counts the process's file-system
steps (``os.fsync``, ``os.replace``, ``os.write``, ``os.unlink``, ``os.truncate``) and sends itself
SIGKILL just before step K; K is drawn, seeded, from the steps of an uninterrupted run. Disguise
does most of its writing inside HDF5, so it is also killed after random delays.

After each kill, the next user of the store (here ``Keystore.audit``, which ends any interrupted
change) must find:
- every version record with its secret, of the recorded key ID, and every secret with a record;
- an audit chain with no findings;
- the command either done or not done, never half done.

The default run kills each command at a few points; ``-m slow`` at 20 points each.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dkit.data import inspect, verify
from dkit.data.h5format import partial_path
from dkit.derive import key_id
from dkit.keystore import FileBackend, Keystore
from dkit.keystore.backends import FILE_STORE_NAME
from dkit.params import KeyParams

from helpers import make_folder

PHRASE = "fault injection passphrase 7d1e"
BACKUP_PHRASE = "fault injection backup passphrase 90b2"
KEYGEN = ["keygen", "g", "--shape", "8x8x3", "--block", "4", "--pipeline", "perm,rmt", "--noise", "10"]
FULL, QUICK = 20, 4

DRIVER = textwrap.dedent("""
    import os, signal, sys
    kill_at = int(os.environ["DKIT_TEST_KILL_AT"])
    count_file = os.environ.get("DKIT_TEST_COUNT_FILE")
    steps = [0]
    def counted(fn):
        def step(*a, **k):
            steps[0] += 1
            if steps[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return step
    for name in ("fsync", "replace", "rename", "write", "unlink", "truncate"):
        setattr(os, name, counted(getattr(os, name)))
    if count_file:
        import atexit
        atexit.register(lambda: open(count_file, "w").write(str(steps[0])))
    sys.argv = ["dkit", *sys.argv[1:]]
    from dkit.cli import main
    main()
""")


def _env(home, **extra):
    env = dict(os.environ, DKIT_HOME=str(home), DKIT_KEYSTORE="file", DKIT_PASSPHRASE=PHRASE)
    env.update(DKIT_BACKUP_PASSPHRASE=BACKUP_PHRASE, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def dkit(home, *args, kill_at=0, count_file=None, check=True):
    extra = {"DKIT_TEST_KILL_AT": kill_at}
    if count_file:
        extra["DKIT_TEST_COUNT_FILE"] = count_file
    p = subprocess.run(
        [sys.executable, "-c", DRIVER, *map(str, args)],
        env=_env(home, **extra),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert p.returncode == 0, p.stderr
    return p


def keystore(home) -> Keystore:
    return Keystore(home, backend_kind="file", passphrase=lambda **_: PHRASE)


def check_store(home) -> dict:
    """Recover, then the invariants: records and secrets pair up, with their key IDs; the audit passes.
    Returns {name: [versions]}."""
    ks = keystore(home)
    report = ks.audit()
    assert report.ok, report.findings
    state = ks._state()
    backend = FileBackend(home / FILE_STORE_NAME, lambda **_: PHRASE)
    stored = set(json.loads((home / FILE_STORE_NAME).read_bytes())["entries"])
    named = set()
    for name, rec in state.keys.items():
        for v in rec.versions:
            label = f"{state.store_id}/{name}@{v.version}"
            if v.status == "destroyed":
                assert label not in stored, f"{name}@{v.version} is destroyed but its secret is stored"
                continue
            named.add(label)
            seed = backend.get(label)
            assert seed is not None, f"{name}@{v.version} has a record but no secret"
            assert key_id(seed, v.params) == v.key_id, f"the secret of {name}@{v.version} has another key ID"
    assert stored <= named, f"secrets without a record: {sorted(stored - named)}"
    assert not list(home.glob(".*.tmp")), "temporary files left behind"
    return {name: [v.version for v in rec.versions] for name, rec in state.keys.items()}


def assert_no_seed(home, files: dict, output: str) -> None:
    """No form of any stored seed in the files a crash left (the journal, temporary files) or in the
    killed command's output."""
    import base64

    backend = FileBackend(home / FILE_STORE_NAME, lambda **_: PHRASE)
    for label in backend.labels():
        raw = backend.get(label).expose()
        forms = [raw, raw.hex().encode(), base64.b64encode(raw), base64.urlsafe_b64encode(raw).rstrip(b"=")]
        for path, data in files.items():
            assert not any(form in data for form in forms), f"a seed in {path.name}"
        assert not any(form.decode("latin-1") in output for form in forms[1:])


@pytest.fixture(scope="module")
def base_home(tmp_path_factory):
    """A home with the file store and key k (two versions), and a backup of another key b."""
    root = tmp_path_factory.mktemp("faults")
    home = root / "home"
    dkit(home, *KEYGEN[:1], "k", *KEYGEN[2:])
    dkit(home, "keys", "rotate", "k")
    other = root / "other"
    dkit(other, *KEYGEN[:1], "b", *KEYGEN[2:])
    dkit(other, "keys", "rotate", "b")
    dkit(other, "keys", "export", "b", "-o", root / "b.backup")
    check_store(home)
    return root


def kill_points(root, name, args, n) -> tuple[list[int], int]:
    """``n`` seeded kill points among the steps of an uninterrupted run (all of them if fewer)."""
    home = root / f"count-{name}"
    shutil.copytree(root / "home", home)
    count_file = root / f"count-{name}.txt"
    dkit(home, *args, count_file=count_file)
    total = int(count_file.read_text())
    rng = random.Random(f"dkit faults {name}")
    points = list(range(1, total + 1))
    rng.shuffle(points)
    chosen = points[:n] if total >= n else points + [rng.randint(1, total) for _ in range(n - total)]
    return chosen, total


CASES = {
    "keygen": (KEYGEN, lambda before, after: after.get("g") in (None, [1])),
    "rotate": (["keys", "rotate", "k"], lambda before, after: after["k"] in ([1, 2], [1, 2, 3])),
    "import": (["keys", "import", "{root}/b.backup"], lambda before, after: after.get("b") in (None, [1, 2])),
    # destroy changes a status, not the versions: check_store holds it to "enabled with its secret, or
    # destroyed without it"
    "destroy": (["keys", "destroy", "k@1", "--yes"], lambda before, after: after["k"] == [1, 2]),
}


def _kill_keys(base_home, case, n):
    template, done_or_not = CASES[case]
    args = [a.format(root=base_home) for a in template]
    points, total = kill_points(base_home, case, args, n)
    killed = 0
    for i, k in enumerate(points):
        home = base_home / f"{case}-{i}"
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(base_home / "home", home)
        before = check_store(home)
        p = dkit(home, *args, kill_at=k, check=False)
        assert p.returncode == -signal.SIGKILL, (k, total, p.returncode, p.stderr)
        killed += 1
        left = {f: f.read_bytes() for f in home.rglob("*") if f.is_file()}  # with the journal, temp files
        after = check_store(home)
        assert_no_seed(home, left, p.stdout + p.stderr)
        assert done_or_not(before, after), (k, after)
        # the store keeps working: the command runs again (or says it was done) and the chain holds
        again = dkit(home, *args, check=False)
        assert again.returncode in (0, 1), again.stderr
        check_store(home)
        shutil.rmtree(home)
    return killed, total


@pytest.mark.parametrize("case", sorted(CASES))
def test_sigkill_in_a_key_change_leaves_a_consistent_store(base_home, case):
    killed, total = _kill_keys(base_home, case, QUICK)
    assert killed == QUICK
    print(f"{case}: killed at {killed} of {total} steps, store consistent every time")


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_sigkill_in_a_key_change_20_times(base_home, case):
    killed, total = _kill_keys(base_home, case, FULL)
    assert killed == FULL
    print(f"{case}: killed at {killed} of {total} steps, store consistent every time")


def _kill_disguise(base_home, n):
    src = base_home / "src"
    if not src.exists():
        make_folder(src, classes=("a", "b", "c"), per_class=120, shape=(8, 8, 3))
    args = ["disguise", src, "{out}", "--key", "k", "--workers", "0"]
    home = base_home / "count-disguise"
    shutil.copytree(base_home / "home", home)
    t0 = time.monotonic()
    count_file = base_home / "count-disguise.txt"
    dkit(home, *[str(a).format(out=home / "whole.h5") for a in args], count_file=count_file)
    duration, total = time.monotonic() - t0, int(count_file.read_text())
    rng = random.Random("dkit faults disguise")
    outcomes = {"killed": 0, "finished first": 0}
    for i in range(n):
        home = base_home / f"disguise-{i}"
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(base_home / "home", home)
        out = home / "out.h5"
        argv = [sys.executable, "-c", DRIVER, *[str(a).format(out=out) for a in args]]
        if i % 2 == 0:  # at a file-system step
            p = subprocess.Popen(argv, env=_env(home, DKIT_TEST_KILL_AT=rng.randint(1, total)), stderr=subprocess.PIPE)
        else:  # after a random delay
            p = subprocess.Popen(argv, env=_env(home, DKIT_TEST_KILL_AT=0), stderr=subprocess.PIPE)
            time.sleep(rng.uniform(0, duration))
            p.send_signal(signal.SIGKILL)
        p.wait(120)
        outcomes["killed" if p.returncode == -signal.SIGKILL else "finished first"] += 1
        assert p.returncode in (0, -signal.SIGKILL), p.stderr.read()
        check_store(home)
        if out.exists():  # the real name only ever holds a whole, checked file
            assert inspect(out).rows == 360 and verify(out)["ok"]
        else:
            resume = ["--resume"] if partial_path(out).exists() else []
            dkit(home, *[str(a).format(out=out) for a in args], *resume)
            assert inspect(out).rows == 360 and verify(out)["ok"]
            check_store(home)
        shutil.rmtree(home)
    return outcomes


def test_sigkill_in_disguise_leaves_no_half_file_and_a_consistent_store(base_home):
    outcomes = _kill_disguise(base_home, 2)
    assert outcomes["killed"] >= 1
    print(f"disguise: {outcomes}")


@pytest.mark.slow
def test_sigkill_in_disguise_20_times(base_home):
    outcomes = _kill_disguise(base_home, FULL)
    assert outcomes["killed"] >= FULL // 2
    print(f"disguise: {outcomes}")


def test_eight_parallel_rotations_give_a_linear_history(base_home):
    home = base_home / "parallel"
    shutil.copytree(base_home / "home", home)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DRIVER, "keys", "rotate", "k"],
            env=_env(home, DKIT_TEST_KILL_AT=0),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    for p in procs:
        assert p.wait(300) == 0, p.stderr.read()
    versions = check_store(home)["k"]
    assert versions == list(range(1, 11))  # 1 and 2 from the fixture, then 3..10: no number twice, none lost
    rec = keystore(home).get("k")
    assert rec.primary == 10
    entries = [json.loads(line) for line in (home / "audit.jsonl").read_text().splitlines()]
    rotations = [e["version"] for e in entries if e["event"] == "rotate"]
    assert rotations == list(range(2, 11))
    assert [e["n"] for e in entries] == list(range(1, len(entries) + 1))
    params = KeyParams.create(shape="8x8x3", block="4", pipeline="perm,rmt", noise=10)
    assert all(v.params == params for v in rec.versions)


class _Crash(BaseException):
    """Stands for SIGKILL inside one process: nothing after it runs."""


def test_a_change_interrupted_after_its_secret_rolls_forward(keystore, monkeypatch):
    from dkit.keystore import journal

    keystore.keygen("j", KeyParams.create(shape="8x8x3", block="4", pipeline="perm,rmt", noise=10))
    finish = journal._finish
    monkeypatch.setattr(journal, "_finish", lambda *a: (_ for _ in ()).throw(_Crash()))
    with pytest.raises(_Crash):
        keystore.rotate("j")
    monkeypatch.setattr(journal, "_finish", finish)
    assert (keystore.home / journal.JOURNAL_NAME).exists()
    assert [v.version for v in keystore.get("j").versions] == [1]  # readers see the old records meanwhile
    report = keystore.audit()  # the next locked use ends the change
    assert report.ok, report.findings
    assert keystore.recovered == "an interrupted rotate of j was rolled forward"
    assert [v.version for v in keystore.get("j").versions] == [1, 2]
    assert keystore.load("j@2").key_id == keystore.get("j").version(2).key_id
    events = [json.loads(line)["event"] for line in (keystore.home / "audit.jsonl").read_text().splitlines()]
    assert events == ["keygen", "rotate", "recover"]


def test_a_secret_store_that_refuses_a_write_leaves_no_journal(keystore, memory_backend, monkeypatch):
    from dkit.errors import SecretBackendError
    from dkit.keystore import journal

    keystore.keygen("j", KeyParams.create(shape="8x8x3", block="4", pipeline="perm,rmt", noise=10))

    def refuse(label, seed):
        raise SecretBackendError("refused")

    monkeypatch.setattr(memory_backend, "set", refuse)
    with pytest.raises(SecretBackendError):
        keystore.rotate("j")
    assert not (keystore.home / journal.JOURNAL_NAME).exists()
    assert keystore.audit().ok and [v.version for v in keystore.get("j").versions] == [1]
