"""``dkit keygen`` and ``dkit keys ...``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import EXIT_ACTION, InputError
from ..keystore import parse_age
from ..keystore.records import KeyRecord, VersionRecord
from ..params import KeyParams, thumbnail_warning
from . import common
from .common import App, escape, out, print_json

keys_app = App(help="List, rotate, promote, disable, enable, destroy, back up and audit keys.")

JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")


def _version_dict(name: str, primary: int, v: VersionRecord) -> dict:
    return {"key": name, "primary": v.version == primary, **v.to_dict()}


def _column(table: Table, name: str) -> None:
    """Key IDs are never cut or wrapped (users compare and copy them); other columns fold instead."""
    if name == "key ID":
        table.add_column(name, no_wrap=True, min_width=32, overflow="ignore")
    else:
        table.add_column(name, overflow="fold")


def _show_record(rec: KeyRecord) -> None:
    table = Table(title=f"key {rec.name}", title_justify="left")
    for col in ("version", "status", "primary", "created", "key ID", "store"):
        _column(table, col)
    for v in rec.versions:
        table.add_row(
            str(v.version),
            v.status,
            "yes" if v.version == rec.primary else "",
            v.created,
            v.key_id,
            v.secret_store,
        )
    out.print(table)
    described = {v.version: v.params.describe() for v in rec.versions}
    if len(set(described.values())) == 1:
        out.print(f"parameters: {escape(next(iter(described.values())))}")
    else:
        for number, text in described.items():
            out.print(f"parameters of version {number}: {escape(text)}")


def keygen(
    name: str = typer.Argument(..., help="The key's name."),
    shape: str = typer.Option(..., "--shape", help="Image geometry HxWxC, e.g. 32x32x3 (HxW for grey)."),
    block: str = typer.Option(
        "auto",
        "--block",
        help="Block size B or BHxBW; it must tile the image. auto: with rmt, the largest block leaving "
        "4 blocks per side (8x8 for 32x32, 7x7 for 28x28), since finer grids leak a thumbnail; else 4.",
    ),
    pipeline: str = typer.Option("perm,rmt", "--pipeline", help="Mechanisms: identity, perm, rmt, aes, instahide."),
    rmt: str = typer.Option("orthogonal", "--rmt", help="RMT matrices: orthogonal or projection."),
    channels: str = typer.Option(
        "joint", "--channels", help="RMT on the whole block (joint) or per channel (shared, as in the papers)."
    ),
    noise: float | None = typer.Option(
        None, "--noise", help="RMT noise level N: Delta ~ U[0, N) in pixel units (default 25 with rmt)."
    ),
    aes: str = typer.Option("per-block", "--aes", help="AES keys: shared or per-block."),
    k: int = typer.Option(4, "--k", help="InstaHide: images mixed per encoding."),
    bound: float = typer.Option(0.65, "--bound", help="InstaHide: largest allowed mixing coefficient."),
    mix: str = typer.Option(
        "inside", "--mix", help="InstaHide: mix with the private set (inside) or a public set (cross)."
    ),
    json_out: bool = JSON,
):
    """Create version 1 of a named key; its secret seed goes to the OS keyring."""
    params = KeyParams.create(
        shape, block, pipeline, rmt_kind=rmt, channels=channels, noise=noise, aes_keys=aes, k=k, bound=bound, mix=mix
    )
    rec = common.open_keystore().keygen(name, params)
    warning = thumbnail_warning(params)
    if warning:
        common.err.print(f"[yellow]warning:[/] {escape(warning)}")
    if json_out:
        print_json(_version_dict(rec.name, rec.primary, rec.versions[0]))
    else:
        v = rec.versions[0]
        out.print(
            f"created key [bold]{escape(rec.name)}[/] version 1 (key ID {v.key_id}) "
            f"in the {v.secret_store} store: {escape(params.describe())}"
        )


@keys_app.command("list")
def list_keys(json_out: bool = JSON):
    """List the keys and their versions."""
    recs = common.open_keystore().list()
    if json_out:
        print_json([r.to_dict() for r in recs])
        return
    if not recs:
        out.print("no keys yet: create one with dkit keygen NAME --shape HxWxC")
        return
    table = Table()
    for col in ("key", "primary", "versions", "parameters"):
        table.add_column(col)
    for r in recs:
        vs = ", ".join(f"{v.version} {v.status}" for v in r.versions)
        table.add_row(escape(r.name), str(r.primary), vs, escape(r.version(None).params.describe()))
    out.print(table)


@keys_app.command("show")
def show(name: str = typer.Argument(..., help="NAME or NAME@VERSION"), json_out: bool = JSON):
    """Show a key's versions, status and public parameters."""
    ks = common.open_keystore()
    rec = ks.get(name.partition("@")[0])
    if "@" in name:
        _, v = ks.resolve(name)
        if json_out:
            print_json(_version_dict(rec.name, rec.primary, v))
        else:
            _show_record(KeyRecord(rec.name, rec.created, rec.primary, (v,)))
        return
    if json_out:
        print_json(rec.to_dict())
    else:
        _show_record(rec)


@keys_app.command("rotate")
def rotate(name: str = typer.Argument(...), json_out: bool = JSON):
    """Add a new version and make it primary. Older versions stay usable for old models."""
    v = common.open_keystore().rotate(name)
    if json_out:
        print_json(_version_dict(name, v.version, v))
    else:
        out.print(f"{escape(name)}@{v.version} created and made primary (key ID {v.key_id})")


