"""The disguise engine: properties over shapes and blocks, the papers' invariants, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dkit.derive import derive
from dkit.engine import Disguise, RandomSource
from dkit.errors import InputError
from dkit.params import KeyParams
from dkit.secret import Seed

PIPELINES = [
    ("identity", {}),
    ("perm", {}),
    ("rmt", {"noise": 0}),
    ("perm,rmt", {"noise": 0}),
    ("perm,rmt", {"noise": 25}),
    ("rmt", {"channels": "shared", "noise": 10}),
    ("perm,rmt", {"rmt_kind": "projection", "noise": 0}),
    ("perm,aes", {}),
    ("aes", {"aes_keys": "shared"}),
]


def make(shape, block, pipeline, seed=None, **kw) -> Disguise:
    params = KeyParams.create(shape, block, pipeline, **kw)
    return Disguise.from_key(derive(seed or Seed.generate(), params))


@st.composite
def geometries(draw, aes=False):
    bh = draw(st.integers(1, 6))
    bw = draw(st.integers(1, 6))
    c = draw(st.sampled_from([1, 3]))
    if aes and bh * bw * c < 16:
        bh, bw = 4, 4
    gh = draw(st.integers(1, 4))
    gw = draw(st.integers(1, 4))
    n = draw(st.integers(0, 5))
    return (gh * bh, gw * bw, c), (bh, bw), n


def images(rng, n, shape):
    return rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)


@settings(max_examples=40, deadline=None)
@given(geo=geometries(), pipe=st.sampled_from(PIPELINES), seed=st.integers(0, 2**32 - 1))
@example(geo=((24, 24, 3), (6, 6), 3), pipe=PIPELINES[6], seed=1084)  # rounded 2e-4 apart in CI
def test_batched_chunked_and_unbatched_agree_and_input_is_kept(geo, pipe, seed):
    shape, block, n = geo
    pipeline, kw = pipe
    if "aes" in pipeline and block[0] * block[1] * shape[2] < 16:
        block = (shape[0], shape[1]) if shape[0] * shape[1] * shape[2] >= 16 else None
        if block is None:
            return
    d = make("x".join(map(str, shape)), "x".join(map(str, block)), pipeline, **kw)
    x = images(np.random.default_rng(seed), n, shape)
    x0 = x.copy()
    y = d.apply(x, rng=RandomSource.fixed(seed))
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.array_equal(x, x0)  # input never mutated
    # BLAS may sum in another order for another batch size: equal to float32 rounding, not bit for bit.
    # Rounding grows with the sums: a 108-value projection block gave 2e-4 once (CI, seed 1084), so
    # allow 1e-3 of a grey level, far below anything the noise or a model could tell apart.
    close = dict(rtol=1e-5, atol=1e-3)
    for i in range(n):  # one image at its global index equals its row in the batch
        yi = d.apply(x[i], rng=RandomSource.fixed(seed), start=i)
        assert yi.shape == shape
        np.testing.assert_allclose(yi, y[i], **close)
    k = n // 2  # chunked = one call
    parts = [d.apply(x[:k], rng=RandomSource.fixed(seed)), d.apply(x[k:], rng=RandomSource.fixed(seed), start=k)]
    np.testing.assert_allclose(np.concatenate(parts), y, **close)
    np.testing.assert_array_equal(d.apply(x, rng=RandomSource.fixed(seed)), y)  # deterministic given randomness


@settings(max_examples=40, deadline=None)
@given(geo=geometries(), pipe=st.sampled_from(PIPELINES), seed=st.integers(0, 2**32 - 1))
def test_fast_kernels_match_the_spec_and_torch_matches_numpy(geo, pipe, seed):
    shape, block, n = geo
    pipeline, kw = pipe
    if "aes" in pipeline:
        shape, block = (8, 8, 3), (4, 4)
    d = make("x".join(map(str, shape)), "x".join(map(str, block)), pipeline, **kw)
    x = images(np.random.default_rng(seed), n, shape)
    y = d.apply(x, rng=RandomSource.fixed(seed))
    ref = d.reference(x, d.noise_for(RandomSource.fixed(seed), 0, n))
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-3)
    xt = torch.from_numpy(x.copy())
    for backend in ("auto", "torch"):  # CPU tensors: the numpy kernels, or the torch kernels (as on CUDA)
        yt = d.apply(xt, rng=RandomSource.fixed(seed), backend=backend)
        assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float32 and yt.device == xt.device
        assert torch.equal(xt, torch.from_numpy(x))
        np.testing.assert_allclose(yt.numpy(), y, rtol=0, atol=2e-3)
    # float inputs and float16 outputs agree too
    np.testing.assert_allclose(d.apply(x.astype(np.float32), rng=RandomSource.fixed(seed)), y, rtol=0, atol=2e-3)
    y16 = d.apply(x, rng=RandomSource.fixed(seed), dtype="float16")
    assert y16.dtype == np.float16
    np.testing.assert_allclose(y16.astype(np.float32), y, rtol=2e-3, atol=0.15)


@settings(max_examples=40, deadline=None)
@given(geo=geometries(), seed=st.integers(0, 2**32 - 1))
def test_reveal_round_trips(geo, seed):
    shape, block, n = geo
    s = "x".join(map(str, shape))
    b = "x".join(map(str, block))
    x = images(np.random.default_rng(seed), n, shape)
    for pipeline, kw, tol in [
        ("perm", {}, 0),
        ("identity", {}, 0),
        ("perm,rmt", {"noise": 0}, 1e-4),
        ("rmt", {"noise": 0, "channels": "shared"}, 1e-4),
    ]:
        d = make(s, b, pipeline, **kw)
        np.testing.assert_allclose(d.reveal(d.apply(x)), x, rtol=0, atol=tol * 255)
    if shape[0] * shape[1] * shape[2] >= 16:  # aes needs 16-byte blocks: the drawn block, or the whole image
        aes_block = b if block[0] * block[1] * shape[2] >= 16 else f"{shape[0]}x{shape[1]}"
        d = make(s, aes_block, "perm,aes")
        np.testing.assert_array_equal(d.reveal(d.apply(x)), x)


def test_reveal_with_noise_is_an_unbiased_estimate():
    d = make("32x32x3", 4, "perm,rmt", noise=25)
    x = images(np.random.default_rng(0), 200, (32, 32, 3))
    err = d.reveal(d.apply(x)) - x
    assert abs(err.mean()) < 0.1  # unbiased
    assert abs(err.std() - 25 / np.sqrt(12)) < 0.2  # orthogonal R keeps the noise's RMS
    p = make("32x32x3", 4, "perm,rmt", rmt_kind="projection", noise=0)
    np.testing.assert_allclose(p.reveal(p.apply(x)), x, rtol=0, atol=0.05)


def test_empty_batches():
    for pipeline, kw in PIPELINES:
        d = make("8x8x3", 4, pipeline, **kw)
        y = d.apply(np.zeros((0, 8, 8, 3), np.uint8))
        assert y.shape == (0, 8, 8, 3)
        assert d.reveal(y).shape == (0, 8, 8, 3)
        for backend in ("auto", "torch"):
            assert d.apply(torch.zeros((0, 8, 8, 3), dtype=torch.uint8), backend=backend).shape == (0, 8, 8, 3)


def test_permutation_only_rearranges_blocks():
    d = make("32x32x3", 4, "perm")
    x = images(np.random.default_rng(1), 3, (32, 32, 3))
    y = d.apply(x)
    xb = x.reshape(3, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(3, 64, 48)
    yb = y.reshape(3, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(3, 64, 48)
    perm = d.material.perm
    assert sorted(perm.tolist()) == list(range(64)) and not np.array_equal(perm, np.arange(64))
    np.testing.assert_array_equal(yb, xb[:, perm])
    for i in range(3):  # the same multiset of blocks
        assert sorted(map(bytes, xb[i])) == sorted(map(bytes, yb[i].astype(np.uint8)))


@pytest.mark.parametrize("channels", ["joint", "shared"])
def test_orthogonal_rmt_without_noise_keeps_block_norms(channels):
    d = make("32x32x3", 4, "rmt", channels=channels, noise=0)
    x = images(np.random.default_rng(2), 4, (32, 32, 3))
    y = d.apply(x)
    xb = x.astype(np.float64).reshape(4, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(4, 64, 48)
    yb = y.astype(np.float64).reshape(4, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(4, 64, 48)
    np.testing.assert_allclose(np.linalg.norm(yb, axis=2), np.linalg.norm(xb, axis=2), rtol=1e-5)
    assert not np.allclose(yb, xb, atol=1)


def test_shared_channels_is_the_papers_per_channel_right_multiplication():
    d = make("8x8x3", 4, "rmt", channels="shared", noise=0)
    x = images(np.random.default_rng(3), 1, (8, 8, 3))[0]
    y = d.apply(x).astype(np.float64)
    r = d.material.matrices  # (t, 4, 4)
    for i in range(4):
        br, bc = divmod(i, 2)
        for ch in range(3):
            xi = x[br * 4 : (br + 1) * 4, bc * 4 : (bc + 1) * 4, ch].astype(np.float64)
            np.testing.assert_allclose(y[br * 4 : (br + 1) * 4, bc * 4 : (bc + 1) * 4, ch], xi @ r[i], atol=1e-3)


@pytest.mark.parametrize("block,keys", [("4", "per-block"), ("4", "shared"), ("7", "per-block")])
def test_aes_equal_blocks_give_equal_output_at_a_position(block, keys):
    shape = "28x28" if block == "7" else "32x32x3"
    d = make(shape, block, "aes", aes_keys=keys)
    p = d.params
    rng = np.random.default_rng(4)
    x = images(rng, 3, p.shape)
    x[1] = x[0]
    x[2, : p.block[0], : p.block[1]] = x[0, : p.block[0], : p.block[1]]  # same first block only
    y = d.apply(x)
    bh, bw = p.block
    assert np.array_equal(y[0], y[1])
    assert np.array_equal(y[2, :bh, :bw], y[0, :bh, :bw])
    assert not np.array_equal(y[2], y[0])
    assert np.all(y == np.round(y)) and y.min() >= 0 and y.max() <= 255
    # Equal plaintext at two positions: equal output only with one shared key.
    z = np.zeros((1,) + p.shape, np.uint8)
    yz = d.apply(z)
    same = np.array_equal(yz[0, :bh, :bw], yz[0, :bh, bw : 2 * bw])
    assert same == (keys == "shared")


def test_different_keys_and_randomness_differ():
    x = images(np.random.default_rng(5), 2, (32, 32, 3))
    for pipeline, kw in [("perm", {}), ("perm,rmt", {}), ("perm,aes", {})]:
        a, b = make("32x32x3", 4, pipeline, **kw), make("32x32x3", 4, pipeline, **kw)
        assert not np.array_equal(a.apply(x, rng=RandomSource.fixed(1)), b.apply(x, rng=RandomSource.fixed(1)))
    d = make("32x32x3", 4, "perm,rmt", noise=25)
    assert not np.array_equal(d.apply(x, rng=RandomSource.fixed(1)), d.apply(x, rng=RandomSource.fixed(2)))
    assert not np.array_equal(d.apply(x), d.apply(x))  # fresh CSPRNG noise by default
    y = d.apply(np.repeat(x[:1], 2, axis=0), rng=RandomSource.fixed(1))
    assert not np.array_equal(y[0], y[1])  # and fresh per image


@pytest.mark.parametrize(
    "bad,words",
    [
        (np.zeros((2, 32, 32, 1), np.uint8), "1 channels, but the key expects 3"),
        (np.zeros((2, 28, 28, 3), np.uint8), "images of 28x28x3, but the key expects 32x32x3"),
        (np.zeros((32, 32), np.uint8), "an array of shape"),
        (np.full((1, 32, 32, 3), np.nan, np.float32), "NaN"),
        (np.full((1, 32, 32, 3), 256.0, np.float32), "0..255"),
        (np.full((1, 32, 32, 3), -1, np.int16), "0..255"),
        (np.zeros((1, 32, 32, 3), bool), "dtype bool"),
        (np.zeros((1, 32, 32, 3), np.complex64), "dtype complex64"),
    ],
)
def test_bad_input_is_refused_clearly(bad, words):
    d = make("32x32x3", 4, "perm,rmt")
    with pytest.raises(InputError, match=words):
        d.apply(bad)
    if bad.dtype != np.complex64:
        for backend in ("auto", "torch"):
            with pytest.raises(InputError, match=words):
                d.apply(torch.from_numpy(bad), backend=backend)


def test_aes_needs_whole_numbers_and_dtype_option():
    d = make("32x32x3", 4, "perm,aes")
    with pytest.raises(InputError, match="whole numbers"):
        d.apply(np.full((1, 32, 32, 3), 1.5, np.float32))
    with pytest.raises(InputError, match="float32 .* or float16"):
        d.apply(np.zeros((1, 32, 32, 3), np.uint8), dtype="float64")


def test_disguise_does_not_print_or_pickle_key_material():
    import pickle

    seed = Seed.generate()
    d = make("8x8x3", 4, "perm,aes", seed=seed)
    text = repr(d) + repr(d.mechanisms) + repr(RandomSource())
    assert d.material.aes[0].hex() not in text and seed.expose().hex() not in text
    for obj in (d, d.aes, d.perm, RandomSource()):
        with pytest.raises(TypeError):
            pickle.dumps(obj)


def test_instahide_encodings():
    d = make("8x8x3", 4, "instahide", k=4, bound=0.65)
    rng = np.random.default_rng(6)
    x = images(rng, 10, (8, 8, 3))
    y = rng.integers(0, 3, size=10)
    enc, soft = d.encode(x, y, num_classes=3, encodings=2, rng=RandomSource.fixed(9))
    assert enc.shape == (20, 8, 8, 3) and soft.shape == (20, 3)
    assert np.abs(enc).max() <= 1.0 + 1e-6
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)  # inside: all k images are private
    # Reproduce encoding 3 (image 1, second encoding) from its draws: the spec, step by step.
    partners, lam, signs = d.instahide.draw(RandomSource.fixed(9), 3, 10, 8 * 8 * 3)
    assert lam.max() <= 0.65 and abs(lam.sum() - 1) < 1e-12 and set(np.unique(signs)) <= {-1.0, 1.0}
    scaled = x.astype(np.float64) / 127.5 - 1
    want = signs.reshape(8, 8, 3) * (lam[0] * scaled[1] + sum(lam[j + 1] * scaled[p] for j, p in enumerate(partners)))
    np.testing.assert_allclose(enc[3], want, atol=1e-5)
    label = np.zeros(3)
    label[y[1]] += lam[0]
    for j, p in enumerate(partners):
        label[y[p]] += lam[j + 1]
    np.testing.assert_allclose(soft[3], label, atol=1e-6)
    # Chunked encoding with the whole set as the pool equals one run.
    a, sa = d.encode(x[:4], y[:4], num_classes=3, encodings=2, pool=x, pool_labels=y, rng=RandomSource.fixed(9))
    b, sb = d.encode(
        x[4:], y[4:], num_classes=3, encodings=2, pool=x, pool_labels=y, rng=RandomSource.fixed(9), start=4
    )
    np.testing.assert_allclose(np.concatenate([a, b]), enc, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([sa, sb]), soft, atol=1e-6)
    with pytest.raises(InputError, match="not be inverted"):
        d.reveal(enc)
    with pytest.raises(InputError, match="Disguise.encode"):
        d.apply(x)


def test_instahide_cross_dataset_needs_public_images():
    d = make("8x8x3", 4, "instahide", k=3, mix="cross")
    rng = np.random.default_rng(7)
    x, public = images(rng, 5, (8, 8, 3)), images(rng, 50, (8, 8, 3))
    y = rng.integers(0, 4, size=5)
    with pytest.raises(InputError, match="public image set"):
        d.encode(x, y, num_classes=4)
    enc, soft = d.encode(x, y, num_classes=4, pool=public)
    assert enc.shape == (5, 8, 8, 3)
    # Only the private image carries a label; its weight is its coefficient.
    assert np.all((soft > 0).sum(1) == 1) and np.all(soft.max(1) < 1)


def test_instahide_masks_differ_between_runs_by_default():
    d = make("8x8x3", 4, "instahide")
    x = images(np.random.default_rng(8), 6, (8, 8, 3))
    a, _ = d.encode(x, np.zeros(6, int), num_classes=1)
    b, _ = d.encode(x, np.zeros(6, int), num_classes=1)
    assert not np.allclose(a, b)


def test_mixing_disguised_images_is_disguising_mixed_images():
    """perm and RMT are linear, which is what makes mixup valid on the cloud side (dkit train --mixup)."""
    d = make("16x16x3", 4, "perm,rmt", noise=0)
    rng = np.random.default_rng(9)
    x1, x2 = images(rng, 2, (16, 16, 3)).astype(np.float64)
    lam = 0.3
    mixed_then_disguised = d.apply(lam * x1 + (1 - lam) * x2)
    disguised_then_mixed = lam * d.apply(x1) + (1 - lam) * d.apply(x2)
    np.testing.assert_allclose(mixed_then_disguised, disguised_then_mixed, rtol=0, atol=1e-3)
    a = make("16x16x3", 4, "perm,aes")  # AES is not linear: mixup only regularises there
    assert not np.allclose(
        a.apply(np.rint(lam * x1 + (1 - lam) * x2)), lam * a.apply(x1) + (1 - lam) * a.apply(x2), atol=1
    )


# -- shared-channel RMT without the block-sized matrix -----------------------------------------

SHARED_GEOMETRIES = [  # (shape, block): square and not, grey and colour, one block row, one column
    ("8x8x3", "4"),
    ("12x8x3", "3x4"),
    ("8x12x1", "2x3"),
    ("6x10x3", "6x5"),
    ("4x4x3", "1x4"),
    ("9x2x3", "3x1"),
]


def _check_shared(d: Disguise, n: int, seed: int) -> None:
    """numpy and torch kernels against the spec (the d x d form), and the owner's inverse."""
    x = images(np.random.default_rng(seed), n, d.params.shape)
    y = d.apply(x, rng=RandomSource.fixed(seed))
    ref = d.reference(x, d.noise_for(RandomSource.fixed(seed), 0, n))
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-3)
    yt = d.apply(torch.from_numpy(x), rng=RandomSource.fixed(seed), backend="torch")
    np.testing.assert_allclose(yt.numpy(), y, rtol=0, atol=2e-3)
    if not d.noise:
        np.testing.assert_allclose(d.reveal(y), x, rtol=0, atol=0.05)


