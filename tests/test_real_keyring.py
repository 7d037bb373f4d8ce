"""The key lifecycle through the real OS keyring (Secret Service in CI), driving the installed CLI
in subprocesses as a user would. CI sets DKIT_REQUIRE_REAL_KEYRING=1, so these never skip there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dkit.keystore import Keystore
from dkit.keystore.backends import SERVICE

from conftest import real_keyring_or_skip
from test_cli_keys import files_under, seed_forms

pytestmark = pytest.mark.realkeyring
PHRASE = "correct horse battery"


@pytest.fixture
def kr():
    return real_keyring_or_skip()


@pytest.fixture
def dkit(isolated_home, tmp_path):
    outputs = []

    def run(*args, home=isolated_home, passphrase=None, expect=0):
        env = {k: v for k, v in os.environ.items() if not k.startswith("DKIT_")}
        env["DKIT_HOME"] = str(home)
        if passphrase:
            env["DKIT_PASSPHRASE"] = env["DKIT_BACKUP_PASSPHRASE"] = passphrase
        r = subprocess.run(
            [sys.executable, "-m", "dkit", *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        outputs.append((r.stdout + r.stderr).encode())
        assert r.returncode == expect, (args, r.stdout, r.stderr)
        return r

    run.outputs = outputs
    return run


def labels(home):
    store = json.loads((home / "keys.json").read_text())
    return {
        f"{n}@{v['version']}": f"{store['store_id']}/{n}@{v['version']}"
        for n, k in store["keys"].items()
        for v in k["versions"]
    }


def test_lifecycle_against_the_real_keyring(kr, dkit, isolated_home, tmp_path):
    created = []
    try:
        v1 = json.loads(
            dkit("keygen", "cifar", "--shape", "32x32x3", "--block", "4", "--pipeline", "perm,rmt", "--json").stdout
        )
        assert v1["secret_store"] == "keyring"
        created += labels(isolated_home).values()
        v2 = json.loads(dkit("keys", "rotate", "cifar", "--json").stdout)
        assert v2["version"] == 2 and v2["primary"]
        created += labels(isolated_home).values()
        lab = labels(isolated_home)
        seeds = {ref: kr.get_password(SERVICE, label) for ref, label in lab.items()}
        assert all(s and s.startswith("dkit-seed-v1:") for s in seeds.values()), "secrets are in the keyring"

        r = dkit("keys", "disable", "cifar@2", expect=1)
        assert "primary version and cannot be disabled" in r.stderr

        # Export and import into a second home, through the real keyring; the material is identical.
        backup = tmp_path / "cifar.backup"
        dkit("keys", "export", "cifar", "-o", backup, passphrase=PHRASE)
        other = tmp_path / "other-home"
        dkit("keys", "import", backup, home=other, passphrase=PHRASE)
        created += labels(other).values()
        dkit("keys", "import", backup, home=tmp_path / "third", passphrase="wrong passphrase", expect=1)
        for v in (1, 2):
            a = Keystore(isolated_home).load(f"cifar@{v}").material
            b = Keystore(other).load(f"cifar@{v}").material
            assert a.key_id == b.key_id and (a.perm == b.perm).all() and (a.matrices == b.matrices).all()

        # Destroy: the secret is gone from the keyring, the record stays, and use is refused.
        dkit("keys", "destroy", "cifar@1", "--yes")
        assert kr.get_password(SERVICE, lab["cifar@1"]) is None
        assert kr.get_password(SERVICE, lab["cifar@2"]) is not None
        shown = json.loads(dkit("keys", "show", "cifar@1", "--json").stdout)
        assert shown["status"] == "destroyed" and shown["key_id"] == v1["key_id"]
        dkit("keys", "enable", "cifar@1", expect=1)
        assert json.loads(dkit("keys", "audit", "--json").stdout)["ok"]

        # No seed, in any encoding, in any output, in any file under either home, or in the backup.
        raw = [s.expose() for s in (Keystore(other).backend.get(label) for label in labels(other).values()) if s]
        assert len(raw) == 2
        blobs = dkit.outputs + list(files_under(isolated_home).values()) + list(files_under(other).values())
        blobs.append(backup.read_bytes())
        for seed in raw:
            for form in seed_forms(seed):
                assert not any(form in blob for blob in blobs)
    finally:
        for label in set(created):
            try:
                kr.delete_password(SERVICE, label)
            except Exception:  # noqa: BLE001 - already gone
                pass
