"""Where each stored block position sits on the image's grid, from data alone.

A block permutation moves blocks but keeps every image's blocks together, so two positions that
were neighbours stay strongly correlated wherever the key put them. Per-position linear maps (RMT)
do not hide this: the canonical correlations between two positions do not change under any
invertible linear map of either one, and independent noise only shrinks them a little. From the
disguised images alone, then, the neighbour graph of the positions follows, and from it the grid
(Laplacian eigenmaps), up to a symmetry of the grid (mirrors, rotations).

dkit uses this twice: ``dkit train`` places a permuted key's blocks for the block-aware models
(the cloud can do the same, so it gives nothing away that the data does not), and ``dkit evaluate``
reports it as an attack on the permutation (level 1: the disguised data alone).
"""

from __future__ import annotations

import numpy as np

MAX_FEATURES = 4096  # positions x kept components per position: the joint covariance stays small
MAX_POSITIONS = 4096  # beyond this the (t, t) graph itself is too big to place


def grid_kernel(grid: tuple[int, int]) -> np.ndarray:
    gh, gw = grid
    r, c = np.divmod(np.arange(gh * gw), gw)
    d2 = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2
    k = np.exp(-d2 / 2.0)
    np.fill_diagonal(k, 0.0)
    return k


def spectral_place(similarity: np.ndarray, grid: tuple[int, int], neighbours: int = 4) -> np.ndarray:
    """A grid placement from a similarity graph by Laplacian eigenmaps: the two smoothest non-constant
    eigenvectors of a nearest-neighbour graph's normalised Laplacian run along the grid's rows and
    columns (up to a rotation, swept here); ranks along them give the rows, then the columns.
    Returns p with p[j] the grid cell of position j."""
    t = len(similarity)
    gh, gw = grid
    if t < 3:
        return np.arange(t)
    k = grid_kernel(grid)
    w = np.zeros_like(similarity)
    nearest = np.argsort(-similarity, axis=1)[:, : min(neighbours, t - 1)]
    rows = np.repeat(np.arange(t), nearest.shape[1])
    w[rows, nearest.ravel()] = np.maximum(similarity[rows, nearest.ravel()], 1e-6)
    w = np.maximum(w, w.T)
    deg = w.sum(axis=1)
    dm = 1 / np.sqrt(np.maximum(deg, 1e-12))
    _, vecs = np.linalg.eigh(dm[:, None] * (np.diag(deg) - w) * dm[None, :])
    y = vecs[:, 1:3] * dm[:, None]
    best, best_val = np.arange(t), -np.inf
    for th in np.linspace(0, np.pi, 72, endpoint=False):
        u = y @ np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        for uu in (u, u[:, ::-1]):
            p = np.empty(t, dtype=np.int64)
            order = np.argsort(uu[:, 0], kind="stable")
            for r in range(gh):
                grp = order[r * gw : (r + 1) * gw]
                p[grp[np.argsort(uu[grp, 1], kind="stable")]] = r * gw + np.arange(gw)
            val = float((similarity * k[np.ix_(p, p)]).sum())
            if val > best_val:
                best, best_val = p, val
    return best


