"""Disguise engine throughput, with the baselines measured in the same run.

    python benchmarks/bench_engine.py [--n 20000] [--json]

For each case it prints images/s of the engine, of a naive per-image Python loop of the same math
(the shape of the DisguisedNets reference code), their ratio, and the memory-bound limit from this
machine's copy bandwidth (bytes read + written per image). Timings are the best of five runs
after a warm-up, with the output buffer reused (as `dkit disguise` does chunk after chunk); the
figure with a freshly allocated output is printed too. Two limits: the copy bandwidth over the bytes
read and written per image, and one plain uint8 -> float32 conversion pass (the least any disguise
writing float32 must do, single-threaded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from dkit.derive import derive
from dkit.engine import Disguise, RandomSource
from dkit.engine.disguise import NOISE_LEVELS
from dkit.engine.mechanisms import aes_rows
from dkit.params import KeyParams
from dkit.secret import Seed


def best(fn, repeat=5):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth() -> float:
    """Bytes moved per second (read + write) by a large numpy copy."""
    a = np.ones(1 << 28, dtype=np.uint8)
    b = np.empty_like(a)
    t = best(lambda: np.copyto(b, a))
    return 2 * a.nbytes / t


def reference_shaped_loop(d: Disguise, x: np.ndarray, rng: RandomSource) -> np.ndarray:
    """Per image, in the shape of the DisguisedNets reference code (Perturb/perturb_data.py): cut the
    image into a list of sub-matrices with np.ix_, multiply each by its matrix, join them back with
    hstack per block row, add the noise. Same math as the engine (joint matrices, permutation)."""
    p = d.params
    bh, bw = p.block
    gh, gw = p.grid
    c = p.shape[2]
    perm = d.material.perm if d.material.perm is not None else np.arange(p.positions)
    mats = d.rmt.matrices.astype(np.float32)
    out = np.empty(x.shape, dtype=np.float32)
    for n in range(x.shape[0]):
        img = x[n].astype(np.float32)
        subs = [
            img[np.ix_(range(r * bh, (r + 1) * bh), range(q * bw, (q + 1) * bw))] for r in range(gh) for q in range(gw)
        ]
        rotated = [(subs[i].reshape(-1) @ mats[i]).reshape(bh, bw, c) for i in range(len(subs))]
        placed = [rotated[perm[j]] for j in range(len(rotated))]
        rows = [np.hstack(placed[r * gw : (r + 1) * gw]) for r in range(gh)]
        res = np.vstack(rows)
        if d.noise:
            res = res + d.noise * d.noise_for(rng, n, 1)[0].astype(np.float32) / NOISE_LEVELS
        out[n] = res
    return out


def naive_loop(d: Disguise, x: np.ndarray, rng: RandomSource) -> np.ndarray:
    """Per image, per block, with slicing instead of lists: a tighter loop (matrix, permuted place, noise)."""
    p = d.params
    bh, bw = p.block
    gh, gw = p.grid
    c = p.shape[2]
    perm = d.material.perm if d.material.perm is not None else np.arange(p.positions)
    mats = d.rmt.matrices.astype(np.float32) if d.rmt is not None else None
    out = np.empty(x.shape, dtype=np.float32)
    for n in range(x.shape[0]):
        img = x[n].astype(np.float32)
        res = np.empty_like(img)
        for j in range(p.positions):
            src = perm[j]
            r, col = divmod(int(src), gw)
            block = img[r * bh : (r + 1) * bh, col * bw : (col + 1) * bw, :].reshape(-1)
            if mats is not None:
                block = block @ mats[src]
            elif d.aes is not None:
                block = aes_rows(block.astype(np.uint8)[None], d.aes.key_for(int(src)))[0].astype(np.float32)
            rj, cj = divmod(j, gw)
            res[rj * bh : (rj + 1) * bh, cj * bw : (cj + 1) * bw, :] = block.reshape(bh, bw, c)
        if d.noise:
            res += d.noise * d.noise_for(rng, n, 1)[0].astype(np.float32) / NOISE_LEVELS
        out[n] = res
    return out


def case(name, shape, block, pipeline, n, bandwidth, naive_n=400, **kw):
    params = KeyParams.create(shape, block, pipeline, **kw)
    d = Disguise.from_key(derive(Seed.generate(), params))
    x = np.random.default_rng(0).integers(0, 256, size=(n,) + params.shape, dtype=np.uint8)
    row = {"case": name, "images": n}
    if params.has("instahide"):
        labels = np.random.default_rng(1).integers(0, 10, size=n)
        t = best(lambda: d.encode(x, labels, num_classes=10, encodings=1), repeat=1)
        row["engine_img_s"] = n / t
        return row
    out = np.empty(x.shape, dtype=np.float32)
    t = best(lambda: d.apply(x, out=out))
    t_fresh = best(lambda: d.apply(x))
    xs = x[:naive_n]
    t_naive = best(lambda: naive_loop(d, xs, RandomSource()), repeat=1)
    per_image_bytes = x[0].nbytes + out[0].nbytes
    t_convert = best(lambda: np.copyto(out, x, casting="unsafe"))
    row.update(
        engine_img_s=n / t,
        engine_fresh_output_img_s=n / t_fresh,
        naive_img_s=naive_n / t_naive,
        ratio_to_naive=(n / t) / (naive_n / t_naive),
        memory_bound_img_s=bandwidth / per_image_bytes,
        convert_only_img_s=n / t_convert,
    )
    if d.rmt is not None:
        t_ref = best(lambda: reference_shaped_loop(d, xs, RandomSource()), repeat=1)
        row.update(reference_loop_img_s=naive_n / t_ref, ratio_to_reference_loop=(n / t) / (naive_n / t_ref))
    xt = torch.from_numpy(x)
    row["torch_cpu_img_s"] = n / best(lambda: d.apply(xt, backend="torch"))
    if torch.cuda.is_available():
        xc = xt.cuda()

        def on_gpu():
            d.apply(xc)
            torch.cuda.synchronize()

        row["torch_cuda_img_s"] = n / best(on_gpu)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    bw = copy_bandwidth()
    n = args.n
    rows = [
        case("cifar 32x32x3, perm+rmt 4x4 joint, noise 25", "32x32x3", 4, "perm,rmt", n, bw, noise=25),
        case("cifar 32x32x3, perm+rmt 2x2 joint, noise 25", "32x32x3", 2, "perm,rmt", n, bw, noise=25, naive_n=100),
        case(
            "cifar 32x32x3, perm+rmt 2x2 shared, noise 25",
            "32x32x3",
            2,
            "perm,rmt",
            n,
            bw,
            noise=25,
            channels="shared",
            naive_n=100,
        ),
        case("mnist 28x28x1, rmt 7x7, noise 100", "28x28", 7, "rmt", n, bw, noise=100),
        case("mnist 28x28x1, perm+rmt 7x7, noise 100", "28x28", 7, "perm,rmt", n, bw, noise=100),
        case("cifar 32x32x3, perm+aes 4x4 per-block", "32x32x3", 4, "perm,aes", n, bw, naive_n=200),
        case("cifar 32x32x3, perm only 4x4", "32x32x3", 4, "perm", n, bw),
        case("cifar 32x32x3, instahide k=4 (T=1)", "32x32x3", 4, "instahide", min(n, 10000), bw, k=4),
    ]
    meta = {
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "copy_bandwidth_GB_s": bw / 1e9,
        "cuda": torch.cuda.is_available(),
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return
    print(
        f"copy bandwidth {bw / 1e9:.1f} GB/s (read+write), {meta['cpus']} CPUs, numpy {np.__version__}, "
        f"torch {torch.__version__}"
    )
    for r in rows:
        parts = [f"{r['engine_img_s']:>10,.0f} img/s"]
        if "naive_img_s" in r:
            parts += [
                f"fresh output {r['engine_fresh_output_img_s']:,.0f}",
                f"naive loop {r['naive_img_s']:,.0f} ({r['ratio_to_naive']:.0f}x)",
            ]
            if "reference_loop_img_s" in r:
                parts.append(
                    f"reference-shaped loop {r['reference_loop_img_s']:,.0f} ({r['ratio_to_reference_loop']:.0f}x)"
                )
            parts += [
                f"limit: copy {r['memory_bound_img_s']:,.0f}, uint8->float32 pass {r['convert_only_img_s']:,.0f}",
                f"torch kernels on cpu {r['torch_cpu_img_s']:,.0f}",
            ]
        if "torch_cuda_img_s" in r:
            parts.append(f"torch cuda {r['torch_cuda_img_s']:,.0f}")
        print(f"{r['case']:<48} " + " | ".join(parts))


if __name__ == "__main__":
    main()
