"""dkit evaluate: the honesty tests (where theory says an attack must succeed, it does) and the
command's promises (key checks, JSON, report, clear errors)."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

import dkit.derive
import dkit.engine.disguise
from dkit.data import Options, disguise_source, open_source
from dkit.data.decode import Policy
from dkit.data.run import decode_all
from dkit.data.sources import SubsetSource
from dkit.engine import Disguise
from dkit.errors import EXIT_USAGE, KeyMismatch
from dkit.evaluate import Settings, evaluate
from dkit.evaluate.codebook import codebook, frequency
from dkit.evaluate.kpa import kpa, noise_ceiling_db

from helpers import test_key


def sample(folder, shape, n, seed=0):
    src = open_source(folder)
    pick = np.sort(np.random.default_rng(seed).permutation(len(src))[:n])
    return decode_all(SubsetSource(src, pick), Policy(shape))[np.random.default_rng(seed + 1).permutation(n)]


@pytest.fixture(scope="module")
def cifar(cifar_folder):
    return sample(cifar_folder, (32, 32, 3), 260)


@pytest.fixture(scope="module")
def mnist(mnist_folder):
    return sample(mnist_folder, (28, 28, 1), 700)


@contextlib.contextmanager
def key_free(monkeypatch):
    """Inside, deriving or using key material fails the test: attacks get arrays and public
    parameters only."""

    def refuse(*a, **k):
        raise AssertionError("an attack touched key material")

    with monkeypatch.context() as m:
        m.setattr(dkit.derive, "derive", refuse)
        for name in ("apply", "encode", "reveal"):
            m.setattr(dkit.engine.disguise.Disguise, name, refuse)
        yield


def disguise(key, x):
    return Disguise.from_key(key).apply(x)


def test_kpa_breaks_noiseless_orthogonal_rmt_and_noise_bounds_it_as_theory_says(cifar, monkeypatch):
    """100 pairs > d = 48 unknowns per position: noiseless orthogonal RMT (with the permutation) falls
    exactly; with noise 25 the reconstruction sits at the noise's own PSNR ceiling, 31 dB."""
    figures = {}
    for noise in (0, 25):
        key = test_key("kpa", shape="32x32x3", block="4", pipeline="perm,rmt", noise=noise)
        y = disguise(key, cifar)
        with key_free(monkeypatch):
            r = kpa(cifar[:100], y[:100], y[200:], cifar[200:], key.params, public_plain=cifar[100:200])
        figures[noise] = r.figures
        assert r.level == 2 and r.params["pairs"] == 100 and r.verdict == "broken"
    assert figures[0]["psnr_db"] > 30 and figures[0]["placement_accuracy"] == 1.0
    ceiling = noise_ceiling_db(25)  # 31.0 dB
    assert figures[25]["psnr_db"] < figures[0]["psnr_db"] - 20
    assert ceiling - 3 < figures[25]["psnr_db"] < ceiling + 2  # clipping to 0..255 gains a little


def test_kpa_with_few_pairs_is_weaker(cifar):
    key = test_key("kpa", shape="32x32x3", block="4", pipeline="perm,rmt", noise=25)
    y = disguise(key, cifar)
    one = kpa(cifar[:1], y[:1], y[200:], cifar[200:], key.params, public_plain=cifar[100:200])
    many = kpa(cifar[:100], y[:100], y[200:], cifar[200:], key.params, public_plain=cifar[100:200])
    assert one.figures["psnr_db"] < many.figures["psnr_db"] - 10 and one.verdict != "broken"


def test_kpa_on_shared_channel_keys(mnist):
    """The papers' MNIST key: each pixel row is a sample, so 10 pairs already give 70 per position."""
    key = test_key("mn", shape="28x28", block="7", pipeline="rmt", noise=0, channels="shared")
    y = disguise(key, mnist)
    r = kpa(mnist[:10], y[:10], y[600:], mnist[600:], key.params)
    assert r.figures["psnr_db"] > 40


