"""A Carlini-style attack on InstaHide (level 1: the cloud sees only the encodings).

Carlini et al. 2020 ("An Attack on InstaHide: Is Private Learning Possible with Instance
Encoding?") break InstaHide in three steps: take |encoding| to remove the random sign mask, find
the encodings that share a private image, and solve each group for the image it shares. This is
that attack, with the learned similarity network replaced by a hand-made similarity and the
graph step done by symmetric NMF:

1. Sign removal: a = |e|. The sign mask flips pixels at random but keeps magnitudes, so
   a = |sum_j lambda_j x_j| (pixels scaled to [-1, 1]) still shows every mixed image's edges.
2. Similarity (instead of Carlini's trained network): the gradient magnitude of a, per channel,
   divided by its local (Gaussian-smoothed) level, compared by cosine. Two encodings that mix a
   common private image share its edge map.
3. Grouping: a k-nearest-neighbour graph (2kT neighbours; each image is in about kT encodings)
   factorised by symmetric NMF (Kuang, Ding & Park 2012) into N = rows / T overlapping groups:
   H[i, j] >= 0 says how strongly encoding i belongs to group j. Each encoding belongs to about k
   groups, which plain clustering cannot express. With few encodings per image the factorisation
   returns copies of one group; copies are replaced by single encodings (farthest first), so the
   output is N different guesses.
4. Solving: the image of group j is the H^3-weighted mean of the |encodings|, which favours the
   encodings where that image has the largest coefficient, contrast-stretched (1st-99th percentile
   to the full range). What comes out estimates |x|, the distance of each pixel from mid-grey: the
   sign mask leaves |x| identifiable, not x (Carlini et al. recover colour with a further learned
   step that is not done here). A joint least-squares fit of |Lambda X| to the |encodings| was
   tried and did no better than this weighted mean.

The attack sees only the encodings (in an order it shuffles itself, so it cannot use the fact that
the T rows of one image are adjacent) and the public ``KeyParams`` (k; N follows from the number
of rows and T).

Scoring uses the plain private images, sign-agnostically: each image is compared with every
reconstruction against three references, the magnitude |x / 127.5 - 1| * 255 and the image in
both polarities, x and 255 - x (averaged mixtures of mostly dark images such as MNIST digits come
out as the negative of the image rather than as its magnitude), and its best SSIM counts (SSIM as
in :func:`dkit.evaluate.common.quality`). The baseline is the same best match against as many
reconstructions made by the same weighted means over *random* groups of encodings, with the
image's own encodings removed from every group (a conservative baseline: a random group can still
hold the image as another encoding's partner); with ``public`` images also against those.
``encoding_ssim`` is what one encoding shows without any attack: each image against its own
|encodings|, averaged. Verdict: as ``verdict_from_ssim`` against the larger baseline, but never
broken or partial within 0.1 SSIM of it.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy import ndimage

from ..params import KeyParams
from .common import AttackResult, as_images, clip8, quality, verdict_from_ssim

__all__ = ["instahide_attack", "reconstruct", "references", "best_match", "sign_agnostic"]

SYMNMF_ITERATIONS = 500
NEIGHBOURS = 2.0  # graph neighbours per expected membership: each image is in about k*T encodings
WEIGHT_POWER = 3.0
MAX_ENCODINGS = 20_000
MAX_IMAGES = 1_000  # the factorisation costs about rows * N^2 per iteration
BEST_MATCH_CANDIDATES = 32  # exact SSIM against this many candidates, shortlisted by correlation
_EPS = 1e-12


def sign_agnostic(x: np.ndarray) -> np.ndarray:
    """Pixels 0..255 to the domain InstaHide leaves identifiable: |x / 127.5 - 1| * 255."""
    return np.abs(np.asarray(x, dtype=np.float64) / 127.5 - 1.0) * 255.0


# -- the attack ---------------------------------------------------------------------------------
def _features(a: np.ndarray) -> np.ndarray:
    """(M, H, W, C) magnitudes -> (M, F) unit vectors: locally normalised gradient magnitude."""
    gx = np.diff(a, axis=2)[:, :-1]
    gy = np.diff(a, axis=1)[:, :, :-1]
    g = np.hypot(gx, gy)
    g = g / (ndimage.gaussian_filter(g, sigma=(0, 3, 3, 0)) + 0.02)
    z = g.reshape(len(a), -1)
    z = z - z.mean(axis=1, keepdims=True)
    return z / (np.linalg.norm(z, axis=1, keepdims=True) + _EPS)


def _knn_affinity(z: np.ndarray, m: int, chunk: int = 1024) -> sp.csr_matrix:
    """Symmetric sparse affinity: each row's m most similar other rows, similarity clipped at 0."""
    n = len(z)
    m = max(1, min(m, n - 1))
    rows, cols, vals = [], [], []
    for r0 in range(0, n, chunk):
        s = z[r0 : r0 + chunk] @ z.T
        idx = np.arange(r0, min(n, r0 + chunk))
        s[idx - r0, idx] = -np.inf
        top = np.argpartition(-s, m - 1, axis=1)[:, :m]
        rows.append(np.repeat(idx, m))
        cols.append(top.ravel())
        vals.append(np.maximum(np.take_along_axis(s, top, axis=1).ravel(), 0.0))
    a = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    return a.maximum(a.T).tocsr()


