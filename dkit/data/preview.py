"""``dkit preview``: a PNG grid, owner side. Each row shows what the owner recovers with the key
(the exact original for perm and AES, an estimate for RMT with noise) beside the disguised image
as the cloud sees it (each image's values stretched to 0..255). InstaHide cannot be undone, so its
rows show encodings only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine import Disguise
from ..errors import InputError, KeyMismatch
from ..home import atomic_write
from ..keystore import LoadedKey
from . import h5format


def _stretch(y: np.ndarray) -> np.ndarray:
    lo = y.min(axis=(1, 2, 3), keepdims=True)
    hi = y.max(axis=(1, 2, 3), keepdims=True)
    return ((y - lo) / np.maximum(hi - lo, 1e-9) * 255).round().astype(np.uint8)


def preview(path: str | Path, key: LoadedKey, out: str | Path, *, count: int = 8, scale: int | None = None) -> dict:
    import io

    from PIL import Image

    path, out = Path(path), Path(out)
    meta = h5format.inspect(path)
    if meta.key_id != key.key_id:
        raise KeyMismatch(
            f"{path} was disguised with key ID {meta.key_id} (version {meta.key_version}), "
            f"not with {key.ref} (key ID {key.key_id})"
        )
    if count < 1:
        raise InputError("--count must be at least 1")
    n = min(count, meta.rows)
    rows = np.unique(np.linspace(0, meta.rows - 1, n).round().astype(np.int64))  # spread over the file
    n = len(rows)
    with h5format.open_h5(path) as f:
        try:
            y = f[h5format.IMAGES][rows].astype(np.float32)
        except h5format.H5_ERRORS as e:
            raise h5format.damaged(path, f"images rows {rows[0]}..{rows[-1]} are unreadable", e) from None
    d = Disguise.from_key(key)
    cols = [_stretch(y)]
    if d.invertible:
        cols.insert(0, np.clip(np.rint(d.reveal(y)), 0, 255).astype(np.uint8))
    h, w, c = meta.params.shape
    scale = scale or max(1, 128 // max(h, w))
    gap = 2
    grid = np.full((n * (h * scale + gap) + gap, len(cols) * (w * scale + gap) + gap, 3), 255, np.uint8)
    for i in range(n):
        for j, col in enumerate(cols):
            img = col[i]
            img = np.repeat(img, 3, axis=2) if c == 1 else img[:, :, :3]
            img = img.repeat(scale, axis=0).repeat(scale, axis=1)
            r0, c0 = gap + i * (h * scale + gap), gap + j * (w * scale + gap)
            grid[r0 : r0 + h * scale, c0 : c0 + w * scale] = img
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, "PNG")
    atomic_write(out, buf.getvalue(), mode=0o644)
    columns = ["revealed", "disguised"] if d.invertible else ["disguised"]
    return {"output": str(out), "rows": n, "file_rows": rows.tolist(), "columns": columns}
