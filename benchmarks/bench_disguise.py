"""End-to-end `dkit disguise` throughput: an image folder to a disguised HDF5 file.

    python benchmarks/bench_disguise.py [--archive ../shared/data/cifar10-train-20k.tar.gz] [--json]

Unpacks the archive into a temporary folder, makes a key (perm + RMT 4x4 joint, noise 25, or as
given), and runs the library's disguise several times, printing images/s end to end and the split
between decoding (in worker processes), disguising and writing. In the same run it measures the
decode-only limit (the same decoding processes, nothing else) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from dkit.data import Options, disguise_source, open_source
from dkit.data.decode import Policy
from dkit.data.run import _batches
from dkit.keystore import Keystore, MemoryBackend
from dkit.params import KeyParams

HERE = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", default=str(HERE.parent.parent / "shared" / "data" / "cifar10-train-20k.tar.gz"))
    ap.add_argument("--shape", default="32x32x3")
    ap.add_argument("--block", default="4")
    ap.add_argument("--pipeline", default="perm,rmt")
    ap.add_argument("--noise", type=float, default=25)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dkit-bench-") as tmp:
        tmp = Path(tmp)
        subprocess.run(["tar", "xzf", args.archive, "-C", str(tmp)], check=True)
        folder = next(p for p in tmp.iterdir() if p.is_dir())
        ks = Keystore(tmp / "home", backend=MemoryBackend())
        params = KeyParams.create(
            args.shape, args.block, args.pipeline, noise=args.noise if "rmt" in args.pipeline else None
        )
        ks.keygen("bench", params)
        key = ks.load("bench")
        source = open_source(folder)
        n = len(source)
        cpus = len(os.sched_getaffinity(0))
        workers = cpus if args.workers is None else args.workers
        runs = []
        for _ in range(args.repeat + 1):  # the first run warms the page cache
            rep = disguise_source(source, tmp / "out.h5", key, Options(workers=workers), force=True)
            runs.append(rep.to_dict())
        runs = runs[1:]
        decode_rates = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for _batch in _batches(source, Policy(params.shape), list(range(0, n, 2048)), n, 2048, workers):
                pass
            decode_rates.append(n / (time.perf_counter() - t0))
        rates = [r["images_per_second"] for r in runs]
        doc = {
            "images": n,
            "workers": workers,
            "cpus": cpus,
            "key": params.describe(),
            "end_to_end_img_s": {"best": max(rates), "median": statistics.median(rates), "runs": rates},
            "decode_only_img_s": {"best": max(decode_rates), "median": statistics.median(decode_rates)},
            "split_seconds_of_best": runs[rates.index(max(rates))]["seconds"],
            "file_bytes": (tmp / "out.h5").stat().st_size,
        }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    e, dlim, s = doc["end_to_end_img_s"], doc["decode_only_img_s"], doc["split_seconds_of_best"]
    print(f"{n:,} images, {doc['key']}, {workers} decoding processes on {cpus} CPUs")
    print(
        f"end to end: best {e['best']:,.0f} img/s, median {e['median']:,.0f} img/s "
        f"(runs: {', '.join(f'{r:,.0f}' for r in e['runs'])})"
    )
    print(f"decode only (same processes, nothing else): best {dlim['best']:,.0f} img/s, median {dlim['median']:,.0f}")
    print(
        f"split of the best run: total {s['total']:.2f}s; decode {s['decode']:.2f}s summed over workers, "
        f"disguise {s['disguise']:.2f}s, write {s['write']:.2f}s (main process)"
    )
    print(f"output {doc['file_bytes'] / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
