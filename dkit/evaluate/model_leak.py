"""The model gives the key away: read RMT's matrices and the permutation out of a block-aware model.

A ``BlockViT`` trained on disguised data has one patch embedding ``E_j`` (d x dim) per disguised
block position. Its token for block ``y_j = x_a R_j`` is ``y_j diag(1/s) E_j`` (``s``: the per-channel
standard deviations of the model's ``Normalize``), so if the network works like a plain ViT on the
plain block, ``F_j = diag(1/s) E_j = R_j^T W`` for one shared ``W``. Then:

1. relative rotations: generalised Procrustes analysis finds ``Q_j`` with ``Q_j F_j = W_bar`` for all j;
   ``Q_j = G R_j`` with one unknown orthogonal ``G``, so the aligned blocks ``(y_j - N/2) Q_j^T = x G^T``
   share a single unknown matrix (``Q_j`` is the papers' BW x BW matrix for ``channels=shared``);
2. placement (with ``perm``): the similarities of the learned position embeddings (and of the aligned
   patch embeddings) are matched to the block grid (Laplacian eigenmaps and FAQ quadratic assignment
   as starts, then pair swaps); the grid's symmetries, which a similarity graph cannot tell apart,
   are decided by step 3's fit to the statistics;
3. the last unknown ``H = G^T``: covariance alignment pooled over all positions (every position
   adds to one m x m problem, far better conditioned than one per position), then the signs, then a
   tied refinement of all moment equations (``dkit.evaluate.covariance``), using the public plain
   images and unlabelled disguised images;
4. reconstruction of the held-out targets ``x = (y - N/2) Q_j^T H^T``.

How much leaks depends on how the model was trained. A network adapted from a plaintext model with
a public W leaks the relative key outright; the attack then recovers the images (tests build such a
model). A BlockViT trained from scratch on disguised data, as ``dkit train`` does, learns its own
embedding per position: measured on MNIST (rmt 7x7 shared, dim 128, depth 6, 10 epochs, 95%
accuracy) the plain-frame embeddings ``R_a F_j`` of different positions are uncorrelated, the
alignment fits no better than random matrices and nothing of the key is read from the weights, even
with the initial weights known. The figures say which case a model is:
``embedding_fit`` is the share of the embeddings' energy explained by one shared W after alignment
(its baseline: the same for random embeddings); ``rotation_r2`` and ``psnr_db_known_frame``
measure, against the held-out plain images and without the key, how well the relative rotations
alone explain the targets once the best single frame is fitted (1, and the owner's own quality up to
the noise: the relative key fully leaked).

BlockConv and BlockResNet hold the same per-position embeddings (their stems) and are read the same
way; a BlockResNet also stores where each position goes on the grid (its arrangement, estimated from
the disguised images: ``dkit.placement``), which the attack then takes as its placement.

Convention: a model without a block-aware network inside is not attacked; the result has verdict ``"n/a"``,
no figures and a note saying why (the same convention ``covariance_attack`` uses for keys it does
not cover).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import quadratic_assignment

from ..params import KeyParams
from . import covariance as cv
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

__all__ = ["model_leak", "find_blockvit"]

GPA_ITERATIONS = 100


def find_blockvit(model):
    """(the block-aware network inside ``model``, its input Normalize or None), or (None, None).
    Block-aware: BlockViT, BlockConv and BlockResNet, which all hold one embedding ``embed_w`` per
    stored block position."""
    from ..models.nets import BlockConv, BlockResNet, BlockViT, Normalize

    vit, norm = None, None
    for mod in model.modules():
        if isinstance(mod, Normalize) and vit is None and norm is None:
            norm = mod
        if isinstance(mod, (BlockViT, BlockConv, BlockResNet)):
            vit = mod
            break
    return (vit, norm) if vit is not None else (None, None)


# -- relative rotations from the embeddings -----------------------------------------------------
def _reduce(m: np.ndarray, params: KeyParams) -> np.ndarray:
    """A d x d matrix to the m x m matrix of the key's form: itself for joint keys; for shared keys
    the sum of its (row, channel) diagonal sub-blocks, so that tr(kron(I, Q, I)^T M) = tr(Q^T reduce(M))."""
    if params.channels == "joint":
        return m
    bh, bw = params.block
    c = params.shape[2]
    return np.einsum("rpcrqc->pq", m.reshape(bh, bw, c, bh, bw, c))


def _expand(q: np.ndarray, params: KeyParams) -> np.ndarray:
    if params.channels == "joint":
        return q
    bh, _ = params.block
    c = params.shape[2]
    return np.kron(np.eye(bh), np.kron(q, np.eye(c)))


def _polar(m: np.ndarray) -> np.ndarray:
    """The orthogonal polar factor (batched over leading axes)."""
    u, _, vt = np.linalg.svd(m)
    return u @ vt


def _reduce_all(m: np.ndarray, params: KeyParams) -> np.ndarray:
    if params.channels == "joint":
        return m
    bh, bw = params.block
    c = params.shape[2]
    return np.einsum("trpcrqc->tpq", m.reshape(len(m), bh, bw, c, bh, bw, c))


def _expand_all(q: np.ndarray, params: KeyParams) -> np.ndarray:
    return q if params.channels == "joint" else np.stack([_expand(x, params) for x in q])


def align_embeddings(f: np.ndarray, params: KeyParams, iterations: int = GPA_ITERATIONS):
    """Generalised Procrustes: Q_j (t, m, m) and the template W_bar (d, dim) with expand(Q_j) F_j ~ W_bar,
    the fit 1 - sum ||expand(Q_j) F_j - W_bar||^2 / sum ||F_j||^2, and the aligned embeddings."""
    t = f.shape[0]
    m = params.matrix_side
    q = np.stack([np.eye(m)] * t)
    w = f[int(np.argmax((f**2).sum(axis=(1, 2))))].copy()
    for _ in range(iterations):
        new = _polar(_reduce_all(w[None] @ f.transpose(0, 2, 1), params))
        w = (_expand_all(new, params) @ f).mean(axis=0)
        done = np.abs(new - q).max() < 1e-8
        q = new
        if done:
            break
    aligned = _expand_all(q, params) @ f
    fit = 1.0 - float(((aligned - w) ** 2).sum() / max((f**2).sum(), 1e-300))
    return q, w, fit, aligned


def null_fit(f: np.ndarray, params: KeyParams, seed: int = 0) -> float:
    """The same fit for random embeddings of the same shapes and norms: what 'no leak' looks like."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(f.shape)
    g *= np.sqrt((f**2).sum(axis=(1, 2), keepdims=True) / (g**2).sum(axis=(1, 2), keepdims=True))
    return align_embeddings(g, params, iterations=30)[2]


