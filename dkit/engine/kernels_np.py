"""Fused numpy kernels: the whole block pipeline in few passes over memory, in cache-sized chunks.

For each chunk of images: gather the blocks in output order (the permutation is folded into the
gather) as float32 ``(t, n, d)``, multiply each position by its matrix (one batched matmul),
scatter back to image layout, and add the noise. Shared-channel RMT keys act on each block row
(or, for very wide blocks, on the block's column axis): never as the (BH*BW*C)-sided matrix they
amount to on the flattened block (see ``slot_matrices``). Chunks are processed by a small thread pool:
numpy and BLAS release the GIL in these loops, so two cores do twice the work.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..params import KeyParams
from .mechanisms import AES, aes_rows

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


# An image chunk (n, H, W, C) is seen as (n, gh, bh, gw, bw, c); a slab layout is a transpose of it.
_NATURAL = (1, 3, 0, 2, 4, 5)  # (gh, gw, n, bh, bw, c): (t, n, d), each block a row
_COLUMNS = (1, 3, 4, 0, 2, 5)  # (gh, gw, bw, n, bh, c): (t, bw, n*bh*c), each block column a row


def _grid6(params: KeyParams, n: int) -> tuple[int, ...]:
    bh, bw = params.block
    gh, gw = params.grid
    return (n, gh, bh, gw, bw, params.shape[2])


def to_slabs(x: np.ndarray, params: KeyParams, out: np.ndarray, cols: bool = False) -> np.ndarray:
    """(n, H, W, C) -> ``out`` (t, n, d): block position-major, one strided copy (converting dtype).

    With ``cols`` the d values of each position are laid out as (bw, n*bh*c) instead of (n, d): the
    block's column axis first, so a shared (BW x BW) RMT matrix applies as one matmul per position.
    """
    n = x.shape[0]
    order = _COLUMNS if cols else _NATURAL
    g6 = _grid6(params, n)
    out.reshape(tuple(g6[a] for a in order))[...] = x.reshape(g6).transpose(order)
    return out


def image_view(out: np.ndarray, params: KeyParams, cols: bool = False) -> np.ndarray:
    """A (t-major) view of an (n, H, W, C) image array with the axes of ``slab_view``."""
    return out.reshape(_grid6(params, out.shape[0])).transpose(_COLUMNS if cols else _NATURAL)


def slab_view(z: np.ndarray, params: KeyParams, cols: bool = False) -> np.ndarray:
    """(t, n, d) seen as (gh, gw, n, bh, bw, c), or with ``cols`` as (gh, gw, bw, n, bh, c)."""
    n = z.size // (params.positions * params.block_size)
    g6 = _grid6(params, n)
    return z.reshape(tuple(g6[a] for a in (_COLUMNS if cols else _NATURAL)))


KRON_MAX_SIDE = 256  # widest block row (bw * c) for which a shared key is applied as kron(R, I_C)


def slot_matrices(params: KeyParams, mats: np.ndarray | None, src: np.ndarray, dtype) -> tuple[bool, np.ndarray | None]:
    """``(cols, M)``: the key's matrices ``mats`` (as stored) in slot order, in the form the kernels use.

    - joint (d x d): M[j] = mats[src[j]], applied to the (t, n, d) layout as blocks @ M.
    - shared (BW x BW matrix R, the block's pixel matrix P <- P R per channel, i.e.
      out[h, j, ch] = sum_k in[h, k, ch] R[k, j]): the d x d form kron(I_BH, kron(R, I_C)) is never
      built. Row form (``cols`` False): M = kron(R, I_C), (bw*c) x (bw*c), applied to each block row
      (bw, c) of the natural layout seen as (t, n*bh, bw*c); for C = 1 this is R itself. Column form
      (``cols`` True, rows wider than ``KRON_MAX_SIDE``): M = R^T, applied as M @ (t, bw, n*bh*c) on
      the column layout of ``to_slabs``. The row form does C times the arithmetic of the column
      form, but its gathers and scatters copy runs of bw*c values instead of c: measured on RGB
      images from 32x32 to 224x224, it was faster up to rows of 168 values (1.5x to 3x) and slower
      at 384 (by 10%). Both are far from the d x d form, which does BH*C times the arithmetic.
    """
    if mats is None:
        return False, None
    m = np.asarray(mats)[src]
    if params.channels != "shared":
        return False, np.ascontiguousarray(m, dtype=dtype)
    bw, c = params.block[1], params.shape[2]
    if m.shape[-2:] != (bw, bw):
        raise ValueError(f"shared RMT: expected {bw} x {bw} matrices, got shape {m.shape}")
    if c == 1 or bw * c <= KRON_MAX_SIDE:
        kron = np.einsum("tkj,ab->tkajb", m, np.eye(c, dtype=m.dtype)).reshape(len(m), bw * c, bw * c)
        return False, np.ascontiguousarray(kron, dtype=dtype)
    return True, np.ascontiguousarray(m.transpose(0, 2, 1), dtype=dtype)


def _multiply(blocks: np.ndarray, mats: np.ndarray, cols: bool, out: np.ndarray | None = None) -> np.ndarray:
    """Each position's (t, n, d) slab times its matrix in the form of ``slot_matrices``."""
    t, w = mats.shape[0], mats.shape[-1]
    rows = blocks.size // (t * w)
    if cols:
        shape = (t, w, rows)
        r = np.matmul(mats, blocks.reshape(shape), out=None if out is None else out.reshape(shape))
    else:
        shape = (t, rows, w)
        r = np.matmul(blocks.reshape(shape), mats, out=None if out is None else out.reshape(shape))
    return r.reshape(blocks.shape)


