"""The permutation from the disguised data alone (level 1), for keys with ``perm`` and ``rmt``.

Canonical correlations between two block positions do not change under any invertible linear map
of either position, so RMT (orthogonal or projection, joint or per channel) leaves them as they
were; independent noise only shrinks them. Neighbouring blocks of natural images correlate, so the
neighbour graph of the stored positions, and from it the grid, follows from the disguised images
(``dkit.placement``: sums of squared canonical correlations, then Laplacian eigenmaps), up to a
symmetry of the grid. No plain image and no pair is needed.

What it recovers is the permutation only: the pixel values stay behind each position's secret
matrix, which this attack does not touch. Hence the verdict ``partial`` when most positions are
placed (the permutation adds nothing against the cloud), ``holds`` otherwise; the images
themselves are judged by the other attacks.

Scoring, without the key: the true source of each disguised position is the plain position it
predicts best on the held-out pairs (``covariance.true_sources``); the placement is scored under
the grid symmetry that fits best, since no statistic can tell an image from its mirror.
"""

from __future__ import annotations

import time

import numpy as np

from ..params import KeyParams
from ..placement import grid_symmetries, place_positions
from .common import AttackResult, as_images, to_blocks
from .covariance import true_sources

__all__ = ["placement_attack"]


def placement_attack(disguised, targets_disguised, targets_plain, params: KeyParams) -> AttackResult:
    run_params = {"disguised_images": int(len(disguised))}
    if not (params.has("perm") and params.has("rmt")):
        return AttackResult("placement", 1, run_params, {}, "n/a", note="for keys with perm and rmt")
    t0 = time.perf_counter()
    cells = place_positions(to_blocks(as_images(disguised, params), params), params.grid)
    run_params["seconds"] = round(time.perf_counter() - t0, 2)
    chance = 1.0 / params.positions
    r2 = true_sources(
        to_blocks(as_images(targets_disguised, params), params),
        to_blocks(as_images(targets_plain, params), params),
        params,
    )
    if r2 is None:
        note = "too few targets to score the placement"
        return AttackResult("placement", 1, run_params, {}, "n/a", note=note)
    best = r2.max(axis=1)
    idx = np.arange(len(cells))
    acc = max(float(np.mean(r2[idx, sym[cells]] >= best - 1e-3)) for sym in grid_symmetries(params.grid))
    verdict = "partial" if acc >= 0.5 else "holds"
    note = (
        "the permutation is recovered from the disguised images alone (up to a grid symmetry): against "
        "the cloud it adds nothing to RMT; the pixel values are not recovered by this attack"
        if verdict == "partial"
        else ""
    )
    return AttackResult(
        "placement",
        1,
        run_params,
        {"placement_accuracy": acc},
        verdict,
        note=note,
        baseline={"placement_accuracy": chance},
    )