def canonical_similarity(blocks: np.ndarray) -> np.ndarray:
    """(t, t) sums of squared canonical correlations between block positions, from ``blocks`` of
    shape (n, t, d): each position is whitened on its own (keeping its strongest components when
    t x d is large), then the squared Frobenius norms of the cross-covariances are taken. Invariant
    to any invertible linear map of each position. The diagonal is zero."""
    n, t, d = blocks.shape
    keep = max(1, min(d, MAX_FEATURES // max(1, t)))
    z = np.empty((n, t, keep), dtype=np.float64)
    for j in range(t):
        x = blocks[:, j].astype(np.float64)
        x -= x.mean(axis=0)
        vals, vecs = np.linalg.eigh(x.T @ x / max(1, n - 1))
        vals, vecs = vals[::-1][:keep], vecs[:, ::-1][:, :keep]
        floor = max(float(vals[0]), 1e-12) * 1e-9  # a constant direction carries no correlation
        z[:, j] = (x @ vecs) / np.sqrt(np.maximum(vals, floor))
        z[:, j, vals <= floor] = 0.0
    flat = z.reshape(n, t * keep)
    g = (flat.T @ flat / max(1, n - 1)).reshape(t, keep, t, keep)
    sim = (g**2).sum(axis=(1, 3))
    np.fill_diagonal(sim, 0.0)
    return sim


def place_positions(blocks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The estimated grid cell of each stored block position of ``blocks`` (n, t, d)."""
    t = blocks.shape[1]
    if t != grid[0] * grid[1]:
        raise ValueError(f"{t} block positions do not fill a {grid[0]}x{grid[1]} grid")
    if t > MAX_POSITIONS:
        raise ValueError(f"{t} block positions: too many to place (at most {MAX_POSITIONS})")
    return spectral_place(canonical_similarity(blocks), grid)


def grid_symmetries(grid: tuple[int, int]) -> list[np.ndarray]:
    """The grid's symmetries as maps of cells (8 for a square grid, 4 otherwise)."""
    gh, gw = grid
    g = np.arange(gh * gw).reshape(gh, gw)
    out = []
    for k in range(4):
        r = np.rot90(g, k)
        for m in (r, r.T):
            if m.shape == (gh, gw):
                out.append(m.ravel())
    unique = {tuple(m) for m in out}
    return [np.array(m) for m in sorted(unique)]


def placement_accuracy(estimate: np.ndarray, truth: np.ndarray, grid: tuple[int, int]) -> float:
    """The share of positions placed right, under the grid symmetry that fits best (the data cannot
    tell an image from its mirror)."""
    return max(float(np.mean(sym[estimate] == truth)) for sym in grid_symmetries(grid))


def align_positions(blocks: np.ndarray, cells: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Per-position maps A_j (t, d, d) that bring every stored position's values into one common
    frame, from ``blocks`` (n, t, d) alone: the eigenvectors of position j's covariance, strongest
    first. An orthogonal key R_j turns the plain block's eigenvectors by R_j, so ``y_j A_j`` is
    the plain block in its own principal frame at every position, up to the sign of each component
    (and mixing where eigenvalues coincide). Signs: the first component's from the mean block (the
    brightness, positive), the others' from the correlation with the neighbouring cells' same
    component (``cells[j]``: position j's grid cell), made consistent over the whole grid at once
    (the top eigenvector of each component's signed neighbour graph). Reliable for the strong
    components; a weak one's signs can split into regions, which blockresnet's trainable maps fix."""
    n, t, d = blocks.shape
    gh, gw = grid
    mean = blocks.mean(axis=0)
    vecs = np.empty((t, d, d))
    proj = np.empty((n, t, d), dtype=np.float32)
    for j in range(t):
        x = blocks[:, j].astype(np.float64) - mean[j]
        _, v = np.linalg.eigh(x.T @ x / max(1, n - 1))
        v = v[:, ::-1]
        v[:, 0] *= 1.0 if mean[j] @ v[:, 0] >= 0 else -1.0
        vecs[j] = v
        proj[:, j] = x @ v
    at = np.empty(t, dtype=np.int64)
    at[cells] = np.arange(t)  # the position at each cell
    scale = proj.std(axis=0) + 1e-12  # (t, d)
    w = np.zeros((d, t, t))  # per component: neighbours' correlations
    for cell in range(t):
        r, c = divmod(cell, gw)
        for rr, cc in ((r + 1, c), (r, c + 1)):
            if rr < gh and cc < gw:
                a, b = at[cell], at[rr * gw + cc]
                corr = (proj[:, a] * proj[:, b]).mean(axis=0) / (scale[a] * scale[b])
                w[:, a, b] = w[:, b, a] = corr
    sign = np.ones((t, d))
    for p in range(1, d):  # sign synchronisation: the top eigenvector of the signed neighbour graph
        e = np.linalg.eigh(w[p])[1][:, -1]
        sign[:, p] = np.where(e < 0, -1.0, 1.0)
    return vecs * sign[:, None, :]
