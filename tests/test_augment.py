"""Owner-side augmentation (issue 11): ``dkit disguise --augment flip,crop --copies T``."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from dkit.data import Options, disguise_source, inspect, open_source
from dkit.data.augment import shift
from dkit.engine import RandomSource
from dkit.errors import InputError
from dkit.models import TrainOptions, train

from helpers import make_folder, test_key


def _rows(path):
    with h5py.File(path, "r") as f:
        return f["images"][:], f["labels"][:], f["source_ids"][:]


def _plain(folder, tmp_path):
    key = test_key("plain8", shape="8x8x3", block="4", pipeline="identity")
    disguise_source(open_source(folder), tmp_path / "plain.h5", key, Options(workers=0))
    return _rows(tmp_path / "plain.h5")


def _variants(img):
    """Every flip and shift of one pixel (8x8 images: an eighth of the side) of ``img``."""
    for flipped in (img, img[:, ::-1]):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yield shift(flipped, dy, dx)


def test_copies_are_consecutive_and_augmented_but_copy_0(tmp_path):
    folder = make_folder(tmp_path / "src", classes=("a", "b"), per_class=12, shape=(8, 8, 3))
    plain, plain_labels, plain_ids = _plain(folder, tmp_path)
    key = test_key("plain8", shape="8x8x3", block="4", pipeline="identity")
    out = tmp_path / "aug.h5"
    opts = Options(workers=0, encodings=3, augment=("flip", "crop"))
    disguise_source(open_source(folder), out, key, opts, rng=RandomSource.fixed(1))
    x, labels, ids = _rows(out)
    assert len(x) == 3 * len(plain)
    meta = inspect(out)
    assert meta.encodings == 3 and meta.options["augment"] == "flip,crop"
    changed = 0
    for i in range(len(plain)):
        group = slice(3 * i, 3 * i + 3)
        assert (labels[group] == plain_labels[i]).all() and (ids[group] == plain_ids[i]).all()
        np.testing.assert_array_equal(x[3 * i], plain[i])  # copy 0: the image as it is
        for c in (1, 2):
            assert any(np.array_equal(x[3 * i + c], v) for v in _variants(plain[i])), (i, c)
            changed += not np.array_equal(x[3 * i + c], plain[i])
    assert changed > len(plain)  # most copies differ from the image (1 in 18 draws is the identity)
    # the draws come from the run's randomness: another run gives other copies, the same run the same
    disguise_source(open_source(folder), tmp_path / "again.h5", key, opts, rng=RandomSource.fixed(1), force=True)
    np.testing.assert_array_equal(_rows(tmp_path / "again.h5")[0], x)
    disguise_source(open_source(folder), tmp_path / "other.h5", key, opts, rng=RandomSource.fixed(2))
    assert not np.array_equal(_rows(tmp_path / "other.h5")[0], x)


def test_each_copy_has_its_own_noise(tmp_path):
    folder = make_folder(tmp_path / "src", classes=("a",), per_class=5, shape=(8, 8, 3))
    key = test_key("noisy", shape="8x8x3", block="4", pipeline="rmt", noise=20)
    out = tmp_path / "c.h5"
    disguise_source(open_source(folder), out, key, Options(workers=0, encodings=2), rng=RandomSource.fixed(5))
    x, _, _ = _rows(out)
    single = tmp_path / "one.h5"
    disguise_source(open_source(folder), single, key, Options(workers=0), rng=RandomSource.fixed(5))
    one, _, _ = _rows(single)
    diff = np.abs(x[0::2] - x[1::2])
    assert (diff > 0).mean() > 0.9 and diff.max() < 20  # the same image, noise apart (uniform on [0, 20))
    assert np.abs(x[0::2] - one).max() < 20
    np.testing.assert_array_equal(one[0], x[0])  # image 0, copy 0: the address of image 0 without copies


def test_copy_noise_is_addressed_by_image_and_copy(tmp_path):
    """Row (image p, copy c) takes the noise at address p x T + c: the second shard starts at p = 3,
    so a run that addressed rows from p (not p x T) would reuse the first shard's noise."""
    from dkit.engine import Disguise

    folder = make_folder(tmp_path / "src", classes=("a",), per_class=6, shape=(8, 8, 3))
    key = test_key("addr", shape="8x8x3", block="4", pipeline="rmt", noise=20)
    out = tmp_path / "s.h5"
    opts = Options(workers=0, encodings=2, shard=(1, 2))
    disguise_source(open_source(folder), out, key, opts, rng=RandomSource.fixed(9))
    x, _, _ = _rows(out)
    plain, _, _ = _plain(folder, tmp_path)
    dis = Disguise.from_key(key)
    assert len(x) == 6
    for r in range(6):
        p, c = 3 + r // 2, r % 2
        want = dis.reference(plain[p : p + 1], noise=dis.noise_for(RandomSource.fixed(9), p * 2 + c, 1))[0]
        np.testing.assert_allclose(x[r], want, atol=1e-3)


