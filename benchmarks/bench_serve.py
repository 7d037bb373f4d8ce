"""dkit serve over loopback: requests/s, images/s and p50/p99 latency at 1, 8 and 32 concurrent
clients and batches of 1 and 64 rows, against a direct in-process call of the same model (the
ratio is the serving overhead, batching included).

    python benchmarks/bench_serve.py [--model DIR] [--out serve.json] [--seconds 8] [--device auto]

Without --model, a blockresnet is trained for one epoch on 512 random 32x32x3 images disguised
with the default key (perm + RMT 8x8, noise 25): the timings do not depend on what it learned.
Each cell runs until --seconds or --requests per client, whichever comes first (loops bounded in
count and time). Clients keep one HTTP connection each. The direct call runs in this process with
torch's default threads, while the server is idle; during a cell the clients share the machine
with the server, so on a small machine the ratio includes the clients' own cost.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from dkit.data import Options, disguise_source, open_source
from dkit.keystore import Keystore, MemoryBackend
from dkit.models import TrainOptions, load, train
from dkit.params import KeyParams
from dkit.serve import wire


def make_model(work: Path) -> tuple[Path, str]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)
    np.savez(work / "data.npz", x=x, y=rng.integers(0, 10, 512))
    ks = Keystore(work / "home", backend=MemoryBackend())
    ks.keygen("bench", KeyParams.create("32x32x3"))
    key = ks.load("bench")
    disguise_source(open_source(str(work / "data.npz")), work / "d.h5", key, Options(workers=0))
    train(work / "d.h5", work / "model", TrainOptions(epochs=1))
    return work / "model", key.key_id


def start(model: Path, device: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "dkit", "serve", str(model), "--port", "0", "--device", device, "--max-queue", "256"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if " on http://" in line:
            return proc, line.split(" on ", 1)[1].split()[0]
    raise SystemExit("dkit serve did not start")


def client(url: str, body: bytes, stop_at: float, most: int, out: list) -> None:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"Content-Type": wire.CONTENT_TYPE}
    for _ in range(most):
        if time.perf_counter() > stop_at:
            break
        t0 = time.perf_counter()
        conn.request("POST", "/v1/predict", body=body, headers=headers)
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise SystemExit(f"server answered {r.status}")
        out.append(time.perf_counter() - t0)
    conn.close()


def cell(url: str, body: bytes, clients: int, seconds: float, most: int) -> dict:
    lat: list[list[float]] = [[] for _ in range(clients)]
    stop_at = time.perf_counter() + seconds
    threads = [threading.Thread(target=client, args=(url, body, stop_at, most, lat[i])) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    all_lat = sorted(v for per in lat for v in per)
    return {
        "requests": len(all_lat),
        "requests_per_s": len(all_lat) / wall,
        "p50_ms": 1000 * statistics.median(all_lat),
        "p99_ms": 1000 * all_lat[min(len(all_lat) - 1, int(0.99 * len(all_lat)))],
    }


def direct(model_dir: Path, rows: int, seconds: float, most: int, device: str) -> dict:
    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    model, _ = load(model_dir, dev)
    x = torch.rand(rows, 3, 32, 32) * 255
    amp = dev.type == "cuda"
    times = []
    stop_at = time.perf_counter() + seconds
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        model(x.to(dev)).float().cpu()  # warm-up
        for _ in range(most):
            if time.perf_counter() > stop_at:
                break
            t0 = time.perf_counter()
            model(x.to(dev)).float().cpu()
            times.append(time.perf_counter() - t0)
    p50 = statistics.median(times)
    return {"calls": len(times), "p50_ms": 1000 * p50, "img_per_s": rows / p50}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="serve-results.json")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--requests", type=int, default=400, help="Most requests per client per cell.")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, key_id = (Path(args.model), None) if args.model else make_model(Path(tmp))
        if key_id is None:
            key_id = json.loads((model_dir / "model.json").read_text())["key_id"]
        proc, url = start(model_dir, args.device)
        results = {"meta": {"torch": torch.__version__, "cuda": torch.cuda.is_available()}, "cells": []}
        try:
            for rows in (1, 64):
                body = wire.encode(torch.rand(rows, 3, 32, 32) * 255, key_id)
                base = direct(model_dir, rows, args.seconds, args.requests, args.device)
                for clients in (1, 8, 32):
                    c = cell(url, body, clients, args.seconds, args.requests)
                    c.update(rows=rows, clients=clients, img_per_s=c["requests_per_s"] * rows)
                    c["direct_img_per_s"] = base["img_per_s"]
                    c["direct_p50_ms"] = base["p50_ms"]
                    c["ratio_to_direct"] = c["img_per_s"] / base["img_per_s"]
                    results["cells"].append(c)
                    print(
                        f"rows {rows:3d} clients {clients:2d}: {c['requests_per_s']:7.1f} req/s "
                        f"{c['img_per_s']:8.1f} img/s  p50 {c['p50_ms']:7.1f} ms  p99 {c['p99_ms']:7.1f} ms  "
                        f"direct {base['img_per_s']:8.1f} img/s ({c['ratio_to_direct']:.0%})",
                        flush=True,
                    )
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
