"""The torch path: the same disguise on the tensor's device (CPU or CUDA).

perm and RMT run as torch ops on the device: a batched matmul over block positions, the
permutation as an index, the noise drawn from the same CSPRNG bytes as the numpy path (made on
the CPU, moved to the device as 16-bit integers, scaled there). AES runs on the CPU through
``cryptography`` (there is no AES in torch) and the result is moved back.
"""

from __future__ import annotations

import numpy as np
import torch

from .geometry import batch_shape, out_dtype
from .kernels_np import slot_matrices
from .randomness import RandomSource

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


def check_values_torch(x: torch.Tensor, what: str, need_bytes: bool) -> None:
    from ..errors import InputError

    if x.dtype == torch.uint8:
        return
    if x.dtype == torch.bool or x.dtype.is_complex:
        name = str(x.dtype).replace("torch.", "")
        raise InputError(f"{what}: dtype {name} is not supported; use uint8 or float pixel values in 0..255")
    if x.numel() == 0:
        return
    xf = x.float() if not x.dtype.is_floating_point else x
    lo, hi = torch.aminmax(xf)
    lo, hi = float(lo), float(hi)
    if not (np.isfinite(lo) and np.isfinite(hi)) or bool(torch.isnan(xf).any()):
        raise InputError(f"{what}: the images contain NaN or infinite values")
    if lo < 0 or hi > 255:
        raise InputError(
            f"{what}: values must lie in 0..255, found {lo:g}..{hi:g}",
            hint="pass raw pixel values (not values scaled to 0..1 or normalised)",
        )
    if x.dtype.is_floating_point and 0 < hi <= 1 and not bool((x == torch.round(x)).all()):
        from .geometry import SCALED_01, SCALED_01_HINT

        raise InputError(f"{what}: {SCALED_01}", hint=SCALED_01_HINT)
    if need_bytes and x.dtype.is_floating_point and not bool((x == torch.round(x)).all()):
        raise InputError(f"{what}: aes encrypts bytes, so pixel values must be whole numbers")


def _tensors(d, device: torch.device):
    """Key material on ``device``, cached per device: (index, float32 matrices in slot order in the
    form of ``kernels_np.slot_matrices``, whether they act on the column layout)."""
    cached = d._torch_cache.get(device)
    if cached is None:
        p = d.params
        t = p.positions
        src = d.material.perm if d.material.perm is not None else np.arange(t)
        src_t = torch.tensor(np.array(src), dtype=torch.long, device=device)
        cols, mats = slot_matrices(p, d.rmt.compact if d.rmt is not None else None, src, np.float32)
        if mats is not None:
            mats = torch.as_tensor(mats, device=device)
        cached = (src_t, mats, cols)
        d._torch_cache[device] = cached
    return cached


def apply_torch(d, x: torch.Tensor, *, rng: RandomSource | None, start: int, dtype) -> torch.Tensor:
    p = d.params
    n, single = batch_shape(tuple(x.shape), p, "images")
    check_values_torch(x, "images", need_bytes=d.aes is not None)
    dt = _TORCH_DTYPES[out_dtype(dtype)]
    h, w, c = p.shape
    bh, bw = p.block
    gh, gw = p.grid
    t, dd = p.positions, p.block_size
    x = x.reshape(n, h, w, c)
    if d.aes is not None:
        y = d.apply(x.detach().cpu().numpy(), dtype=dtype)
        out = torch.from_numpy(y).to(x.device)
        return out[0] if single else out
    src, mats, cols = _tensors(d, x.device)
    xf = x.to(torch.float32).reshape(n, gh, bh, gw, bw, c)
    # Slot j holds the block of original position src[j], as (gh*gw, n, d); for shared matrices in
    # the column form as (gh*gw, bw, n*bh*c), the block's column axis first.
    if cols:
        blocks = xf.permute(1, 3, 4, 0, 2, 5).reshape(t, bw, n * bh * c)
    else:
        blocks = xf.permute(1, 3, 0, 2, 4, 5).reshape(t, n, dd)
    blocks = blocks.index_select(0, src) if d.material.perm is not None else blocks
    if mats is not None:
        side = mats.shape[-1]
        if cols:
            blocks = torch.bmm(mats, blocks)
        else:  # rows of ``side`` values: whole blocks (joint), or block rows (shared)
            blocks = torch.bmm(blocks.reshape(t, n * dd // side, side), mats).reshape(t, n, dd)
    if cols:
        y = blocks.reshape(gh, gw, bw, n, bh, c).permute(3, 0, 4, 1, 2, 5).reshape(n, h, w, c)
    else:
        y = blocks.reshape(gh, gw, n, bh, bw, c).permute(2, 0, 3, 1, 4, 5).reshape(n, h, w, c)
    if d.noise > 0:
        rng = rng or RandomSource()
        # Move the 16-bit draws as int16 (half the bytes of int32), then read them back as unsigned.
        u = torch.from_numpy(d.noise_for(rng, start, n).view(np.int16)).to(x.device, non_blocking=True)
        noise = (u.to(torch.int32) & 0xFFFF).to(torch.float32)
        y = y + noise * (d.noise / 65536)
    y = y.to(dt).contiguous()
    return y[0] if single else y
