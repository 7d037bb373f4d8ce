"""A thumbnail of every image from the disguised data alone (level 1), for orthogonal RMT keys.

An orthogonal matrix keeps a block's covariance structure: the covariance of disguised position j
is ``R_j^T C_a R_j + sigma^2 I``, so its top eigenvector is ``R_j^T u_a`` where ``u_a`` is the plain
block's top principal direction. For natural images that direction is, very nearly, the uniform
vector: a block's brightness. Projecting each disguised block on its position's top eigenvector
therefore gives back the block's mean (times sqrt(m)), whatever the key; the sign comes from the
mean disguised block, whose projection is the (positive) mean brightness. With ``perm``, the
positions are first placed from the same data (``dkit.placement``). The result is a grey
(H / BH) x (W / BW) thumbnail of every image (for per-channel keys, one value per block row and
channel), with no plain image, pair or key. Noise does not stop it: the projection averages m
values, and the noise adds N/2 plus a spread of N / sqrt(12) to a signal of hundreds.

Figures: ``thumbnail_corr`` (median over targets of the correlation between the recovered and the
true block means), ``psnr_db``/``ssim`` of the thumbnail blown up to full size against the plain
target, and the same for the true block means (``ssim_true_thumbnail``: the most a perfect
thumbnail can score; the finer the grid, the higher). Verdict by SSIM, like the other
reconstructions.
"""

from __future__ import annotations

import numpy as np

from ..params import KeyParams
from ..placement import grid_symmetries, place_positions
from .common import AttackResult, as_images, clip8, mean_image_baseline, quality, rows_of, to_blocks, verdict_from_ssim

__all__ = ["thumbnail_attack"]


def _block_means(images: np.ndarray, params: KeyParams) -> np.ndarray:
    """(N, t) mean of each block over its pixels and channels."""
    return to_blocks(images, params).mean(axis=2)


def _blow_up(means: np.ndarray, params: KeyParams) -> np.ndarray:
    """(N, t) block values on the grid -> (N, H, W, C) images, each block filled with its value."""
    gh, gw = params.grid
    bh, bw = params.block
    g = means.reshape(-1, gh, gw)
    img = np.repeat(np.repeat(g, bh, axis=1), bw, axis=2)
    return np.repeat(img[..., None], params.shape[2], axis=3)


def thumbnail_attack(disguised, targets_disguised, targets_plain, params: KeyParams, public=None) -> AttackResult:
    run_params = {"disguised_images": int(len(disguised)), "thumbnail": "x".join(map(str, params.grid))}
    if not params.has("rmt") or params.rmt_kind != "orthogonal" or params.has("aes") or params.has("instahide"):
        note = "for orthogonal RMT keys (without aes or instahide)"
        return AttackResult("thumbnail", 1, run_params, {}, "n/a", note=note)
    dis = as_images(disguised, params)
    z = rows_of(to_blocks(dis, params), params)  # (n r, t, m)
    t, m = z.shape[1], z.shape[2]
    mean = z.mean(axis=0)
    v = np.empty((t, m))
    for j in range(t):
        zc = z[:, j] - mean[j]
        _, vecs = np.linalg.eigh(zc.T @ zc / max(1, len(zc) - 1))
        v[j] = vecs[:, -1] * (1.0 if mean[j] @ vecs[:, -1] >= 0 else -1.0)
    cells = place_positions(to_blocks(dis, params), params.grid) if params.has("perm") else np.arange(t)

    tp = as_images(targets_plain, params)
    zt = rows_of(to_blocks(as_images(targets_disguised, params), params) - params.noise / 2, params)
    n = len(tp)
    proj = np.einsum("ntm,tm->nt", zt, v) / np.sqrt(m)  # each row's mean, in disguised position order
    per_block = proj.reshape(n, -1, t).mean(axis=1)  # the r rows of a block (1 for joint keys)
    truth = _block_means(tp, params)

    def placed(c):
        out = np.empty_like(per_block)
        out[:, c] = per_block
        return out

    def median_corr(e):
        pairs = zip(e, truth, strict=True)
        return float(np.median([np.corrcoef(a, b)[0, 1] if a.std() > 0 and b.std() > 0 else 0.0 for a, b in pairs]))

    # a placement is known up to a grid symmetry (mirrors, rotations): the attacker looks at the
    # few candidates and keeps the upright one; the scorer keeps the one closest to the truth
    candidates = [placed(sym[cells]) for sym in grid_symmetries(params.grid)] if params.has("perm") else [placed(cells)]
    scores = [median_corr(e) for e in candidates]
    est = candidates[int(np.argmax(scores))]
    corr = [max(scores)]
    recon = _blow_up(est, params)
    psnr, ssim = quality(tp, recon)
    psnr_true, ssim_true = quality(tp, _blow_up(truth, params))
    figures = {
        "thumbnail_corr": corr[0],
        "psnr_db": psnr,
        "ssim": ssim,
        "psnr_db_true_thumbnail": psnr_true,
        "ssim_true_thumbnail": ssim_true,
    }
    baseline = mean_image_baseline(as_images(public, params), tp) if public is not None else {}
    verdict = verdict_from_ssim(ssim, baseline.get("ssim", 0.0))
    note = (
        f"a grey {run_params['thumbnail']} thumbnail of each image from the disguised data alone "
        f"(correlation {figures['thumbnail_corr']:.2f} with the true block means)"
    )
    k = min(8, n)
    samples = {"original": clip8(tp[:k]), "disguised": clip8(as_images(targets_disguised, params)[:k])}
    samples["reconstructed"] = clip8(recon[:k])
    return AttackResult("thumbnail", 1, run_params, figures, verdict, note=note, baseline=baseline, samples=samples)
