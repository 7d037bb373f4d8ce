"""Privacy figures: `dkit evaluate` on the keys the papers and the README name, on ../shared/data.

    python benchmarks/bench_privacy.py [--cases cifar-default,mnist-paper,cifar-aes,cifar-instahide]
                                       [--work DIR] [--out benchmarks/results/privacy.json] [--reports DIR]

For each case a throw-away key (in memory) disguises the whole image folder (`dkit disguise`), a
model trains on the disguise without the key (`dkit train`), and `dkit evaluate` runs every attack
that fits the pipeline with the plain folder as the owner's images (200 held-out targets, pairs
m = 1, 10, 100, the rest unpaired for level 3 and the examiner). Results are written as JSON as they
come, one HTML report per case, and a table is printed. The figures move a little with the key and
the noise: each run draws a fresh key.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dkit.data import Options, disguise_source, open_source
from dkit.evaluate import Settings, evaluate
from dkit.evaluate import report as html_report
from dkit.keystore import Keystore, MemoryBackend
from dkit.models import TrainOptions, train
from dkit.params import KeyParams

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"

# name: (archive, key parameters, architecture, epochs, disguise options)
CASES = {
    "cifar-default": (
        "cifar10-train-20k",
        dict(shape="32x32x3", block=4, pipeline="perm,rmt", noise=25),
        "blockvit",
        6,
        {},
    ),
    "mnist-paper": (
        "mnist-10k",
        dict(shape="28x28", block=7, pipeline="rmt", noise=100, channels="shared"),
        "cnn",
        6,
        {},
    ),
    "mnist-paper-blockvit": (
        "mnist-10k",
        dict(shape="28x28", block=7, pipeline="rmt", noise=100, channels="shared"),
        "blockvit",
        6,
        {},
    ),
    "cifar-aes": ("cifar10-train-20k", dict(shape="32x32x3", block=4, pipeline="perm,aes"), "blockvit", 2, {}),
    "mnist-aes": ("mnist-10k", dict(shape="28x28", block=7, pipeline="perm,aes"), "cnn", 4, {}),
    "cifar-instahide": (
        "cifar10-train-20k",
        dict(shape="32x32x3", block=4, pipeline="instahide", k=4),
        "resnet18",
        4,
        {"encodings": 1},
    ),
    "cifar-perm": ("cifar10-train-20k", dict(shape="32x32x3", block=4, pipeline="perm"), "blockvit", 4, {}),
}


def unpack(name: str, work: Path) -> Path:
    out = work / name
    if not out.exists():
        subprocess.run(["tar", "xzf", str(SHARED / f"{name}.tar.gz"), "-C", str(work)], check=True)
    return out


def run_case(
    name: str, work: Path, reports: Path, epochs_override: int | None = None, train_model: bool = True
) -> dict:
    archive, kp, arch, epochs, dopts = CASES[name]
    epochs = epochs_override or epochs
    folder = unpack(archive, work)
    ks = Keystore(work / f"home-{name}", backend=MemoryBackend())
    ks.keygen(name, KeyParams.create(**kp))
    key = ks.load(name)
    h5 = work / f"{name}.h5"
    t0 = time.perf_counter()
    disguise_source(open_source(folder), h5, key, Options(workers=2, **dopts))
    t1 = time.perf_counter()
    metrics = (
        train(h5, work / f"model-{name}", TrainOptions(arch=arch, epochs=epochs), force=True)
        if train_model
        else {"final": {"val_acc": None}}
    )
    t2 = time.perf_counter()
    ev = evaluate(
        h5,
        key,
        open_source(folder),
        model_dir=work / f"model-{name}" if train_model else None,
        settings=Settings(),
        progress=lambda m: print(f"  {name}: {m}", flush=True),
    )
    doc = ev.to_dict()
    html_report.write(reports / f"privacy-{name}.html", doc, html_report.evaluation_samples(ev))
    doc.update(
        case=name,
        arch=arch,
        epochs=epochs,
        val_acc=metrics["final"]["val_acc"],
        seconds={"disguise": round(t1 - t0, 1), "train": round(t2 - t1, 1), "evaluate": doc["seconds"]},
    )
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="cifar-default,mnist-paper,cifar-aes,cifar-instahide")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "privacy.json")
    ap.add_argument("--reports", type=Path, default=HERE / "results")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs for every case (default: per case)")
    ap.add_argument("--no-train", action="store_true", help="no model: skip misusability and the model-leak attack")
    args = ap.parse_args()
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        sys.exit(f"unknown case {unknown[0]!r}: choose from {', '.join(CASES)}")
    args.reports.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    with tempfile.TemporaryDirectory(prefix="dkit-bench-privacy-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            print(f"== {name}", flush=True)
            results[name] = run_case(name, work, args.reports, args.epochs, train_model=not args.no_train)
            args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
            for a in results[name]["attacks"]:
                figs = html_report.figure_text(a)
                print(f"  {a['attack']:<12} L{a['level']} {json.dumps(a['params']):<40} {figs} -> {a['verdict']}")
            print(f"  model val_acc {results[name]['val_acc']}; seconds {results[name]['seconds']}", flush=True)


if __name__ == "__main__":
    main()
