"""``dkit disguise``, ``inspect``, ``verify``, ``merge`` and ``preview``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ..data import Options, disguise_source, inspect, merge, open_source, parse_shard, verify
from ..data.decode import DEFAULT_MAX_PIXELS, FITS
from ..errors import InputError
from . import common
from .common import err, escape, out, print_json

JSON = typer.Option(False, "--json", help="Print JSON.")


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} img/s" if speed else "", style="cyan")


AUGMENT_WARNING = (
    "--augment: each shifted or mirrored copy is a known transform of its copy 0, and a cloud that "
    "relates them learns the RMT matrices; a probe rebuilds images from that on large sets "
    "(SECURITY.md, Copies). dkit evaluate does not measure it yet."
)


def _warn_augment(options: Options, loaded) -> None:
    if options.augment and loaded.params.has("rmt"):
        common.err.print(f"[yellow]warning:[/] {AUGMENT_WARNING}")


def disguise(
    src: str = typer.Argument(
        ...,
        help="An image folder (class sub-folders or flat), a .npy/.npz file, or torchvision:NAME:ROOT[:train|test].",
    ),
    output: Path = typer.Argument(..., help="The HDF5 file to write."),
    key: str = typer.Option(..., "--key", help="NAME or NAME@VERSION (default: the primary version)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output, or drop an interrupted run."),
    on_error: Literal["fail", "skip"] = typer.Option(
        "fail", "--on-error", help="What a bad image does: fail (stop) or skip (count it)."
    ),
    workers: int | None = typer.Option(None, "--workers", help="Decoding processes (default: one per CPU)."),
    shard: str | None = typer.Option(
        None, "--shard", help="Write shard I of N (I/N, I counted from 0: 0/4 .. 3/4); join them with dkit merge."
    ),
    fit: Literal["none", "resize", "crop", "resize-crop"] = typer.Option(
        "none", "--fit", help="Sizes that differ from the key's: " + ", ".join(FITS) + "."
    ),
    convert: bool = typer.Option(
        True, "--convert/--no-convert", help="Convert grey/RGB, alpha, 16-bit, palette and CMYK to the key's pixels."
    ),
    float_range: Literal["0-1", "0-255"] | None = typer.Option(
        None,
        "--float-range",
        help="Float pixels (.npy/.npz): 0-1 (scaled by 255) or 0-255 (rounded); without it only whole values pass.",
    ),
    dtype: Literal["float32", "float16"] = typer.Option(
        "float32", "--dtype", help="float32, or float16 (half the bytes)."
    ),
    withhold_classes: bool = typer.Option(False, "--withhold-classes", help="Do not store the class names."),
    encodings: int = typer.Option(1, "--encodings", min=1, help="InstaHide: encodings per image (T)."),
    copies: int = typer.Option(
        1, "--copies", min=1, help="Rows per image, each with fresh noise (with --augment: copies 1.. augmented)."
    ),
    augment: str = typer.Option(
        "", "--augment", help="Augment the copies before disguising: flip, crop, or flip,crop (needs --copies 2+)."
    ),
    public: str | None = typer.Option(None, "--public", help="InstaHide cross: the public image set to mix with."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", help="Refuse larger images (bombs)."),
    download: bool = typer.Option(False, "--download", help="Let a torchvision dataset download its files."),
    engine: Literal["local", "ray"] = typer.Option(
        "local", "--engine", help="local, or ray: shards on a Ray cluster (--workers actors), then merged."
    ),
    address: str | None = typer.Option(None, "--address", help="--engine ray: the cluster (default: a local one)."),
    json_out: bool = JSON,
):
    """Disguise a dataset with a key into an HDF5 file (written under a temporary name, then renamed)."""
    if dtype not in ("float32", "float16"):
        raise InputError(f"unknown dtype {dtype!r}: choose float32 or float16")
    if encodings < 1 or copies < 1:
        raise InputError("--encodings and --copies must be at least 1")
    if encodings > 1 and copies > 1:
        raise InputError("give --encodings (InstaHide) or --copies (other keys), not both")
    options = Options(
        fit=fit,
        convert=convert,
        on_error=on_error,
        workers=workers,
        dtype=dtype,
        withhold_classes=withhold_classes,
        encodings=max(encodings, copies),
        augment=augment,
        max_pixels=max_pixels,
        float_range=float_range,
        shard=parse_shard(shard) if shard else None,
    )
    if engine not in ("local", "ray"):
        raise InputError(f"unknown --engine {engine!r}: choose local or ray")
    if engine == "ray":
        return _disguise_on_ray(src, output, key, options, workers, address, force, resume, public, json_out)
    if address:
        raise InputError("--address goes with --engine ray")
    source = open_source(src, download=download)
    public_source = open_source(public) if public else None
    loaded = common.open_keystore().load(key, use="disguise", output=str(output))
    columns = [TextColumn("[bold]disguise"), BarColumn(), MofNCompleteColumn(), _Rate(), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True, disable=json_out) as bar:
        task = bar.add_task("disguise", total=None)

        def tick(done: int, total: int) -> None:
            common.check_terminated()
            bar.update(task, completed=done, total=total)

        report = disguise_source(
            source, output, loaded, options, resume=resume, force=force, public=public_source, progress=tick
        )
    doc = dict(report.to_dict(), key_id=loaded.key_id, key_version=loaded.version, source=source.description)
    _warn_augment(options, loaded)
    if json_out:
        print_json(doc)
        return
    s = report.seconds
    out.print(
        f"wrote {report.rows:,} rows to [bold]{escape(str(output))}[/] with {escape(loaded.ref)} "
        f"(key ID {loaded.key_id}) in {s['total']:.1f}s, {doc['images_per_second']:,.0f} img/s "
        f"[dim](decode {s['decode']:.1f}s in workers, disguise {s['disguise']:.1f}s, write {s['write']:.1f}s)[/]"
    )
    if report.resumed_from:
        out.print(f"resumed after {report.resumed_from:,} source items")
    if report.conversions:
        out.print("converted: " + ", ".join(f"{n} {escape(k)}" for k, n in sorted(report.conversions.items())))
    if source.ignored:
        out.print(f"ignored {len(source.ignored)} files without an image extension, e.g. {escape(source.ignored[0])}")
    if report.skipped:
        out.print(f"[yellow]skipped {len(report.skipped)} images[/]:")
        for name, problem in report.skipped[:10]:
            out.print(f"  {escape(name)}: {escape(problem)}")
        if len(report.skipped) > 10:
            out.print(f"  ... and {len(report.skipped) - 10} more (--json lists the counts by problem)")


def _disguise_on_ray(src, output, key, options, workers, address, force, resume, public, json_out) -> None:
    from ..data.ray_engine import disguise_with_ray

    if resume or public or options.shard:
        given = "--resume" if resume else ("--public" if public else "--shard")
        raise InputError(f"{given} is not available with --engine ray", hint="use --engine local for it")
    ks = common.open_keystore()
    loaded = ks.load(key, use="disguise", output=str(output), engine="ray")
    doc = disguise_with_ray(
        src, output, loaded, options, seed=ks.seed(loaded), workers=workers or 2, address=address, force=force
    )
    doc.update(key_id=loaded.key_id, key_version=loaded.version, engine="ray")
    _warn_augment(options, loaded)
    if json_out:
        print_json(doc)
        return
    out.print(
        f"wrote {doc['rows']:,} rows to [bold]{escape(str(output))}[/] with {escape(loaded.ref)} "
        f"(key ID {loaded.key_id}) on Ray: {doc['shards']} shards by {doc['workers']} actors, merged, "
        f"in {doc['seconds']['total']:.1f}s, {doc['images_per_second']:,.0f} img/s"
    )
    if doc["skipped"]:
        out.print(f"[yellow]skipped {doc['skipped']} images[/] (run --engine local --json for the list)")


def _augmented(meta) -> str:
    kinds = meta.options.get("augment") if isinstance(meta.options, dict) else None
    return f" (copies augmented: {escape(str(kinds))})" if kinds else ""


def inspect_cmd(file: Path = typer.Argument(..., help="A disguised HDF5 file."), json_out: bool = JSON):
    """Check a disguised dataset against the format spec and show its public metadata (no key needed)."""
    meta = inspect(file)
    doc = meta.to_dict()
    if json_out:
        print_json(doc)
        return
    t = Table(show_header=False, title=str(file), title_justify="left")
    rows = [
        ("format", f"dkit disguised dataset v{meta.format_version}, written by dkit {meta.dkit_version}"),
        ("created", meta.created),
        ("rows", f"{meta.rows:,}"),
        ("images", f"{meta.rows} x {'x'.join(map(str, meta.params.shape))} {meta.dtype}"),
        ("key", f"ID {meta.key_id}, version {meta.key_version}"),
        ("pipeline", meta.params.describe()),
        ("labels", meta.label_kind + (f", {meta.num_classes} classes" if meta.num_classes else "")),
        ("class names", ", ".join(meta.class_names) if meta.class_names else "withheld or none"),
        ("rows per image", str(meta.encodings) + _augmented(meta)),
        ("source items", f"{meta.source_count:,} ({meta.source_skipped} skipped)"),
    ]
    if meta.shard:
        rows.append(("shard", f"{meta.shard[0]}/{meta.shard[1]}, source items {meta.shard[2]}..{meta.shard[3] - 1}"))
    for k, v in rows:
        t.add_row(k, escape(str(v)))
    out.print(t)


def verify_cmd(file: Path = typer.Argument(..., help="A disguised HDF5 file."), json_out: bool = JSON):
    """Read every chunk and check its checksum; exit 1 naming the damaged rows."""
    doc = verify(file)
    if json_out:
        print_json(doc)
    else:
        out.print(
            f"{escape(str(file))}: ok, {doc['rows']:,} rows, every chunk's checksum verified "
            f"({', '.join(doc['datasets'])})"
        )


def merge_cmd(
    output: Path = typer.Argument(..., help="The merged file."),
    shards: list[Path] = typer.Argument(..., help="All shard files of one run."),
    virtual: bool = typer.Option(
        False,
        "--virtual",
        help="Reference the shards (HDF5 virtual datasets) instead of "
        "copying them; the shards must then stay beside the merged file.",
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite the output."),
    json_out: bool = JSON,
):
    """Join the shards of one dkit disguise run into one dataset."""
    doc = merge(output, [str(s) for s in shards], virtual=virtual, force=force)
    if json_out:
        print_json(doc)
    else:
        out.print(
            f"merged {doc['shards']} shards, {doc['rows']:,} rows, into {escape(str(output))}"
            + (" (virtual)" if virtual else "")
        )


def preview_cmd(
    file: Path = typer.Argument(..., help="A disguised HDF5 file."),
    key: str = typer.Option(..., "--key", help="The key it was made with (NAME or NAME@VERSION)."),
    output: Path = typer.Option(..., "-o", "--output", help="The PNG to write."),
    count: int = typer.Option(8, "--count", help="How many rows to show."),
    json_out: bool = JSON,
):
    """Owner side: a PNG grid of what the key recovers beside what the cloud sees."""
    from ..data.preview import preview as make_preview

    loaded = common.open_keystore().load(key, use="preview", file=str(file))
    doc = make_preview(file, loaded, output, count=count)
    if json_out:
        print_json(doc)
    else:
        out.print(f"wrote {escape(str(output))}: {doc['rows']} rows, columns {' | '.join(doc['columns'])}")
