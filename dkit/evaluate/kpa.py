"""Known-plaintext regression on RMT (threat level 2): m plain/disguised pairs give each block
position's matrix by least squares, and the permutation by which fit is best.

The disguise of a block at output position j is ``x_{pi(j)} R_{pi(j)} + Delta``, Delta uniform on
[0, N) per pixel. With the mean N/2 removed, ``Y_j ~ X_i R`` for the right input position i. Per
candidate (i, j) the attack fits R and keeps the assignment with the smallest residuals (scipy's
``linear_sum_assignment``); with fewer samples than unknowns, where every fit is exact, it matches
Gram matrices instead (an orthogonal R keeps inner products). R is then estimated by orthogonal
Procrustes (orthogonal keys: the public parameter says so) or by least squares, ``(X^T X)^-1 X^T Y``
(minimum-norm when underdetermined). Shared-channel keys multiply each row of each channel's
BH x BW pixel matrix by one BW x BW matrix, so each row is a sample: one pair gives BH x C samples.

Theory: with R exact, the reconstruction error is the centred noise times R^-1, RMS N / sqrt(12) for
an orthogonal R, so the PSNR ceiling is 20 log10(255 sqrt(12) / N): 31 dB at N = 25, 19 dB at N = 100.
Noise bounds what KPA recovers; it does not stop it.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..params import KeyParams
from .common import (
    AttackResult,
    as_images,
    clip8,
    from_blocks,
    mean_image_baseline,
    quality,
    rows_of,
    to_blocks,
    unrows,
    verdict_from_ssim,
)

NOISE_MEAN_FACTOR = 65535 / 65536 / 2  # the engine's noise is N * m / 65536, m uniform in 0..65535


def noise_mean(params: KeyParams) -> float:
    return float(params.noise) * NOISE_MEAN_FACTOR


def samples(blocks: np.ndarray, params: KeyParams) -> np.ndarray:
    """(n, t, d) blocks -> (t, S, q): per position, the row vectors a key matrix acts on."""
    return rows_of(blocks, params).transpose(1, 0, 2)


def unsamples(rows: np.ndarray, params: KeyParams) -> np.ndarray:
    """The inverse of ``samples``: (t, S, q) -> (n, t, d)."""
    return unrows(rows.transpose(1, 0, 2), params)


def match_positions(xs: np.ndarray, ys: np.ndarray, orthogonal: bool) -> np.ndarray:
    """For each output position j, the input position i whose samples best explain it: (t,) ints.
    xs, ys: (t, S, q), noise mean removed."""
    t, s, q = xs.shape
    if s > q + 1:
        # residual of the least-squares fit of Y_j on X_i: |Y_j|^2 - |Q_i^T Y_j|^2 (Q_i: X_i's column space)
        qs = np.linalg.qr(xs)[0]  # (t, S, q)
        energy = np.stack([(np.einsum("sa,jsb->jab", qi, ys) ** 2).sum(axis=(1, 2)) for qi in qs])  # (t_in, t_out)
        cost = (ys**2).sum(axis=(1, 2))[None, :] - energy
        cost = cost / np.maximum((ys**2).sum(axis=(1, 2))[None, :], 1e-12)
    else:
        gx = np.einsum("isq,iuq->isu", xs, xs)
        gy = np.einsum("jsq,juq->jsu", ys, ys)
        if not orthogonal:  # no invariant: compare normalised Gram matrices (a weak guess)
            gx = gx / np.maximum(np.linalg.norm(gx, axis=(1, 2), keepdims=True), 1e-12)
            gy = gy / np.maximum(np.linalg.norm(gy, axis=(1, 2), keepdims=True), 1e-12)
        cost = ((gx[:, None] - gy[None, :]) ** 2).sum(axis=(2, 3))
    rows, cols = linear_sum_assignment(cost)
    src = np.empty(t, dtype=np.int64)
    src[cols] = rows
    return src


def fit_matrices(xs: np.ndarray, ys: np.ndarray, orthogonal: bool) -> np.ndarray:
    """Per position, R with X R ~ Y: (t, q, q). Orthogonal Procrustes, or least squares."""
    if orthogonal:
        u, _, vt = np.linalg.svd(np.einsum("tsq,tse->tqe", xs, ys))
        return u @ vt
    return np.stack([np.linalg.lstsq(x, y, rcond=None)[0] for x, y in zip(xs, ys, strict=True)])


def invert(r: np.ndarray, orthogonal: bool) -> np.ndarray:
    return r.transpose(0, 2, 1) if orthogonal else np.linalg.pinv(r)


def kpa(
    pairs_plain: np.ndarray,
    pairs_disguised: np.ndarray,
    targets_disguised: np.ndarray,
    targets_plain: np.ndarray,
    params: KeyParams,
    *,
    public_plain: np.ndarray | None = None,
) -> AttackResult:
    """Reconstruct held-out targets from m known pairs. ``public_plain`` (optional) gives the
    mean-image baseline; without it the pairs' mean is used."""
    xp = as_images(pairs_plain, params)
    yp = as_images(pairs_disguised, params) - noise_mean(params)
    yt = as_images(targets_disguised, params) - noise_mean(params)
    truth = as_images(targets_plain, params)
    m = len(xp)
    orthogonal = params.rmt_kind == "orthogonal"
    xs, ys = samples(to_blocks(xp, params), params), samples(to_blocks(yp, params), params)
    t = xs.shape[0]
    src = match_positions(xs, ys, orthogonal) if "perm" in params.pipeline else np.arange(t)
    r = fit_matrices(xs[src], ys, orthogonal)  # output position j: X_{src[j]} R_j ~ Y_j
    rt = samples(to_blocks(yt, params), params)  # (t_out, S, q)
    rec_rows = np.einsum("jsq,jqe->jse", rt, invert(r, orthogonal))
    placed = np.empty_like(rec_rows)
    placed[src] = rec_rows  # back to input positions
    recon = from_blocks(unsamples(placed, params), params)
    psnr, ssim = quality(truth, recon)
    base = mean_image_baseline(public_plain if public_plain is not None else xp, truth)
    figures = {"psnr_db": psnr, "ssim": ssim}
    if "perm" in params.pipeline:
        figures["placement_accuracy"] = placement_accuracy(recon, truth, params)
    return AttackResult(
        attack="kpa",
        level=2,
        params={"pairs": m, "noise": params.noise},
        figures=figures,
        verdict=verdict_from_ssim(ssim, base["ssim"]),
        note=f"a perfect key estimate leaves the noise: {noise_ceiling_db(params.noise):.1f} dB (before clipping)",
        baseline=base,
        samples={
            "original": clip8(truth[:8]),
            "disguised": clip8(yt[:8] + noise_mean(params)),
            "reconstructed": clip8(recon[:8]),
        },
    )


def noise_ceiling_db(noise: float) -> float:
    """The PSNR of a perfect key estimate: the residual is the centred uniform noise, RMS N/sqrt(12)."""
    if noise <= 0:
        return 100.0
    return float(20 * np.log10(255 * np.sqrt(12) / noise))


def placement_accuracy(recon: np.ndarray, truth: np.ndarray, params: KeyParams) -> float:
    """The fraction of (image, position) blocks whose reconstruction is nearer to the true block at
    that position than to any other position's true block of the same image: key-free scoring of
    a recovered permutation."""
    rb, tb = to_blocks(recon, params), to_blocks(truth, params)  # (n, t, d)
    d2 = ((rb[:, :, None, :] - tb[:, None, :, :]) ** 2).sum(axis=3)  # (n, t, t)
    own = np.take_along_axis(d2, np.arange(d2.shape[1])[None, :, None], axis=2)[..., 0]
    return float((own <= d2.min(axis=2) + 1e-9).mean())
