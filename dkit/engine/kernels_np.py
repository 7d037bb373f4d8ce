"""Fused numpy kernels: the whole block pipeline in few passes over memory, in cache-sized chunks.

For each chunk of images: gather the blocks in output order (the permutation is folded into the
gather) as float32 ``(t, n, d)``, multiply each position by its matrix (one batched matmul),
scatter back to image layout, and add the noise. Chunks are processed by a small thread pool:
numpy and BLAS release the GIL in these loops, so two cores do twice the work.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..params import KeyParams

CHUNK_BYTES = 1 << 21  # float32 bytes of one chunk's blocks: fits in L2/L3 with its buffers
SLAB_VALUES = 1 << 13  # at least this many values per block position, so small blocks amortise calls


def _threads() -> int:
    env = os.environ.get("DKIT_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="dkit")
    return _POOL


def chunk_images(params: KeyParams) -> int:
    h, w, c = params.shape
    return max(1, CHUNK_BYTES // (4 * h * w * c), SLAB_VALUES // params.block_size)


def _positions(order: np.ndarray, gw: int) -> list[tuple[int, int, int]]:
    return [(j, *divmod(int(p), gw)) for j, p in enumerate(order)]


def gather(x6: np.ndarray, pos: list, buf: np.ndarray) -> None:
    """buf[j] (n, d) <- the block at (r, c) of each image, for each (j, r, c) in ``pos``."""
    n, _, bh, _, bw, c = x6.shape
    for j, r, col in pos:
        buf[j].reshape(n, bh, bw, c)[...] = x6[:, r, :, col, :, :]


def scatter(z: np.ndarray, pos: list, out6: np.ndarray) -> None:
    """The block at (r, c) of each output image <- z[j], for each (j, r, c) in ``pos``."""
    n, _, bh, _, bw, c = out6.shape
    for j, r, col in pos:
        out6[:, r, :, col, :, :] = z[j].reshape(n, bh, bw, c)


class LinearPlan:
    """perm and/or rmt (or identity) as: gather in ``src`` order, multiply by ``mats[j]``, scatter, add noise."""

    def __init__(self, params: KeyParams, perm: np.ndarray | None, mats: np.ndarray | None):
        t = params.positions
        self.params = params
        self.src = perm if perm is not None else np.arange(t)
        self.gather_pos = _positions(self.src, params.grid[1])
        self.natural_pos = _positions(np.arange(t), params.grid[1])
        # Slot j holds original block src[j], so it is multiplied by that position's matrix.
        self.mats = None if mats is None else np.ascontiguousarray(mats[self.src], dtype=np.float32)

    def run(self, x: np.ndarray, out: np.ndarray, noise_fn=None, noise_scale: float = 0.0) -> None:
        """Disguise ``x`` (N, H, W, C) into ``out`` (same shape, float). ``noise_fn(i0, n, buf)`` gives uint16 noise."""
        n_all = x.shape[0]
        step = chunk_images(self.params)
        starts = list(range(0, n_all, step))
        if len(starts) <= 1:
            for s in starts:
                self._chunk(x, out, s, min(n_all, s + step), noise_fn, noise_scale)
            return
        futures = [_pool().submit(self._chunk, x, out, s, min(n_all, s + step), noise_fn, noise_scale)
                   for s in starts]
        for f in futures:
            f.result()

    def _chunk(self, x, out, i0, i1, noise_fn, noise_scale):
        p = self.params
        h, w, c = p.shape
        bh, bw = p.block
        gh, gw = p.grid
        n = i1 - i0
        x6 = x[i0:i1].reshape(n, gh, bh, gw, bw, c)
        o = out[i0:i1]
        o6 = o.reshape(n, gh, bh, gw, bw, c)
        noisy = noise_fn is not None and noise_scale
        if noisy:
            # The noise goes straight into the output; the blocks are then added onto it.
            u = noise_fn(i0, n).reshape(n, h, w, c)
            np.multiply(u, np.float32(noise_scale), out=o, casting="unsafe")
        if self.mats is None:
            # Pure permutation (or identity): one pass, converting as it copies.
            for (j, r, col), (_, rs, cs) in zip(self.natural_pos, self.gather_pos):
                if noisy:
                    np.add(o6[:, r, :, col], x6[:, rs, :, cs], out=o6[:, r, :, col], casting="unsafe")
                else:
                    o6[:, r, :, col] = x6[:, rs, :, cs]
            return
        t, d = p.positions, p.block_size
        ws = _workspace((t, n, d))
        gather(x6, self.gather_pos, ws.a)
        np.matmul(ws.a, self.mats, out=ws.b)
        if noisy:
            for j, r, col in self.natural_pos:
                view = o6[:, r, :, col]
                np.add(view, ws.b[j].reshape(n, bh, bw, c), out=view, casting="unsafe")
        else:
            scatter(ws.b, self.natural_pos, o6)


class _Workspace(threading.local):
    """Per-thread scratch buffers, reused from chunk to chunk (fresh memory is slow to touch)."""

    shape = None
    a = b = None


_WS = _Workspace()


def _workspace(shape) -> _Workspace:
    ws = _WS
    if ws.shape != shape:
        ws.a = np.empty(shape, dtype=np.float32)
        ws.b = np.empty(shape, dtype=np.float32)
        ws.shape = shape
    return ws


def invert_linear(y: np.ndarray, params: KeyParams, perm: np.ndarray | None, inv_mats: np.ndarray | None,
                  noise_mean: float) -> np.ndarray:
    """The owner's inverse: subtract the noise mean, undo the matrices and the permutation (float64)."""
    n = y.shape[0]
    h, w, c = params.shape
    bh, bw = params.block
    gh, gw = params.grid
    t, d = params.positions, params.block_size
    src = perm if perm is not None else np.arange(t)
    y6 = (y.astype(np.float64) - noise_mean).reshape(n, gh, bh, gw, bw, c)
    buf = np.empty((t, n, d), dtype=np.float64)
    gather(y6, _positions(np.arange(t), gw), buf)  # slot j: output position j
    if inv_mats is not None:
        buf = np.matmul(buf, inv_mats[src])
    out = np.empty((n, h, w, c), dtype=np.float64)
    scatter(buf, _positions(src, gw), out.reshape(n, gh, bh, gw, bw, c))  # back to position src[j]
    return out