# -- placement from the position embeddings ----------------------------------------------------
def _cosine(v: np.ndarray) -> np.ndarray:
    """Cosine similarities of the rows after removing their common part (zero diagonal); rows with
    (numerically) nothing of their own left give zeros, not noise."""
    v = v.reshape(len(v), -1)
    scale = max(float(np.linalg.norm(v, axis=1).max()), 1e-300)
    v = v - v.mean(axis=0)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = np.where(norms > 1e-6 * scale, v / np.maximum(norms, 1e-300), 0.0)
    s = v @ v.T
    np.fill_diagonal(s, 0.0)
    return s


def grid_symmetries(params: KeyParams) -> list[np.ndarray]:
    """The block grid's automorphisms as maps of positions: 4 (8 for a square grid)."""
    gh, gw = params.grid
    g = np.arange(gh * gw).reshape(gh, gw)
    out = [g, g[:, ::-1], g[::-1], g[::-1, ::-1]]
    if gh == gw:
        out += [g.T, g.T[:, ::-1], g.T[::-1], g.T[::-1, ::-1]]
    return [s.ravel() for s in out]


def place_from_model(similarity: np.ndarray, params: KeyParams, seed: int = 0) -> np.ndarray:
    """p[j]: the plain position of disguised position j that best matches the similarity graph to the
    grid (up to the grid's symmetries): Laplacian eigenmaps and FAQ quadratic assignment as starts,
    then pair swaps; the best objective sum_jk S_jk K(p_j, p_k) wins."""
    t = len(similarity)
    k = cv.grid_kernel(params)
    rng = np.random.default_rng(seed)
    zeros = np.zeros((t, t))
    starts = [cv.spectral_place(similarity, params)]
    for p0 in ["barycenter", None, None]:
        if p0 is None:
            p0 = np.eye(t)[rng.permutation(t)]
        res = quadratic_assignment(similarity, k, method="faq", options={"maximize": True, "P0": p0, "rng": rng})
        starts.append(np.asarray(res.col_ind))
    best, best_val = None, -np.inf
    for s in starts:
        # pair swaps: minimising sum (S - K_p)^2 is maximising sum S * K_p (the rest is constant)
        cand = cv._local_search(s, similarity, k, zeros, 0.0)
        val = float((similarity * k[np.ix_(cand, cand)]).sum())
        if val > best_val:
            best, best_val = cand, val
    return best


