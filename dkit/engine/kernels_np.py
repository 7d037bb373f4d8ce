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


def to_slabs(x: np.ndarray, params: KeyParams, out: np.ndarray) -> np.ndarray:
    """(n, H, W, C) -> ``out`` (t, n, d): block position-major, one strided copy (converting dtype)."""
    n = x.shape[0]
    bh, bw = params.block
    gh, gw = params.grid
    c = params.shape[2]
    out.reshape(gh, gw, n, bh, bw, c)[...] = x.reshape(n, gh, bh, gw, bw, c).transpose(1, 3, 0, 2, 4, 5)
    return out


def image_view(out: np.ndarray, params: KeyParams) -> np.ndarray:
    """A (t-major) view of an (n, H, W, C) image array with the axes of ``slab_view``."""
    n = out.shape[0]
    bh, bw = params.block
    gh, gw = params.grid
    return out.reshape(n, gh, bh, gw, bw, params.shape[2]).transpose(1, 3, 0, 2, 4, 5)


def slab_view(z: np.ndarray, params: KeyParams) -> np.ndarray:
    """(t, n, d) seen as (gh, gw, n, bh, bw, c)."""
    bh, bw = params.block
    gh, gw = params.grid
    return z.reshape(gh, gw, z.shape[1], bh, bw, params.shape[2])


class LinearPlan:
    """perm and/or rmt (or identity) as: gather in ``src`` order, multiply by ``mats[j]``, scatter, add noise."""

    def __init__(self, params: KeyParams, perm: np.ndarray | None, mats: np.ndarray | None):
        t = params.positions
        self.params = params
        self.src = perm if perm is not None else np.arange(t)
        self.permuted = perm is not None
        # Slot j holds original block src[j], so it is multiplied by that position's matrix.
        self.mats = None if mats is None else np.ascontiguousarray(mats[self.src], dtype=np.float32)

    def run(self, x: np.ndarray, out: np.ndarray, noise_fn=None, noise_scale: float = 0.0) -> None:
        """Disguise ``x`` (N, H, W, C) into ``out`` (same shape, float). ``noise_fn(i0, n)`` gives uint16 noise."""
        _run_chunks(self._chunk, x, out, chunk_images(self.params), noise_fn, noise_scale)

    def _chunk(self, x, out, i0, i1, noise_fn, noise_scale):
        p = self.params
        t, d = p.positions, p.block_size
        n = i1 - i0
        ws = _workspace((t, n, d), x.dtype)
        # Gather: one strided copy to (t, n, d) in natural order, then whole slabs in slot order.
        blocks = to_slabs(x[i0:i1], p, ws.g)
        if self.permuted:
            np.take(ws.g, self.src, axis=0, out=ws.g2)
            blocks = ws.g2
        if self.mats is not None:
            if blocks.dtype != np.float32:
                np.copyto(ws.a, blocks, casting="unsafe")
                blocks = ws.a
            np.matmul(blocks, self.mats, out=ws.b)
            blocks = ws.b
        o = out[i0:i1]
        o_t = image_view(o, p)
        b6 = slab_view(blocks, p)
        if noise_fn is not None and noise_scale:
            # The noise goes straight into the output; the blocks are then added onto it.
            u = noise_fn(i0, n).reshape(o.shape)
            np.multiply(u, np.float32(noise_scale), out=o, casting="unsafe")
            np.add(o_t, b6, out=o_t, casting="unsafe")
        else:
            np.copyto(o_t, b6, casting="unsafe")


class AESPlan:
    """perm and/or aes: gather uint8 blocks, encrypt each position's rows, place them in slot order."""

    def __init__(self, params: KeyParams, perm: np.ndarray | None, keys: tuple[bytes, ...]):
        self.params = params
        self.src = perm if perm is not None else np.arange(params.positions)
        self.keys = keys

    def run(self, x: np.ndarray, out: np.ndarray) -> None:
        _run_chunks(self._chunk, x, out, chunk_images(self.params))

    def _chunk(self, x, out, i0, i1):
        from .mechanisms import aes_rows

        p = self.params
        t, d = p.positions, p.block_size
        n = i1 - i0
        ws = _workspace((t, n, d), np.uint8)
        to_slabs(x[i0:i1], p, ws.g)
        if len(self.keys) == 1 and d % 16 == 0:
            ws.g2[...] = aes_rows(ws.g.reshape(t * n, d), self.keys[0]).reshape(t, n, d)
        else:
            for i in range(t):
                ws.g2[i] = aes_rows(ws.g[i], self.keys[0] if len(self.keys) == 1 else self.keys[i])
        np.take(ws.g2, self.src, axis=0, out=ws.g)
        np.copyto(image_view(out[i0:i1], p), slab_view(ws.g, p), casting="unsafe")


def _run_chunks(fn, x, out, step, *args) -> None:
    """fn(x, out, i0, i1, *args) over chunks of ``step`` images, on the thread pool when there are several."""
    n_all = x.shape[0]
    starts = list(range(0, n_all, step))
    if len(starts) <= 1:
        for s in starts:
            fn(x, out, s, min(n_all, s + step), *args)
        return
    futures = [_pool().submit(fn, x, out, s, min(n_all, s + step), *args) for s in starts]
    for f in futures:
        f.result()


class _Workspace(threading.local):
    """Per-thread scratch buffers, reused from chunk to chunk (fresh memory is slow to touch)."""

    size = 0
    dtype = None
    flat: dict = {}


_WS = _Workspace()


class _Views:
    def __init__(self, shape, gdt):
        ws = _WS
        size = int(np.prod(shape))
        if ws.size < size or ws.dtype != gdt:
            ws.flat = {
                "g": np.empty(size, gdt),
                "g2": np.empty(size, gdt),
                "a": np.empty(size, np.float32),
                "b": np.empty(size, np.float32),
            }
            ws.size, ws.dtype = size, gdt
        for name, buf in ws.flat.items():
            setattr(self, name, buf[:size].reshape(shape))


def _workspace(shape, dtype) -> _Views:
    return _Views(shape, np.uint8 if dtype == np.uint8 else np.float32)


def invert_linear(
    y: np.ndarray, params: KeyParams, perm: np.ndarray | None, inv_mats: np.ndarray | None, noise_mean: float
) -> np.ndarray:
    """The owner's inverse: subtract the noise mean, undo the matrices and the permutation (float64)."""
    t, d = params.positions, params.block_size
    n = y.shape[0]
    src = perm if perm is not None else np.arange(t)
    z = to_slabs(y, params, np.empty((t, n, d), dtype=np.float64))  # slot j = output position j
    z -= noise_mean
    if inv_mats is not None:
        z = np.matmul(z, inv_mats[src])
    natural = np.take(z, np.argsort(src), axis=0)  # slot j came from original position src[j]
    out = np.empty(y.shape, dtype=np.float64)
    np.copyto(image_view(out, params), slab_view(natural, params))
    return out