def _symnmf(a: sp.csr_matrix, rank: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """min ||A - H H^T|| over H >= 0 by the damped multiplicative rule of Kuang, Ding & Park (2012)."""
    n = a.shape[0]
    h = rng.uniform(0.0, 1.0, (n, rank)) * np.sqrt(max(a.sum(), _EPS) / n / n / rank)
    for _ in range(iterations):
        h *= 0.5 + 0.5 * (a @ h) / (h @ (h.T @ h) + 1e-9)
    return h


def _stretch(r: np.ndarray) -> np.ndarray:
    """Each image's 1st..99th percentile to 0..1 (the attacker's calibration: no truth involved)."""
    flat = r.reshape(len(r), -1)
    lo, hi = np.percentile(flat, [1, 99], axis=1)
    out = (flat - lo[:, None]) / np.maximum(hi - lo, _EPS)[:, None]
    return np.clip(out, 0.0, 1.0).reshape(r.shape)


def _weighted_means(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(M, ...) magnitudes, (M, N) weights -> (N, ...) stretched weighted means."""
    flat = a.reshape(len(a), -1)
    means = (w.T @ flat) / (w.sum(axis=0)[:, None] + _EPS)
    return _stretch(means.reshape((w.shape[1],) + a.shape[1:]))


def _diversify(a: np.ndarray, w: np.ndarray, duplicate: float = 0.95) -> np.ndarray:
    """Replace groups that repeat another (reconstructions correlating above ``duplicate``; with few
    encodings per image the factorisation returns many copies of one group) by single encodings,
    farthest first from what is kept, so that the N reconstructions are N different guesses."""

    def unit(r):
        z = r.reshape(len(r), -1)
        z = z - z.mean(axis=1, keepdims=True)
        return z / (np.linalg.norm(z, axis=1, keepdims=True) + _EPS)

    z = unit(_weighted_means(a, w))
    kept: list[int] = []
    for j in np.argsort(-w.sum(axis=0)):  # the heaviest groups first
        if w[:, j].sum() > _EPS and (not kept or (z[kept] @ z[j]).max() < duplicate):
            kept.append(int(j))
    missing = w.shape[1] - len(kept)
    if missing == 0:
        return w
    ze = unit(a)
    closest = (ze @ z[kept].T).max(axis=1) if kept else np.full(len(a), -1.0)
    out = [w[:, kept]]
    for _ in range(missing):
        i = int(np.argmin(closest))
        one = np.zeros((len(a), 1))
        one[i] = 1.0
        out.append(one)
        closest = np.maximum(closest, ze @ ze[i])
        closest[i] = np.inf
    return np.concatenate(out, axis=1)


def reconstruct(encodings: np.ndarray, images: int, k: int, encodings_per_image: int, *, seed: int = 0):
    """The attack proper, from encodings alone. Returns (reconstructions (N, H, W, C) in 0..1, the
    estimates of |x|; weights (M, N): how strongly each encoding, in the order given, belongs to
    each reconstruction). ``images`` = N, the number of private images (rows / T, public)."""
    e = np.asarray(encodings, dtype=np.float64)
    m_rows = len(e)
    rng = np.random.default_rng(seed)
    order = rng.permutation(m_rows)  # forget the row order: rows of one image are not adjacent
    a = np.abs(e[order])
    z = _features(a)
    aff = _knn_affinity(z, int(round(NEIGHBOURS * k * encodings_per_image)))
    h = _symnmf(aff, images, SYMNMF_ITERATIONS, rng)
    w = _diversify(a, h**WEIGHT_POWER)
    recs = _weighted_means(a, w)
    weights = np.empty_like(w)
    weights[order] = w
    return recs, weights


# -- scoring ----------------------------------------------------------------------------------
def _ssim_against(t: np.ndarray, cands: np.ndarray) -> np.ndarray:
    """SSIM of one image (H, W, C) against each candidate (n, H, W, C), 0..255: the computation of
    scikit-image's structural_similarity with its defaults (uniform window, sample covariance) and
    the window of :func:`dkit.evaluate.common.quality` (7, or the largest odd side below it)."""
    side = min(t.shape[0], t.shape[1])
    win = min(7, side if side % 2 else side - 1)
    pad = (win - 1) // 2

    def filt(z):
        return ndimage.uniform_filter(z, size=(1, win, win, 1), mode="reflect")

    c1, c2, cn = (0.01 * 255) ** 2, (0.03 * 255) ** 2, win * win / (win * win - 1.0)
    t = t[None]
    mt, mc = filt(t), filt(cands)
    vt = cn * (filt(t * t) - mt * mt)
    vc = cn * (filt(cands * cands) - mc * mc)
    cov = cn * (filt(t * cands) - mt * mc)
    s = ((2 * mt * mc + c1) * (2 * cov + c2)) / ((mt**2 + mc**2 + c1) * (vt + vc + c2))
    h, w = s.shape[1:3]
    return s[:, pad : h - pad, pad : w - pad, :].mean(axis=(1, 2, 3))


def references(x: np.ndarray) -> np.ndarray:
    """The sign-agnostic references a reconstruction is scored against, (3, N, H, W, C), 0..255:
    the magnitude |x / 127.5 - 1| * 255 that the sign mask leaves, and the image in both
    polarities, x and 255 - x (averaged mixtures of mostly dark or mostly light images, MNIST
    digits for one, come out as the image or its negative rather than as the magnitude)."""
    x = np.asarray(x, dtype=np.float64)
    return np.stack([sign_agnostic(x), x, 255.0 - x])


def best_match(refs: np.ndarray, recs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each image (refs: (V, N, H, W, C), V references of each), the reconstruction with the
    highest SSIM against any of its references, among the candidates that correlate best with that
    reference (all of them when there are few). Returns (index, ssim, reference) per image."""
    refs = np.asarray(refs, dtype=np.float64)
    recs = np.asarray(recs, dtype=np.float64)
    rz = _standardise(recs)
    c = min(BEST_MATCH_CANDIDATES, len(recs))
    n = refs.shape[1]
    idx = np.zeros(n, dtype=np.int64)
    which = np.zeros(n, dtype=np.int64)
    val = np.full(n, -np.inf)
    for v, ref in enumerate(refs):
        tz = _standardise(ref)
        for i in range(n):
            corr = rz @ tz[i]
            cand = np.argpartition(-corr, c - 1)[:c] if c < len(recs) else np.arange(len(recs))
            s = _ssim_against(ref[i], recs[cand])
            j = int(np.argmax(s))
            if s[j] > val[i]:
                idx[i], val[i], which[i] = cand[j], s[j], v
    return idx, val, which


def _unrelated_best_match(refs: np.ndarray, a: np.ndarray, w: np.ndarray, t_enc: int) -> np.ndarray:
    """Best-match SSIM of each image against the weighted means of w's random groups, with the
    image's own T encodings taken out of every group (so no group is related to it by construction)."""
    flat = a.reshape(len(a), -1)
    num = w.T @ flat
    den = w.sum(axis=0)
    n = refs.shape[1]
    c = min(BEST_MATCH_CANDIDATES, w.shape[1])
    out = np.empty(n)
    for i in range(n):
        rows = slice(i * t_enc, (i + 1) * t_enc)
        wi = w[rows]
        means = (num - wi.T @ flat[rows]) / (den - wi.sum(axis=0) + _EPS)[:, None]
        # shortlist before the (per image) contrast stretch, which hardly changes correlations
        z = _standardise(means)
        cand = set()
        for ref in refs[:, i]:
            corr = z @ _standardise(ref[None])[0]
            cand.update(np.argpartition(-corr, c - 1)[:c].tolist() if c < len(corr) else range(len(corr)))
        cand = np.array(sorted(cand))
        recs = _stretch(means[cand].reshape((len(cand),) + a.shape[1:])) * 255.0
        _, s, _ = best_match(refs[:, i : i + 1], recs)
        out[i] = s[0]
    return out


def _standardise(r: np.ndarray) -> np.ndarray:
    z = np.asarray(r, dtype=np.float64).reshape(len(r), -1)
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, keepdims=True) + _EPS)


