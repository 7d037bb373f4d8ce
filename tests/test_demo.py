"""dkit demo: the README's first promise, run for real (one epoch per model to keep it short)."""

from __future__ import annotations

import io

from rich.console import Console

from dkit import demo


def test_demo_runs_end_to_end_with_the_file_store(monkeypatch, tmp_path):
    """With DKIT_KEYSTORE=file the demo uses the passphrase-encrypted file store (it used to ignore it)."""
    monkeypatch.setenv("DKIT_KEYSTORE", "file")
    monkeypatch.delenv("DKIT_PASSPHRASE", raising=False)
    buf = io.StringIO()
    results = demo.run(Console(file=buf, width=120), workdir=tmp_path, epochs=1)
    text = buf.getvalue()
    assert "file store" in text and (tmp_path / "home" / "secrets.json").exists()
    assert results["plain"]["test_acc"] > 0.5 and results["demo"]["test_acc"] > 0.3  # chance is 0.1
    assert results["rotation_refused_new_version"] and results["audit_ok"]
    levels = {(a["attack"], a["level"]) for a in results["attacks"]}
    assert levels == {("kpa", 2), ("covariance", 3)}
    assert all(a["verdict"] in ("holds", "partial", "broken") and "ssim" in a for a in results["attacks"])
    assert "attack, level 2" in text and "attack, level 3" in text
