"""``dkit evaluate`` and ``dkit calibrate``: how private is a key, measured by real attacks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer
from rich.table import Table

from ..data import open_source
from . import common
from .common import err, escape, out, print_json

VERDICT_STYLE = {"holds": "green", "partial": "yellow", "broken": "bold red"}


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected whole numbers separated by commas", param_hint=flag) from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{text!r}: expected positive whole numbers", param_hint=flag)
    return values


def evaluate(
    data: Path = typer.Argument(..., help="The disguised dataset (DATA.h5) the cloud holds."),
    key: str = typer.Option(..., "--key", help="NAME or NAME@VERSION: the key that made DATA.h5."),
    plain: str = typer.Option(..., "--plain", help="The owner's plain images (any source dkit disguise reads)."),
    model: Path | None = typer.Option(None, "--model", help="A model trained on DATA.h5 (misusability, model leak)."),
    attacks: str = typer.Option(
        "all",
        "--attacks",
        help="all, or a comma list of: examiner, misusability, kpa, "
        "covariance, placement, thumbnail, copies, codebook, jigsaw, instahide, model-leak.",
    ),
    pairs: str = typer.Option("1,10,100", "--pairs", help="Known pairs m for the level-2 attacks (comma list)."),
    targets: int = typer.Option(200, "--targets", min=20, help="Held-out images every figure is measured on."),
    max_images: int = typer.Option(6000, "--max-images", min=100, help="Plain images decoded at most (at random)."),
    epochs: int = typer.Option(8, "--epochs", min=1, help="Training epochs of the DNN examiner."),
    report: Path | None = typer.Option(None, "--report", help="Write a self-contained HTML report here."),
    json_out: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
):
    """Measure what the cloud could recover from DATA.h5: real attacks at three threat levels."""
    from ..evaluate import ATTACKS, Settings
    from ..evaluate import evaluate as run
    from ..evaluate import report as html_report

    chosen = ATTACKS if attacks == "all" else tuple(a.strip() for a in attacks.split(",") if a.strip())
    bad = [a for a in chosen if a not in ATTACKS]
    if bad:
        raise typer.BadParameter(
            f"unknown attack {bad[0]!r}: choose all or " + ", ".join(ATTACKS), param_hint="--attacks"
        )
    settings = Settings(
        attacks=chosen, pairs=_ints(pairs, "--pairs"), targets=targets, max_images=max_images, examiner_epochs=epochs
    )
    loaded = common.open_keystore().load(key, use="evaluate", output=str(data))
    source = open_source(plain)
    ev = run(
        data,
        loaded,
        source,
        model_dir=model,
        settings=settings,
        progress=None if json_out else (lambda msg: err.print(f"[dim]{escape(msg)}[/]")),
    )
    doc = ev.to_dict()
    if report is not None:
        html_report.write(report, doc, html_report.evaluation_samples(ev))
    if json_out:
        print_json(doc)
        return
    print_table(doc)
    if report is not None:
        out.print(f"report: {escape(str(report))}")


def print_table(doc: dict) -> None:
    from ..evaluate.report import figure_text, setting_text

    t = Table(title=f"dkit evaluate: {' + '.join(doc['pipeline'])} (key ID {doc['key_id']})", title_justify="left")
    for col in ("attack", "level", "setting", "figures", "verdict"):
        t.add_column(col, overflow="fold")
    for r in doc["attacks"]:
        style = VERDICT_STYLE.get(r["verdict"], "")
        t.add_row(
            r["attack"],
            str(r["level"]),
            escape(setting_text(r["params"])),
            escape(figure_text(r)),
            f"[{style}]{r['verdict']}[/]" if style else r["verdict"],
        )
    out.print(t)
    out.print(
        "[dim]level 1: the cloud (disguised data, model, public knowledge); level 2: plus known pairs; "
        "level 3: plus the data distribution. Figures on held-out images.[/]"
    )


def calibrate(
    src: str = typer.Argument(..., help="The owner's plain images (any source dkit disguise reads)."),
    shape: str = typer.Option(..., "--shape", help="Image geometry HxW or HxWxC, e.g. 32x32x3."),
    pipeline: str = typer.Option("perm,rmt", "--pipeline", help="Mechanisms, e.g. perm,rmt (as dkit keygen)."),
    blocks: str = typer.Option("2,4,8", "--blocks", help="Block sizes to try (comma list)."),
    noise: str = typer.Option("0,25,50,100", "--noise", help="Noise levels to try, 0..255 units (comma list)."),
    rmt: Literal["orthogonal", "projection"] = typer.Option("orthogonal", "--rmt", help="orthogonal or projection."),
    channels: Literal["joint", "shared"] = typer.Option(
        "joint", "--channels", help="joint or shared (the papers' per-channel matrix)."
    ),
    epochs: int = typer.Option(3, "--epochs", min=1, help="Training epochs per setting (utility)."),
    arch: Literal["auto", "cnn", "resnet18", "blockvit"] = typer.Option(
        "auto", "--arch", help="Model to train: auto, cnn, resnet18 or blockvit."
    ),
    max_images: int = typer.Option(4000, "--max-images", min=400, help="Images used per setting (at random)."),
    report: Path | None = typer.Option(None, "--report", help="Write the frontier as a self-contained HTML file."),
    json_out: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
):
    """Try block sizes and noise levels with throw-away keys: utility against privacy, and the frontier."""
    from ..evaluate import report as html_report
    from ..evaluate.calibrate import Grid
    from ..evaluate.calibrate import calibrate as run

    try:
        noises = tuple(float(v) for v in noise.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{noise!r}: expected numbers separated by commas", param_hint="--noise") from None
    if not noises or min(noises) < 0 or max(noises) > 255:
        raise typer.BadParameter(f"{noise!r}: noise levels lie in 0..255", param_hint="--noise")
    grid = Grid(
        shape=shape,
        pipeline=pipeline,
        blocks=_ints(blocks, "--blocks"),
        noises=noises,
        rmt_kind=rmt,
        channels=channels,
        epochs=epochs,
        arch=arch,
        max_images=max_images,
    )
    doc = run(open_source(src), grid, progress=None if json_out else (lambda m: err.print(f"[dim]{escape(m)}[/]")))
    if report is not None:
        html_report.write_calibration(report, doc)
    if json_out:
        print_json(doc)
        return
    t = Table(title=f"dkit calibrate: {pipeline} on {shape}", title_justify="left")
    for col in ("setting", "utility", "privacy", "worst attack", "visual privacy", "frontier"):
        t.add_column(col, overflow="fold")
    for r in doc["settings"]:
        vp = "" if r["visual_privacy"] is None else f"{r['visual_privacy']:.3f}"
        t.add_row(
            r["setting"],
            f"{r['utility']:.3f}",
            f"{r['privacy']:.3f}",
            escape(str(r["worst_attack"])),
            vp,
            "yes" if r["on_frontier"] else "",
        )
    out.print(t)
    out.print(f"recommendation: {escape(doc['recommendation'])}")
    if report is not None:
        out.print(f"report: {escape(str(report))}")
