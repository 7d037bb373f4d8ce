"""The keys CLI: exit codes, messages, JSON output, and that secrets never show."""

from __future__ import annotations

import base64
import json

import pytest

from dkit.errors import EXIT_ACTION, EXIT_USAGE

PHRASE = "correct horse battery"


def files_under(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_keygen_and_list(cli):
    r = cli("keygen", "cifar", "--shape", "32x32x3", "--block", "4", "--pipeline", "perm,rmt", "--json")
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)
    assert v["key"] == "cifar" and v["version"] == 1 and v["primary"] and v["status"] == "enabled"
    assert v["params"]["rmt"] == {"kind": "orthogonal", "channels": "joint", "noise": 25.0}
    assert len(v["key_id"]) == 32
    r = cli("keys", "list", "--json")
    assert [k["name"] for k in json.loads(r.stdout)] == ["cifar"]
    r = cli("keys", "list")
    assert r.exit_code == 0 and "cifar" in r.stdout and "perm+rmt" in r.stdout


@pytest.mark.parametrize(
    "shape,pipeline,block,grid",
    [
        ("32x32x3", "perm,rmt", [8, 8], [4, 4]),  # CIFAR: a 4x4 thumbnail at most
        ("28x28", "rmt", [7, 7], [4, 4]),  # MNIST: the papers' block
        ("96x96x3", "rmt", [16, 24], [6, 4]),  # 24x24x3 matrices would pass the key size limit
        ("32x32x3", "perm,aes", [4, 4], [8, 8]),  # no rmt, no thumbnail: the old default
    ],
)
def test_keygen_picks_the_block_from_the_shape(cli, shape, pipeline, block, grid):
    r = cli("keygen", "k", "--shape", shape, "--pipeline", pipeline, "--json")
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)
    assert v["params"]["block"] == block
    h, w = (int(s) for s in shape.split("x")[:2])
    assert [h // block[0], w // block[1]] == grid
    assert ("thumbnail" in r.stderr) == (pipeline != "perm,aes" and max(grid) > 4)


def test_keygen_warns_about_blocks_that_leak_a_thumbnail(cli):
    r = cli("keygen", "k", "--shape", "32x32x3", "--block", "4", "--pipeline", "perm,rmt")
    assert r.exit_code == 0, r.output
    assert "warning" in r.stderr and "8x8 grey thumbnail" in r.stderr and "level 1" in r.stderr
    assert "thumbnail" not in cli("keygen", "q", "--shape", "32x32x3", "--block", "8").stderr


def test_auto_block_for_large_images():
    from dkit.params import KeyParams, thumbnail_warning

    joint = KeyParams.create("224x224x3", "auto", "perm,rmt")  # 56x56x3 matrices would be too large
    assert joint.block == (8, 8) and "28x28 grey thumbnail" in thumbnail_warning(joint)
    shared = KeyParams.create("224x224x3", "auto", "perm,rmt", channels="shared")
    assert shared.block == (56, 56) and thumbnail_warning(shared) is None
    assert KeyParams.create("32x32x3").block == (8, 8)  # the library's default is the CLI's


@pytest.mark.parametrize(
    "args,code,words",
    [
        (["--shape", "32by32"], EXIT_USAGE, "malformed shape '32by32'"),
        (["--shape", "32x32x3", "--block", "5"], EXIT_USAGE, "block 5x5 does not tile a 32x32 image"),
        (["--shape", "32x32x3", "--pipeline", "perm,shuffle"], EXIT_USAGE, "unknown mechanism 'shuffle'"),
        (["--shape", "32x32x3", "--rmt", "rotation"], EXIT_USAGE, "unknown rmt kind 'rotation'"),
        (["--shape", "32x32x3", "--block", "2", "--pipeline", "aes"], EXIT_USAGE, "at least 16 bytes"),
    ],
)
def test_keygen_bad_input(cli, isolated_home, args, code, words):
    r = cli("keygen", "k", *args)
    assert r.exit_code == code, r.output
    assert words in r.stderr
    assert not (isolated_home / "keys.json").exists()


def test_lifecycle_exit_codes(cli, isolated_home):
    assert cli("keygen", "k", "--shape", "28x28", "--block", "7").exit_code == 0
    assert cli("keys", "rotate", "k").exit_code == 0
    before = files_under(isolated_home)
    for args, words in [
        (["keys", "disable", "k@2"], "primary version and cannot be disabled"),
        (["keys", "show", "nope"], "no key named 'nope'"),
        (["keys", "show", "k@9"], "has no version 9"),
        (["keys", "promote", "k@9"], "has no version 9"),
        (["keys", "destroy", "k@2", "--yes"], "cannot be destroyed"),
        (["keygen", "k", "--shape", "28x28", "--block", "7"], "exists already"),
    ]:
        r = cli(*args)
        assert r.exit_code == EXIT_ACTION, (args, r.output)
        assert words in r.stderr
        assert files_under(isolated_home) == before  # a refused command changes nothing
    r = cli("keys", "disable", "k@1", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "disabled"
    r = cli("keys", "destroy", "k@1", input="n\n")
    assert r.exit_code == EXIT_ACTION
    assert json.loads(cli("keys", "show", "k@1", "--json").stdout)["status"] == "disabled"
    r = cli("keys", "destroy", "k@1", input="y\n")
    assert r.exit_code == 0
    assert json.loads(cli("keys", "show", "k@1", "--json").stdout)["status"] == "destroyed"
    r = cli("keys", "enable", "k@1")
    assert r.exit_code == EXIT_ACTION and "destroyed" in r.stderr


def test_export_import_through_the_cli(cli, tmp_path, isolated_home, monkeypatch):
    cli("keygen", "k", "--shape", "32x32x3", "--pipeline", "perm,aes")
    out = tmp_path / "k.backup"
    r = cli("keys", "export", "k", "-o", out, input=f"{PHRASE}\n{PHRASE}\n")  # prompted twice, hidden
    assert r.exit_code == 0, r.output
    assert PHRASE not in r.stdout
    r = cli("keys", "export", "k", "-o", out, input=f"{PHRASE}\n{PHRASE}\n")
    assert r.exit_code == EXIT_ACTION and "use --force" in r.stderr
    r = cli("keys", "import", out, "--name", "k2", input="wrong passphrase\n")
    assert r.exit_code == EXIT_ACTION and "wrong passphrase" in r.stderr
    monkeypatch.setenv("DKIT_PASSPHRASE", PHRASE)  # the store's passphrase is not the backup's
    r = cli("keys", "import", out, "--name", "k2", "--json", input="wrong passphrase\n")
    assert r.exit_code == EXIT_ACTION and "wrong passphrase" in r.stderr
    monkeypatch.setenv("DKIT_BACKUP_PASSPHRASE", PHRASE)
    r = cli("keys", "import", out, "--name", "k2", "--json")
    assert r.exit_code == 0, r.output
    assert (
        json.loads(r.stdout)["versions"][0]["key_id"]
        == json.loads(cli("keys", "show", "k@1", "--json").stdout)["key_id"]
    )
    out.write_bytes(out.read_bytes()[:200])
    r = cli("keys", "import", out, "--name", "k3")
    assert r.exit_code == EXIT_ACTION and str(out) in r.stderr and "truncated" in r.stderr
    r = cli("keys", "import", tmp_path / "missing.backup")
    assert r.exit_code == EXIT_ACTION and "no such file" in r.stderr


def test_audit_names_the_edited_line(cli, isolated_home):
    cli("keygen", "k", "--shape", "32x32x3")
    for _ in range(3):
        cli("keys", "rotate", "k")
    r = cli("keys", "audit", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"]
    log = isolated_home / "audit.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"rotate"', '"disable"')
    log.write_text("".join(lines))
    r = cli("keys", "audit")
    assert r.exit_code == EXIT_ACTION
    assert "audit.jsonl line 2" in r.stdout
    doc = json.loads(cli("keys", "audit", "--json").stdout)
    assert not doc["ok"] and doc["findings"][0]["line"] == 2


def test_audit_max_age(cli, isolated_home):
    cli("keygen", "k", "--shape", "32x32x3")
    assert cli("keys", "audit", "--max-age", "90d").exit_code == 0
    store = isolated_home / "keys.json"
    doc = json.loads(store.read_text())
    doc["keys"]["k"]["versions"][0]["created"] = "2020-01-01T00:00:00Z"  # age the key
    store.write_text(json.dumps(doc))
    r = cli("keys", "audit", "--max-age", "90d", "--json")
    assert r.exit_code == EXIT_ACTION
    finding = json.loads(r.stdout)["findings"][0]
    assert finding["kind"] == "age" and "k@1" in finding["message"] and "rotate" in finding["message"]
    r = cli("keys", "audit", "--max-age", "soon")
    assert r.exit_code == EXIT_USAGE and "malformed age" in r.stderr


def test_corrupt_store_is_reported(cli, isolated_home):
    cli("keygen", "k", "--shape", "32x32x3")
    (isolated_home / "keys.json").write_text("{oops")
    r = cli("keys", "list")
    assert r.exit_code == EXIT_ACTION
    assert str(isolated_home / "keys.json") in r.stderr and "damaged" in r.stderr


def test_tracebacks_do_not_show_locals():
    from dkit.cli import app

    assert app.pretty_exceptions_show_locals is False


def seed_forms(seed: bytes) -> list[bytes]:
    """Every way a seed might leak into text: hex, base64 (standard, url-safe, unpadded), raw."""
    b64 = base64.b64encode(seed)
    forms = [
        seed,
        seed.hex().encode(),
        seed.hex().upper().encode(),
        b64,
        b64.rstrip(b"="),
        base64.urlsafe_b64encode(seed).rstrip(b"="),
    ]
    # Also a large enough piece of each, in case of wrapping or truncation.
    return forms + [f[4:28] for f in forms[1:]]


def test_no_seed_appears_in_home_output_or_json(cli, isolated_home, memory_backend, tmp_path, monkeypatch):
    outputs = []

    def run(*args, **kw):
        r = cli(*args, **kw)
        outputs.append(r.output.encode() + r.stderr.encode())
        return r

    run("keygen", "a", "--shape", "32x32x3", "--pipeline", "perm,rmt")
    run("keygen", "b", "--shape", "32x32x3", "--pipeline", "perm,aes", "--json")
    run("keygen", "c", "--shape", "28x28", "--block", "7", "--pipeline", "instahide", "--json")
    for name in "abc":
        run("keys", "rotate", name)
        run("keys", "rotate", name, "--json")
    monkeypatch.setenv("DKIT_PASSPHRASE", PHRASE)
    monkeypatch.setenv("DKIT_BACKUP_PASSPHRASE", PHRASE)
    for args in [
        ("keys", "list"),
        ("keys", "list", "--json"),
        ("keys", "show", "a"),
        ("keys", "show", "b", "--json"),
        ("keys", "show", "a@1", "--json"),
        ("keys", "disable", "a@1", "--json"),
        ("keys", "enable", "a@1"),
        ("keys", "promote", "b@1"),
        ("keys", "audit"),
        ("keys", "audit", "--json"),
        ("keys", "export", "b", "-o", tmp_path / "b.backup"),
        ("keys", "import", tmp_path / "b.backup", "--name", "b2"),
        ("keys", "disable", "a@9"),
        ("keys", "destroy", "c@1", "--yes", "--json"),
    ]:
        run(*args)
    seeds = [s.expose() for s in memory_backend._items.values()]
    assert len(seeds) >= 8
    blobs = outputs + list(files_under(isolated_home).values()) + [(tmp_path / "b.backup").read_bytes()]
    for seed in seeds:
        for form in seed_forms(seed):
            for blob in blobs:
                assert form not in blob


def test_key_commands_do_not_import_torch():
    """Start-up stays quick: the key commands never pay for importing torch."""
    import subprocess
    import sys

    code = (
        "import sys, dkit.cli; from dkit.models.nets import ARCHS; import dkit.cli.model as m; "
        "assert m.ARCH_NAMES == ARCHS; print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "True"  # the check itself imported nets; now the real thing:
    r = subprocess.run(
        [sys.executable, "-c", "import sys, dkit.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.strip() == "False"


def test_no_terminal_gives_dkits_error_not_a_getpass_warning(tmp_path):
    """Without a terminal and without DKIT_BACKUP_PASSPHRASE, export stops with a clear error; the
    store's DKIT_PASSPHRASE is never reused for the backup."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("DKIT_")}
    env.update(DKIT_HOME=str(tmp_path / "home"), DKIT_KEYSTORE="file", DKIT_PASSPHRASE=PHRASE)
    run = [sys.executable, "-m", "dkit"]
    assert (
        subprocess.run(
            [*run, "keygen", "k", "--shape", "8x8", "--block", "4"],
            env=env,
            capture_output=True,
            stdin=subprocess.DEVNULL,
        ).returncode
        == 0
    )
    r = subprocess.run(
        [*run, "keys", "export", "k", "-o", tmp_path / "k.backup"],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == EXIT_ACTION and "no terminal" in r.stderr and "DKIT_BACKUP_PASSPHRASE" in r.stderr
    assert "GetPassWarning" not in r.stderr and "Traceback" not in r.stderr and not (tmp_path / "k.backup").exists()