# -- the last unknown: one matrix for every position --------------------------------------------
def _ising_dense(h: np.ndarray, j: np.ndarray, sweeps: int = 100) -> np.ndarray:
    m = len(h)
    big = np.zeros((m + 1, m + 1))
    big[0, 1:] = big[1:, 0] = h / 2
    big[1:, 1:] = (j + j.T) / 2
    np.fill_diagonal(big, 0.0)
    v = np.linalg.eigh(big)[1][:, -1]
    x = np.concatenate([[1.0], np.where(v[1:] * (1 if v[0] >= 0 else -1) >= 0, 1.0, -1.0)])
    for _ in range(sweeps):
        changed = False
        for i in range(1, m + 1):
            new = 1.0 if big[i] @ x >= 0 else -1.0
            if new != x[i]:
                x[i], changed = new, True
        if not changed:
            break
    return x[1:]


def solve_frame(dis: cv.Moments, pub: cv.Moments, p: np.ndarray, params: KeyParams, sweeps: int = 100):
    """One orthogonal H for all positions (aligned blocks z = x H): pooled eigen-alignment, signs, tied
    refinement. Returns (H, moment loss)."""
    t = dis.t
    q = np.argsort(p)
    pairs = [(int(q[a]), int(q[b])) for a, b in cv.grid_pairs(params, 1)]
    sx, sz = pub.self_cov.mean(axis=0), dis.self_cov.mean(axis=0)
    vx = np.linalg.eigh(sx)[1][:, ::-1]
    vz = np.linalg.eigh(sz)[1][:, ::-1]
    var = float(np.mean(np.clip(pub.vals, 0, None))) + 1e-12
    # fields: the means; couplings: every position's covariance and every neighbour pair's cross-covariance
    h = var * (pub.mean[p] @ vx * (dis.mean @ vz)).sum(axis=0)
    jm = sum((vx.T @ pub.self_cov[p[j]] @ vx) * (vz.T @ dis.self_cov[j] @ vz) for j in range(t))
    for j, k in pairs:
        jm = jm + (vx.T @ pub.cov[p[j], p[k]] @ vx) * (vz.T @ dis.cov[j, k] @ vz)
    s = _ising_dense(h, jm)
    h0 = vx @ np.diag(s) @ vz.T
    r = cv.refine(np.stack([h0] * t), dis, pub, p, pairs, sweeps=sweeps, tied=True)
    return r[0], cv.moment_loss(r, dis, pub, p, pairs)


def _aligned_rows(images: np.ndarray, q: np.ndarray, params: KeyParams) -> np.ndarray:
    """(N * r, t, m): (y - N/2) in the matrix frame, each position turned by Q_j^T (all in one frame)."""
    z = rows_of(to_blocks(as_images(images, params), params) - params.noise / 2, params)
    return np.einsum("ntm,tkm->ntk", z, q)


