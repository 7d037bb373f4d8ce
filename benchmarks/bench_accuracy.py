"""Accuracy on disguised data against the plaintext baseline: same code, same budget.

    python benchmarks/bench_accuracy.py [--datasets mnist,cifar] [--work DIR] [--out results.json]

For each data set, the image folder from ../shared/data is split per class into a training part
(the first 80% of each class's files) and a held-out part (the rest). Each key disguises the
training part (`dkit disguise`), a model trains on it (`dkit train`, 10% validation split), and
the owner predicts the held-out images with the key (`dkit predict`, fresh noise). The identity
pipeline is the plaintext baseline, made by the same code. Epoch times are the training loop's
mean seconds per epoch. Results are written as JSON as they come, and printed as a table.

Privacy is measured elsewhere; this script only says what the disguise costs in accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dkit.data import Options, disguise_source, open_source
from dkit.derive import KeyMaterial
from dkit.keystore import Keystore, LoadedKey, MemoryBackend
from dkit.models import TrainOptions, predict, train
from dkit.params import KeyParams
from dkit.placement import placement_accuracy

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"

# "/ blockresnet" rows are the free stem (pixels=0), the default until 2026-12-03; "pixels=1" rows the new one.
# (name, key parameters, architecture, architecture settings, epochs, disguise options[, training options])
MNIST = [
    ("identity / cnn", dict(pipeline="identity"), "cnn", {}, 10, {}),
    (
        "rmt 7x7 noise 100 (paper: per-channel) / cnn",
        dict(pipeline="rmt", noise=100, channels="shared"),
        "cnn",
        {},
        10,
        {},
    ),
    ("perm+rmt 7x7 noise 100 joint / cnn", dict(pipeline="perm,rmt", noise=100), "cnn", {}, 10, {}),
    ("perm+rmt 7x7 noise 100 joint / blockvit", dict(pipeline="perm,rmt", noise=100), "blockvit", {}, 10, {}),
    ("identity / blockvit", dict(pipeline="identity"), "blockvit", {}, 10, {}),
    ("aes 7x7 per-block / cnn", dict(pipeline="aes"), "cnn", {}, 10, {}),
    ("instahide k=4, T=1 / cnn", dict(pipeline="instahide", k=4), "cnn", {}, 10, {}),
    (
        "rmt 7x7 noise 100 (paper: per-channel) / blockresnet",
        dict(pipeline="rmt", noise=100, channels="shared"),
        "blockresnet",
        {"pixels": 0},
        10,
        {},
    ),
    (
        "rmt 7x7 noise 100 (paper: per-channel) / blockresnet pixels=1",
        dict(pipeline="rmt", noise=100, channels="shared"),
        "blockresnet",
        {"pixels": 1},
        10,
        {},
    ),
]
CIFAR = [
    ("identity / blockvit", dict(pipeline="identity"), "blockvit", {}, 15, {}),
    ("perm+rmt 4x4 joint noise 25 / blockvit", dict(pipeline="perm,rmt", noise=25), "blockvit", {}, 15, {}),
    ("identity / resnet18", dict(pipeline="identity"), "resnet18", {}, 15, {}),
    ("perm+rmt 4x4 joint noise 25 / resnet18", dict(pipeline="perm,rmt", noise=25), "resnet18", {}, 15, {}),
    ("rmt 4x4 joint noise 25 / blockconv", dict(pipeline="rmt", noise=25), "blockconv", {}, 15, {}),
    # issue 11's table: rows 2-5 against "identity / resnet18" (row 1)
    ("rmt 4x4 joint noise 25 / blockresnet", dict(pipeline="rmt", noise=25), "blockresnet", {"pixels": 0}, 15, {}),
    (
        "perm+rmt 4x4 joint noise 25 / blockresnet",
        dict(pipeline="perm,rmt", noise=25),
        "blockresnet",
        {"pixels": 0},
        15,
        {},
    ),
    (
        "perm+rmt 2x2 shared noise 25 (papers) / blockresnet",
        dict(pipeline="perm,rmt", noise=25, channels="shared", block=2),
        "blockresnet",
        {"pixels": 0},
        15,
        {},
    ),
    (
        "rmt 4x4 joint noise 25, augment flip,crop x4 / blockresnet",
        dict(pipeline="rmt", noise=25),
        "blockresnet",
        {"pixels": 0},
        15,
        {"augment": "flip,crop", "encodings": 4},
    ),
    (
        "perm+rmt 4x4 joint noise 25, augment flip,crop x4 / blockresnet",
        dict(pipeline="perm,rmt", noise=25),
        "blockresnet",
        {"pixels": 0},
        15,
        {"augment": "flip,crop", "encodings": 4},
    ),
    (
        "rmt 4x4 joint noise 25, augment flip,crop x4 / blockresnet pixels=1",
        dict(pipeline="rmt", noise=25),
        "blockresnet",
        {"pixels": 1},
        15,
        {"augment": "flip,crop", "encodings": 4},
    ),
    (
        "perm+rmt 8x8 joint noise 25, augment flip,crop x4 / blockresnet pixels=1",
        dict(pipeline="perm,rmt", noise=25, block=8),
        "blockresnet",
        {"pixels": 1},
        15,
        {"augment": "flip,crop", "encodings": 4},
    ),
    (
        "rmt 8x8 joint noise 25, augment flip,crop x4 / blockresnet pixels=1",
        dict(pipeline="rmt", noise=25, block=8),
        "blockresnet",
        {"pixels": 1},
        15,
        {"augment": "flip,crop", "encodings": 4},
    ),
    # row 1 with the same owner-made copies: the plaintext model to hold row 5 against
    (
        "identity, augment flip,crop x4 / resnet18",
        dict(pipeline="identity"),
        "resnet18",
        {},
        15,
        {"augment": "flip,crop", "encodings": 4},
    ),
    # the cost of the noise alone: plain images plus noise 25 (R = I)
    (
        "control: plain + noise 25 (rmt with R = I) / resnet18",
        dict(pipeline="rmt", noise=25),
        "resnet18",
        {},
        15,
        {},
        {"control": "noise only"},
    ),
    # 8x8 blocks: the thumbnail attack's grid shrinks to 4x4 (the candidate default for 32x32)
    (
        "rmt 8x8 joint noise 25 / blockresnet",
        dict(pipeline="rmt", noise=25, block=8),
        "blockresnet",
        {"pixels": 0},
        15,
        {},
    ),
    (
        "perm+rmt 8x8 joint noise 25 / blockresnet",
        dict(pipeline="perm,rmt", noise=25, block=8),
        "blockresnet",
        {"pixels": 0},
        15,
        {},
    ),
    (
        "perm+rmt 8x8 joint noise 25 / blockresnet shared=1",
        dict(pipeline="perm,rmt", noise=25, block=8),
        "blockresnet",
        {"shared": 1},
        15,
        {},
    ),
    # blockresnet pixels=1: per-position maps, one shared map, the image rebuilt for ResNet-18's own stem
    (
        "perm+rmt 8x8 joint noise 25 / blockresnet pixels=1",
        dict(pipeline="perm,rmt", noise=25, block=8),
        "blockresnet",
        {"pixels": 1},
        15,
        {},
    ),
    (
        "rmt 4x4 joint noise 25 / blockresnet pixels=1",
        dict(pipeline="rmt", noise=25),
        "blockresnet",
        {"pixels": 1},
        15,
        {},
    ),
    (
        "perm+rmt 4x4 joint noise 25 / blockresnet pixels=1",
        dict(pipeline="perm,rmt", noise=25),
        "blockresnet",
        {"pixels": 1},
        15,
        {},
    ),
    (
        "perm+rmt 2x2 shared noise 25 (papers) / blockresnet pixels=1",
        dict(pipeline="perm,rmt", noise=25, channels="shared", block=2),
        "blockresnet",
        {"pixels": 1},
        15,
        {},
    ),
    ("perm+aes 4x4 per-block / blockvit", dict(pipeline="perm,aes"), "blockvit", {}, 15, {}),
    ("instahide k=4, T=1 / resnet18", dict(pipeline="instahide", k=4), "resnet18", {}, 15, {}),
    ("identity / blockvit, mixup 0.2", dict(pipeline="identity"), "blockvit", {}, 15, {}, {"mixup": 0.2}),
    (
        "perm+rmt 4x4 joint noise 25 / blockvit, mixup 0.2",
        dict(pipeline="perm,rmt", noise=25),
        "blockvit",
        {},
        15,
        {},
        {"mixup": 0.2},
    ),
]
SETS = {
    "mnist": ("mnist-10k", "28x28", 7, MNIST),
    "cifar": ("cifar10-train-20k", "32x32x3", 4, CIFAR),
}


def noise_only(key: LoadedKey) -> LoadedKey:
    """A control, not a disguise: ``key`` with every RMT matrix replaced by the identity, so that
    its "disguised" images are the plain images plus the key's noise (uniform on [0, N)). A model
    trained on them shows what the noise alone costs: with the key folded in, a model that absorbs
    an orthogonal R_j sees x + Delta R_j^T, noise of the same covariance (not of the same shape)."""
    m = key.material
    eye = np.broadcast_to(np.eye(m.matrices.shape[1]), m.matrices.shape).copy()
    eye.setflags(write=False)
    fake = KeyMaterial(params=m.params, key_id=m.key_id, perm=m.perm, matrices=eye, aes=m.aes, source_key=m.source_key)
    return LoadedKey(name=key.name, record=key.record, material=fake)


def split_folder(src: Path, dest: Path, train_share: float = 0.8) -> tuple[Path, Path]:
    tr, te = dest / "train", dest / "test"
    if tr.exists() and te.exists():
        return tr, te
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        cut = int(len(files) * train_share)
        for part, chunk in ((tr, files[:cut]), (te, files[cut:])):
            (part / cls.name).mkdir(parents=True, exist_ok=True)
            for f in chunk:
                shutil.copy(f, part / cls.name / f.name)
    return tr, te


def run_set(
    name: str,
    work: Path,
    results: dict,
    out: Path,
    only: set[str] | None,
    epochs: int | None,
    noise_samples: tuple[int, ...] = (4, 16),
) -> None:
    archive, shape, block, cases = SETS[name]
    folder = work / archive
    if not folder.exists():
        subprocess.run(["tar", "xzf", str(SHARED / f"{archive}.tar.gz"), "-C", str(work)], check=True)
    train_dir, test_dir = split_folder(folder, work / f"{name}-split")
    ks = Keystore(work / "home", backend=MemoryBackend())
    for label, kw, arch, arch_params, case_epochs, dopts, *topts in cases:
        kw = dict(kw)
        topts = dict(topts[0]) if topts else {}
        control = topts.pop("control", None)
        n_epochs = epochs or case_epochs
        row_key = f"{name}: {label}, {n_epochs} epochs"
        if only and not any(o in row_key for o in only):
            continue
        if row_key in results["rows"]:
            continue
        key_name = f"{name}-{len(ks.list())}"
        params = KeyParams.create(shape, kw.pop("block", block), kw.pop("pipeline"), **kw)
        ks.keygen(key_name, params)
        key = ks.load(key_name)
        if control == "noise only":
            key = noise_only(key)
        t0 = time.perf_counter()
        h5 = work / f"{key_name}.h5"
        disguise_source(open_source(train_dir), h5, key, Options(**dopts), force=True)
        t_dis = time.perf_counter() - t0
        model_dir = work / f"model-{key_name}"
        metrics = train(
            h5, model_dir, TrainOptions(arch=arch, epochs=n_epochs, arch_params=arch_params, **topts), force=True
        )
        pred = predict(model_dir, open_source(test_dir), key)
        by_samples = {}
        if not params.has("identity") and not params.has("instahide"):
            for n_samples in noise_samples:  # the owner may average over fresh noise
                by_samples[n_samples] = predict(model_dir, open_source(test_dir), key, samples=n_samples)["accuracy"]
        epoch_s = [e["seconds"] for e in metrics["epochs"]]
        placed = None
        if metrics.get("placement") and params.has("perm"):  # the estimated arrangement, scored against the key
            from safetensors.torch import load_file

            cells = next(v for k, v in load_file(str(model_dir / "model.safetensors")).items() if "arrangement" in k)
            placed = placement_accuracy(cells.numpy(), key.material.perm, params.grid)
        results["rows"][row_key] = {
            "set": name,
            "case": label,
            "key": params.describe(),
            "arch": arch,
            "epochs": n_epochs,
            "train": topts,
            "disguise": dopts,
            "control": control,
            "parameters": metrics["parameters"],
            "train_rows": metrics["train_rows"],
            "val_acc": metrics["final"]["val_acc"],
            "test_acc": pred["accuracy"],
            "test_images": pred["labelled"],
            "test_acc_averaged_over_noise": by_samples,
            "epoch_seconds_mean": statistics.mean(epoch_s),
            "epoch_seconds_median": statistics.median(epoch_s),
            "train_img_s_median": statistics.median(e["images_per_second"] for e in metrics["epochs"]),
            "disguise_seconds": t_dis,
            "placement_accuracy": placed,
        }
        out.write_text(json.dumps(results, indent=2))
        r = results["rows"][row_key]
        print(
            f"{row_key:<60} test {r['test_acc']:.4f} val {r['val_acc']:.4f} epoch {r['epoch_seconds_median']:.1f}s",
            flush=True,
        )


def table(results: dict) -> None:
    """Each row against the same model on plaintext, and against the best plaintext model, both
    at the same epochs and with the same owner-side options (rows written before the options were
    recorded take them from the case list)."""
    rows = results["rows"]
    listed = {(s, label): dopts for s, (*_, cases) in SETS.items() for label, _, _, _, _, dopts, *_ in cases}

    def budget(r):
        dopts = r["disguise"] if "disguise" in r else listed.get((r["set"], r["case"]), {})
        return (r["set"], r["epochs"], json.dumps(dopts, sort_keys=True))

    def cfg(r):
        return (*budget(r), r["arch"], json.dumps(r.get("train", {}), sort_keys=True))

    plain = [r for r in rows.values() if r["key"].endswith("identity")]
    same = {cfg(r): r["test_acc"] for r in plain}
    best: dict = {}
    for r in plain:
        best[budget(r)] = max(best.get(budget(r), 0.0), r["test_acc"])

    def rel(acc, b):
        return f"{acc / b:8.1%}" if b else "       -"

    print(f"\n{'case':<60} {'test acc':>8} {'vs plain':>9} {'vs best':>8} {'epoch s':>8}")
    for k, r in rows.items():
        acc = r["test_acc"]
        print(
            f"{k:<60} {acc:8.4f} {rel(acc, same.get(cfg(r))):>9} {rel(acc, best.get(budget(r))):>8} "
            f"{r['epoch_seconds_median']:8.1f}"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="mnist,cifar")
    ap.add_argument("--work", default=None, help="Working folder (kept, so a rerun skips finished cases).")
    ap.add_argument("--out", default="accuracy-results.json")
    ap.add_argument(
        "--only",
        default=None,
        help="Substrings of the cases to run, comma-separated (or |-separated when they hold commas); "
        "a string found whole in a case's name is taken whole.",
    )
    ap.add_argument("--epochs", type=int, default=None, help="Epochs for every case (default: each case's).")
    ap.add_argument(
        "--noise-samples", default="4,16", help="Also predict averaging these many noise draws ('' for none)."
    )
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path("/tmp/dkit-bench-accuracy")
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    results["meta"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "cuda": torch.cuda.is_available(),
    }
    only = None
    if args.only:  # one case's whole name (commas and all) is one pattern, not a list split at its commas
        whole = any(args.only in name for _, _, _, cases in SETS.values() for name, *_ in cases)
        only = {args.only} if whole else set(args.only.split("|" if "|" in args.only else ","))
    for name in args.datasets.split(","):
        samples = tuple(int(v) for v in args.noise_samples.split(",") if v)
        run_set(name, work, results, out, only, args.epochs, samples)
    table(results)


if __name__ == "__main__":
    main()