@pytest.mark.parametrize("shape,block", SHARED_GEOMETRIES)
@pytest.mark.parametrize("form", ["rows", "columns"])
def test_shared_rmt_both_kernel_forms_match_the_spec(shape, block, form, monkeypatch):
    from dkit.engine import kernels_np

    if form == "columns":  # the form used for block rows wider than KRON_MAX_SIDE values
        monkeypatch.setattr(kernels_np, "KRON_MAX_SIDE", 0)
    for kw in ({"noise": 0}, {"noise": 0, "rmt_kind": "projection"}, {"noise": 25}):
        d = make(shape, block, "perm,rmt", channels="shared", **kw)
        _check_shared(d, 5, 11)
        cols = kernels_np.LinearPlan(d.params, None, d.rmt.compact).cols
        assert cols == (form == "columns" and d.params.shape[2] > 1)  # grey keys always use R on block rows


def test_shared_rmt_wide_block_rows_use_the_column_form():
    from dkit.engine import kernels_np

    d = make("4x192x3", "2x96", "perm,rmt", channels="shared", noise=0)  # rows of 96 * 3 > KRON_MAX_SIDE values
    assert kernels_np.LinearPlan(d.params, None, d.rmt.compact).cols
    _check_shared(d, 3, 12)


def test_shared_rmt_kernels_never_build_the_block_sized_matrix(monkeypatch):
    """kron(I_BH, kron(R, I_C)) has (BH*C)^2 times the entries of R: 2.3 GB for 128x128x3 images in
    32x32 blocks. Only the plain reference (Disguise.reference, RMT.apply) may build it."""
    import tracemalloc

    from dkit.engine import mechanisms

    def refuse(*a, **k):
        raise AssertionError("the kernels built the d x d form of a shared RMT key")

    monkeypatch.setattr(mechanisms, "block_matrices", refuse)
    d = make("128x128x3", 32, "perm,rmt", channels="shared", noise=25)
    x = images(np.random.default_rng(13), 2, (128, 128, 3))
    tracemalloc.start()
    try:
        y = d.apply(x, rng=RandomSource.fixed(3))
        yt = d.apply(torch.from_numpy(x), rng=RandomSource.fixed(3), backend="torch")
        x_hat = d.reveal(y)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"
    np.testing.assert_allclose(yt.numpy(), y, rtol=0, atol=2e-3)
    assert abs((x_hat - x).mean()) < 1 and (x_hat - x).std() < 25
    # P <- P R per channel, checked on one block without any expanded matrix.
    r = d.material.matrices
    p = d.material.perm
    u = d.noise_for(RandomSource.fixed(3), 0, 2).astype(np.float64) * 25 / 65536
    j = 5
    src = p[j]
    rows, cols = divmod(j, 4)
    br, bc = divmod(int(src), 4)
    for ch in range(3):
        want = x[1, br * 32 : (br + 1) * 32, bc * 32 : (bc + 1) * 32, ch].astype(np.float64) @ r[src]
        want += u[1, rows * 32 : (rows + 1) * 32, cols * 32 : (cols + 1) * 32, ch]
        got = y[1, rows * 32 : (rows + 1) * 32, cols * 32 : (cols + 1) * 32, ch]
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)


