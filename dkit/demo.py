"""``dkit demo``: the main job end to end on the sample data shipped with the package.

It runs in a throw-away dkit home. Its keys go to the OS keyring when one works and are destroyed
at the end; without a keyring it says so and keeps them in this process's memory only.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from rich.console import Console

from .errors import SecretBackendError
from .keystore import KeyringBackend, Keystore, MemoryBackend
from .params import KeyParams


def _backend(console: Console):
    try:
        backend = KeyringBackend()
        backend.get("dkit-demo-probe")
        console.print(f"[dim]secrets: the OS keyring ({backend!r}); the demo removes its entries at the end[/]")
        return backend
    except SecretBackendError as e:
        console.print(
            f"[yellow]no OS keyring here[/] ({e.message}).\n"
            "[dim]The demo keeps its keys in memory for this run only. For real keys, run a keyring "
            "or set DKIT_KEYSTORE=file (a passphrase-encrypted file).[/]"
        )
        return MemoryBackend()


def run(console: Console | None = None, workdir: Path | None = None) -> dict:
    """Run the demo; returns its figures."""
    console = console or Console()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dkit-demo-")))
        home = workdir / "home"
        backend = _backend(console)
        ks = Keystore(home, backend=backend)
        stack.callback(_cleanup, ks, backend)
        params = KeyParams.create("28x28", 7, "perm,rmt", noise=100)
        rec = ks.keygen("demo", params)
        console.print(f"[bold]keygen[/] demo@1: {params.describe()} (key ID {rec.versions[0].key_id})")
        v2 = ks.rotate("demo")
        console.print(f"[bold]rotate[/] demo@2 is primary (key ID {v2.key_id})")
        report = ks.audit()
        console.print(f"[bold]audit[/] {report.lines} log lines, {'no findings' if report.ok else report.findings}")
        return {"key_id": v2.key_id, "audit_ok": report.ok}


def _cleanup(ks: Keystore, backend) -> None:
    """Remove the demo's secrets from the OS keyring (the temporary home goes with its folder)."""
    state = ks._state()
    for name, rec in state.keys.items():
        for v in rec.versions:
            with contextlib.suppress(Exception):
                backend.delete(ks._label(state, name, v.version))
