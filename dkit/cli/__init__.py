"""The ``dkit`` command: a thin skin over the library. Each command parses, calls one library
function, and prints; ``DkitError`` becomes a message and an exit code in ``common.App``."""

from __future__ import annotations

import typer

from .. import __version__
from . import data, model, privacy, serve
from .common import App, out
from .keys import keygen, keys_app

ENVIRONMENT = (
    "Environment: DKIT_HOME, the state folder (key records, audit log; default ~/.local/share/dkit). "
    "DKIT_KEYSTORE, keyring (the OS keyring, default) or file (a passphrase-encrypted file store). "
    "DKIT_PASSPHRASE, the file store's passphrase when no prompt is possible. "
    "DKIT_BACKUP_PASSPHRASE, the passphrase of keys export/import backups (kept apart from the store's). "
    "Exit codes: 0 success, 1 when you must act, 2 for usage errors."
)

app = App(
    help="Disguise image datasets with a secret key, train on the disguise, measure the privacy.",
    epilog=ENVIRONMENT,
)


def _version(value: bool):
    if value:
        out.print(f"dkit {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    """dkit: keygen, disguise, train, predict, and measure how private it is."""


app.command("keygen")(keygen)
app.add_typer(keys_app, name="keys")
app.command("disguise")(data.disguise)
app.command("inspect")(data.inspect_cmd)
app.command("verify")(data.verify_cmd)
app.command("merge")(data.merge_cmd)
app.command("preview")(data.preview_cmd)
app.command("train")(model.train)
app.command("predict")(model.predict)
app.command("serve")(serve.serve)
app.command("evaluate")(privacy.evaluate)
app.command("calibrate")(privacy.calibrate)


@app.command("demo")
def demo(
    epochs: int = typer.Option(4, "--epochs", help="Training epochs per model."),
    json_out: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
):
    """Run the main job end to end on the shipped MNIST sample: keygen, disguise, train, predict, privacy."""
    from .. import demo as demo_mod
    from .common import err, print_json

    figures = demo_mod.run(err if json_out else out, epochs=epochs)
    if json_out:
        print_json(figures)


def main() -> None:
    import signal
    import sys

    from .common import on_sigterm, quiet_unraisable

    signal.signal(signal.SIGTERM, on_sigterm)
    sys.unraisablehook = quiet_unraisable
    app()