# -- float16 output, randomness, AES plan, inverse plan ------------------------------------------


@pytest.mark.parametrize(
    "shape,block,pipeline,kw",
    [
        ("32x32x3", 4, "perm,rmt", {"noise": 25}),
        ("32x32x3", 2, "rmt", {"noise": 10, "channels": "shared"}),
        ("28x28", 7, "perm,rmt", {"noise": 100, "rmt_kind": "projection"}),
        ("16x16x3", 4, "perm", {}),
    ],
)
def test_float16_output_is_the_float32_output_rounded_once(shape, block, pipeline, kw):
    d = make(shape, block, pipeline, **kw)
    x = images(np.random.default_rng(14), 40, d.params.shape)
    y32 = d.apply(x, rng=RandomSource.fixed(4))
    y16 = d.apply(x, rng=RandomSource.fixed(4), dtype="float16")
    assert y16.dtype == np.float16
    np.testing.assert_array_equal(y16, y32.astype(np.float16))
    t16 = d.apply(torch.from_numpy(x), rng=RandomSource.fixed(4), dtype="float16", backend="torch")
    t32 = d.apply(torch.from_numpy(x), rng=RandomSource.fixed(4), backend="torch")
    assert torch.equal(t16, t32.to(torch.float16))


def test_zero_bytes_view_survives_a_concurrent_replacement(monkeypatch):
    """Another thread may store a shorter buffer in randomness._ZEROS right after this call stored
    its own; the view returned must still have the n bytes asked for. The interleaving is replayed
    deterministically: a tracer shrinks the global just after _zeros stores it."""
    import dis
    import sys

    from dkit.engine import randomness

    code = randomness._zeros.__code__
    stores = {i.offset for i in dis.get_instructions(code) if i.opname == "STORE_GLOBAL" and i.argval == "_ZEROS"}
    assert stores
    state = {"after_store": False, "fired": 0}

    def local(frame, event, arg):
        if event == "opcode":
            if state["after_store"]:
                randomness._ZEROS = bytes(1)  # the other thread's (shorter) buffer
                state["fired"] += 1
            state["after_store"] = frame.f_lasti in stores
        return local

    def tracer(frame, event, arg):
        if frame.f_code is code:
            frame.f_trace_opcodes = True
            return local
        return None

    monkeypatch.setattr(randomness, "_ZEROS", b"")
    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        view = randomness._zeros(1000)
    finally:
        sys.settrace(old)
    assert state["fired"] == 1
    assert len(view) == 1000 and not any(view)


