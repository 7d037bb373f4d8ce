"""Covariance alignment on RMT: recover the secret matrices (and the permutation) without pairs.

The attacker holds the cloud's disguised images and, separately, plain images of the same kind
(level 3; level 1 when such images are public). RMT maps block ``x`` at plain position ``a`` to
``y = x R + Delta`` at disguised position ``j`` (``a = perm[j]``), with ``Delta`` uniform on [0, N)
per pixel. For an orthogonal ``R`` the second-order statistics transform exactly:

- mean:        E[y] - N/2 = E[x] R
- covariance:  Cov(y_j) = R^T Cov(x_a) R + sigma^2 I      (sigma^2 = N^2 / 12, known)
- cross-cov:   Cov(y_j, y_k) = R_j^T Cov(x_a, x_b) R_k    (j != k: the noise does not enter)

so the eigenvectors of the two covariances align: ``R = V_x diag(s) V_y^T`` up to one sign per
eigenvector (Liu, Giannella and Kargupta 2006 break rotation perturbation this way). The attack:

1. statistics of both sets in the matrix's frame (the flattened block for ``channels=joint``; each
   channel's block rows for ``shared``, where every row is a sample of the same BW x BW matrix);
2. placement (when ``perm`` is in the pipeline): rotation-invariant features, the eigenvalue spectra
   and mean norms per position and the Frobenius norms of all cross-covariances between positions
   (the grid's "who neighbours whom", untouched by noise), matched to the plain images' by a
   quadratic assignment (FAQ and Laplacian-eigenmap starts, then pair swaps). Caveat: a grid
   symmetry such as the left-right mirror fits mirror-symmetric statistics just as well; the result
   then shows mirrored images, scored separately (``ssim_mirrored``);
3. per-position eigenbasis alignment, then the signs: an Ising problem whose fields come from the
   mean vectors and the third moments (skewness) and whose couplings come from the cross-covariances
   of neighbouring positions (the statistical form of "neighbouring blocks are smooth"), solved by a
   spectral relaxation and coordinate descent;
4. a joint refinement of all matrices on the orthogonal group (all three moment equations above,
   with the neighbours), which also settles eigenvectors whose eigenvalues nearly coincide;
5. reconstruction of the held-out targets: ``x = (y - N/2) R^T``.

The attack never sees key material; it is scored on held-out targets against their plain images.
``rmt_kind = projection`` (a general invertible R) is declared not applicable here: second-order
statistics then fix R only up to an unknown rotation of whitened coordinates.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment, quadratic_assignment

from .. import placement
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

__all__ = ["covariance_attack"]

SAMPLES = 8
MAX_DIM = 8192  # t * m above this: the full cross-covariance matrix would not fit comfortably


# -- statistics in the matrix frame (rows_of, common) -------------------------------------------
class Moments:
    """Mean (t, m), full covariance (t, t, m, m) between positions (rows paired by index), the
    eigen-decomposition of each position's covariance and the third moments in that eigenbasis."""

    def __init__(self, z: np.ndarray, noise_var: float = 0.0, noise_mean: float = 0.0):
        n, t, m = z.shape
        self.t, self.m, self.n = t, m, n
        self.mean = z.mean(axis=0) - noise_mean
        zc = (z - z.mean(axis=0)).reshape(n, t * m).astype(np.float32)
        g = (zc.T @ zc).astype(np.float64) / max(1, n - 1)
        self.cov = g.reshape(t, m, t, m).transpose(0, 2, 1, 3).copy()
        idx = np.arange(t)
        self.cov[idx, idx] -= noise_var * np.eye(m)
        self.self_cov = self.cov[idx, idx].copy()
        vals, vecs = np.linalg.eigh(self.self_cov)
        self.vals, self.vecs = vals[:, ::-1].copy(), vecs[:, :, ::-1].copy()
        # third moments of the projections: T[j, p, q] = E[u_p^2 u_q] (noise is symmetric: unchanged,
        # apart from E[u_q] * sigma^2 = 0 for centred u)
        u = np.matmul(zc.reshape(n, t, m).transpose(1, 0, 2), self.vecs.astype(np.float32))
        self.third = np.matmul((u * u).transpose(0, 2, 1), u).astype(np.float64) / max(1, n)
        # rotation-invariant summaries
        self.fro = np.sqrt((self.cov**2).sum(axis=(2, 3)))
        self.fro[idx, idx] = 0.0


