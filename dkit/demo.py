"""``dkit demo``: the main job end to end on the MNIST sample shipped with the package.

keygen -> disguise (an image folder to HDF5) -> train (no key) -> predict (with the key) -> a first
privacy report, for a disguise (RMT 7x7, noise 100, the papers' MNIST setting) and for the identity
baseline made by the same code. It runs in a throw-away dkit home. Its keys go to the OS keyring
when one works and are removed at the end; without a keyring it says so and keeps them in memory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from .data import Options, disguise_source, open_source
from .engine import Disguise
from .errors import KeyMismatch, SecretBackendError
from .keystore import FileBackend, KeyringBackend, Keystore, MemoryBackend
from .keystore.backends import ENV_KEYSTORE, ENV_PASSPHRASE, FILE_STORE_NAME
from .models import TrainOptions, predict, train
from .models import load as load_model
from .models.prediction import check_key
from .params import KeyParams

SAMPLE = "mnist-2500.npz"


def _backend(console: Console, home: Path):
    if os.environ.get(ENV_KEYSTORE, "").strip().lower() == "file":
        # The user chose the file store: honour it, in the demo's throw-away folder. Its passphrase is
        # DKIT_PASSPHRASE when set, else a random one that lives only as long as this process.
        phrase = os.environ.get(ENV_PASSPHRASE) or secrets.token_urlsafe(24)
        console.print("[dim]keys: the passphrase-encrypted file store (DKIT_KEYSTORE=file), in a temporary folder[/]")
        return FileBackend(home / FILE_STORE_NAME, lambda **_: phrase)
    try:
        backend = KeyringBackend()
        backend.get("dkit-demo-probe")
        console.print(f"[dim]keys: the OS keyring ({backend!r}); the demo removes its entries at the end[/]")
        return backend
    except SecretBackendError as e:
        console.print(
            f"[yellow]no OS keyring here[/] ({e.message}).\n"
            "[dim]The demo keeps its keys in this process's memory only. For real keys run a keyring, "
            "or set DKIT_KEYSTORE=file (a passphrase-encrypted file).[/]"
        )
        return MemoryBackend()


def _write_folder(root: Path, images: np.ndarray, labels: np.ndarray, classes) -> Path:
    from PIL import Image

    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        d = root / str(classes[y])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")
    return root


def _accuracy(model, x: torch.Tensor, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    return float((pred == y).mean())


def run(console: Console | None = None, workdir: Path | None = None, epochs: int = 4) -> dict:
    console = console or Console()
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dkit-demo-")))
        backend = _backend(console, workdir / "home")
        ks = Keystore(workdir / "home", backend=backend)
        stack.callback(_cleanup, ks, backend)
        with resources.files("dkit").joinpath("sample", SAMPLE).open("rb") as f, np.load(f) as z:
            sample = {k: z[k] for k in z.files}
        classes = [str(c) for c in sample["classes"]]
        train_dir = _write_folder(workdir / "train", sample["train_images"], sample["train_labels"], classes)
        test_dir = _write_folder(workdir / "test", sample["test_images"], sample["test_labels"], classes)
        console.print(
            f"sample: {len(sample['train_images']):,} MNIST digits to train on, "
            f"{len(sample['test_images']):,} held out (28x28 grey PNG folders)"
        )
        settings = {
            "plain": KeyParams.create("28x28", 7, "identity"),
            "demo": KeyParams.create("28x28", 7, "rmt", channels="shared", noise=100),
        }
        results = {}
        models = {}
        for name, params in settings.items():
            rec = ks.keygen(name, params)
            key = ks.load(name, use="disguise")
            console.print(f"[bold]keygen[/] {name}@1: {params.describe()} (key ID {rec.versions[0].key_id})")
            h5 = workdir / f"{name}.h5"
            rep = disguise_source(open_source(train_dir), h5, key, Options(workers=0))
            console.print(f"[bold]disguise[/] {rep.rows:,} images -> {h5.name}")
            metrics = train(h5, workdir / f"model-{name}", TrainOptions(arch="cnn", epochs=epochs))
            console.print(
                f"[bold]train[/] simple CNN, {epochs} epochs, no key: validation accuracy "
                f"{metrics['final']['val_acc']:.3f}"
            )
            pred = predict(workdir / f"model-{name}", open_source(test_dir), ks.load(name, use="predict"))
            console.print(
                f"[bold]predict[/] {pred['count']} held-out images with {name}@1: accuracy {pred['accuracy']:.3f}"
            )
            results[name] = {"val_acc": metrics["final"]["val_acc"], "test_acc": pred["accuracy"]}
            models[name] = load_model(workdir / f"model-{name}")[0]

        # Privacy, first look (dkit evaluate goes further): what the cloud can do with what it holds.
        x_plain = torch.from_numpy(sample["test_images"][:, None].astype(np.float32))
        y = sample["test_labels"]
        disguised = Disguise.from_key(ks.load("demo")).apply(sample["test_images"][..., None])
        x_disguised = torch.from_numpy(disguised).permute(0, 3, 1, 2)
        misuse = _accuracy(models["demo"], x_plain, y)
        examiner = _accuracy(models["plain"], x_disguised, y)
        results["privacy"] = {
            "model_misusability": misuse,
            "visual_privacy": 1 - examiner,
            "examiner_accuracy": examiner,
        }

        # dkit evaluate, short: the two attacks that read images back out of this key, each with its level.
        from .evaluate import Settings, evaluate

        ev = evaluate(
            workdir / "demo.h5",
            ks.load("demo"),
            open_source(train_dir),
            settings=Settings(attacks=("kpa", "covariance"), pairs=(10,), targets=100),
        )
        results["attacks"] = [r.to_dict() for r in ev.results]

        # Rotation: new data uses demo@2; the model trained on demo@1 refuses demo@2's key.
        ks.rotate("demo")
        try:
            check_key(load_model(workdir / "model-demo")[1], ks.load("demo@2"), workdir / "model-demo")
            refused = False
        except KeyMismatch:
            refused = True
        audit = ks.audit()
        results["rotation_refused_new_version"] = refused
        results["audit_ok"] = audit.ok
        results["seconds"] = round(time.perf_counter() - t_start, 1)

    table = Table(title="dkit demo: MNIST sample, simple CNN", title_justify="left")
    for col in ("", "plain (identity)", "disguised (RMT 7x7, noise 100)"):
        table.add_column(col)
    table.add_row(
        "held-out accuracy, predicted by the owner",
        f"{results['plain']['test_acc']:.3f}",
        f"{results['demo']['test_acc']:.3f}",
    )
    table.add_row(
        "validation accuracy, reported by training",
        f"{results['plain']['val_acc']:.3f}",
        f"{results['demo']['val_acc']:.3f}",
    )
    console.print(table)
    p = results["privacy"]
    console.print(
        f"privacy: the disguised model on plain images (model misusability, lower is better): "
        f"{p['model_misusability']:.3f}; a plain model on disguised images (DNN examiner) "
        f"{p['examiner_accuracy']:.3f}, so visual privacy {p['visual_privacy']:.3f}"
    )
    for a in results["attacks"]:
        what = (
            "known-plaintext regression from 10 pairs"
            if a["attack"] == "kpa"
            else ("covariance alignment, no pairs, plain digits of the same kind")
        )
        style = {"broken": "bold red", "partial": "yellow", "holds": "green"}.get(a["verdict"], "")
        console.print(
            f"attack, level {a['level']}: {what}: held-out digits rebuilt at PSNR {a['psnr_db']:.1f} dB, "
            f"SSIM {a['ssim']:.2f} (a guess without the attack: SSIM {a['baseline']['ssim']:.2f}): "
            f"[{style}]{a['verdict']}[/]"
        )
    console.print(
        "[dim]level 1: the cloud alone; level 2: plus known plain/disguised pairs; level 3: plus plain images of "
        "the same kind. dkit evaluate runs every attack that fits a key; SECURITY.md has the table.[/]"
    )
    console.print(
        f"keys: after rotation the demo model refuses demo@2 ({'yes' if refused else 'NO'}); "
        f"audit chain {'intact' if audit.ok else 'BROKEN'}; {results['seconds']:.0f}s in all"
    )
    return results


def _cleanup(ks: Keystore, backend) -> None:
    """Remove the demo's secrets from the OS keyring (the temporary home goes with its folder)."""
    state = ks._state()
    for name, rec in state.keys.items():
        for v in rec.versions:
            with contextlib.suppress(Exception):
                backend.delete(ks._label(state, name, v.version))
