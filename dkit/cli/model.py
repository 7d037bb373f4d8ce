"""``dkit train`` and ``dkit predict``."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Literal

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..data import open_source
from ..errors import InputError
from ..params import MAX_SAMPLES
from . import common
from .common import err, escape, out, print_json, printable

LOG_EVERY_S = 30.0  # without a terminal: a progress line at most this often within an epoch
ARCH_NAMES = (
    "cnn",
    "resnet18",
    "blockvit",
    "blockconv",
    "blockresnet",
)  # dkit.models.nets.ARCHS, named here to keep torch out of start-up


def train(
    data: Path = typer.Argument(..., help="A disguised HDF5 file (dkit disguise)."),
    output: Path = typer.Option(..., "-o", "--output", help="The model folder to write."),
    arch: Literal["auto", "cnn", "resnet18", "blockvit", "blockconv", "blockresnet"] = typer.Option(
        "auto",
        "--arch",
        help="auto (resnet18 for plain and InstaHide images, blockresnet for block disguises), "
        + ", ".join(ARCH_NAMES)
        + ".",
    ),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Passes over the training data."),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="Images per training step."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default per architecture)."),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction", min=0.0, max=0.9, help="Share of source images held out for validation."
    ),
    device: Literal["auto", "cpu", "cuda"] = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights, the split and the batch order."),
    mixup: float = typer.Option(0.0, "--mixup", help="Mixup alpha (0: off); valid on perm/RMT disguises."),
    arch_param: list[str] = typer.Option([], "--arch-param", help="Architecture setting KEY=INT, e.g. depth=4."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace a model or an interrupted run in the folder."),
    json_out: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
):
    """Train a model on a disguised dataset. No key is needed (this runs on the cloud side).
    Under torchrun (torchrun --nproc_per_node N -m dkit train ...) it trains with DDP."""
    from ..models.distributed import is_main
    from ..models.training import TrainOptions
    from ..models.training import train as run

    params = {}
    for item in arch_param:
        k, sep, v = item.partition("=")
        if not sep or not v.strip().lstrip("-").isdigit():
            raise InputError(f"malformed --arch-param {item!r}: expected KEY=INTEGER")
        params[k.strip()] = int(v)
    options = TrainOptions(
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
        arch_params=params,
        mixup=mixup,
    )
    columns = [
        TextColumn("[bold]train[/] epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.3f}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err, transient=True, disable=json_out) as bar:
        task = bar.add_task("train", total=None, epoch="", loss=0.0, acc=0.0)

        last = [time.monotonic()]

        def tick(p: dict) -> None:
            common.check_terminated()
            if "epoch_done" in p:
                e = p["epoch_done"]
                if not json_out:
                    val = f", val acc {e['val_acc']:.4f}" if e["val_acc"] is not None else ""
                    err.print(
                        f"epoch {e['epoch']}: train loss {e['train_loss']:.4f}, acc {e['train_acc']:.4f}{val} "
                        f"({e['seconds']:.1f}s, {e['images_per_second']:,.0f} img/s)"
                    )
                return
            if not err.is_terminal and not json_out and time.monotonic() - last[0] >= LOG_EVERY_S:
                last[0] = time.monotonic()  # a log file gets a plain line now and then, not a bar
                err.print(
                    f"epoch {p['epoch']}/{p['epochs']}: step {p['step']}/{p['steps']}, "
                    f"train loss {p['loss']:.4f}, acc {p['acc']:.4f}"
                )
            bar.update(
                task,
                completed=p["step"],
                total=p["steps"],
                epoch=f"{p['epoch']}/{p['epochs']}",
                loss=p["loss"],
                acc=p["acc"],
            )

        metrics = run(data, output, options, resume=resume, force=force, progress=tick)
    if not is_main():  # under torchrun, rank 0 reports
        return
    if json_out:
        print_json(metrics)
        return
    f = metrics["final"]
    val = (
        f"validation accuracy {f['val_acc']:.4f} on {metrics['val_rows']:,} rows"
        if f["val_acc"] is not None
        else "no validation split"
    )
    procs = f" x {metrics['processes']} processes" if metrics.get("processes", 1) > 1 else ""
    out.print(
        f"trained {metrics['arch']} ({metrics['parameters']:,} parameters) on {metrics['device']}{procs}: {val}; "
        f"model in [bold]{escape(str(output))}[/]"
    )


def predict(
    model_dir: str = typer.Argument(
        ..., help="A model folder (dkit train), or the URL of dkit serve (only disguised batches are sent)."
    ),
    inputs: str = typer.Argument(..., help="Images: a folder (labelled sub-folders give an accuracy), .npy/.npz."),
    key: str = typer.Option(..., "--key", help="NAME or NAME@VERSION: the key the training data was disguised with."),
    fmt: Literal["table", "csv", "json"] = typer.Option("table", "--format", help="table, csv or json."),
    top_k: int = typer.Option(3, "--top-k", min=1, help="Classes to show per image."),
    device: Literal["auto", "cpu", "cuda"] = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    fit: Literal["none", "resize", "crop", "resize-crop"] | None = typer.Option(
        None, "--fit", help="Size policy (default: the training data's)."
    ),
    public: str | None = typer.Option(None, "--public", help="InstaHide cross: the public set to mix with."),
    samples: int | None = typer.Option(
        None,
        "--samples",
        min=1,
        max=MAX_SAMPLES,
        help=f"Disguises per image, probabilities averaged (default 1; 4 for InstaHide; at most {MAX_SAMPLES}).",
    ),
    float_range: Literal["0-1", "0-255"] | None = typer.Option(
        None,
        "--float-range",
        help="Float pixels (.npy/.npz): 0-1 (scaled by 255) or 0-255 (rounded); default: the training data's.",
    ),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="With a URL: a file holding the server's bearer token."
    ),
    json_out: bool = typer.Option(False, "--json", help="Same as --format json."),
):
    """Disguise new images with the key (fresh noise), check the key against the model, print the classes."""
    from ..models.artifact import read_meta
    from ..models.prediction import check_key
    from ..models.prediction import predict as run
    from ..serve.client import is_url
    from ..serve.server import read_token

    fmt = "json" if json_out else fmt
    if fmt not in ("table", "csv", "json"):
        raise InputError(f"unknown --format {fmt!r}: choose table, csv or json")
    remote = is_url(model_dir)
    if token_file is not None and not remote:
        raise InputError("--token-file goes with a server URL, not a model folder")
    token = read_token(token_file)
    ks = common.open_keystore()
    if remote:  # the server's description is fetched and checked against the key in run()
        loaded = ks.load(key, use="predict", model=model_dir)
    else:
        meta = read_meta(Path(model_dir))
        loaded = ks.load(key, use="predict", model=str(model_dir))
        check_key(meta, loaded, Path(model_dir))
    source = open_source(inputs)
    doc = run(
        model_dir,
        source,
        loaded,
        top_k=top_k,
        device=device,
        fit=fit,
        samples=samples,
        float_range=float_range,
        public=open_source(public) if public else None,
        token=token,
    )
    rows = doc["predictions"]
    if fmt == "json":
        print_json(doc)
        return
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        k = len(rows[0]["top"]) if rows else 0
        w.writerow(["input", *[f"{h}{i + 1}" for i in range(k) for h in ("class", "probability")], "label"])
        for r in rows:
            cells = [
                r["input"],
                *[v for t in r["top"] for v in (t["class"], f"{t['probability']:.6f}")],
                r["label"] or "",
            ]
            w.writerow([printable(c) for c in cells])  # names from files: no terminal control characters
        print(buf.getvalue(), end="")
        return
    table = Table()
    table.add_column("input")
    for i in range(len(rows[0]["top"]) if rows else 0):
        table.add_column(f"#{i + 1}")
    if any(r["label"] for r in rows):
        table.add_column("label")
    for r in rows[:200]:
        cells = [escape(r["input"])] + [f"{escape(t['class'])} {t['probability']:.3f}" for t in r["top"]]
        if any(x["label"] for x in rows):
            cells.append(escape(r["label"] or ""))
        table.add_row(*cells)
    out.print(table)
    if len(rows) > 200:
        out.print(f"... {len(rows) - 200} more rows (use --format csv or json for all)")
    if doc["accuracy"] is not None:
        out.print(
            f"accuracy {doc['accuracy']:.4f} on {doc['labelled']:,} labelled images "
            f"(key {escape(loaded.ref)}, key ID {loaded.key_id})"
        )