def _verdict(ssim: float, baseline: float) -> str:
    """verdict_from_ssim, except that nothing within 0.1 SSIM of the baseline counts as a break:
    unrelated MNIST digits already match each other at about 0.45."""
    return "holds" if ssim < baseline + 0.1 else verdict_from_ssim(ssim, baseline)


def instahide_attack(
    encodings, encodings_per_image: int, private_truth, params: KeyParams, *, public=None, seed: int = 0
) -> AttackResult:
    """Run the attack on the encodings of a private set and score it against the plain set.

    ``encodings``: (N*T, H, W, C) InstaHide encodings (values in [-1, 1]); ``private_truth``:
    the N plain private images (0..255) whose T encodings are rows [i*T, (i+1)*T) — that order is
    used only for scoring, the attack shuffles the rows. ``public``: optional plain public images,
    used only for an extra baseline.
    """
    if tuple(params.pipeline) != ("instahide",):
        raise ValueError(f"instahide_attack attacks instahide keys; this key's pipeline is {'+'.join(params.pipeline)}")
    t_enc = int(encodings_per_image)
    enc = np.asarray(encodings, dtype=np.float64).reshape((-1,) + tuple(params.shape))
    truth = as_images(private_truth, params)
    n = len(truth)
    if t_enc < 1 or len(enc) != n * t_enc:
        raise ValueError(f"{len(enc)} encodings do not make {t_enc} per image for {n} private images")
    if len(enc) > MAX_ENCODINGS or n > MAX_IMAGES:
        raise ValueError(
            f"{n} images with {len(enc)} encodings: the attack handles at most {MAX_IMAGES} images and "
            f"{MAX_ENCODINGS} encodings; attack a subset of the private images with all their encodings"
        )

    recs, weights = reconstruct(enc, n, params.k, t_enc, seed=seed)
    recs255 = recs * 255.0
    refs = references(truth)
    match, ssims, which = best_match(refs, recs255)
    psnr, _ = quality(refs[which, np.arange(n)], recs255[match])

    # baseline: the same weighted means over random groups of encodings (each weight column
    # shuffled over the rows), scoring each image only against groups without its own encodings
    rng = np.random.default_rng(seed + 1)
    shuffled = np.stack([rng.permutation(weights[:, j]) for j in range(weights.shape[1])], axis=1)
    base_ssims = _unrelated_best_match(refs, np.abs(enc), shuffled, t_enc)
    baseline = {"ssim": float(base_ssims.mean())}
    if public is not None:
        pub = as_images(public, params)
        pick = rng.choice(len(pub), size=min(len(pub), n), replace=False)
        _, pub_ssims, _ = best_match(refs, sign_agnostic(pub[pick]))
        baseline["public_ssim"] = float(pub_ssims.mean())

    # what one encoding shows without any attack: each image against its own |encodings|
    own = _stretch(np.abs(enc)) * 255.0
    enc_ssim = float(
        np.mean([max(_ssim_against(r[i], own[i * t_enc : (i + 1) * t_enc]).mean() for r in refs) for i in range(n)])
    )

    verdict = _verdict(float(ssims.mean()), max(baseline.values()))
    s = min(8, n)
    return AttackResult(
        attack="instahide",
        level=1,
        params={"k": params.k, "encodings_per_image": t_enc, "images": n},
        figures={"ssim": float(ssims.mean()), "psnr_db": psnr, "encoding_ssim": enc_ssim},
        verdict=verdict,
        note="sign-agnostic: best SSIM over reconstructions and over |x/127.5-1|, x, 255-x per image",
        baseline=baseline,
        samples={
            "original": clip8(truth[:s]),
            "encoding": clip8(np.abs(enc[[i * t_enc for i in range(s)]]) * 255.0),
            "reconstructed": clip8(recs255[match[:s]]),
        },
    )
