"""``dkit disguise --engine ray`` against ``--engine local`` on the CIFAR-10 folder: images/s.

    python benchmarks/bench_ray_disguise.py [--limit 20000] [--out ray-disguise.json]

The 20k CIFAR-10 JPEG folder from ../shared/data (or its first --limit images per the listing, as
a flat copy) is disguised with the default key: locally with 1 and 2 decoding processes, and on
a local Ray cluster with 1 and 2 actors (shards, then a copy merge). Ray's start-up is outside the
timing (a cluster is started once, as a user would keep one); its shard merge is inside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from dkit.data import Options, disguise_source, open_source
from dkit.data.ray_engine import disguise_with_ray
from dkit.keystore import Keystore, MemoryBackend
from dkit.params import KeyParams

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=20000, help="Images per class folder at most, times 10.")
    ap.add_argument("--out", default="ray-disguise-results.json")
    args = ap.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(["tar", "xzf", str(SHARED / "cifar10-train-20k.tar.gz"), "-C", str(work)], check=True)
        src = work / "cifar10-train-20k"
        if args.limit < 20000:
            small = work / "small"
            for cls in sorted(p for p in src.iterdir() if p.is_dir()):
                (small / cls.name).mkdir(parents=True)
                for f in sorted(cls.iterdir())[: args.limit // 10]:
                    shutil.copy(f, small / cls.name / f.name)
            src = small
        n = len(open_source(src))
        ks = Keystore(work / "home", backend=MemoryBackend())
        ks.keygen("k", KeyParams.create("32x32x3"))
        key = ks.load("k")
        rows = []
        for workers in (1, 2):
            t0 = time.perf_counter()
            disguise_source(open_source(src), work / f"local-{workers}.h5", key, Options(workers=workers))
            s = time.perf_counter() - t0
            rows.append({"engine": "local", "workers": workers, "seconds": s, "images_per_second": n / s})
            print(f"local, {workers} decoding process(es): {n / s:,.0f} img/s ({s:.1f} s)", flush=True)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            for workers in (1, 2):
                t0 = time.perf_counter()
                disguise_with_ray(str(src), work / f"ray-{workers}.h5", key, seed=ks.seed(key), workers=workers)
                s = time.perf_counter() - t0
                rows.append({"engine": "ray", "workers": workers, "seconds": s, "images_per_second": n / s})
                print(f"ray, {workers} actor(s): {n / s:,.0f} img/s ({s:.1f} s)", flush=True)
        finally:
            ray.shutdown()
    base = rows[1]["images_per_second"]
    for r in rows:
        r["ratio_to_local_2"] = r["images_per_second"] / base
    Path(args.out).write_text(json.dumps({"images": n, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
