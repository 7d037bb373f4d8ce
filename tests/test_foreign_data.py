"""A dataset from elsewhere cannot make dkit read local files: external links, external raw storage
and virtual datasets are refused, except a dkit merge --virtual file whose sources are shards of the
same run in its folder; verify checks those shards' checksums too (issue 14)."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from dkit.data import Options, disguise_source, inspect, merge, open_source, verify
from dkit.data.h5format import IMAGES_ATTRS
from dkit.engine import RandomSource
from dkit.errors import DkitError, FormatError, InputError
from dkit.models import TrainOptions, train

from helpers import make_folder, test_key

KEY = test_key("foreign", shape="8x8x3", block="4", pipeline="perm,rmt", noise=10)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    work = tmp_path_factory.mktemp("foreign")
    src = open_source(make_folder(work / "src", classes=("a", "b", "c"), per_class=6))
    disguise_source(src, work / "good.h5", KEY, Options(workers=0))
    (work / "shards").mkdir()
    for i in range(2):
        disguise_source(
            src, work / "shards" / f"s{i}.h5", KEY, Options(workers=0, shard=(i, 2)), rng=RandomSource.fixed(1)
        )
    secret = work / "secret.txt"
    secret.write_bytes(bytes(range(256)) * 64)  # a local file an attacker wants to read
    return work


def crafted(made, tmp_path, edit):
    path = tmp_path / "crafted.h5"
    shutil.copy(made / "good.h5", path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def refused_everywhere(path, tmp_path, words):
    for run in (inspect, verify, lambda p: train(p, tmp_path / "model", TrainOptions(arch="cnn", epochs=1))):
        with pytest.raises(FormatError, match=words):
            run(path)


def _replace_images(f, **create):
    shape, dtype = f["images"].shape, f["images"].dtype
    del f["images"]
    ds = f.create_dataset("images", shape=shape, dtype=dtype, **create)
    ds.attrs["encoding_type"] = np.bytes_(IMAGES_ATTRS["encoding_type"].encode())
    ds.attrs["encoding_version"] = IMAGES_ATTRS["encoding_version"]


def test_an_external_link_is_refused(made, tmp_path):
    path = crafted(
        made, tmp_path, lambda f: f.__setitem__("extra", h5py.ExternalLink(str(made / "good.h5"), "/images"))
    )
    refused_everywhere(path, tmp_path, "external link")


def test_external_raw_storage_is_refused(made, tmp_path):
    path = crafted(
        made, tmp_path, lambda f: _replace_images(f, external=[(str(made / "secret.txt"), 0, h5py.h5f.UNLIMITED)])
    )
    refused_everywhere(path, tmp_path, "external file")


@pytest.mark.parametrize("where", ["absolute", "parent", "not-a-shard"])
def test_virtual_datasets_must_read_shards_of_the_run_beside_the_file(made, tmp_path, where):
    plain = made / "plain.h5"
    with h5py.File(plain, "w") as g:  # an HDF5 file that is not a dkit shard
        g["images"] = np.zeros((18, 8, 8, 3), np.float32)
    target = {"absolute": str(plain), "parent": "../plain.h5", "not-a-shard": "plain.h5"}[where]
    folder = made if where == "not-a-shard" else tmp_path / "sub"
    folder.mkdir(exist_ok=True)

    def edit(f):
        shape, dtype = f["images"].shape, f["images"].dtype
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[:] = h5py.VirtualSource(target, "images", shape=shape)
        del f["images"]
        ds = f.create_virtual_dataset("images", layout)
        ds.attrs["encoding_type"] = IMAGES_ATTRS["encoding_type"]
        ds.attrs["encoding_version"] = IMAGES_ATTRS["encoding_version"]

    path = folder / f"virtual-{where}.h5"
    shutil.copy(made / "good.h5", path)
    with h5py.File(path, "r+") as f:
        edit(f)
    refused_everywhere(path, tmp_path, "virtual images dataset reads")


def test_a_virtual_merge_is_accepted_and_verify_checks_its_shards(made, tmp_path):
    shards = [made / "shards" / "s0.h5", made / "shards" / "s1.h5"]
    out = made / "merged.h5"
    merge(out, shards, virtual=True, force=True)
    doc = verify(out)
    assert doc["ok"] and doc["rows"] == 18 and doc["shards"] == sorted(map(str, shards))
    with pytest.raises(InputError, match="readers accept only shards in"):
        merge(tmp_path / "elsewhere.h5", shards, virtual=True)
    # a flipped byte in a shard's image chunk: verify of the merged file names the shard
    damaged = made / "damaged"
    shutil.copytree(made / "shards", damaged / "shards")
    merge(damaged / "merged.h5", [damaged / "shards" / "s0.h5", damaged / "shards" / "s1.h5"], virtual=True)
    with h5py.File(damaged / "shards" / "s1.h5", "r") as g:
        offset = g["images"].id.get_chunk_info(0).byte_offset
    raw = bytearray((damaged / "shards" / "s1.h5").read_bytes())
    raw[offset + 5] ^= 0xFF
    (damaged / "shards" / "s1.h5").write_bytes(bytes(raw))
    with pytest.raises(DkitError, match="s1.h5"):
        verify(damaged / "merged.h5")
