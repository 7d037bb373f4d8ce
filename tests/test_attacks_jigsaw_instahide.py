"""Honesty tests of the jigsaw attack (permutation-only keys) and the Carlini-style InstaHide attack.

Each attack must clearly beat its trivial baseline on real images, must not do so on a negative
control (where nothing links what it attacks to what it is scored on), and must never touch key
material: it gets arrays and the public KeyParams only.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dkit.engine import Disguise, RandomSource
from dkit.evaluate.common import AttackResult
from dkit.evaluate.instahide_attack import best_match, instahide_attack, reconstruct, references
from dkit.evaluate.jigsaw import jigsaw

from helpers import test_key


def _images(folder: Path, per_class: int, skip: int = 0) -> np.ndarray:
    """per_class images from each class folder (after the first ``skip``), interleaved by class."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    files = [sorted(c.iterdir())[skip : skip + per_class] for c in classes]
    out = []
    for i in range(per_class):
        for fs in files:
            a = np.asarray(Image.open(fs[i]))
            out.append(a[:, :, None] if a.ndim == 2 else a)
    return np.stack(out)


# -- jigsaw ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, shape, block, sample",
    [("mnist", "28x28", 7, 200), ("cifar", "32x32x3", 4, 100)],
)
def test_jigsaw_solves_a_permutation_key_from_disguised_images(data, shape, block, sample, request):
    folder = request.getfixturevalue(f"{data}_folder")
    x = _images(folder, (sample + 60) // 10)
    key = test_key(f"jigsaw-{data}", shape=shape, block=block, pipeline="perm")
    y = Disguise.from_key(key).apply(x)
    params = key.record.params
    # the attack sees the cloud's disguised sample; scored on held-out images only
    r = jigsaw(y[:sample], y[sample:], x[sample:], params)
    assert isinstance(r, AttackResult) and r.attack == "jigsaw" and r.level == 1
    chance = 1 / params.positions
    assert r.figures["chance"] == pytest.approx(chance)
    assert r.figures["placement_accuracy"] > 5 * chance
    assert r.figures["placement_accuracy"] > 3 * r.figures["chance_with_ties"]
    assert r.figures["placement_accuracy"] >= 0.9  # measured: 1.0 on both
    assert r.verdict == "broken"
    assert r.figures["ssim"] > r.baseline["ssim"] + 0.5
    assert r.params == {"images": sample}
    assert set(r.samples) == {"original", "disguised", "reconstructed"}
    assert all(v.dtype == np.uint8 and len(v) == 8 for v in r.samples.values())


def test_jigsaw_negative_control_scores_chance(mnist_folder):
    """Solving one key's puzzle says nothing about targets disguised with another key."""
    x = _images(mnist_folder, 25)
    k1 = test_key("jigsaw-a", shape="28x28", block=7, pipeline="perm")
    k2 = test_key("jigsaw-b", shape="28x28", block=7, pipeline="perm")
    y1 = Disguise.from_key(k1).apply(x[:200])
    y2 = Disguise.from_key(k2).apply(x[200:])
    r = jigsaw(y1, y2, x[200:], k1.record.params)
    # identical blank blocks (MNIST corners) still count as placed, which chance_with_ties expects
    assert r.figures["chance_with_ties"] > r.figures["chance"]
    assert r.figures["placement_accuracy"] < 2 * r.figures["chance_with_ties"]
    assert r.verdict == "holds"


# -- InstaHide ------------------------------------------------------------------------------------
def _encode(x: np.ndarray, k: int, t: int, label: str = "instahide"):
    key = test_key(label, shape="32x32x3", block=4, pipeline="instahide", k=k)
    enc, _ = Disguise.from_key(key).encode(x, None, encodings=t, rng=RandomSource.fixed(7))
    return enc, key.record.params


def test_instahide_attack_beats_the_random_match_baseline(cifar_folder):
    x = _images(cifar_folder, 4)  # 40 private images
    enc, params = _encode(x, k=2, t=5)
    pub = _images(cifar_folder, 4, skip=100)
    r = instahide_attack(enc, 5, x, params, public=pub)
    assert r.attack == "instahide" and r.level == 1
    assert r.params == {"k": 2, "encodings_per_image": 5, "images": 40}
    base = max(r.baseline.values())
    assert r.figures["ssim"] > base + 0.2  # measured: 0.59 against 0.27
    assert r.figures["ssim"] > r.figures["encoding_ssim"] + 0.1  # better than looking at one encoding
    assert r.verdict == "broken"
    assert set(r.samples) == {"original", "encoding", "reconstructed"}
    assert all(v.dtype == np.uint8 and v.shape == (8, 32, 32, 3) for v in r.samples.values())


def test_instahide_reconstruction_does_not_need_the_row_order(cifar_folder):
    """The attack proper on rows in random order: no use of 'the T rows of one image are adjacent'."""
    x = _images(cifar_folder, 4)
    enc, params = _encode(x, k=2, t=5)
    rows = np.random.default_rng(3).permutation(len(enc))
    recs, weights = reconstruct(enc[rows], len(x), params.k, 5)
    assert recs.shape == (40, 32, 32, 3) and weights.shape == (200, 40)
    _, ssim, _ = best_match(references(x), recs * 255)
    assert ssim.mean() > 0.5


def test_instahide_negative_control_holds(cifar_folder):
    """Encodings of other images, scored against this private set: the attack must not look broken."""
    x = _images(cifar_folder, 5)
    other = _images(cifar_folder, 5, skip=50)
    enc, params = _encode(other, k=2, t=4)
    r = instahide_attack(enc, 4, x, params)
    assert r.figures["ssim"] < r.baseline["ssim"] + 0.1
    assert r.verdict == "holds"


# -- no key material ------------------------------------------------------------------------------
def test_attacks_never_read_the_key(mnist_folder, cifar_folder, monkeypatch):
    xm = _images(mnist_folder, 8)
    km = test_key("nokey-perm", shape="28x28", block=7, pipeline="perm")
    ym = Disguise.from_key(km).apply(xm)
    xc = _images(cifar_folder, 3)
    enc, ih_params = _encode(xc, k=2, t=3)
    perm_params = km.record.params
    del km

    def refuse(*a, **kw):
        raise AssertionError("an attack touched key material")

    import dkit.derive
    import dkit.engine.disguise
    from dkit.keystore.manager import Keystore

    monkeypatch.setattr(dkit.derive, "derive", refuse)
    monkeypatch.setattr(dkit.engine.disguise.Disguise, "from_key", classmethod(refuse))
    monkeypatch.setattr(dkit.engine.disguise.Disguise, "__init__", refuse)
    monkeypatch.setattr(Keystore, "load", refuse)
    with pytest.raises(AssertionError, match="key material"):
        Disguise.from_key(None)  # the trap is armed

    r1 = jigsaw(ym[:60], ym[60:], xm[60:], perm_params)
    r2 = instahide_attack(enc, 3, xc, ih_params)
    assert r1.verdict in ("holds", "partial", "broken") and r2.verdict in ("holds", "partial", "broken")
    for fn in (jigsaw, instahide_attack):
        names = set(inspect.signature(fn).parameters)
        assert not names & {"key", "material", "disguise", "seed_material", "perm", "keystore"}


def test_attacks_refuse_other_pipelines():
    x = np.zeros((4, 28, 28, 1), dtype=np.uint8)
    p = test_key("other", shape="28x28", block=7, pipeline="perm,rmt").record.params
    with pytest.raises(ValueError, match="permutation-only"):
        jigsaw(x, x, x, p)
    with pytest.raises(ValueError, match="instahide"):
        instahide_attack(x.astype(np.float32), 1, x, p)


@pytest.mark.parametrize("side", [16, 6])
def test_best_match_scores_with_the_ssim_of_quality(side):
    """The fast best-match SSIM is common.quality's SSIM (scikit-image's), maximised over the
    references and the reconstructions."""
    from dkit.evaluate.common import quality

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, side, side, 3)).astype(np.float64)
    recs = np.clip(references(x)[0][[2, 0, 1, 1]] + rng.normal(0, 40, (4, side, side, 3)), 0, 255)
    idx, ssim, which = best_match(references(x), recs)
    refs = references(x)
    for i in range(3):
        table = [[quality(refs[v, i][None], r[None])[1] for r in recs] for v in range(3)]
        assert ssim[i] == pytest.approx(np.max(table), abs=1e-9)
        assert table[which[i]][idx[i]] == pytest.approx(ssim[i], abs=1e-9)
    assert idx[0] == 1 and idx[1] in (2, 3) and idx[2] == 0  # recs 2 and 3 are both noisy copies of image 1