class LinearPlan:
    """perm and/or rmt (or identity) as: gather in ``src`` order, multiply by ``mats[j]``, scatter, add noise.

    ``mats`` are the key's matrices as stored: d x d (joint) or BW x BW (shared); ``slot_matrices``
    says how each is applied.
    """

    def __init__(self, params: KeyParams, perm: np.ndarray | None, mats: np.ndarray | None):
        t = params.positions
        self.params = params
        self.src = perm if perm is not None else np.arange(t)
        self.permuted = perm is not None
        # Slot j holds original block src[j], so it is multiplied by that position's matrix.
        self.cols, self.mats = slot_matrices(params, mats, self.src, np.float32)

    def run(self, x: np.ndarray, out: np.ndarray, noise_fn=None, noise_scale: float = 0.0) -> None:
        """Disguise ``x`` (N, H, W, C) into ``out`` (same shape, float). ``noise_fn(i0, n)`` gives uint16 noise."""
        _run_chunks(self._chunk, x, out, chunk_images(self.params), noise_fn, noise_scale)

    def _chunk(self, x, out, i0, i1, noise_fn, noise_scale):
        p = self.params
        t, d = p.positions, p.block_size
        n = i1 - i0
        cols = self.cols
        ws = _workspace((t, n, d), x.dtype)
        # Gather: one strided copy to (t, n, d) in natural order, then whole slabs in slot order.
        blocks = to_slabs(x[i0:i1], p, ws.g, cols)
        if self.permuted:
            np.take(ws.g, self.src, axis=0, out=ws.g2)
            blocks = ws.g2
        if self.mats is not None:
            if blocks.dtype != np.float32:
                np.copyto(ws.a, blocks, casting="unsafe")
                blocks = ws.a
            blocks = _multiply(blocks, self.mats, cols, out=ws.b)
        o = out[i0:i1]
        b6 = slab_view(blocks, p, cols)
        if noise_fn is not None and noise_scale:
            # noise + blocks are summed in float32 and rounded once to the output dtype: straight in
            # the output when it is float32, else in a float32 buffer (ws.a is free after the matmul).
            acc = o if o.dtype == np.float32 else ws.a.reshape(o.shape)
            u = noise_fn(i0, n).reshape(o.shape)
            np.multiply(u, np.float32(noise_scale), out=acc, casting="unsafe")
            acc_t = image_view(acc, p, cols)
            np.add(acc_t, b6, out=acc_t)
            if acc is not o:
                np.copyto(o, acc, casting="unsafe")
        else:
            np.copyto(image_view(o, p, cols), b6, casting="unsafe")


class AESPlan:
    """perm and/or aes: gather uint8 blocks, encrypt each position's rows, place them in slot order."""

    def __init__(self, params: KeyParams, perm: np.ndarray | None, aes: AES):
        self.params = params
        self.src = perm if perm is not None else np.arange(params.positions)
        self.aes = aes

    def run(self, x: np.ndarray, out: np.ndarray) -> None:
        _run_chunks(self._chunk, x, out, chunk_images(self.params))

    def _chunk(self, x, out, i0, i1):
        p = self.params
        t, d = p.positions, p.block_size
        n = i1 - i0
        ws = _workspace((t, n, d), np.uint8)
        to_slabs(x[i0:i1], p, ws.g)
        key = self.aes.single_key
        if key is not None:
            # aes_rows encrypts each row on its own, so one call covers every position (any d).
            ws.g2[...] = aes_rows(ws.g.reshape(t * n, d), key).reshape(t, n, d)
        else:
            for i in range(t):
                ws.g2[i] = aes_rows(ws.g[i], self.aes.key_for(i))
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


class InversePlan:
    """The owner's inverse of a ``LinearPlan``: subtract the noise mean, undo the matrices and the
    permutation (float64). The slot-ordered inverse matrices and the un-permutation are made once.

    ``inv_mats`` are the inverses of the key's matrices as stored (d x d joint, BW x BW shared).
    """

    def __init__(self, params: KeyParams, perm: np.ndarray | None, inv_mats: np.ndarray | None):
        t = params.positions
        self.params = params
        src = perm if perm is not None else np.arange(t)
        self.natural = np.argsort(src)  # slot j came from original position src[j]
        self.cols, self.inv = slot_matrices(params, inv_mats, src, np.float64)

    def run(self, y: np.ndarray, noise_mean: float) -> np.ndarray:
        p = self.params
        t, d = p.positions, p.block_size
        n = y.shape[0]
        z = to_slabs(y, p, np.empty((t, n, d), dtype=np.float64), self.cols)  # slot j = output position j
        z -= noise_mean
        if self.inv is not None:
            z = _multiply(z, self.inv, self.cols)
        natural = np.take(z, self.natural, axis=0)
        out = np.empty(y.shape, dtype=np.float64)
        np.copyto(image_view(out, p, self.cols), slab_view(natural, p, self.cols))
        return out


def invert_linear(
    y: np.ndarray, params: KeyParams, perm: np.ndarray | None, inv_mats: np.ndarray | None, noise_mean: float
) -> np.ndarray:
    """The owner's inverse in one call (``InversePlan`` keeps its set-up for repeated calls)."""
    return InversePlan(params, perm, inv_mats).run(y, noise_mean)