def _status_command(verb: str, doc: str):
    def run(ref: str = typer.Argument(..., help="NAME@VERSION"), json_out: bool = JSON):
        ks = common.open_keystore()
        v = getattr(ks, verb)(ref)
        rec = ks.get(ref.partition("@")[0])
        if json_out:
            print_json(_version_dict(rec.name, rec.primary, v))
        else:
            out.print(f"{escape(ref)}: {v.status}" + (" (primary)" if rec.primary == v.version else ""))

    run.__doc__ = doc
    run.__name__ = verb
    keys_app.command(verb)(run)


_status_command("promote", "Make an enabled version the primary (used for new data).")
_status_command("disable", "Disable a version: kept, but refused for use. Never the primary.")
_status_command("enable", "Enable a disabled version again.")


@keys_app.command("destroy")
def destroy(
    ref: str = typer.Argument(..., help="NAME@VERSION"),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
    json_out: bool = JSON,
):
    """Delete a version's secret for good; its record stays as a tombstone. Never the primary."""
    if not yes and not typer.confirm(
        f"Destroy the secret of {ref}? Models trained with it will never predict again", default=False
    ):
        raise typer.Exit(EXIT_ACTION)
    ks = common.open_keystore()
    v = ks.destroy(ref)
    if json_out:
        rec = ks.get(ref.partition("@")[0])
        print_json(_version_dict(rec.name, rec.primary, v))
    else:
        out.print(f"{escape(ref)}: destroyed (the secret is deleted; the record stays)")


@keys_app.command("export")
def export(
    name: str = typer.Argument(...),
    output: Path = typer.Option(..., "-o", "--output", help="The backup file to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    json_out: bool = JSON,
):
    """Write a backup of a key, encrypted under a passphrase (prompt or DKIT_BACKUP_PASSPHRASE)."""
    if output.exists() and not force:
        raise InputError(f"{output} exists; use --force to overwrite it")
    ks = common.open_keystore()
    ks.get(name)  # fail on an unknown key before asking for a passphrase
    passphrase = common.ask_passphrase(new=True, what=f"the backup of {name}", env_var=common.ENV_BACKUP_PASSPHRASE)
    rec = ks.export(name, output, passphrase)
    if json_out:
        print_json({"key": rec.name, "file": str(output), "versions": [v.version for v in rec.versions]})
    else:
        out.print(
            f"wrote an encrypted backup of {escape(name)} to {escape(str(output))}; "
            "keep the file and its passphrase apart"
        )


@keys_app.command("import")
def import_(
    file: Path = typer.Argument(..., help="A backup written by dkit keys export."),
    as_name: str | None = typer.Option(None, "--name", help="Import under another name."),
    json_out: bool = JSON,
):
    """Restore a key from a backup; each version's fingerprint is checked."""
    if not file.is_file():
        raise InputError(f"{file}: no such file")
    passphrase = common.ask_passphrase(new=False, what=f"the backup {file}", env_var=common.ENV_BACKUP_PASSPHRASE)
    rec = common.open_keystore().import_(file, passphrase, name=as_name)
    if json_out:
        print_json(rec.to_dict())
    else:
        out.print(
            f"imported key {escape(rec.name)}: versions " + ", ".join(f"{v.version} {v.status}" for v in rec.versions)
        )


@keys_app.command("audit")
def audit(
    max_age: str | None = typer.Option(
        None, "--max-age", help="Flag enabled versions older than this (90d, 12w, 36h)."
    ),
    json_out: bool = JSON,
):
    """Check the audit log's hash chain and each version's age, secret and uses; exit 1 on findings."""
    age = parse_age(max_age) if max_age else None
    report = common.open_keystore().audit(age)
    if json_out:
        print_json(report.to_dict())
    else:
        table = Table(title=f"{report.lines} audit log lines", title_justify="left", caption="* the primary version")
        for col in ("key", "status", "age (days)", "uses", "key ID"):
            _column(table, col)
        for v in report.versions:
            star = " *" if v["primary"] else ""
            table.add_row(
                f"{escape(v['key'])}@{v['version']}{star}",
                v["status"],
                f"{v['age_days']:.1f}",
                f"{v['uses']} {','.join(v['use_actions'])}".strip(),
                v["key_id"],
            )
        out.print(table)
        if report.ok:
            out.print("[green]no findings[/]")
        for f in report.findings:
            out.print(f"[bold red]finding[/] ({f['kind']}): {escape(f['message'])}")
    if not report.ok:
        raise typer.Exit(EXIT_ACTION)


@keys_app.command("repair")
def repair(
    delete_orphans: bool = typer.Option(
        False, "--delete-orphans", help="Delete secrets that no key record names (keys audit lists them)."
    ),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
    json_out: bool = JSON,
):
    """Finish or undo an interrupted key change, and list (or delete) orphaned secrets."""
    ks = common.open_keystore()
    found = ks.orphans()
    if delete_orphans and found and not yes:
        if not typer.confirm(
            f"Delete {len(found)} secret(s) that no key record names ({', '.join(found)})? If you still "
            "have the records elsewhere (a copy of keys.json), restore them instead",
            default=False,
        ):
            raise typer.Exit(EXIT_ACTION)
    doc = ks.repair(delete_orphans=delete_orphans)
    if json_out:
        print_json(doc)
        return
    if doc["recovered"]:
        out.print(escape(doc["recovered"]))
    if doc["deleted"]:
        out.print(f"deleted {len(doc['deleted'])} orphaned secret(s): {escape(', '.join(doc['deleted']))}")
    elif doc["orphans"]:
        out.print(
            f"orphaned secrets (no key record): {escape(', '.join(doc['orphans']))}; --delete-orphans removes them"
        )
    if not (doc["recovered"] or doc["orphans"]):
        out.print("[green]nothing to repair[/]")