# -- the attack ------------------------------------------------------------------------------
def model_leak(
    model,
    params: KeyParams,
    public_plain: np.ndarray,
    targets_disguised: np.ndarray,
    targets_plain: np.ndarray,
    *,
    disguised: np.ndarray | None = None,
    init=None,
) -> AttackResult:
    """Read the relative RMT matrices and the permutation out of a block-aware model (level 1).

    ``model``: the trained network (``nn.Sequential(Normalize, BlockViT)`` as dkit builds it; any
    module holding a BlockViT, BlockConv or BlockResNet); ``public_plain``: plain images of the same
    kind; ``targets_*``: the held-out pairs to reconstruct and score. ``disguised``: unlabelled disguised images for the
    statistics of the last step; without them the first half of the targets plays that part and only
    the second half is scored, so no figure comes from images the attack was fitted on.
    ``init``: the same network at initialisation, when the attacker knows it (the cloud trained the
    model; dkit seeds training with ``TrainOptions.seed``, 0 by default, recorded with the model):
    the learned updates ``E_j - E_j(0)`` and ``pos - pos(0)`` are then read instead of the weights,
    which after a short training are mostly their random initialisation.
    """
    run_params = {"public_images": int(len(public_plain))}
    vit, norm = find_blockvit(model)
    if vit is None:
        return AttackResult(
            "model-leak",
            1,
            run_params,
            {},
            "n/a",
            note=f"not a block-aware model ({type(model).__name__} holds no BlockViT, BlockConv or BlockResNet): "
            "no per-position embeddings to read",
        )
    if not params.has("rmt") or params.rmt_kind != "orthogonal":
        return AttackResult(
            "model-leak", 1, run_params, {}, "n/a", note="the attack reads orthogonal RMT matrices; the key has none"
        )
    if tuple(getattr(vit, "shape", ())) != tuple(params.shape) or tuple(vit.block) != tuple(params.block):
        return AttackResult("model-leak", 1, run_params, {}, "n/a", note="the model's geometry differs from the key's")

    tp = as_images(targets_plain, params)
    td = as_images(targets_disguised, params)
    if disguised is None:
        half = len(td) // 2
        stats_images, td, tp = td[:half], td[half:], tp[half:]
        run_params["disguised_images"] = f"{half} (the first half of the targets; the rest scored)"
    else:
        stats_images = as_images(disguised, params)
        run_params["disguised_images"] = int(len(stats_images))
    c = params.shape[2]
    # the embeddings on raw disguised values: diag(1 / s) E_j (the normalisation's shift is a bias)
    e = (vit.embeddings() if hasattr(vit, "embeddings") else vit.embed_w).detach().double().cpu().numpy()
    pos = vit.pos.detach().double().cpu().numpy()[0] if hasattr(vit, "pos") else None
    if init is not None:
        vit0, _ = find_blockvit(init)
        e0 = vit0.embeddings() if hasattr(vit0, "embeddings") else getattr(vit0, "embed_w", None)
        if vit0 is None or e0 is None or e0.shape != e.shape:
            raise ValueError("model_leak: init must be the same block-aware network at initialisation")
        e = e - e0.detach().double().cpu().numpy()
        if pos is not None:
            pos = pos - vit0.pos.detach().double().cpu().numpy()[0]
        run_params["init_known"] = True
    scale = np.ones(c) if norm is None else norm.std.detach().double().cpu().numpy().ravel()
    f = e / np.tile(scale, params.block_size // c)[None, :, None]
    q, _, fit, aligned = align_embeddings(f, params)
    fit_null = null_fit(f, params)

    noise = float(params.noise)
    pub = cv.Moments(rows_of(to_blocks(as_images(public_plain, params), params), params))
    dis = cv.Moments(_aligned_rows(stats_images, q, params), noise**2 / 12, 0.0)
    if params.has("perm"):
        if hasattr(vit, "arrangement"):  # blockresnet stores where each position goes (dkit.placement)
            p0 = vit.arrangement.detach().cpu().numpy().astype(np.int64)
            run_params["placement_from"] = "the model's stored arrangement"
        else:
            p0 = place_from_model(_cosine(aligned) + (_cosine(pos) if pos is not None else 0), params)
        # the grid symmetries look alike to the similarity graph: keep the one the statistics fit best
        cands = [sym[p0] for sym in grid_symmetries(params)]
        fits = [solve_frame(dis, pub, pc, params) for pc in cands]
        best = int(np.argmin([loss for _, loss in fits]))
        p, hmat = cands[best], fits[best][0]
    else:
        p = np.arange(params.positions)
        hmat = solve_frame(dis, pub, p, params)[0]

    tdb = to_blocks(td, params)
    tpb = to_blocks(tp, params)
    z = _aligned_rows(td, q, params)

    def rebuild(h, place):
        x = np.einsum("ntm,km->ntk", z, h)
        out = np.empty_like(x)
        out[:, place] = x
        return from_blocks(unrows(out, params), params)

    recon = rebuild(hmat, p)
    psnr, ssim = quality(tp, recon)
    figures = {"psnr_db": psnr, "ssim": ssim, "embedding_fit": fit}
    baseline = mean_image_baseline(as_images(public_plain, params), tp)
    baseline["embedding_fit"] = fit_null
    notes: list[str] = []
    # key-free scoring of what leaked: the true source of each disguised position from the held-out
    # pairs, then the single best frame fitted to the truth (an oracle for step 3 only)
    best_ssim, r2 = cv.score_placement(tdb, tp, recon, p, params, figures, baseline, notes)
    true_p = np.argmax(r2, axis=1) if r2 is not None else np.arange(params.positions)
    if r2 is not None or not params.has("perm"):
        xt = rows_of(tpb, params)[:, true_p]  # truth rows at each disguised position's true source
        h_star = _polar(np.einsum("ntk,ntm->km", xt, z))  # z ~ x H: H = polar(x^T z)
        res = ((np.einsum("ntm,km->ntk", z, h_star) - xt) ** 2).sum()
        tot = ((xt - xt.mean(axis=0)) ** 2).sum()
        figures["rotation_r2"] = float(1 - res / max(tot, 1e-300))
        figures["psnr_db_known_frame"], figures["ssim_known_frame"] = quality(tp, rebuild(h_star, true_p))
    if fit <= fit_null + 0.05:
        notes.append(
            "the aligned embeddings fit one shared W no better than random ones: little of the key leaks "
            "through the weights (the network learned its own embedding per position); what the "
            "reconstruction still shows comes from the disguised images' statistics, not from the model"
        )
    k = min(cv.SAMPLES, len(tp))
    samples = {"original": clip8(tp[:k]), "disguised": clip8(td[:k]), "reconstructed": clip8(recon[:k])}
    return AttackResult(
        "model-leak",
        1,
        run_params,
        figures,
        verdict_from_ssim(best_ssim, baseline["ssim"]),
        note="; ".join(notes),
        baseline=baseline,
        samples=samples,
    )
