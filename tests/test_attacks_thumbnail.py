"""The thumbnail attack (level 1): orthogonal RMT keeps each position's covariance structure, and
the top principal direction of a natural-image block is its brightness, so the disguised data alone
give a (H / B) x (W / B) thumbnail of every image. Theory says it must succeed on CIFAR-10 for any
orthogonal key and any noise that leaves the data usable; the test holds it to that."""

from __future__ import annotations

import numpy as np
import pytest

from dkit.data import decode_all, open_source
from dkit.data.decode import Policy
from dkit.engine import Disguise
from dkit.evaluate.thumbnail_attack import thumbnail_attack

from helpers import subset, test_key


@pytest.fixture(scope="module")
def cifar_images(cifar_folder, tmp_path_factory):
    src = open_source(subset(cifar_folder, tmp_path_factory.mktemp("thumb"), per_class=600))
    x = decode_all(src, Policy((32, 32, 3))).astype(np.float64)
    return np.random.default_rng(0).permutation(x)  # the listing is sorted by class


@pytest.mark.parametrize(
    "block,kw,least_ssim",
    [
        (4, {"pipeline": "perm,rmt", "noise": 25}, 0.5),  # the default key until 2026-11-23: broken
        (4, {"pipeline": "rmt", "noise": 100}, 0.5),  # noise does not stop it
        (2, {"pipeline": "perm,rmt", "noise": 25, "channels": "shared"}, 0.7),  # the papers' CIFAR key
    ],
)
def test_the_thumbnail_attack_recovers_block_means_from_disguised_cifar(cifar_images, block, kw, least_ssim):
    key = test_key(f"thumb-{block}-{sorted(kw.items())}", shape=(32, 32, 3), block=block, **kw)
    d = Disguise.from_key(key)
    cloud, targets, public = cifar_images[:5000], cifar_images[5000:5200], cifar_images[5200:]
    res = thumbnail_attack(d.apply(cloud), d.apply(targets), targets, key.params, public=public)
    f = res.figures
    assert res.level == 1 and f["thumbnail_corr"] > 0.95
    assert f["ssim"] > least_ssim and f["ssim"] > f["ssim_true_thumbnail"] - 0.05  # about a perfect thumbnail
    assert res.verdict == "broken" and res.baseline["ssim"] < 0.2


def test_the_default_key_gives_only_a_4x4_thumbnail(cifar_images):
    """The default block (auto) leaves four blocks per side: 8x8 blocks on CIFAR. The attack still
    finds the block means, but a 4x4 grey thumbnail is not a recognisable image (partial)."""
    key = test_key("thumb-8", shape=(32, 32, 3), block="auto", pipeline="perm,rmt", noise=25)
    assert key.params.block == (8, 8)
    d = Disguise.from_key(key)
    cloud, targets, public = cifar_images[:5000], cifar_images[5000:5200], cifar_images[5200:]
    res = thumbnail_attack(d.apply(cloud), d.apply(targets), targets, key.params, public=public)
    assert res.params["thumbnail"] == "4x4" and res.figures["thumbnail_corr"] > 0.95
    assert res.figures["ssim"] < 0.4 and res.verdict == "partial"


def test_no_thumbnail_without_a_dominant_direction_or_for_other_keys():
    """Pixels with no common structure (i.i.d.) have no top direction to find; projection RMT and
    AES keys are outside the attack's reach (n/a)."""
    rng = np.random.default_rng(1)
    key = test_key("thumb-iid", shape=(16, 16, 3), block=4, pipeline="rmt", noise=25)
    d = Disguise.from_key(key)
    cloud, targets = rng.uniform(0, 255, (3000, 16, 16, 3)), rng.uniform(0, 255, (200, 16, 16, 3))
    res = thumbnail_attack(d.apply(cloud), d.apply(targets), targets, key.params)
    assert res.figures["thumbnail_corr"] < 0.5
    for kw in ({"pipeline": "rmt", "rmt_kind": "projection"}, {"pipeline": "perm,aes"}):
        other = test_key(f"thumb-{sorted(kw.items())}", shape=(16, 16, 3), block=4, **kw)
        assert thumbnail_attack(cloud, cloud, targets, other.params).verdict == "n/a"
