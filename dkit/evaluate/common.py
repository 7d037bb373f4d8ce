"""What every attack shares: its result record, image quality (PSNR/SSIM), the block layout and verdicts.

An attack is a plain function of public things only: arrays of plain and disguised images and the
key's public parameters (``KeyParams``: shape, block, pipeline, noise level). It never receives key
material; ``dkit.evaluate.run`` (the owner's side) makes the arrays with the key and hands them over.
Figures are always measured on held-out images, never on the pairs or samples an attack was given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..engine.geometry import from_blocks, to_blocks
from ..params import KeyParams

__all__ = [
    "AttackResult",
    "quality",
    "verdict_from_ssim",
    "to_blocks",
    "from_blocks",
    "rows_of",
    "unrows",
    "as_images",
    "clip8",
]

LEVELS = {
    1: "the cloud: disguised data, the model, public knowledge",
    2: "plus known plain/disguised pairs",
    3: "plus the data distribution (plain images of the same kind, unpaired)",
}


@dataclass
class AttackResult:
    """One measured attack. ``figures`` holds whichever of psnr_db, ssim, block_hit_rate,
    placement_accuracy, ... apply; ``baseline`` the same figures for the attacker's trivial guess
    (the mean public image, or chance). ``samples`` (not in JSON) holds small image grids for the
    report: name -> (n, H, W, C) uint8."""

    attack: str
    level: int
    params: dict
    figures: dict
    verdict: str  # holds | partial | broken
    note: str = ""
    baseline: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = {"attack": self.attack, "level": self.level, "params": self.params, "verdict": self.verdict}
        d.update({k: _num(v) for k, v in self.figures.items()})
        if self.baseline:
            d["baseline"] = {k: _num(v) for k, v in self.baseline.items()}
        if self.note:
            d["note"] = self.note
        return d


def _num(v):
    if isinstance(v, (np.floating, float)):
        return round(float(v), 4)
    if isinstance(v, np.integer):
        return int(v)
    return v


def as_images(x: np.ndarray, params: KeyParams) -> np.ndarray:
    """(N, H, W, C) float64 view of an image batch (grey (N, H, W) gets its channel axis)."""
    x = np.asarray(x, dtype=np.float64)
    return x.reshape((-1,) + tuple(params.shape))


def clip8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def quality(truth: np.ndarray, recon: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB, capped at 100) and mean SSIM of reconstructions against the truth, both in
    0..255 pixel units, per image then averaged (scikit-image's reference implementations)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    truth = np.asarray(truth, dtype=np.float64)
    recon = np.clip(np.asarray(recon, dtype=np.float64), 0, 255)
    if truth.shape != recon.shape or truth.ndim != 4:
        raise ValueError(f"quality: shapes {truth.shape} and {recon.shape} differ or are not (N, H, W, C)")
    psnrs, ssims = [], []
    side = min(truth.shape[1:3])
    win = min(7, side if side % 2 else side - 1)
    for t, r in zip(truth, recon, strict=True):
        if np.array_equal(t, r):
            psnrs.append(100.0)
        else:
            psnrs.append(min(100.0, float(peak_signal_noise_ratio(t, r, data_range=255))))
        ssims.append(float(structural_similarity(t, r, data_range=255, channel_axis=-1, win_size=win)))
    return float(np.mean(psnrs)), float(np.mean(ssims))


def verdict_from_ssim(ssim: float, baseline_ssim: float) -> str:
    """broken: reconstructions are recognisable (SSIM >= 0.5); partial: clearly better than the
    attacker's trivial guess (+0.1 SSIM) without being recognisable; holds: no better than that guess."""
    if ssim >= 0.5:
        return "broken"
    if ssim >= baseline_ssim + 0.1:
        return "partial"
    return "holds"


def mean_image_baseline(public: np.ndarray, truth: np.ndarray) -> dict:
    """The attacker's trivial guess with no attack at all: the mean public image for every target."""
    guess = np.broadcast_to(np.asarray(public, dtype=np.float64).mean(axis=0), truth.shape)
    psnr, ssim = quality(truth, guess)
    return {"psnr_db": psnr, "ssim": ssim}


def rows_of(blocks: np.ndarray, params: KeyParams) -> np.ndarray:
    """(N, t, d) blocks -> (N * r, t, m) samples of the matrix's input: r = 1, m = d for joint keys;
    r = BH * C rows of BW pixels for shared keys (each row is multiplied by the same R)."""
    if params.channels == "joint":
        return blocks
    n, t, _ = blocks.shape
    bh, bw = params.block
    c = params.shape[2]
    return blocks.reshape(n, t, bh, bw, c).transpose(0, 2, 4, 1, 3).reshape(n * bh * c, t, bw)


def unrows(z: np.ndarray, params: KeyParams) -> np.ndarray:
    """The inverse of :func:`rows_of`."""
    if params.channels == "joint":
        return z
    bh, bw = params.block
    c = params.shape[2]
    t = z.shape[1]
    n = z.shape[0] // (bh * c)
    return z.reshape(n, bh, c, t, bw).transpose(0, 3, 1, 4, 2).reshape(n, t, bh * bw * c)
