"""``dkit disguise --engine ray`` on a local Ray cluster: the merged file equals the local run's
for the same randomness, bad input fails clearly, and the key reaches the actors without a trace
in Ray's logs."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from dkit.data import Options, disguise_source, inspect, open_source, verify
from dkit.data.ray_engine import disguise_with_ray
from dkit.engine import RandomSource
from dkit.errors import DkitError
from dkit.params import KeyParams

from helpers import subset

ray = pytest.importorskip("ray")
ROOT = bytes(range(32))


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(cifar_folder, tmp_path_factory):
    return subset(cifar_folder, tmp_path_factory.mktemp("ray-src"), per_class=15)


def rows_of(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in ("images", "labels", "source_ids") if name in f}


def test_ray_equals_local_for_the_same_noise(cluster, images, keystore, tmp_path):
    keystore.keygen("k", KeyParams.create("32x32x3"))
    key = keystore.load("k")
    local = tmp_path / "local.h5"
    disguise_source(open_source(images), local, key, Options(workers=0), rng=RandomSource(ROOT))
    out = tmp_path / "ray.h5"
    doc = disguise_with_ray(str(images), out, key, Options(), seed=keystore.seed(key), workers=2, rng_root=ROOT)
    assert doc["rows"] == 150 and doc["shards"] == 2
    a, b = rows_of(local), rows_of(out)
    assert set(a) == set(b) and "images" in a
    for name in ("labels", "source_ids"):
        assert np.array_equal(a[name], b[name]), name
    # the same noise per image; BLAS may round differently for other batch sizes (as in local shards)
    np.testing.assert_allclose(a["images"], b["images"], rtol=1e-5, atol=1e-3)  # float32 matmul order
    ma, mb = inspect(local), inspect(out)
    assert (mb.key_id, mb.rows, mb.class_names, mb.params) == (ma.key_id, ma.rows, ma.class_names, ma.params)
    assert verify(out)["ok"]
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "dkit-home")
    assert left == ["local.h5", "ray.h5"]  # no shard left behind
    # fresh randomness (no root given) gives other noise: the test above is not comparing zeros
    other = tmp_path / "other.h5"
    disguise_with_ray(str(images), other, key, Options(), seed=keystore.seed(key), workers=2)
    assert np.abs(rows_of(other)["images"] - b["images"]).mean() > 1.0
    # the seed never shows in Ray's logs
    seed = keystore.seed(key).expose()
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for f in logs.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            found = seed in data or seed.hex().encode() in data  # never the seed itself in an assertion
            assert not found, f


def test_cli_engine_ray_and_its_errors(cluster, images, cli, tmp_path):
    assert cli("keygen", "k", "--shape", "32x32x3").exit_code == 0
    out = tmp_path / "out.h5"
    r = cli("disguise", images, out, "--key", "k", "--engine", "ray", "--workers", "2", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["rows"] == 150 and doc["engine"] == "ray" and doc["shards"] == 2
    assert cli("verify", out).exit_code == 0
    for args, code, words in [
        (["--engine", "spark"], 2, "spark"),
        (["--engine", "ray", "--resume"], 1, "--resume is not available with --engine ray"),
        (["--engine", "ray", "--shard", "0/2"], 1, "--shard is not available with --engine ray"),
        (["--address", "127.0.0.1:6379"], 1, "--address goes with --engine ray"),
    ]:
        r = cli("disguise", images, tmp_path / "bad.h5", "--key", "k", *args)
        assert r.exit_code == code and words in r.output, (args, r.output)
        assert not (tmp_path / "bad.h5").exists()
    r = cli("disguise", images, out, "--key", "k", "--engine", "ray")
    assert r.exit_code == 1 and "exists" in r.stderr


def test_a_bad_image_in_an_actor_names_the_file(cluster, images, keystore, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(images, src)
    victim = sorted((src / sorted(p.name for p in src.iterdir())[-1]).iterdir())[-1]
    victim.write_bytes(b"not an image at all")
    keystore.keygen("k", KeyParams.create("32x32x3"))
    key = keystore.load("k")
    out = tmp_path / "out.h5"
    with pytest.raises(DkitError) as e:
        disguise_with_ray(str(src), out, key, Options(), seed=keystore.seed(key), workers=2)
    assert victim.name in str(e.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name != "dkit-home") == ["src"]
    # a seed from another key is refused before anything runs
    keystore.keygen("q", KeyParams.create("32x32x3"))
    with pytest.raises(DkitError, match="not the seed of k@1"):
        disguise_with_ray(str(images), out, key, Options(), seed=keystore.seed(keystore.load("q")), workers=2)
