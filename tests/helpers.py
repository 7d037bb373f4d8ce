"""Test helpers: small image folders, test keys from public seeds, shared data sets."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dkit.derive import derive
from dkit.keystore import LoadedKey
from dkit.keystore.records import VersionRecord
from dkit.params import KeyParams
from dkit.secret import Seed

from conftest import SHARED_DATA


def test_key(label: str = "test", **kw) -> LoadedKey:
    """A key version from a public test seed, without a key store."""
    seed = Seed(hashlib.sha256(f"dkit test key {label}".encode()).digest())
    kw.setdefault("block", 4)  # the tests' keys were written for 4x4 blocks
    params = KeyParams.create(**kw)
    m = derive(seed, params)
    rec = VersionRecord(1, "enabled", "2026-11-22T00:00:00Z", m.key_id, params, "memory", "2026-11-22T00:00:00Z")
    return LoadedKey(name=label, record=rec, material=m)


test_key.__test__ = False  # not a test function


def make_folder(root: Path, classes=("cat", "dog"), per_class=5, shape=(8, 8, 3), fmt="png", seed=0) -> Path:
    """An ImageFolder of random images; classes=() gives a flat folder."""
    rng = np.random.default_rng(seed)
    h, w, c = shape
    for cls in classes or ("",):
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)
            Image.fromarray(arr[:, :, 0] if c == 1 else arr).save(d / f"{i:04d}.{fmt}")
    return root


def shared_archive(name: str, dest: Path) -> Path:
    """Unpack ../shared/data/NAME.tar.gz into dest (skip the test when the shared data is absent)."""
    tar = SHARED_DATA / f"{name}.tar.gz"
    if not tar.exists():
        pytest.skip(f"{tar} is absent (it ships beside the repository in CI, not with the package)")
    out = dest / name
    if not out.exists():
        subprocess.run(["tar", "xzf", str(tar), "-C", str(dest)], check=True)
    return out


def subset(src: Path, dest: Path, per_class: int, *, last: bool = False) -> Path:
    """The first (or with ``last``, the last) ``per_class`` files of each class folder of ``src``, copied."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dest / cls.name).mkdir(parents=True, exist_ok=True)
        files = sorted(cls.iterdir())
        for f in files[-per_class:] if last else files[:per_class]:
            shutil.copy(f, dest / cls.name / f.name)
    return dest


def train_and_held_out(src: Path, work: Path, per_class: int, held_out: int) -> tuple[Path, Path]:
    """``work/train`` (the first ``per_class`` files of each class) and ``work/test`` (the last ``held_out``)."""
    return subset(src, work / "train", per_class), subset(src, work / "test", held_out, last=True)


def key_as_affine(key):
    """A key's noise-free disguise as one affine map per stored block position, measured on basis
    images through the spec's plain computation. Returns (disguise, offset, mt): ``disguise`` maps
    (N, H, W, C) float64 tensors, and the blocks of ``disguise(x)`` at stored position j are
    ``x_block[perm[j]] @ mt[j] + offset[j]`` (offset (t, d), mt (t, d, d))."""
    import torch

    from dkit.engine import Disguise
    from dkit.models.nets import from_blocks, to_blocks

    dis = Disguise.from_key(key)
    p = key.params
    t, d = p.positions, p.block_size

    def disguise(images):
        return torch.from_numpy(dis.reference(images.numpy()))

    def blocks(images):
        return to_blocks(images.permute(0, 3, 1, 2), p.block, p.grid)

    offset = blocks(disguise(torch.zeros(1, *p.shape, dtype=torch.float64)))[:, 0]
    eye = torch.eye(d, dtype=torch.float64)[None].expand(t, d, d)
    basis = from_blocks(eye, p.block, p.grid, p.shape[2]).permute(0, 2, 3, 1)
    return disguise, offset, blocks(disguise(basis)) - offset[:, None]