def tiled(n=120, seed=3):
    """Images tiled from a dictionary of six 4x4 blocks: every block repeats."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    grid = rng.integers(0, 6, (n, 4, 4))
    return words[grid].transpose(0, 1, 3, 2, 4, 5).reshape(n, 16, 16, 3)


@pytest.mark.parametrize("pipeline,aes", [("perm,aes", "per-block"), ("aes", "shared")])
def test_codebook_recovers_repeated_blocks(monkeypatch, pipeline, aes):
    imgs = tiled()
    key = test_key("aes", shape="16x16x3", block="4", pipeline=pipeline, aes_keys=aes)
    y = disguise(key, imgs)
    with key_free(monkeypatch):
        r = codebook(imgs[:40], y[:40], y[60:], imgs[60:], key.params, public_plain=imgs[40:60])
        few = codebook(imgs[:1], y[:1], y[60:], imgs[60:], key.params, public_plain=imgs[40:60])
        level1 = frequency(y[:60], imgs[:60], y[60:], imgs[60:], key.params)
    assert r.level == 2 and r.figures["block_hit_rate"] == 1.0 and r.figures["psnr_db"] == 100.0
    if aes == "per-block":  # one pair shows one word per position; a shared key shows all six at once
        assert few.figures["block_hit_rate"] < 0.5
    else:
        assert few.figures["block_hit_rate"] > 0.9
    assert level1.level == 1 and level1.figures["repeat_rate"] == 1.0  # every block repeats: ECB shows it


def test_codebook_finds_nothing_in_unique_blocks(cifar):
    key = test_key("aes", shape="32x32x3", block="4", pipeline="perm,aes")
    y = disguise(key, cifar)
    r = codebook(cifar[:100], y[:100], y[200:], cifar[200:], key.params, public_plain=cifar[100:200])
    assert r.figures["block_hit_rate"] < 0.01 and r.verdict == "holds"


def test_aes_on_mnist_leaks_the_background(mnist):
    key = test_key("aes", shape="28x28", block="7", pipeline="aes")
    y = disguise(key, mnist)
    r = frequency(y[:300], mnist[300:600], y[600:], mnist[600:], key.params)
    assert r.figures["block_hit_rate"] > 0.3  # the black blocks, recovered with no pair at all


def test_cli_evaluate_json_report_and_key_checks(cli, mnist_folder, tmp_path, memory_backend):
    """The papers' MNIST key end to end: disguise, train, evaluate with --json and --report."""
    from helpers import subset

    plain = subset(mnist_folder, tmp_path / "plain", per_class=60)
    assert (
        cli(
            "keygen",
            "mn",
            "--shape",
            "28x28",
            "--block",
            "7",
            "--pipeline",
            "rmt",
            "--channels",
            "shared",
            "--noise",
            "100",
        ).exit_code
        == 0
    )
    h5 = tmp_path / "mn.h5"
    assert cli("disguise", plain, h5, "--key", "mn").exit_code == 0
    assert cli("train", h5, "-o", tmp_path / "model", "--arch", "cnn", "--epochs", "1").exit_code == 0
    report = tmp_path / "report.html"
    r = cli(
        "evaluate",
        h5,
        "--key",
        "mn",
        "--plain",
        plain,
        "--model",
        tmp_path / "model",
        "--pairs",
        "1,10",
        "--targets",
        "100",
        "--epochs",
        "1",
        "--report",
        report,
        "--json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["pipeline"] == ["rmt"] and len(doc["key_id"]) == 32
    assert set(doc["visual_privacy"]) == {"visual_privacy", "examiner_accuracy", "chance"}
    assert 0 <= doc["misusability"] <= 1
    kinds = {(a["attack"], a["level"]) for a in doc["attacks"]}
    assert {("examiner", 1), ("misusability", 1), ("kpa", 2), ("covariance", 3)} <= kinds
    kpa_rows = [a for a in doc["attacks"] if a["attack"] == "kpa"]
    assert [a["params"]["pairs"] for a in kpa_rows] == [1, 10]
    assert all({"psnr_db", "ssim", "verdict"} <= set(a) for a in kpa_rows)
    page = report.read_text()
    assert page.count("<svg") >= 1 and page.count("data:image/png;base64,") >= 3 and "Level 3" in page
    from test_cli_keys import seed_forms

    seeds = [v.expose() for v in memory_backend._items.values()]
    assert seeds and not any(f in page.encode() or f in r.stdout.encode() for sd in seeds for f in seed_forms(sd))
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    # the table form
    r = cli("evaluate", h5, "--key", "mn", "--plain", plain, "--attacks", "kpa", "--pairs", "10", "--targets", "100")
    assert r.exit_code == 0 and "kpa" in r.stdout and "level 1" in r.stdout
    # another key, or another version, is refused before any attack runs
    assert cli("keys", "rotate", "mn").exit_code == 0
    r = cli("evaluate", h5, "--key", "mn", "--plain", plain)
    assert r.exit_code == 1 and "not with mn@2" in r.output
    r = cli("evaluate", h5, "--key", "mn@1", "--plain", plain, "--attacks", "nonsense")
    assert r.exit_code == EXIT_USAGE and "unknown attack" in r.output
    r = cli("evaluate", h5, "--key", "mn@1", "--plain", plain, "--pairs", "ten")
    assert r.exit_code == EXIT_USAGE


def test_library_evaluate_refuses_a_model_of_another_key(mnist_folder, tmp_path):
    from dkit.models import TrainOptions, train

    plain = open_source(mnist_folder)
    few = SubsetSource(plain, range(0, len(plain), 40))
    a = test_key("a", shape="28x28", block="7", pipeline="rmt", channels="shared", noise=100)
    b = test_key("b", shape="28x28", block="7", pipeline="rmt", channels="shared", noise=100)
    disguise_source(few, tmp_path / "a.h5", a, Options(workers=0))
    disguise_source(few, tmp_path / "b.h5", b, Options(workers=0))
    train(tmp_path / "b.h5", tmp_path / "model-b", TrainOptions(arch="cnn", epochs=1))
    with pytest.raises(KeyMismatch, match="b.h5 was disguised with key ID"):
        evaluate(tmp_path / "b.h5", a, few)
    with pytest.raises(KeyMismatch, match="not the key"):
        evaluate(tmp_path / "a.h5", a, few, model_dir=tmp_path / "model-b", settings=Settings(attacks=("kpa",)))


def test_frontier_keeps_the_settings_nothing_beats():
    from dkit.evaluate.calibrate import frontier

    pts = [
        {"utility": 0.9, "privacy": 0.1},
        {"utility": 0.8, "privacy": 0.5},
        {"utility": 0.7, "privacy": 0.4},  # beaten by the one above on both
        {"utility": 0.5, "privacy": 0.9},
    ]
    assert frontier(pts) == [0, 1, 3]


def test_cli_calibrate_writes_a_frontier(cli, mnist_folder, tmp_path):
    from helpers import subset

    plain = subset(mnist_folder, tmp_path / "plain", per_class=50)
    report = tmp_path / "frontier.html"
    r = cli(
        "calibrate",
        plain,
        "--shape",
        "28x28",
        "--pipeline",
        "rmt",
        "--channels",
        "shared",
        "--blocks",
        "7,5",
        "--noise",
        "0,100",
        "--epochs",
        "1",
        "--max-images",
        "500",
        "--report",
        report,
        "--json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [s["setting"] for s in doc["settings"]] == ["block 7, noise 0", "block 7, noise 100"]
    assert [s["setting"] for s in doc["skipped"]] == ["block 5, noise 0", "block 5, noise 100"]
    assert all("tile" in s["reason"] or "divide" in s["reason"] for s in doc["skipped"])
    noiseless, noisy = doc["settings"]
    # noise 0 falls to known pairs exactly; noise 100 leaves the reconstruction noisy
    assert noiseless["privacy"] < 0.05 and noisy["privacy"] > noiseless["privacy"]
    assert all(0 <= s["utility"] <= 1 for s in doc["settings"]) and doc["frontier"]
    page = report.read_text()
    assert "<svg" in page and "block 7, noise 100" in page and doc["recommendation"] in page.replace("&#x27;", "'")


def test_the_cloud_sample_spans_the_whole_file(tmp_path):
    """A file in listing order is sorted by class: the level-1 sample must not be one contiguous slice
    (it held two or three CIFAR classes, and the covariance attack failed on the skewed statistics)."""
    from PIL import Image

    from dkit.data import inspect
    from dkit.evaluate.runner import _cloud_sample

    for cls, value in (("a", 0), ("b", 255)):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(300):
            Image.fromarray(np.full((8, 8), value, np.uint8)).save(tmp_path / "src" / cls / f"{i:03d}.png")
    key = test_key("id", shape="8x8", block="4", pipeline="identity")
    disguise_source(open_source(tmp_path / "src"), tmp_path / "d.h5", key, Options(workers=0))
    for seed in range(5):
        x = _cloud_sample(tmp_path / "d.h5", inspect(tmp_path / "d.h5"), 100, np.random.default_rng(seed))
        assert len(x) == 100 and 20 < (x.reshape(100, -1).mean(axis=1) > 127).sum() < 80
