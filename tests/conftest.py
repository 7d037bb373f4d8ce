"""Shared fixtures. Every test gets its own DKIT_HOME; unit tests use an in-memory secret store,
and tests marked ``realkeyring`` go through the OS keyring (required in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dkit.keystore import Keystore, MemoryBackend

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("DKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """A fresh dkit home per test; no test touches the user's real state or passphrase."""
    home = tmp_path / "dkit-home"
    monkeypatch.setenv("DKIT_HOME", str(home))
    monkeypatch.delenv("DKIT_KEYSTORE", raising=False)
    monkeypatch.delenv("DKIT_PASSPHRASE", raising=False)
    monkeypatch.delenv("DKIT_BACKUP_PASSPHRASE", raising=False)
    return home


@pytest.fixture
def memory_backend():
    return MemoryBackend()


@pytest.fixture
def keystore(isolated_home, memory_backend):
    return Keystore(isolated_home, backend=memory_backend)


@pytest.fixture
def cli(isolated_home, memory_backend, monkeypatch):
    """Invoke the CLI in-process with the in-memory secret store. Returns (runner, invoke)."""
    from typer.testing import CliRunner

    from dkit.cli import app, common

    monkeypatch.setattr(common, "open_keystore", lambda: Keystore(isolated_home, backend=memory_backend))
    monkeypatch.setattr(common, "interactive", lambda: True)  # input= plays the user at a terminal
    runner = CliRunner()

    def invoke(*args, input=None, env=None):
        return runner.invoke(app, [str(a) for a in args], input=input, env=env)

    return invoke


def real_keyring_or_skip():
    """The OS keyring if one works here; in CI (DKIT_REQUIRE_REAL_KEYRING=1) its absence fails."""
    import keyring

    from dkit.errors import SecretBackendError
    from dkit.keystore import KeyringBackend

    try:
        KeyringBackend()
        keyring.get_password("dkit-probe", "probe")
    except (SecretBackendError, Exception) as e:  # noqa: BLE001 - any failure means no usable keyring
        msg = f"no working OS keyring here ({type(e).__name__}: {e})"
        if os.environ.get("DKIT_REQUIRE_REAL_KEYRING") == "1":
            pytest.fail(msg + "; CI must run these tests (see .ci/run)")
        pytest.skip(msg)
    return keyring.get_keyring()


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory):
    """The 20k CIFAR-10 image folder from ../shared/data, unpacked once per session."""
    from helpers import shared_archive

    return shared_archive("cifar10-train-20k", tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def mnist_folder(tmp_path_factory):
    from helpers import shared_archive

    return shared_archive("mnist-10k", tmp_path_factory.mktemp("mnist"))