# -- placement --------------------------------------------------------------------------------
def grid_pairs(params: KeyParams, reach: int = 1) -> list[tuple[int, int]]:
    """Plain position pairs (a, b), a < b, within Chebyshev distance ``reach`` on the block grid."""
    gh, gw = params.grid
    out = []
    for a in range(gh * gw):
        ra, ca = divmod(a, gw)
        for b in range(a + 1, gh * gw):
            rb, cb = divmod(b, gw)
            if max(abs(ra - rb), abs(ca - cb)) <= reach:
                out.append((a, b))
    return out


def grid_kernel(params: KeyParams) -> np.ndarray:
    return placement.grid_kernel(params.grid)


def spectral_place(similarity: np.ndarray, params: KeyParams, neighbours: int = 4) -> np.ndarray:
    return placement.spectral_place(similarity, params.grid, neighbours)


def unary_costs(dis: Moments, pub: Moments) -> np.ndarray:
    """Cost of disguised position j coming from plain position a: rotation-invariant per-position
    features (standard deviations along the sorted eigen-directions, the mean's norm)."""
    sy = np.sqrt(np.clip(dis.vals, 0, None))
    sx = np.sqrt(np.clip(pub.vals, 0, None))
    spec = ((sy[:, None, :] - sx[None, :, :]) ** 2).sum(-1)
    my = np.linalg.norm(dis.mean, axis=1)
    mx = np.linalg.norm(pub.mean, axis=1)
    return spec + (my[:, None] - mx[None, :]) ** 2


def _objective(p: np.ndarray, fy: np.ndarray, fx: np.ndarray, u: np.ndarray, alpha: float) -> float:
    return float(((fy - fx[np.ix_(p, p)]) ** 2).sum() + alpha * u[np.arange(len(p)), p].sum())


def _local_search(p: np.ndarray, fy: np.ndarray, fx: np.ndarray, u: np.ndarray, alpha: float) -> np.ndarray:
    """Best-improvement pair swaps while the objective falls. fy and fx are symmetric with zero
    diagonals; the change of the quadratic part when p[j] and p[k] swap is
    4 [(fy_j - fy_k) . (B_j - B_k) - 2 fy_jk B_jk] with B = fx[p][:, p]."""
    p = p.copy()
    t = len(p)
    for _ in range(10 * t):
        b = fx[np.ix_(p, p)]
        g = fy @ b
        dg = np.diag(g)
        quad = 4 * (dg[:, None] + dg[None, :] - g - g.T - 2 * fy * b)
        up = u[:, p]  # up[j, k] = u[j, p[k]]
        d_up = np.diag(up)
        lin = alpha * (up + up.T - d_up[:, None] - d_up[None, :])
        delta = quad + lin
        np.fill_diagonal(delta, 0.0)
        j, k = np.unravel_index(np.argmin(delta), delta.shape)
        if delta[j, k] >= -1e-12:
            break
        p[j], p[k] = p[k], p[j]
    return p


def place(dis: Moments, pub: Moments, params: KeyParams, seed: int = 0) -> np.ndarray:
    """p[j] = the plain position estimated for disguised position j."""
    fy, fx = dis.fro, pub.fro
    u = unary_costs(dis, pub)
    scale_f = max(float((fx**2).sum()), 1e-12)
    scale_u = max(float(np.median(u)) * len(u), 1e-12)
    fy, fx = fy / np.sqrt(scale_f), fx / np.sqrt(scale_f)
    u = u / scale_u
    alpha = 1.0
    t = dis.t
    starts = [linear_sum_assignment(u)[1], spectral_place(fy, params)]
    rng = np.random.default_rng(seed)
    for p0 in [starts[0], "barycenter", *[None] * 3]:
        if p0 is None:
            p0 = np.eye(t)[rng.permutation(t)]
        elif isinstance(p0, np.ndarray) and p0.ndim == 1:
            p0 = np.eye(t)[p0]
        res = quadratic_assignment(fy, fx, method="faq", options={"maximize": True, "P0": p0, "rng": rng})
        starts.append(np.asarray(res.col_ind))
    cands = [_local_search(s, fy, fx, u, alpha) for s in starts]
    scores = [_objective(c, fy, fx, u, alpha) for c in cands]
    return cands[int(np.argmin(scores))]


