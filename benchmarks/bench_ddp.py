"""``dkit train`` with 1 and 2 processes (torchrun, DDP, gloo on the CPU or NCCL on GPUs): epoch
time and held-out accuracy, same data, model, global batch and epochs.

    python benchmarks/bench_ddp.py [--set cifar|mnist] [--per-class 400] [--epochs 2] [--arch auto]

The image folder from ../shared/data is split per class (the first --per-class images of each class
train, the next 100 are held out), disguised with the default key for its shape, trained as one
process and as two (`torchrun --standalone --nproc_per_node 2 -m dkit train`), and predicted by
the owner. On a 2-core machine two processes of one thread each share the two cores that one
process uses with two threads, so expect little speed-up there: the figure says what DDP costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dkit.data import Options, disguise_source, open_source
from dkit.keystore import Keystore, MemoryBackend
from dkit.models import predict
from dkit.params import KeyParams

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
SETS = {"mnist": ("mnist-10k", "28x28"), "cifar": ("cifar10-train-20k", "32x32x3")}


def split(folder: Path, work: Path, per_class: int) -> tuple[Path, Path]:
    tr, te = work / "train", work / "test"
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        for part, chunk in ((tr, files[:per_class]), (te, files[per_class : per_class + 100])):
            (part / cls.name).mkdir(parents=True, exist_ok=True)
            for f in chunk:
                shutil.copy(f, part / cls.name / f.name)
    return tr, te


def run(h5: Path, out: Path, processes: int, epochs: int, arch: str) -> dict:
    args = ["train", str(h5), "-o", str(out), "--arch", arch, "--epochs", str(epochs), "--json"]
    threads = str(max(1, (os.cpu_count() or 2) // processes))
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    if processes == 1:
        cmd = [sys.executable, "-m", "dkit", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        cmd += ["-m", "dkit", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout[r.stdout.index("{") :])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="cifar", choices=sorted(SETS))
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--arch", default="auto")
    ap.add_argument("--out", default="ddp-results.json")
    args = ap.parse_args()
    archive, shape = SETS[args.set]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(["tar", "xzf", str(SHARED / f"{archive}.tar.gz"), "-C", str(work)], check=True)
        tr, te = split(work / archive, work, args.per_class)
        ks = Keystore(work / "home", backend=MemoryBackend())
        ks.keygen("k", KeyParams.create(shape))
        key = ks.load("k")
        disguise_source(open_source(tr), work / "d.h5", key, Options(workers=0))
        rows = {}
        for n in (1, 2):
            m = run(work / "d.h5", work / f"model-{n}", n, args.epochs, args.arch)
            acc = predict(work / f"model-{n}", open_source(te), key)["accuracy"]
            secs = [e["seconds"] for e in m["epochs"]]
            rows[n] = {
                "processes": n,
                "arch": m["arch"],
                "epoch_seconds": secs,
                "images_per_second": [e["images_per_second"] for e in m["epochs"]],
                "val_acc": m["final"]["val_acc"],
                "test_acc": acc,
                "train_rows": m["train_rows"],
            }
            print(
                f"{n} process(es): {m['arch']}, epoch {min(secs):.1f}-{max(secs):.1f} s, "
                f"val acc {m['final']['val_acc']:.3f}, held-out {acc:.3f}",
                flush=True,
            )
    result = {"set": args.set, "per_class": args.per_class, "epochs": args.epochs, "rows": rows}
    result["speedup"] = min(rows[1]["epoch_seconds"]) / min(rows[2]["epoch_seconds"])
    print(f"speed-up with 2 processes: {result['speedup']:.2f}x")
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
