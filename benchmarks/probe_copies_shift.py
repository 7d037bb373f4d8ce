"""Probe: do augmented copies give the cloud the key? (an upper bound: the cloud is told each draw)

    python benchmarks/probe_copies_shift.py [--pairs 270,1000,4000,16000] [--images 200] [--out F]

`dkit disguise --augment flip,crop --copies T` stores, next to each image's copy 0, copies that are
mirrored and shifted by up to an eighth of the side. For RMT (y = x M_j + noise, per block
position j) a copy shifted right by one pixel has, at position j, the blocks

    y'_j = y_j (M_j^T S M_j) + y_left(j) (M_left^T C M_j) + noise,

where S is the known one-pixel shift inside a block. The cloud can regress y'_j on y_j and its
neighbour (correcting for the known noise variance), which estimates A_j = M_j^T S M_j; with the
vertical shift too, M_j is the solution of the linear equations M A = S M (and their transposes),
unique up to scale and sign on grey images, because only multiples of the identity commute with
every shift. This script measures that on grey CIFAR images (32x32, RMT 8x8, noise 25, the
default block and noise): for n pairs of each of the two draws, the error of the recovered
matrices and the PSNR / SSIM of held-out images rebuilt with them.

It is told which copies are the one-pixel shifts. A real cloud would have to find them among the
162 draws (they are not stored), and colour images leave a 3x3 mixing of the channels per
position that this probe does not resolve. So a success here shows the leak exists, not that
`dkit evaluate` can measure it yet; a failure at n pairs says the naive attack needs more.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dkit.data.augment import shift
from dkit.derive import derive
from dkit.engine import Disguise, RandomSource
from dkit.engine.geometry import from_blocks, to_blocks
from dkit.evaluate.common import mean_image_baseline, quality
from dkit.params import KeyParams
from dkit.secret import Seed

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
NOISE = 25.0
B = 8  # block side; CIFAR 32x32 -> a 4x4 grid


def grey_images(folder: Path, n: int, seed: int) -> np.ndarray:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(files) < n:
        raise SystemExit(f"{folder}: {len(files)} images, {n} needed")
    pick = np.random.default_rng(seed).choice(len(files), n, replace=False)
    rgb = np.stack([np.asarray(Image.open(files[i]).convert("RGB"), dtype=np.float64) for i in pick])
    return (rgb @ np.array([0.299, 0.587, 0.114]))[..., None]  # (n, 32, 32, 1)


def shift_matrix(dy: int, dx: int) -> np.ndarray:
    """S with (x S) the block x moved by (dy, dx) inside the block (row vectors, pixels row-major)."""
    s = np.zeros((B * B, B * B))
    for r in range(B):
        for c in range(B):
            if 0 <= r + dy < B and 0 <= c + dx < B:
                s[r * B + c, (r + dy) * B + c + dx] = 1.0
    return s


def estimate_map(y0: np.ndarray, y1: np.ndarray, j: int, nb: int | None, var: float) -> np.ndarray:
    """The regression of copy blocks y1[:, j] on copy-0 blocks y0[:, j] (and its neighbour nb),
    corrected for the noise in the inputs (errors in variables); the y0[:, j] part."""
    x = y0[:, j] if nb is None else np.concatenate([y0[:, j], y0[:, nb]], axis=1)
    x = x - x.mean(axis=0)
    t = y1[:, j] - y1[:, j].mean(axis=0)
    g = x.T @ x - len(x) * var * np.eye(x.shape[1])
    w = np.linalg.solve(g, x.T @ t)
    return w[: B * B]


def solve_key(maps: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The orthogonal M closest to solving M A = S M (and M A^T = S^T M) for every (A, S): the
    eigenvector of the least eigenvalue of the normal operator, by Lanczos on matrices."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    d = B * B
    pairs = list(maps) + [(a.T, s.T) for a, s in maps]
    # a bound above the normal operator's largest eigenvalue: its least becomes the largest of top - op
    top = 1.01 * sum((np.linalg.norm(a, 2) + np.linalg.norm(s, 2)) ** 2 for a, s in pairs)

    def flipped(v):
        m = v.reshape(d, d)
        out = top * m
        for a, s in pairs:
            r = m @ a - s @ m
            out -= r @ a.T - s.T @ r
        return out.ravel()

    _, vec = eigsh(
        LinearOperator((d * d, d * d), matvec=flipped, dtype=np.float64),
        k=1,
        which="LA",
        tol=1e-8,
        maxiter=20000,
        v0=np.random.default_rng(0).standard_normal(d * d),
    )
    u, _, vt = np.linalg.svd(vec[:, 0].reshape(d, d))
    return u @ vt


def shifted_copies(key: Disguise, plain: np.ndarray, rng: RandomSource):
    """Blocks (n, t, d) of copy 0 and of its one-pixel right and down shifts, each with fresh noise."""
    n = len(plain)

    def disguised(x, start):
        return to_blocks(np.asarray(key.apply(x, rng=rng, start=start), dtype=np.float64), key.params)

    return (
        disguised(plain, 0),
        disguised(np.stack([shift(x, 0, 1) for x in plain]), n),
        disguised(np.stack([shift(x, 1, 0) for x in plain]), 2 * n),
    )


def recover_matrix(y0, yh, yv, j: int, grid_w: int, var: float) -> np.ndarray:
    """Position j's matrix, up to sign, from the copies' regressions on copy 0."""
    a_h = estimate_map(y0, yh, j, j - 1 if j % grid_w else None, var)
    a_v = estimate_map(y0, yv, j, j - grid_w if j >= grid_w else None, var)
    return solve_key([(a_h, shift_matrix(0, 1)), (a_v, shift_matrix(1, 0))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="270,1000,4000,16000", help="Pairs of each draw the cloud holds.")
    ap.add_argument("--images", type=int, default=200, help="Held-out images rebuilt.")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dkit-probe"), help="Where the CIFAR folder is unpacked.")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sizes = [int(v) for v in args.pairs.split(",")]
    folder = args.work / "cifar10-train-20k"
    if not folder.exists():
        args.work.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "xzf", str(SHARED / "cifar10-train-20k.tar.gz"), "-C", str(args.work)], check=True)
    plain = grey_images(folder, max(sizes) + args.images, seed=0)
    params = KeyParams.create("32x32", B, "rmt", noise=NOISE)
    key = Disguise(derive(Seed(hashlib.sha256(b"dkit probe: copies shift").digest()), params))
    y0, yh, yv = shifted_copies(key, plain, RandomSource.fixed(1))  # every copy 0 has both draws
    var = NOISE**2 / 12  # uniform noise on [0, N)
    held = slice(max(sizes), len(plain))
    baseline = {k: round(v, 3) for k, v in mean_image_baseline(plain[: max(sizes)], plain[held]).items()}
    rows = []
    for m_pairs in sizes:
        t0 = time.perf_counter()
        fit = slice(0, m_pairs)
        errs, recon = [], np.empty_like(y0[held])
        for j in range(params.positions):
            m = recover_matrix(y0[fit], yh[fit], yv[fit], j, params.grid[1], var)
            blocks = (y0[held, j] - NOISE / 2) @ m.T
            if blocks.mean() < 0:  # the sign: pixels are not negative
                m, blocks = -m, -blocks
            # 0 is exact, about 1.41 an unrelated orthogonal matrix (the key's, for scoring only)
            errs.append(np.linalg.norm(m - key.material.matrices[j]) / np.sqrt(B * B))
            recon[:, j] = blocks
        psnr, ssim = quality(plain[held], np.clip(from_blocks(recon, params), 0, 255))
        rows.append(
            {
                "pairs_per_draw": m_pairs,
                "matrix_error": round(float(np.mean(errs)), 4),
                "psnr_db": round(psnr, 2),
                "ssim": round(ssim, 3),
                "baseline": baseline,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "noise": NOISE, "block": B, "held_out": args.images}, indent=2))


if __name__ == "__main__":
    main()