@pytest.mark.parametrize("shape,block", [("32x32x3", "4"), ("28x28", "7"), ("12x12x3", "3x6")])
def test_shared_key_aes_is_one_call_over_all_rows_for_any_block_size(shape, block, monkeypatch):
    from dkit.engine import kernels_np
    from dkit.engine.mechanisms import aes_rows

    d = make(shape, block, "perm,aes", aes_keys="shared")
    bsize = d.params.block_size  # 48, 49 (a partial tail), 54
    rows = images(np.random.default_rng(15), 1, (37, bsize))[0]
    key = d.material.aes[0]
    whole = aes_rows(rows, key)
    np.testing.assert_array_equal(whole, np.concatenate([aes_rows(r[None], key) for r in rows]))
    np.testing.assert_array_equal(aes_rows(whole, key, decrypt=True), rows)
    calls = []

    def counting(r, k, **kw):
        calls.append(r.shape)
        return aes_rows(r, k, **kw)

    monkeypatch.setattr(kernels_np, "aes_rows", counting)
    x = images(np.random.default_rng(16), 6, d.params.shape)
    y = d.apply(x)
    assert calls == [(d.params.positions * 6, bsize)]
    np.testing.assert_array_equal(y, d.reference(x))
    np.testing.assert_array_equal(d.reveal(y), x)


