"""Every file that a dkit release wrote, kept in formats/archives, stays readable forever."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest

from dkit.data import DisguisedDataset, inspect, verify
from dkit.derive import derive
from dkit.engine import Disguise
from dkit.params import KeyParams
from dkit.secret import Seed

from conftest import REPO

ARCHIVES = REPO / "formats" / "archives"
FILES = [
    (version_dir, name, entry)
    for version_dir in sorted(ARCHIVES.glob("v*"))
    if version_dir.is_dir()
    for name, entry in json.loads((version_dir / "manifest.json").read_text())["files"].items()
]


def test_there_are_archives_for_the_current_format():
    from dkit.data.h5format import VERSION

    assert any(d.name == f"v{VERSION}" for d, _, _ in FILES)


@pytest.mark.parametrize("version_dir,name,entry", FILES, ids=[f"{d.name}/{n}" for d, n, _ in FILES])
def test_archive_reads_back(version_dir, name, entry):
    path = version_dir / name
    meta = inspect(path)
    assert verify(path)["ok"]
    assert meta.key_id == entry["key_id"] and meta.params.to_dict() == entry["params"]
    with h5py.File(path, "r") as f:
        for k, v in entry["attrs"].items():
            got = f.attrs[k]
            got = got.decode() if isinstance(got, bytes) else (got.item() if hasattr(got, "item") else got)
            if isinstance(v, list):
                got = list(np.asarray(got).tolist())
            assert got == v, k
        for ds, want in entry["datasets"].items():
            data = f[ds][:]
            assert list(data.shape) == want["shape"] and str(data.dtype) == want["dtype"]
            assert hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest() == want["sha256"], ds
    ds = DisguisedDataset(path)
    assert len(ds) == meta.rows
    # The owner's key (a public test seed here) still undoes the disguise of the stored rows.
    params = KeyParams.from_dict(entry["params"])
    d = Disguise.from_key(derive(Seed(bytes.fromhex(entry["seed"])), params))
    assert d.key_id == meta.key_id
    pixels = np.frombuffer(bytes.fromhex(entry["source_pixels_hex"]), np.uint8).reshape((-1,) + params.shape)
    with h5py.File(path, "r") as f:
        images = f["images"][:].astype(np.float32)
    if d.invertible:
        noise = params.noise if params.has("rmt") else 0
        tol = 0.6 if not noise else noise  # float16 storage rounds; noise leaves an estimate
        assert np.abs(d.reveal(images) - pixels).mean() < tol
