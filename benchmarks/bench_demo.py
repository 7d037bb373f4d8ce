"""The README's demo figures: run ``dkit demo --json`` N times in a row and print each figure's range.

    python benchmarks/bench_demo.py [--runs 10] [--out benchmarks/results/demo.json]

Each run is a fresh process (as a user runs it), so the wall time includes Python and torch start-up;
CPU time is user plus system time of the child. Run it on a quiet machine: on two cores another heavy
process slows training by up to 18x. The figures move from run to run with the fresh key, the noise
and the small sample; the range over N runs is what the README gives.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

FIGURES = {
    "plain held-out accuracy": lambda r: r["plain"]["test_acc"],
    "disguised held-out accuracy": lambda r: r["demo"]["test_acc"],
    "model misusability": lambda r: r["privacy"]["model_misusability"],
    "visual privacy": lambda r: r["privacy"]["visual_privacy"],
    "KPA (10 pairs) PSNR dB": lambda r: r["attacks"][0]["psnr_db"],
    "KPA (10 pairs) SSIM": lambda r: r["attacks"][0]["ssim"],
    "covariance PSNR dB": lambda r: r["attacks"][1]["psnr_db"],
    "covariance SSIM": lambda r: r["attacks"][1]["ssim"],
    "wall seconds": lambda r: r["wall_s"],
    "CPU seconds": lambda r: r["cpu_s"],
}


def one_run() -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "dkit", "demo", "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"dkit demo failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    r = json.loads(p.stdout)
    r["wall_s"] = round(wall, 1)
    r["cpu_s"] = round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo.json")
    args = ap.parse_args()
    runs = []
    for i in range(args.runs):
        runs.append(one_run())
        print(f"run {i + 1}/{args.runs}: {runs[-1]['wall_s']} s wall, {runs[-1]['cpu_s']} s CPU", flush=True)
    ranges = {}
    for name, get in FIGURES.items():
        vals = [get(r) for r in runs]
        ranges[name] = {"min": min(vals), "max": max(vals), "median": sorted(vals)[len(vals) // 2]}
        print(f"{name:32s} {min(vals):8.3f} .. {max(vals):8.3f}  (median {ranges[name]['median']:.3f})")
    attacks = [a["attack"] for a in runs[0]["attacks"]]
    verdicts = {a: sorted({r["attacks"][i]["verdict"] for r in runs}) for i, a in enumerate(attacks)}
    keys_ok = all(r["audit_ok"] and r["rotation_refused_new_version"] for r in runs)
    print(f"verdicts over {len(runs)} runs: {verdicts}")
    print(f"audit intact and rotation refused in every run: {keys_ok}")
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine, "ranges": ranges, "verdicts": verdicts, "runs": runs}
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
