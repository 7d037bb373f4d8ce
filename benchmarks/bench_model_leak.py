"""What a trained model gives away: the model-leak attack against the data-only covariance attack.

    python benchmarks/bench_model_leak.py [--work DIR] [--out benchmarks/results/model-leak.json]
                                          [--epochs 2] [--variants pixels=1,pixels=0] [--known 20,100,1000]
                                          [--pipeline rmt]

A throw-away key with dkit's defaults for 32x32x3 (in memory) disguises the training part of the
CIFAR-10 folder (the same per-class 80/20 split as bench_accuracy.py); for each variant a
`blockresnet` trains on it (`dkit train`). The attacker then holds the model, plain images of the
same kind (the held-out part, less 200 targets) and n disguised images from the training file, for
each n in --known. Two attacks rebuild the 200 held-out targets:

- `model-leak` reads the per-position stem maps out of the model (relative rotations, the stored
  arrangement) and fits the one frame they leave open to the n disguised images;
- `covariance` gets everything from the n disguised images alone (no model).

Where model-leak beats covariance at the same n, the model adds to what the data already gives:
whoever holds the model and a few disguised images rebuilds the images. Figures: PSNR and SSIM of
the reconstruction, and the verdicts of `dkit evaluate`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dkit.data import Options, disguise_source, h5format, open_source
from dkit.data.decode import Policy
from dkit.data.run import decode_all
from dkit.engine import Disguise
from dkit.evaluate.covariance import covariance_attack
from dkit.evaluate.model_leak import model_leak
from dkit.evaluate.runner import _cloud_sample
from dkit.keystore import Keystore, MemoryBackend
from dkit.models import TrainOptions, artifact, train
from dkit.params import KeyParams

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_accuracy import SHARED, split_folder  # noqa: E402  (the same split as the accuracy rows)

TARGETS = 200


def figures(result) -> dict:
    f = result.figures
    return {
        "verdict": result.verdict,
        "psnr_db": round(f["psnr_db"], 2) if "psnr_db" in f else None,
        "ssim": round(f["ssim"], 3) if "ssim" in f else None,
        **{k: round(f[k], 3) for k in ("embedding_fit", "rotation_r2", "placement_accuracy") if k in f},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="working folder (the split is kept)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "model-leak.json")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--variants", default="pixels=1,pixels=0", help="blockresnet arch params, one set per model")
    ap.add_argument("--pipeline", default=None, help="the key's pipeline, e.g. rmt (default: dkit's default)")
    ap.add_argument("--known", default="20,100,1000", help="disguised images the attacker holds")
    args = ap.parse_args()
    known = [int(v) for v in args.known.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]

    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.work / "cifar10-train-20k"
    if not folder.exists():
        subprocess.run(["tar", "xzf", str(SHARED / "cifar10-train-20k.tar.gz"), "-C", str(args.work)], check=True)
    train_dir, test_dir = split_folder(folder, args.work / "cifar-split")
    home = args.work / "home-leak"
    shutil.rmtree(home, ignore_errors=True)  # a memory key store lives as long as the run: no old records
    ks = Keystore(home, backend=MemoryBackend())
    ks.keygen("leak", KeyParams.create(shape="32x32x3", **({"pipeline": args.pipeline} if args.pipeline else {})))
    key = ks.load("leak")
    params = key.params
    h5 = args.work / f"leak-{args.pipeline or 'default'}.h5"
    disguise_source(open_source(train_dir), h5, key, Options(workers=2), force=True)

    rng = np.random.default_rng(0)
    plain = decode_all(open_source(test_dir), Policy(tuple(params.shape))).astype(np.float64)
    plain = plain[rng.permutation(len(plain))]
    targets, public = plain[:TARGETS], plain[TARGETS:]
    targets_d = Disguise.from_key(key).apply(targets)
    cloud = _cloud_sample(h5, h5format.inspect(h5), max(known), rng)

    doc = {"key": params.describe(), "epochs": args.epochs, "public": len(public), "targets": TARGETS, "rows": {}}
    for n in known:
        doc["rows"][f"covariance, {n} disguised"] = figures(
            covariance_attack(cloud[:n], public, targets_d, targets, params, level=3)
        )
    for v in variants:
        name, value = v.split("=")
        out = args.work / f"leak-model-{args.pipeline or 'default'}-{name}{value}"
        t0 = time.perf_counter()
        metrics = train(
            h5, out, TrainOptions(arch="blockresnet", epochs=args.epochs, arch_params={name: int(value)}), force=True
        )
        train_seconds = round(time.perf_counter() - t0)
        model, _ = artifact.load(out)
        for n in known:
            row = figures(model_leak(model, params, public, targets_d, targets, disguised=cloud[:n]))
            row.update(val_acc=round(metrics["final"]["val_acc"], 4), train_seconds=train_seconds)
            doc["rows"][f"model-leak, blockresnet {v}, {n} disguised"] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"key: {doc['key']}; {args.epochs} epochs; {len(public)} public images; {TARGETS} targets")
    print(f"{'attack':<48} {'verdict':<8} {'PSNR':>6} {'SSIM':>6}  other")
    for k, r in doc["rows"].items():
        rest = {a: b for a, b in r.items() if a not in ("verdict", "psnr_db", "ssim")}
        print(f"{k:<48} {r['verdict']:<8} {r['psnr_db']!s:>6} {r['ssim']!s:>6}  {rest}")


if __name__ == "__main__":
    main()
