"""What every command shares: the error mapping, output, the key store and passphrases."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from ..errors import EXIT_ACTION, DkitError, PassphraseError
from ..keystore import Keystore
from ..keystore.backends import ENV_PASSPHRASE
from ..text import printable

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class App(typer.Typer):
    """A Typer app whose commands map ``DkitError`` to a message and its exit code, in one place."""

    def __init__(self, **kw):
        kw.setdefault("pretty_exceptions_show_locals", False)  # locals could hold key material
        kw.setdefault("no_args_is_help", True)
        kw.setdefault("add_completion", False)
        kw.setdefault("context_settings", {"help_option_names": ["-h", "--help"]})
        super().__init__(**kw)

    def command(self, *args, **kw):
        register = super().command(*args, **kw)

        def decorator(fn: Callable) -> Callable:
            @functools.wraps(fn)
            def wrapped(*a, **k):
                try:
                    return fn(*a, **k)
                except DkitError as e:
                    fail(e)
                except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (see on_sigterm): no traceback
                    code = EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
                    err.print("[yellow]interrupted[/]" + (" (SIGTERM)" if code == EXIT_TERMINATED else ""))
                    raise typer.Exit(code) from None

            return register(wrapped)

        return decorator


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it unwinds and cleans up exactly as Ctrl-C does."""


_terminated = False


def on_sigterm(signum, frame) -> None:
    """Raise where the program is. Python may swallow the exception when the signal lands inside a
    callback it guards (a fork hook, a finaliser), so the request is also remembered, and long
    commands call ``check_terminated`` between batches."""
    global _terminated
    _terminated = True
    raise Terminated()


def check_terminated() -> None:
    if _terminated:
        raise Terminated()


def quiet_unraisable(args) -> None:
    """``sys.unraisablehook`` that drops a swallowed ``Terminated``: it is remembered (``_terminated``)
    and raised again at the next ``check_terminated``, so Python's "Exception ignored ... Traceback"
    would only frighten the user. Everything else goes to the default hook."""
    if isinstance(args.exc_value, Terminated):
        return
    sys.__unraisablehook__(args)


def fail(e: DkitError) -> None:
    err.print(f"[bold red]error:[/] {escape(e.message)}")
    if e.hint:
        err.print(f"[dim]hint:[/] {escape(e.hint)}")
    raise typer.Exit(e.exit_code)


def escape(text) -> str:
    """Markup-escaped and printable (``printable``): every string from outside dkit goes through here
    on its way to the terminal."""
    from rich.markup import escape as _escape

    return _escape(printable(text))


def print_json(obj: Any) -> None:
    """JSON to stdout, exactly one document, no markup. Strict JSON: a non-finite number (which
    Python would print as NaN or Infinity, and no JSON reader takes) is written as null."""
    sys.stdout.write(json.dumps(finite(obj), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, through dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def open_keystore() -> Keystore:
    """The key store of ``$DKIT_HOME`` with the backend of ``$DKIT_KEYSTORE`` (tests may replace this)."""
    return Keystore(
        passphrase=lambda new=False: ask_passphrase(new=new, what="the file store"),
        on_recover=lambda done: err.print(f"[yellow]note:[/] {escape(done)} (see dkit keys audit)"),
    )


def interactive() -> bool:
    """Is somebody at a terminal to answer a hidden prompt? (Tests that type answers replace this.)"""
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


ENV_BACKUP_PASSPHRASE = "DKIT_BACKUP_PASSPHRASE"  # backups: never the store's passphrase by accident


def ask_passphrase(*, new: bool, what: str, env_var: str = ENV_PASSPHRASE) -> str:
    """``$env_var``, else a hidden prompt (twice for a new one). Never from argv. Without a terminal
    there is nobody to ask: dkit says which variable to set (getpass would warn and echo)."""
    env = os.environ.get(env_var)
    if env:
        return env
    if not interactive():
        raise PassphraseError(f"no passphrase for {what}, and no terminal to ask for one", hint=f"set {env_var}")
    try:
        return typer.prompt(f"Passphrase for {what}", hide_input=True, confirmation_prompt=new)
    except (typer.Abort, EOFError):
        raise PassphraseError(
            f"no passphrase for {what}", hint=f"set {env_var} or run in a terminal to be prompted"
        ) from None


__all__ = [
    "EXIT_ACTION",
    "App",
    "ask_passphrase",
    "err",
    "escape",
    "fail",
    "open_keystore",
    "out",
    "print_json",
    "printable",
]
