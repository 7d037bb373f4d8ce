"""Covariance alignment and the model-leak attack: they recover what theory says they must, on
synthetic data built for it and on real MNIST, and they never touch the key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

import dkit.derive
from dkit.engine import Disguise
from dkit.evaluate.covariance import covariance_attack
from dkit.evaluate.model_leak import model_leak
from dkit.models.nets import build
from dkit.params import KeyParams

from helpers import shared_archive, test_key


def synthetic(n: int, seed: int, h: int = 16, w: int = 16) -> np.ndarray:
    """Grey images whose block statistics suit the attack: an anisotropic smooth random field
    (distinct eigenvalues), made log-normal (skewed marginals), with position-dependent brightness
    and contrast (positions that can be told apart)."""
    rng = np.random.default_rng(seed)
    z = gaussian_filter(rng.standard_normal((n, h, w)), sigma=(0, 1.0, 1.8), mode="wrap")
    z /= z.std()
    rr, cc = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    x = 30 * np.exp(0.35 * z * (0.6 + cc + 0.5 * rr) + 1.2 * rr + 0.4 * cc)
    return np.clip(x, 0, 255)[..., None]


def disguise(key, *arrays):
    d = Disguise.from_key(key)
    return [d.apply(a) for a in arrays]


# -- covariance alignment ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pipeline,channels,noise",
    [("rmt", "joint", 0), ("perm,rmt", "joint", 0), ("perm,rmt", "shared", 0), ("perm,rmt", "joint", 10)],
)
def test_covariance_alignment_recovers_an_orthogonal_key(pipeline, channels, noise):
    key = test_key("cov-synth", shape="16x16", block=4, pipeline=pipeline, channels=channels, noise=noise)
    public, private, targets = synthetic(3000, 1), synthetic(3000, 2), synthetic(48, 3)
    dis, tdis = disguise(key, private, targets)
    res = covariance_attack(dis, public, tdis, targets, key.material.params)
    assert res.attack == "covariance" and res.level == 3
    assert res.params == {"public_images": 3000, "disguised_images": 3000}
    assert res.figures["psnr_db"] > (33 if noise else 35)  # held-out images; the mean image scores ~16
    assert res.figures["ssim"] > 0.95 and res.verdict == "broken"
    assert res.baseline["psnr_db"] < 20
    if "perm" in pipeline:
        assert res.figures["placement_accuracy"] == 1.0
    assert set(res.samples) == {"original", "disguised", "reconstructed"}
    assert all(s.dtype == np.uint8 and s.shape == (8, 16, 16, 1) for s in res.samples.values())


def test_covariance_alignment_fails_without_structure_to_align():
    """White uniform images: every eigenvalue equal, no skew, no neighbours. The statistics say
    nothing about the matrices, and the attack must not do better than guessing."""
    rng = np.random.default_rng(0)
    public, private, targets = (rng.uniform(0, 255, (n, 16, 16, 1)) for n in (3000, 3000, 48))
    key = test_key("cov-white", shape="16x16", block=4, pipeline="rmt", noise=0)
    dis, tdis = disguise(key, private, targets)
    res = covariance_attack(dis, public, tdis, targets, key.material.params)
    assert res.figures["psnr_db"] < res.baseline["psnr_db"] + 1
    assert res.verdict == "holds"


@pytest.fixture(scope="module")
def mnist_images(tmp_path_factory):
    root = shared_archive("mnist-10k", tmp_path_factory.mktemp("mnist"))
    files = [f for c in sorted(p for p in root.iterdir() if p.is_dir()) for f in sorted(c.iterdir())[:150]]
    x = np.stack([np.asarray(Image.open(f).convert("L")) for f in files])[..., None]
    return x[np.random.default_rng(0).permutation(len(x))]


def test_covariance_alignment_breaks_rmt_on_mnist(mnist_images):
    """The seed setting (7x7 blocks, the papers' shared matrices) without noise: 700 public and 700
    disguised images suffice (measured ~34 dB and SSIM ~0.98 on held-out digits; mean image ~12 dB)."""
    x = mnist_images
    key = test_key("cov-mnist", shape="28x28", block=7, pipeline="rmt", channels="shared", noise=0)
    dis, tdis = disguise(key, x[:700], x[-100:])
    res = covariance_attack(dis, x[700:1400], tdis, x[-100:], key.material.params)
    assert res.figures["psnr_db"] > res.baseline["psnr_db"] + 15
    assert res.figures["ssim"] > 0.9 and res.verdict == "broken"


def test_covariance_alignment_declines_what_it_does_not_cover():
    x = synthetic(20, 0)
    proj = test_key("cov-proj", shape="16x16", block=4, pipeline="rmt", rmt_kind="projection", noise=0)
    res = covariance_attack(x, x, x, x, proj.material.params)
    assert res.verdict == "n/a" and "projection" in res.note and res.figures == {}
    perm_only = KeyParams.create("16x16", 4, "perm")
    assert covariance_attack(x, x, x, x, perm_only).verdict == "n/a"


# -- placement from the disguised data alone -------------------------------------------------------
def smooth(n: int, seed: int) -> np.ndarray:
    """Grey 16x16 images of a smooth random field cut from a larger one (``synthetic`` wraps around,
    which makes the left and right edges neighbours: a torus, not a grid)."""
    z = gaussian_filter(np.random.default_rng(seed).standard_normal((n, 32, 32)), sigma=(0, 2.0, 2.0))
    return np.clip(128 + 600 * z[:, 8:24, 8:24], 0, 255)[..., None]


@pytest.mark.parametrize("kind,channels,noise", [("orthogonal", "joint", 25), ("projection", "joint", 25)])
def test_placement_attack_recovers_the_permutation_from_disguised_images(kind, channels, noise):
    """Theory: canonical correlations between positions survive any invertible per-position map, so
    neighbours are found, and the grid from them, with no plain image and no pair."""
    from dkit.evaluate.placement_attack import placement_attack

    key = test_key(f"place-{kind}", shape="16x16", block=4, pipeline="perm,rmt", rmt_kind=kind, noise=noise)
    private, targets = smooth(3000, 2), smooth(200, 3)
    dis, tdis = disguise(key, private, targets)
    res = placement_attack(dis, tdis, targets, key.material.params)
    assert res.attack == "placement" and res.level == 1
    assert res.figures["placement_accuracy"] == 1.0 and res.baseline["placement_accuracy"] == 1 / 16
    assert res.verdict == "partial" and "adds nothing to RMT" in res.note


def test_placement_attack_finds_nothing_without_neighbour_correlation():
    from dkit.evaluate.placement_attack import placement_attack

    key = test_key("place-iid", shape="16x16", block=4, pipeline="perm,rmt", noise=25)
    rng = np.random.default_rng(0)
    private, targets = rng.uniform(0, 255, (3000, 16, 16, 1)), rng.uniform(0, 255, (200, 16, 16, 1))
    dis, tdis = disguise(key, private, targets)
    res = placement_attack(dis, tdis, targets, key.material.params)
    assert res.figures["placement_accuracy"] < 0.5 and res.verdict == "holds"
    no_perm = KeyParams.create("16x16", 4, "rmt")
    assert placement_attack(dis, tdis, targets, no_perm).verdict == "n/a"


# -- model leak -----------------------------------------------------------------------------------
def synthetic_model(key, *, seed: int = 0, std: float = 40.0):
    """A BlockViT whose embeddings are exactly what a perfect leak would give: at disguised position
    j, E_j = diag(std) R_a^T W for one shared W (a = perm[j]; std undoes the model's Normalize), and
    position embeddings that are a smooth function of the plain position a. (The test reads the key
    to build the model; the attack receives only the model.)"""
    p = key.material.params
    rng = np.random.default_rng(seed)
    dim = 32
    model = build("blockvit", p.shape, p.block, 10, [100.0], [std], dim=dim, depth=1, heads=2)
    vit = model[1]
    w = rng.standard_normal((p.block_size, dim))
    mats = Disguise.from_key(key).rmt.matrices  # d x d form (expanded for shared keys)
    perm = key.material.perm if key.material.perm is not None else np.arange(p.positions)
    gh, gw = p.grid
    rr, cc = np.divmod(np.arange(p.positions), gw)
    with torch.no_grad():
        for j in range(p.positions):
            a = perm[j]
            vit.embed_w[j] = torch.tensor(std * mats[a].T @ w, dtype=torch.float32)
            rbf = np.exp(-((rr - rr[a]) ** 2 + (cc - cc[a]) ** 2) / (2 * 1.5**2))
            vit.pos[0, j] = torch.tensor(np.pad(rbf, (0, dim - p.positions)), dtype=torch.float32)
    return model


@pytest.mark.parametrize("pipeline,channels", [("rmt", "joint"), ("perm,rmt", "joint"), ("perm,rmt", "shared")])
def test_model_leak_recovers_the_relative_rotations(pipeline, channels):
    key = test_key("leak-synth", shape="16x16", block=4, pipeline=pipeline, channels=channels, noise=0)
    model = synthetic_model(key)
    public, private, targets = synthetic(2000, 1), synthetic(2000, 2), synthetic(48, 3)
    dis, tdis = disguise(key, private, targets)
    res = model_leak(model, key.material.params, public, tdis, targets, disguised=dis)
    assert res.attack == "model-leak" and res.level == 1
    f = res.figures
    assert f["embedding_fit"] > 0.999 and res.baseline["embedding_fit"] < 0.9  # one shared W explains them
    assert f["rotation_r2"] > 0.999  # the relative rotations, scored against the truth without the key
    assert f["psnr_db"] > 33 and f["ssim"] > 0.95 and res.verdict == "broken"
    if "perm" in pipeline:
        assert f["placement_accuracy"] == 1.0


@pytest.mark.parametrize("pixels", [0, 1])
def test_model_leak_reads_a_blockresnet_and_its_arrangement(pixels):
    """A BlockResNet whose stems are a perfect leak (E_j = diag(std) R_a^T W, one W; with pixels=1
    A_j = diag(std) R_a^T and the shared map W) and whose stored arrangement is the key's
    permutation, as dkit train estimates it: the attack takes the placement from the model and
    recovers the images."""
    key = test_key("leak-resnet", shape="16x16", block=4, pipeline="perm,rmt", noise=0)
    p, std = key.material.params, 40.0
    model = build("blockresnet", p.shape, p.block, 10, [100.0], [std], pixels=pixels)
    net = model[1]
    out = p.block_size if pixels else net.embed_w.shape[2]
    w = np.random.default_rng(0).standard_normal((p.block_size, out))
    mats = Disguise.from_key(key).rmt.matrices
    with torch.no_grad():
        for j, a in enumerate(key.material.perm):
            if pixels:
                net.align[j] = torch.tensor(std * mats[a].T, dtype=torch.float32)
            else:
                net.embed_w[j] = torch.tensor(std * mats[a].T @ w, dtype=torch.float32)
        if pixels:
            net.mix.copy_(torch.tensor(w, dtype=torch.float32))
        net.arrangement.copy_(torch.from_numpy(np.array(key.material.perm)))
    public, private, targets = synthetic(2000, 1), synthetic(2000, 2), synthetic(48, 3)
    dis, tdis = disguise(key, private, targets)
    res = model_leak(model, p, public, tdis, targets, disguised=dis)
    assert res.params["placement_from"] == "the model's stored arrangement"
    assert res.figures["embedding_fit"] > 0.999 and res.figures["placement_accuracy"] == 1.0
    assert res.figures["psnr_db"] > 33 and res.verdict == "broken"


def test_model_leak_scores_only_held_out_targets_without_a_disguised_set():
    key = test_key("leak-split", shape="16x16", block=4, pipeline="rmt", noise=0)
    targets = synthetic(1200, 3)
    (tdis,) = disguise(key, targets)
    res = model_leak(synthetic_model(key), key.material.params, synthetic(2000, 1), tdis, targets)
    assert "first half of the targets" in str(res.params["disguised_images"])
    assert res.samples["original"].shape[0] == 8
    np.testing.assert_array_equal(res.samples["original"], np.clip(np.rint(targets[600:608]), 0, 255))
    assert res.figures["psnr_db"] > 30


def test_model_leak_finds_nothing_in_random_embeddings():
    """Untrained embeddings carry no key: the fit is the null fit and the attack says so."""
    key = test_key("leak-random", shape="16x16", block=4, pipeline="rmt", noise=0)
    torch.manual_seed(0)
    model = build("blockvit", (16, 16, 1), (4, 4), 10, [100.0], [40.0], dim=32, depth=1, heads=2)
    public, private, targets = synthetic(2000, 1), synthetic(2000, 2), synthetic(48, 3)
    dis, tdis = disguise(key, private, targets)
    res = model_leak(model, key.material.params, public, tdis, targets, disguised=dis)
    assert res.figures["embedding_fit"] < res.baseline["embedding_fit"] + 0.05
    assert res.figures["rotation_r2"] < 0.5
    assert "little of the key leaks" in res.note


def test_model_leak_is_not_applicable_to_other_models():
    params = KeyParams.create("16x16", 4, "rmt", noise=0)
    cnn = build("cnn", (16, 16, 1), (4, 4), 10, [0.0], [1.0])
    x = synthetic(10, 0)
    res = model_leak(cnn, params, x, x, x)
    assert res.verdict == "n/a" and "not a block-aware model" in res.note and res.figures == {}


# -- no key ---------------------------------------------------------------------------------------
def test_the_attacks_never_read_the_key(monkeypatch):
    key = test_key("no-key", shape="16x16", block=4, pipeline="perm,rmt", noise=0)
    model = synthetic_model(key)
    public, private, targets = synthetic(2000, 1), synthetic(2000, 2), synthetic(48, 3)
    dis, tdis = disguise(key, private, targets)
    params = key.material.params

    def refuse(*a, **k):
        raise AssertionError("an attack touched the key")

    monkeypatch.setattr(dkit.derive, "derive", refuse)
    monkeypatch.setattr(Disguise, "from_key", classmethod(refuse))
    monkeypatch.setattr(Disguise, "__init__", refuse)
    cov = covariance_attack(dis, public, tdis, targets, params)
    leak = model_leak(model, params, public, tdis, targets, disguised=dis)
    assert cov.verdict == "broken" and leak.verdict == "broken"
    with pytest.raises(AssertionError, match="touched the key"):
        Disguise.from_key(key)  # the trap is armed
