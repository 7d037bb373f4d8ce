"""What ``--copies`` gives the cloud (level 1): several noisy views of one image.

The copies of an image share its source ID (public, so that training can keep them together), so
the cloud knows which rows are views of one image. Two views of the *same* plain image differ only
by their noise, ``U[0, N)`` per value, so every value of their difference lies in (-N, N); views of
different plain images (another image, or a flipped or shifted copy) almost surely do not. The
attack finds, for each image, its views of the same plain image and averages them: k such views
cut the noise's standard deviation by sqrt(k), to what a key with noise N / sqrt(k) would give
every attack that the noise slows down (known-plaintext regression, covariance alignment).

Figures: ``views_averaged`` (mean k over images), ``effective_noise`` (mean N / sqrt(k)) against
the key's noise (the baseline). Without ``--augment`` every copy is such a view (k = T); with
``--augment flip,crop`` a copy repeats the plain image only when its draw is "no flip, no shift".
Verdict: partial when the effective noise falls more than 5% below the key's, holds otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import h5format
from ..params import KeyParams
from .common import AttackResult

__all__ = ["copies_attack"]

MAX_IMAGES = 2000


def _views(rows: np.ndarray, noise: float) -> int:
    """The largest set of rows of one image that are views of one plain image."""
    n = len(rows)
    flat = rows.reshape(n, -1).astype(np.float64)
    same = np.array([[np.abs(flat[i] - flat[j]).max() < noise * 1.001 for j in range(n)] for i in range(n)])
    return int(same.sum(axis=1).max())


def copies_attack(path: Path, meta: h5format.Meta, params: KeyParams) -> AttackResult:
    copies = int(meta.encodings)
    run_params = {"copies_per_image": copies, "augment": (meta.options or {}).get("augment", "none")}
    if params.has("instahide") or copies < 2 or not params.noise:
        why = "one row per image" if copies < 2 else "no noise to average" if not params.noise else "InstaHide"
        return AttackResult("copies", 1, run_params, {}, "n/a", note=f"nothing to average ({why})")
    with h5format.open_h5(path) as f:
        n_rows = min(int(meta.rows), MAX_IMAGES * copies)
        x = np.asarray(f[h5format.IMAGES][:n_rows], dtype=np.float32)
        ids = np.asarray(f[h5format.SOURCE_IDS][:n_rows])
    _, first, counts = np.unique(ids, axis=0, return_index=True, return_counts=True)
    views = [_views(x[a : a + c], params.noise) for a, c in zip(first, counts, strict=True) if c == copies]
    k = np.array(views, dtype=np.float64)
    run_params["images"] = len(views)
    effective = float(np.mean(params.noise / np.sqrt(k)))
    verdict = "partial" if effective < 0.95 * params.noise else "holds"
    note = (
        f"views of the same plain image average the noise down to {effective:.1f} (the key says {params.noise:g})"
        if verdict == "partial"
        else ""
    )
    return AttackResult(
        "copies",
        1,
        run_params,
        {"views_averaged": float(k.mean()), "effective_noise": effective},
        verdict,
        note=note,
        baseline={"effective_noise": float(params.noise)},
    )