@pytest.mark.parametrize(
    "options,message",
    [
        (Options(workers=0, augment=("flip",)), "--augment needs --copies 2 or more"),
        (Options(workers=0, encodings=2, augment="flip,rotate"), "unknown --augment 'rotate'"),
    ],
)
def test_bad_augment_options_are_refused_before_writing(tmp_path, options, message):
    folder = make_folder(tmp_path / "src", classes=("a",), per_class=3, shape=(8, 8, 3))
    key = test_key("plain8", shape="8x8x3", block="4", pipeline="identity")
    with pytest.raises(InputError, match=message):
        disguise_source(open_source(folder), tmp_path / "x.h5", key, options)
    assert list(tmp_path.glob("x.h5*")) == []


def test_instahide_keys_take_encodings_not_augment(tmp_path):
    folder = make_folder(tmp_path / "src", classes=("a", "b"), per_class=3, shape=(8, 8, 3))
    key = test_key("ih", shape="8x8x3", block="4", pipeline="instahide", k=2)
    with pytest.raises(InputError, match="--augment applies to keys without instahide"):
        disguise_source(open_source(folder), tmp_path / "x.h5", key, Options(workers=0, encodings=2, augment="flip"))


def test_cli_copies_and_encodings_are_one_or_the_other(cli, tmp_path):
    folder = make_folder(tmp_path / "src", classes=("a",), per_class=3, shape=(8, 8, 3))
    assert cli("keygen", "k", "--shape", "8x8x3", "--block", "4", "--pipeline", "rmt").exit_code == 0
    r = cli("disguise", str(folder), str(tmp_path / "x.h5"), "--key", "k", "--copies", "2", "--encodings", "2")
    assert r.exit_code != 0 and "not both" in r.output
    r = cli("disguise", str(folder), str(tmp_path / "y.h5"), "--key", "k", "--copies", "3", "--augment", "flip,crop")
    assert r.exit_code == 0, r.output
    assert "warning" in r.output and "SECURITY.md" in r.output  # the copies' shift relation leaks RMT keys
    r = cli("disguise", str(folder), str(tmp_path / "z.h5"), "--key", "k", "--copies", "3")
    assert r.exit_code == 0 and "warning" not in r.output  # plain copies: only noise averaging, measured
    assert inspect(tmp_path / "y.h5").rows == 9
    r = cli("inspect", str(tmp_path / "y.h5"))
    assert "rows per image" in r.output and "flip,crop" in r.output


def test_training_visits_each_image_once_per_epoch(tmp_path):
    """With copies, an epoch draws one copy per image (the budget of one copy); validation uses copy 0."""
    folder = make_folder(tmp_path / "src", classes=("a", "b"), per_class=20, shape=(8, 8, 3))
    key = test_key("cp", shape="8x8x3", block="4", pipeline="rmt", noise=10)
    out = tmp_path / "c.h5"
    disguise_source(open_source(folder), out, key, Options(workers=0, encodings=4, augment=("flip", "crop")))
    steps = []
    metrics = train(
        out,
        tmp_path / "m",
        TrainOptions(arch="cnn", epochs=2, batch_size=8, arch_params={"hidden": 8}),
        progress=lambda p: steps.append(p.get("steps")),
    )
    assert metrics["train_rows"] == 4 * metrics["train_images"]
    assert metrics["train_images"] + metrics["val_rows"] == 40  # val: one row (copy 0) per image
    assert max(s for s in steps if s) == -(-metrics["train_images"] // 8)


def test_the_copies_attack_averages_views_of_the_same_image(tmp_path):
    """Without --augment every copy is a view of the same plain image: T views cut the noise by
    sqrt(T). Augmented copies repeat the plain image only on a 'no flip, no shift' draw."""
    from dkit.evaluate.copies_attack import copies_attack

    folder = make_folder(tmp_path / "src", classes=("a", "b"), per_class=40, shape=(32, 32, 3))
    key = test_key("views", shape="32x32x3", block="4", pipeline="perm,rmt", noise=20)
    plain_copies, augmented = tmp_path / "p.h5", tmp_path / "a.h5"
    disguise_source(open_source(folder), plain_copies, key, Options(workers=0, encodings=4))
    disguise_source(open_source(folder), augmented, key, Options(workers=0, encodings=4, augment=("flip", "crop")))
    res = copies_attack(plain_copies, inspect(plain_copies), key.params)
    assert res.figures["views_averaged"] == 4 and res.figures["effective_noise"] == pytest.approx(10.0)
    assert res.verdict == "partial" and res.params["images"] == 80
    from dkit.evaluate import Settings, evaluate

    ev = evaluate(plain_copies, key, open_source(folder), settings=Settings(attacks=("copies", "kpa"), pairs=(1,)))
    assert [r.attack for r in ev.results if r.attack == "copies"] == ["copies"]
    assert ev.find("copies")[0].figures["views_averaged"] == 4
    res = copies_attack(augmented, inspect(augmented), key.params)
    assert res.figures["views_averaged"] < 1.2 and res.verdict == "holds"
    assert res.params["augment"] == "flip,crop"
    single = tmp_path / "s.h5"
    disguise_source(open_source(folder), single, key, Options(workers=0))
    assert copies_attack(single, inspect(single), key.params).verdict == "n/a"
