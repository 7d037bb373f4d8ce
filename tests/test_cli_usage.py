"""The CLI's promises (issue 10): usage errors exit 2 before anything runs, -h works, help lists the
environment, and hints name flags that exist."""

from __future__ import annotations

import json

import pytest

from dkit.errors import EXIT_USAGE, ParameterError
from dkit.params import KeyParams


@pytest.mark.parametrize(
    "args",
    [
        ("disguise", "src", "out.h5", "--key", "k", "--fit", "bogus"),
        ("disguise", "src", "out.h5", "--key", "k", "--on-error", "ignore"),
        ("disguise", "src", "out.h5", "--key", "k", "--float-range", "0..1"),
        ("train", "data.h5", "-o", "m", "--arch", "vit"),
        ("train", "data.h5", "-o", "m", "--epochs", "0"),
        ("predict", "m", "x", "--key", "k", "--format", "xml"),
        ("predict", "m", "x", "--key", "k", "--device", "tpu"),
        ("evaluate", "d.h5", "--key", "k", "--plain", "x", "--targets", "0"),
        ("calibrate", "x", "--shape", "8x8", "--rmt", "random"),
    ],
)
def test_usage_errors_exit_2(cli, args):
    r = cli(*args)
    assert r.exit_code == EXIT_USAGE, r.output
    assert "Invalid value" in r.output or "Usage" in r.output


def test_short_help_and_environment(cli):
    r = cli("-h")
    assert r.exit_code == 0
    for name in ("DKIT_HOME", "DKIT_KEYSTORE", "DKIT_PASSPHRASE", "evaluate", "calibrate"):
        assert name in r.output
    r = cli("disguise", "-h", env={"COLUMNS": "400"})
    assert r.exit_code == 0 and "counted from 0" in r.output and "--float-range" in r.output


def test_block_hint_names_a_real_flag():
    with pytest.raises(ParameterError) as e:
        KeyParams.create("30x30", 4, "rmt")
    assert "--fit resize" in e.value.hint and "--resize)" not in e.value.hint


def test_key_ids_are_never_cut_at_80_columns(cli):
    assert cli("keygen", "cifar", "--shape", "32x32x3", "--block", "4").exit_code == 0
    key_id = json.loads(cli("keys", "show", "cifar", "--json").stdout)["versions"][0]["key_id"]
    for args in (("keys", "show", "cifar"), ("keys", "audit")):
        r = cli(*args, env={"COLUMNS": "80"})
        assert key_id in r.stdout, r.stdout
    assert "* the primary version" in cli("keys", "audit", env={"COLUMNS": "80"}).stdout