def test_reveal_sets_up_its_inverse_once(monkeypatch):
    from dkit.engine import kernels_np

    made = []
    real = kernels_np.slot_matrices

    def counting(params, mats, src, dtype):
        made.append(dtype)
        return real(params, mats, src, dtype)

    monkeypatch.setattr(kernels_np, "slot_matrices", counting)
    d = make("16x16x3", 4, "perm,rmt", rmt_kind="projection", noise=0)
    x = images(np.random.default_rng(17), 3, (16, 16, 3))
    y = d.apply(x)
    for _ in range(3):
        np.testing.assert_allclose(d.reveal(y), x, rtol=0, atol=0.05)
    assert made.count(np.float64) == 1


def test_instahide_inside_pool_needs_valid_pool_labels():
    d = make("8x8x3", 4, "instahide", k=3)
    rng = np.random.default_rng(18)
    x, y = images(rng, 6, (8, 8, 3)), rng.integers(0, 3, size=6)
    with pytest.raises(InputError, match="without pool_labels"):
        d.encode(x[:3], y[:3], num_classes=3, pool=x)
    for bad, words in [
        (np.array([0, 1, 2, 3, 0, 1]), r"pool_labels must lie in 0\.\.2"),
        (np.array([0, 1, -1, 2, 0, 1]), r"pool_labels must lie in 0\.\.2"),
        (np.array([0, 1, 2]), "expected 6 labels"),
    ]:
        with pytest.raises(InputError, match=words):
            d.encode(x[:3], y[:3], num_classes=3, pool=x, pool_labels=bad)
    enc, soft = d.encode(x[:3], y[:3], num_classes=3, pool=x, pool_labels=y, rng=RandomSource.fixed(1))
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)
    enc2, none = d.encode(x[:3], None, pool=x, rng=RandomSource.fixed(1))  # no labels: none needed
    assert none is None
    np.testing.assert_array_equal(enc2, enc)


def test_torch_input_through_the_numpy_kernels():
    d = make("8x8x3", 4, "perm,rmt", noise=10)
    x = np.random.default_rng(3).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    want = d.apply(x, rng=RandomSource(b"\x07" * 32))
    # bfloat16 holds 0..255 exactly; numpy has no bfloat16, so the engine converts it.
    got = d.apply(torch.from_numpy(x).to(torch.bfloat16), rng=RandomSource(b"\x07" * 32), backend="numpy")
    assert isinstance(got, torch.Tensor) and got.device.type == "cpu"
    np.testing.assert_array_equal(got.numpy(), want)
    with pytest.raises(InputError, match="out is for numpy input"):
        d.apply(torch.from_numpy(x), out=np.empty(x.shape, np.float32))
