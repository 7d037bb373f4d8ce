"""Names from files (class folders, HDF5 metadata, a model's description) never drive the terminal:
control characters are shown as escapes in tables, CSV and JSON alike (issue 14)."""

from __future__ import annotations

import json

import pytest

from dkit.cli.common import escape, printable

from helpers import make_folder

HOSTILE = ("\x1b]52;c;ZXZpbA==\x07cat", "\x1b[2J\x1b[Hdog", "e\u202egnp.exe", "f\x9b31mg")


def raw_controls(text: str) -> list[str]:
    return [ch for ch in text if not ch.isprintable() and ch not in "\n"]


def test_printable_escapes_controls_and_keeps_the_rest():
    assert printable("plain name, ü and 字") == "plain name, ü and 字"
    assert printable("\x1b[2Jx") == "\\x1b[2Jx"
    assert printable("a\u202eb") == "a\\u202eb"
    assert raw_controls(escape("".join(HOSTILE))) == []


def test_hostile_class_names_from_folders_reach_no_terminal(cli, tmp_path):
    src = make_folder(tmp_path / "src", classes=HOSTILE, per_class=6, shape=(8, 8, 3))
    assert cli("keygen", "k", "--shape", "8x8x3", "--block", "4", "--pipeline", "perm,rmt").exit_code == 0
    r = cli("disguise", src, tmp_path / "d.h5", "--key", "k")
    assert r.exit_code == 0, r.output
    r = cli("inspect", tmp_path / "d.h5")
    assert r.exit_code == 0 and raw_controls(r.output) == [] and "\\x1b]52" in r.output
    r = cli("train", tmp_path / "d.h5", "-o", tmp_path / "m", "--arch", "cnn", "--epochs", "1")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m" / "model.json").read_text())["class_names"] == sorted(HOSTILE)  # kept as is
    for fmt in ("table", "csv", "json"):
        r = cli("predict", tmp_path / "m", src, "--key", "k", "--format", fmt)
        assert r.exit_code == 0, r.output
        assert raw_controls(r.output) == [], fmt
    doc = json.loads(cli("predict", tmp_path / "m", src, "--key", "k", "--format", "json").stdout)
    assert {row["label"] for row in doc["predictions"]} == set(HOSTILE)  # JSON escapes, and keeps the names


def test_json_output_is_strict_json(capsys):
    from dkit.cli.common import print_json

    print_json({"loss": float("nan"), "acc": [0.5, float("inf")], "name": "\x1b[2J"})
    text = capsys.readouterr().out
    assert "NaN" not in text and "Infinity" not in text and "\x1b" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {
        "loss": None,
        "acc": [0.5, None],
        "name": "\x1b[2J",
    }