# -- rotations --------------------------------------------------------------------------------
def sign_fields(dis: Moments, pub: Moments, p: np.ndarray, pairs_dis, weights) -> tuple[np.ndarray, dict]:
    """Unary fields h (t, m) and couplings J[(j, k)] (m, m) of the sign problem, in eigen-coordinates:
    energy = -sum_j h_j . s_j - sum_(j,k) s_j^T J_jk s_k."""
    w_mean, w_third = weights
    t, m = dis.t, dis.m
    h = np.zeros((t, m))
    for j in range(t):
        a = p[j]
        vx, vy = pub.vecs[a], dis.vecs[j]
        h[j] += w_mean * (pub.mean[a] @ vx) * (dis.mean[j] @ vy)
        h[j] += w_third * (pub.third[a] * dis.third[j]).sum(axis=0)
    couplings = {}
    for j, k in pairs_dis:
        a, b = p[j], p[k]
        cx = pub.vecs[a].T @ pub.cov[a, b] @ pub.vecs[b]
        cy = dis.vecs[j].T @ dis.cov[j, k] @ dis.vecs[k]
        couplings[(j, k)] = cx * cy
    return h, couplings


def solve_signs(h: np.ndarray, couplings: dict, sweeps: int = 100) -> np.ndarray:
    """Maximise h.s + sum s_j^T J s_k over s in {-1, +1}: spectral start, then coordinate descent."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import eigsh

    t, m = h.shape
    size = t * m + 1
    rows, cols, vals = [np.zeros(t * m, dtype=np.int64)], [np.arange(1, size)], [h.ravel() / 2]
    grid = np.arange(m)
    for (j, k), c in couplings.items():
        rr = np.repeat(1 + j * m + grid, m)
        cc = np.tile(1 + k * m + grid, m)
        rows.append(rr)
        cols.append(cc)
        vals.append(c.ravel() / 2)
    rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    big = coo_matrix((vals, (rows, cols)), shape=(size, size)).tocsr()
    big = big + big.T
    v0 = np.concatenate([[1.0], np.sign(h.ravel()) + 0.01])
    _, vecs = eigsh(big, k=1, which="LA", v0=v0, tol=1e-6, maxiter=20 * size)
    v = vecs[:, 0]
    v = v * (1 if v[0] >= 0 else -1)
    s = np.where(v[1:] >= 0, 1.0, -1.0)
    # coordinate descent on single spins
    x = np.concatenate([[1.0], s])
    for _ in range(sweeps):
        changed = False
        for i in range(1, size):
            lo, hi = big.indptr[i], big.indptr[i + 1]
            f = big.data[lo:hi] @ x[big.indices[lo:hi]]  # no diagonal: couplings join different positions
            new = 1.0 if f >= 0 else -1.0
            if new != x[i]:
                x[i] = new
                changed = True
        if not changed:
            break
    return x[1:].reshape(t, m)


def _pair_terms(dis: Moments, pub: Moments, p: np.ndarray, pairs_dis):
    """Per disguised position: [(k, C_ab, D) ...] so that the cross terms contribute C_ab R_k D."""
    nbr: list[list[tuple[int, np.ndarray, np.ndarray]]] = [[] for _ in range(dis.t)]
    for j, k in pairs_dis:
        cx, cy = pub.cov[p[j], p[k]], dis.cov[j, k]
        nbr[j].append((k, cx, cy.T))  # from ||R_j^T C R_k - D||^2: C R_k D^T
        nbr[k].append((j, cx.T, cy))  # and for R_k: C^T R_j D
    return nbr


def moment_loss(r: np.ndarray, dis: Moments, pub: Moments, p: np.ndarray, pairs_dis) -> float:
    """The objective of :func:`refine` (smaller is a better fit of the matrices to the statistics)."""
    var = float(np.mean(np.clip(pub.vals, 0, None))) + 1e-12
    sx = pub.self_cov[p]
    loss = float(((np.transpose(r, (0, 2, 1)) @ sx @ r - dis.self_cov) ** 2).sum())
    for j, k in pairs_dis:
        loss += float(((r[j].T @ pub.cov[p[j], p[k]] @ r[k] - dis.cov[j, k]) ** 2).sum())
    loss += var * float(((np.einsum("ti,tij->tj", pub.mean[p], r) - dis.mean) ** 2).sum())
    return loss


def refine(
    r0: np.ndarray, dis: Moments, pub: Moments, p: np.ndarray, pairs_dis, sweeps: int = 60, *, tied: bool = False
) -> np.ndarray:
    """Joint least squares on all three moment equations over orthogonal R_j:

        sum_j ||R_j^T S_a R_j - S_j||^2 + sum_(j,k) ||R_j^T C_ab R_k - C_jk||^2 + v sum_j ||mu_a R_j - m_j||^2

    by block coordinate ascent: with the others fixed, each term is (after a minorisation of the
    quadratic self term) linear in R_j, so R_j is the polar factor of one m x m matrix (Procrustes).
    ``tied``: one matrix shared by every position (the model-leak attack's last unknown).
    """
    t = dis.t
    r = r0.copy()
    sx = pub.self_cov[p]
    sy = dis.self_cov
    var = float(np.mean(np.clip(pub.vals, 0, None))) + 1e-12
    lin = np.einsum("ti,tj->tij", pub.mean[p], dis.mean) * var
    nbr = _pair_terms(dis, pub, p, pairs_dis)

    def target(j):
        m = 2 * sx[j] @ r[j] @ sy[j] + lin[j]
        for k, c, dt in nbr[j]:
            m += c @ r[k] @ dt
        return m

    def polar(m):
        u, _, vt = np.linalg.svd(m)
        return u @ vt

    prev = r.copy()
    for _ in range(sweeps):
        if tied:
            r[:] = polar(sum(target(j) for j in range(t)))
        else:
            for j in range(t):
                r[j] = polar(target(j))
        if np.abs(r - prev).max() < 1e-5:
            break
        prev = r.copy()
    return r


def estimate_rotations(
    dis: Moments, pub: Moments, p: np.ndarray, params: KeyParams, *, signs: bool = True, sweeps: int = 60
) -> np.ndarray:
    """R_j (t, m, m) for each disguised position j, given its plain position p[j]: eigenbasis
    alignment, then the signs (fields from means and third moments, couplings from neighbours),
    then the joint refinement (``sweeps=0`` skips it)."""
    q = np.argsort(p)  # plain position -> disguised position
    pairs_dis = [(int(q[a]), int(q[b])) for a, b in grid_pairs(params, 1)]
    var = float(np.mean(np.clip(pub.vals, 0, None))) + 1e-12
    h, couplings = sign_fields(dis, pub, p, pairs_dis, weights=(var, 1.0 / np.sqrt(var)))
    s = solve_signs(h, couplings) if signs else np.where(h >= 0, 1.0, -1.0)
    r = np.einsum("tij,tj,tkj->tik", pub.vecs[p], s, dis.vecs)
    if sweeps:
        r = refine(r, dis, pub, p, pairs_dis, sweeps=sweeps)
    return r


def reconstruct(targets_blocks: np.ndarray, r: np.ndarray, p: np.ndarray, params: KeyParams) -> np.ndarray:
    """Plain blocks (N, t, d) from disguised blocks: x_a = (y_j - N/2) R_j^T at a = p[j]."""
    z = rows_of(targets_blocks - params.noise / 2, params)
    x = np.einsum("ntm,tkm->ntk", z, r)
    out = np.empty_like(x)
    out[:, p] = x
    return unrows(out, params)


# -- scoring (ground truth only, never the key) ------------------------------------------------
def true_sources(targets_disguised_blocks: np.ndarray, targets_plain_blocks: np.ndarray, params: KeyParams):
    """(t, t) matrix R^2[j, a]: how well disguised position j predicts plain position a linearly
    (least squares with an intercept on the held-out pairs, in the matrix's frame; 1 where the plain
    block is constant). The scorer's ground truth for the permutation: held-out plain images, never
    the key. None when there are too few targets for the regressions to mean anything."""
    y = rows_of(targets_disguised_blocks, params)
    x = rows_of(targets_plain_blocks, params)
    n, t, m = x.shape
    if n < 2 * m + 2:
        return None
    xc = x - x.mean(axis=0)
    tot = (xc**2).sum(axis=(0, 2))  # (t,)
    r2 = np.empty((t, t))
    flat = xc.reshape(n, t * m)
    for j in range(t):
        yj = y[:, j] - y[:, j].mean(axis=0)
        coef, *_ = np.linalg.lstsq(yj, flat, rcond=None)
        res = ((flat - yj @ coef) ** 2).reshape(n, t, m).sum(axis=(0, 2))
        r2[j] = np.where(tot > 1e-9 * n, 1 - res / np.maximum(tot, 1e-300), 1.0)
    return r2


def placement_accuracy(r2: np.ndarray, p: np.ndarray) -> float:
    """The fraction of disguised positions placed where they predict the plain block best (ties,
    such as two constant blocks, count as right)."""
    best = r2.max(axis=1)
    return float(np.mean(r2[np.arange(len(p)), p] >= best - 1e-3))


# -- the attack -------------------------------------------------------------------------------
def score_placement(tdb, tp, recon, p, params, figures: dict, baseline: dict, notes: list):
    """Key-free scoring of a recovered permutation ``p`` (for keys with ``perm``): the true source of
    each disguised position from the held-out pairs, placement accuracy, and the mirror check. Fills
    ``figures``/``baseline``/``notes``; returns (the SSIM the verdict uses, the true-source matrix or None)."""
    best = figures["ssim"]
    if not params.has("perm"):
        return best, None
    r2 = true_sources(tdb, to_blocks(tp, params), params)
    if r2 is not None:
        figures["placement_accuracy"] = placement_accuracy(r2, p)
        baseline["placement_accuracy"] = 1.0 / params.positions
    else:
        notes.append("too few targets to score the placement")
    psnr_m, ssim_m = quality(tp[:, :, ::-1], recon)
    figures["psnr_db_mirrored"], figures["ssim_mirrored"] = psnr_m, ssim_m
    if ssim_m > best + 0.05:
        best = ssim_m
        notes.append(
            "the reconstructions are left-right mirror images of the originals: the permutation was "
            "matched up to the grid's mirror symmetry, which the statistics of mirror-symmetric data "
            "cannot resolve; the verdict uses ssim_mirrored"
        )
    return best, r2


def _not_applicable(level: int, run_params: dict, note: str) -> AttackResult:
    return AttackResult("covariance", level, run_params, {}, "n/a", note=note)


def covariance_attack(
    disguised: np.ndarray,
    public_plain: np.ndarray,
    targets_disguised: np.ndarray,
    targets_plain: np.ndarray,
    params: KeyParams,
    *,
    level: int = 3,
) -> AttackResult:
    """Covariance alignment against an RMT key (orthogonal matrices, with or without the
    permutation and the noise), with no plain/disguised pairs.

    ``disguised``: the cloud's disguised images (N, H, W, C) (the statistics of the key's output);
    ``public_plain``: unpaired plain images of the same kind (the statistics of its input);
    ``targets_disguised``/``targets_plain``: held-out pairs, the first reconstructed, the second
    used only to score. ``level``: 3 (the data distribution is known), or 1 when images of this kind
    are public anyway.

    Figures: ``psnr_db``/``ssim`` of the reconstructed targets; with a permutation also
    ``placement_accuracy`` and ``psnr_db_mirrored``/``ssim_mirrored`` (against the left-right mirror
    of the truth: a mirrored grid fits mirror-symmetric statistics as well as the true one, and a
    mirrored reconstruction is just as recognisable, so the verdict takes the better of the two).
    Keys this attack does not cover give verdict ``"n/a"`` and a note, with no figures.
    """
    if level not in (1, 3):
        raise ValueError("covariance_attack: level is 3 (known distribution) or 1 (public images of the kind)")
    run_params = {"public_images": int(len(public_plain)), "disguised_images": int(len(disguised))}
    if not params.has("rmt"):
        return _not_applicable(level, run_params, "the key has no RMT: there are no matrices to align")
    if params.rmt_kind != "orthogonal":
        return _not_applicable(
            level,
            run_params,
            "rmt_kind=projection is not covered: second-order statistics fix a general matrix only up to "
            "an unknown rotation of whitened coordinates (this attack assumes orthogonal matrices)",
        )
    m = params.matrix_side
    if params.positions * m > MAX_DIM:
        return _not_applicable(level, run_params, f"{params.positions} positions x {m} = more than {MAX_DIM} dims")
    if len(disguised) < 2 or len(public_plain) < 2:
        return _not_applicable(level, run_params, "at least two disguised and two public images are needed")
    noise = float(params.noise)
    dis = Moments(rows_of(to_blocks(as_images(disguised, params), params), params), noise**2 / 12, noise / 2)
    pub = Moments(rows_of(to_blocks(as_images(public_plain, params), params), params))
    p = place(dis, pub, params) if params.has("perm") else np.arange(params.positions)
    r = estimate_rotations(dis, pub, p, params)

    tp = as_images(targets_plain, params)
    td = as_images(targets_disguised, params)
    tdb = to_blocks(td, params)
    recon = from_blocks(reconstruct(tdb, r, p, params), params)
    psnr, ssim = quality(tp, recon)
    figures = {"psnr_db": psnr, "ssim": ssim}
    baseline = mean_image_baseline(as_images(public_plain, params), tp)
    notes: list[str] = []
    best_ssim, _ = score_placement(tdb, tp, recon, p, params, figures, baseline, notes)
    k = min(SAMPLES, len(tp))
    samples = {"original": clip8(tp[:k]), "disguised": clip8(td[:k]), "reconstructed": clip8(recon[:k])}
    return AttackResult(
        "covariance",
        level,
        run_params,
        figures,
        verdict_from_ssim(best_ssim, baseline["ssim"]),
        note="; ".join(notes),
        baseline=baseline,
        samples=samples,
    )
