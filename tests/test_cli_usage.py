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


def test_train_logs_plain_progress_lines_without_a_terminal(cli, tmp_path, monkeypatch):
    from dkit.cli import model as model_cli
    from dkit.data import Options, disguise_source, open_source

    from helpers import make_folder, test_key

    src = make_folder(tmp_path / "src", classes=("a", "b"), per_class=40, shape=(8, 8, 3))
    disguise_source(open_source(src), tmp_path / "d.h5", test_key("t", shape="8x8x3", block="4"), Options(workers=0))
    monkeypatch.setattr(model_cli, "LOG_EVERY_S", 0.0)
    r = cli("train", tmp_path / "d.h5", "-o", tmp_path / "m", "--arch", "cnn", "--epochs", "2", "--batch-size", "16")
    assert r.exit_code == 0, r.output
    assert "epoch 1/2: step 1/" in r.stderr and "epoch 2/2: step" in r.stderr  # within-epoch lines
    assert "epoch 2: train loss" in r.stderr  # and the per-epoch line
