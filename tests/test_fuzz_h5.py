"""Mutation fuzz of the disguised-dataset reader: ``dkit inspect``, ``verify`` and ``train`` on seeded
mutants of a small valid file (byte flips by region, truncations, crafted attributes, shapes, dtypes,
declared sizes). Every mutant must end ``ok`` (still valid) or ``clean`` (a one-line dkit error), never
a traceback, a signal, a timeout or a memory blow-up (``tests/fuzzing.py`` runs each in a forked child).

A fast subset runs by default; the full set (``-m slow``) runs well over 1,000 mutants. Read the
tallies with ``pytest -s``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from dkit.data import Options, disguise_source, h5format, open_source
from dkit.engine import RandomSource

from conftest import REPO
from fuzzing import BAD, preload, run_cli, tally
from helpers import make_folder, test_key

KEY = test_key("fuzz", shape="8x8x3", block="4", pipeline="perm,rmt", noise=10)
SOFT_KEY = test_key("fuzz-soft", shape="8x8x3", block="4", pipeline="instahide", k=2)
TIMEOUT = 30.0  # a hang: a mutant takes well under a second (train: about 2); dkit's own probe gives up at 15
MEMORY = 2 << 30  # beyond what the warm parent has mapped
ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# -- the valid files ------------------------------------------------------------------------------


class Base:
    """A valid file, its bytes, and where its regions lie."""

    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes()
        self.chunks: list[tuple[int, int]] = []  # (offset, size) of every stored chunk
        with h5py.File(path, "r") as f:
            for name in f:
                ds = f[name]
                for i in range(ds.id.get_num_chunks()):
                    info = ds.id.get_chunk_info(i)
                    self.chunks.append((info.byte_offset, info.size))
        version = self.data[8]
        self.superblock = 96 if version in (0, 1) else 48  # 8-byte offsets and lengths
        in_chunk = np.zeros(len(self.data), dtype=bool)
        for off, size in self.chunks:
            in_chunk[off : off + size] = True
        in_chunk[: self.superblock] = True
        self.metadata = np.flatnonzero(~in_chunk)  # every byte that is neither superblock nor chunk
        self.chunk_bytes = np.concatenate([np.arange(o, o + s) for o, s in self.chunks])


def _write(tmp: Path, key, *, classes=("a", "b"), per_class=12, **opts) -> Path:
    src = make_folder(tmp / "src", classes=classes, per_class=per_class, shape=key.params.shape)
    out = tmp / "base.h5"
    disguise_source(open_source(src), out, key, Options(workers=0, **opts), rng=RandomSource.fixed(3))
    return out


@pytest.fixture(scope="module", autouse=True)
def _warm():
    """Children start warm, and the memory limit counts only what a command allocates."""
    preload()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    return Base(_write(tmp_path_factory.mktemp("fuzz-base"), KEY))


@pytest.fixture(scope="module")
def soft_base(tmp_path_factory) -> Base:
    return Base(_write(tmp_path_factory.mktemp("fuzz-soft"), SOFT_KEY, per_class=6, encodings=2))


@pytest.fixture(scope="module")
def v1_base() -> Base:
    """A file of format version 1 (no checksums in its HDF5 metadata), as dkit 0.1 wrote it."""
    return Base(REPO / "formats" / "archives" / "v1" / "perm-rmt-hard.h5")


# -- mutants: (name, a function that writes the mutant to a path) ---------------------------------


def _bytes_mutant(name: str, data: bytes):
    def write(path: Path) -> None:
        path.write_bytes(data)

    return name, write


def _flip(data: bytes, pos: int, mask: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= mask
    return bytes(b)


def flips(base: Base, region: str, n: int, seed: int):
    rng = random.Random(f"{region}/{seed}")
    where = {
        "superblock": np.arange(base.superblock),
        "metadata": base.metadata,
        "chunk": base.chunk_bytes,
    }[region]
    for _ in range(n):
        pos = int(where[rng.randrange(len(where))])
        mask = 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
        yield _bytes_mutant(f"flip-{region}@{pos}^{mask:#04x}", _flip(base.data, pos, mask))


def multi_flips(base: Base, n: int, seed: int):
    """Several random bytes at once, anywhere."""
    rng = random.Random(f"multi/{seed}")
    for i in range(n):
        b = bytearray(base.data)
        for _ in range(rng.randrange(2, 12)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        yield _bytes_mutant(f"multi-flip-{seed}-{i}", bytes(b))


def truncations(base: Base, n: int, seed: int):
    rng = random.Random(f"trunc/{seed}")
    size = len(base.data)
    cuts = {0, 1, 8, base.superblock - 1, base.superblock, size - 1}
    for off, s in base.chunks:
        cuts |= {off, off + 1, off + s // 2, off + s - 1}
    cuts = sorted(c for c in cuts if 0 <= c < size)
    while len(cuts) < n:
        cuts.append(rng.randrange(size))
    for c in cuts[:n]:
        yield _bytes_mutant(f"truncate@{c}", base.data[:c])
    yield _bytes_mutant("extended", base.data + bytes(4096))  # trailing garbage is harmless


def _edit(name: str, base: Base, fn):
    def write(path: Path) -> None:
        path.write_bytes(base.data)
        with h5py.File(path, "r+") as f:
            fn(f)

    return name, write


NEST = 100_000
BAD_VALUES = {
    "neg": -1,
    "zero": 0,
    "2^31": 2**31,
    "2^63-1": 2**63 - 1,
    "-2^63": -(2**63),
    "u64max": np.uint64(2**64 - 1),
    "float": 1.5,
    "nan": float("nan"),
    "inf": float("inf"),
    "str": "x",
    "empty": "",
    "numstr": "24",
    "badutf8": np.bytes_(b"\xff\xfe\x00"),
    "long": "A" * 200_000,
    "array": np.arange(3),
    "array2d": np.zeros((2, 2)),
    "emptyarray": np.zeros(0),
    "bool": np.bool_(True),
    "complex": np.complex64(1 + 2j),
    "json-nest-list": "[" * NEST + "]" * NEST,
    "json-nest-dict": '{"a":' * NEST + "1" + "}" * NEST,
    "json-null": "null",
    "json-list": "[1, 2]",
    "json-dict": '{"shape": [8, 8, 3]}',
    "json-huge-int": "9" * 5000,
    "json-bigfloat": "1e999",
    "compound": np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
}
ATTRS = ("dkit_format", *h5format.REQUIRED, *h5format.OPTIONAL, "layout")  # every root attribute a reader reads


def _set(attrs, key, value):
    if key in attrs:
        del attrs[key]
    attrs[key] = value


def attribute_mutants(base: Base, *, full: bool, seed: int = 0):
    rng = random.Random(f"attrs/{seed}")
    for attr in ATTRS:
        yield _edit(f"attr-missing-{attr}", base, lambda f, a=attr: f.attrs.__delitem__(a) if a in f.attrs else None)
        values = rng.sample(list(BAD_VALUES.items()), 14 if full else 3)
        for vname, v in values:
            yield _edit(f"attr-{attr}={vname}", base, lambda f, a=attr, v=v: _set(f.attrs, a, v))
    # crafted but well-typed values
    params = json.loads(h5py.File(base.path, "r").attrs["key_params"])
    for label, change in (
        ("key_params-shape-huge", {"shape": [65536, 65536, 3]}),
        ("key_params-shape-neg", {"shape": [-8, 8, 3]}),
        ("key_params-shape-2d", {"shape": [8, 8]}),
        ("key_params-block-0", {"block": [0, 0]}),
        ("key_params-pipeline-unknown", {"pipeline": ["nope"]}),
        ("key_params-noise-nan", {"noise": float("nan")}),
        ("key_params-extra", {"extra": 1}),
    ):
        doc = dict(params, **change)
        yield _edit(f"attr-{label}", base, lambda f, d=doc: _set(f.attrs, "key_params", json.dumps(d)))
    for label, value in (
        ("class_names-short", json.dumps(["a"])),
        ("class_names-long", json.dumps([str(i) for i in range(100_000)])),
        ("class_names-ints", json.dumps([1, 2])),
        ("class_names-dict", json.dumps({"a": 1})),
        ("class_names-nested", json.dumps([["a"], ["b"]])),
        ("options-list", json.dumps([1])),
        ("options-weird", json.dumps({"dtype": 5, "encodings": "x", "float_range": []})),
        ("label_kind-soft", "soft"),
        ("label_kind-none", "none"),
        ("dtype-float16", "float16"),
        ("dtype-int8", "int8"),
        ("shard-short", np.array([1, 2], dtype=np.int64)),
        ("shard-huge", np.array([2**62, 2**62, 0, 2**62], dtype=np.int64)),
        ("shard-neg", np.array([-1, -1, -5, -9], dtype=np.int64)),
        ("shard-float", np.array([0.5, 1, 0, 24])),
        ("format_version-2", 2),
        ("format_version-99", 99),
        ("format_version-0", 0),
        ("complete-0", 0),
        ("complete-7", 7),
    ):
        name = label.split("-")[0]
        attr = {"format_version": "dkit_format_version"}.get(name, name)
        yield _edit(f"attr-{label}", base, lambda f, a=attr, v=value: _set(f.attrs, a, v))
    for label, value in (
        ("encoding_type-missing", None),
        ("encoding_type-other", "png"),
        ("encoding_version-2", 2),
        ("encoding_version-str", "1"),
        ("encoding_version-array", np.array([1, 1])),
    ):
        key = label.split("-")[0]

        def fn(f, k=key, v=value):
            if v is None:
                del f["images"].attrs[k]
            else:
                _set(f["images"].attrs, k, v)

        yield _edit(f"images-attr-{label}", base, fn)
    # many attributes, an attribute on every dataset, a huge attribute
    yield _edit("attr-many", base, lambda f: [f.attrs.__setitem__(f"x{i}", i) for i in range(2000)])
    yield _edit("attr-huge-array", base, lambda f: _set(f.attrs, "junk", np.zeros(2_000_000, np.uint8)))


def _replace(f, name, data=None, **kw):
    if name in f:
        del f[name]
    if data is not None or kw:
        f.create_dataset(name, data=data, **kw)


def _resize(f, name, n):
    f[name].resize(n, axis=0)


def layout_mutants(base: Base):
    """Shapes, dtypes and declared sizes that disagree with the metadata or with the real storage."""
    with h5py.File(base.path, "r") as f:
        imgs, labels, ids = f["images"][:], f["labels"][:], f["source_ids"][:]
    n = len(imgs)
    ck = dict(chunks=True, fletcher32=True)
    cases = {
        # declared sizes
        "rows=2^31": lambda f: _set(f.attrs, "rows", 2**31),
        "rows=2^62": lambda f: _set(f.attrs, "rows", 2**62),
        "rows=-1": lambda f: _set(f.attrs, "rows", -1),
        "rows=0": lambda f: _set(f.attrs, "rows", 0),
        "rows=1": lambda f: _set(f.attrs, "rows", 1),
        "rows=n+1": lambda f: _set(f.attrs, "rows", n + 1),
        "rows=n-1": lambda f: _set(f.attrs, "rows", n - 1),
        "num_classes=2^31": lambda f: _set(f.attrs, "num_classes", 2**31),
        "num_classes=2^20": lambda f: _set(f.attrs, "num_classes", 2**20),
        "num_classes=0": lambda f: _set(f.attrs, "num_classes", 0),
        "num_classes=1": lambda f: _set(f.attrs, "num_classes", 1),
        "num_classes=-3": lambda f: _set(f.attrs, "num_classes", -3),
        "encodings=2^40": lambda f: _set(f.attrs, "encodings", 2**40),
        "encodings=0": lambda f: _set(f.attrs, "encodings", 0),
        "source_count=2^62": lambda f: _set(f.attrs, "source_count", 2**62),
        "all-resized-2^31": lambda f: (
            [_resize(f, k, 2**31) for k in ("images", "labels", "source_ids")] + [_set(f.attrs, "rows", 2**31)]
        ),
        "images-resized-2^31": lambda f: _resize(f, "images", 2**31),
        "images-resized-2^20+rows": lambda f: (
            [_resize(f, k, 2**20) for k in ("images", "labels", "source_ids")] + [_set(f.attrs, "rows", 2**20)]
        ),
        "ids-resized-2^31": lambda f: _resize(f, "source_ids", 2**31),
        "labels-resized-2^31": lambda f: _resize(f, "labels", 2**31),
        "all-resized-n+100": lambda f: (
            [_resize(f, k, n + 100) for k in ("images", "labels", "source_ids")] + [_set(f.attrs, "rows", n + 100)]
        ),
        "all-resized-0": lambda f: (
            [_resize(f, k, 0) for k in ("images", "labels", "source_ids")] + [_set(f.attrs, "rows", 0)]
        ),
        "all-resized-1": lambda f: (
            [_resize(f, k, 1) for k in ("images", "labels", "source_ids")] + [_set(f.attrs, "rows", 1)]
        ),
        # shapes
        "images-missing": lambda f: _replace(f, "images"),
        "labels-missing": lambda f: _replace(f, "labels"),
        "ids-missing": lambda f: _replace(f, "source_ids"),
        "images-group": lambda f: [_replace(f, "images"), f.create_group("images")],
        "images-short": lambda f: _replace(f, "images", imgs[:-1], **ck),
        "images-hw": lambda f: _replace(f, "images", imgs[:, :4], **ck),
        "images-3d": lambda f: _replace(f, "images", imgs[..., 0], **ck),
        "images-5d": lambda f: _replace(f, "images", imgs[..., None], **ck),
        "images-scalar": lambda f: _replace(f, "images", np.float32(1)),
        "images-empty-shape": lambda f: _replace(f, "images", shape=None, dtype="f4"),
        "images-contiguous": lambda f: _replace(f, "images", imgs),
        "images-compressed": lambda f: _replace(f, "images", imgs, compression="gzip", **ck),
        "images-no-checksum": lambda f: _replace(f, "images", imgs, chunks=True),
        "images-chunk-1row": lambda f: _replace(f, "images", imgs, chunks=(1, 8, 8, 3), fletcher32=True),
        "images-chunk-huge": lambda f: _replace(
            f, "images", shape=(2**31, 8, 8, 3), maxshape=(None, 8, 8, 3), chunks=(4096, 8, 8, 3), dtype="f4"
        ),
        "labels-2d": lambda f: _replace(f, "labels", labels[:, None], **ck),
        "labels-short": lambda f: _replace(f, "labels", labels[:-1], **ck),
        "labels-scalar": lambda f: _replace(f, "labels", np.int64(1)),
        "ids-width-8": lambda f: _replace(f, "source_ids", ids[:, :8], **ck),
        "ids-1d": lambda f: _replace(f, "source_ids", ids[:, 0], **ck),
        "ids-short": lambda f: _replace(f, "source_ids", ids[:-1], **ck),
        "soft-labels-instead": lambda f: [
            _replace(f, "labels"),
            _replace(f, "soft_labels", np.eye(2, dtype=np.float32)[labels], **ck),
            _set(f.attrs, "label_kind", "soft"),
        ],
        # dtypes and values
        "images-f64": lambda f: _replace(f, "images", imgs.astype(np.float64), **ck),
        "images-u8": lambda f: _replace(f, "images", imgs.astype(np.uint8), **ck),
        "images-str": lambda f: _replace(f, "images", np.full(imgs.shape, b"x", dtype="S1"), **ck),
        "images-f16-attr-f32": lambda f: _replace(f, "images", imgs.astype(np.float16), **ck),
        "labels-f32": lambda f: _replace(f, "labels", labels.astype(np.float32), **ck),
        "labels-i32": lambda f: _replace(f, "labels", labels.astype(np.int32), **ck),
        "labels-u64": lambda f: _replace(f, "labels", labels.astype(np.uint64), **ck),
        "labels-str": lambda f: _replace(f, "labels", labels.astype("S3"), **ck),
        "labels-vlen": lambda f: _replace(
            f, "labels", [str(v) for v in labels], dtype=h5py.string_dtype(), chunks=True
        ),
        "labels-compound": lambda f: _replace(
            f, "labels", np.array([(v, 0) for v in labels], dtype=[("a", "i8"), ("b", "i8")]), **ck
        ),
        "labels-negative": lambda f: _replace(f, "labels", -labels - 1, **ck),
        "labels-out-of-range": lambda f: _replace(f, "labels", labels + 7, **ck),
        "labels-huge": lambda f: _replace(f, "labels", labels + 2**62, **ck),
        "labels-all-one-class": lambda f: _replace(f, "labels", labels * 0, **ck),
        "ids-f32": lambda f: _replace(f, "source_ids", ids.astype(np.float32), **ck),
        "ids-i64": lambda f: _replace(f, "source_ids", ids.astype(np.int64), **ck),
        "ids-all-equal": lambda f: _replace(f, "source_ids", ids * 0, **ck),
        "images-zero": lambda f: _replace(f, "images", imgs * 0, **ck),
        "extra-dataset": lambda f: f.create_dataset("junk", data=np.zeros(10)),
        "extra-group": lambda f: f.create_group("more/deeply/nested"),
    }
    for name, fn in cases.items():
        yield _edit(f"layout-{name}", base, fn)


# -- running them ---------------------------------------------------------------------------------


def _commands(path: Path, workdir: Path, which: str):
    if which == "train":
        out = workdir / "model"
        shutil.rmtree(out, ignore_errors=True)
        return ["train", path, "-o", out, "--epochs", "1", "--arch", "cnn", "--device", "cpu", "--batch-size", "8"]
    return [which, path]


def run_mutants(mutants, workdir: Path, commands=("inspect", "verify"), train_every: int = 0):
    """Run each mutant under each command; ``train_every``: also train on every k-th mutant."""
    results: dict[str, list] = {c: [] for c in ("inspect", "verify", "train")}
    path = workdir / "mutant.h5"
    unbuilt = []
    for i, (name, write) in enumerate(mutants):
        path.unlink(missing_ok=True)
        try:
            write(path)
        except (OSError, ValueError) as e:  # HDF5 refuses it for this file (a 200 kB attribute in a v1 header)
            unbuilt.append(f"{name} ({str(e).splitlines()[0][:60]})")
            continue
        which = list(commands) + (["train"] if train_every and i % train_every == 0 else [])
        for c in which:
            results[c].append((name, run_cli(_commands(path, workdir, c), timeout=TIMEOUT, memory=MEMORY, env=ENV)))
    if unbuilt:
        print(f"\n{len(unbuilt)} mutants HDF5 would not write: " + "; ".join(unbuilt))
    return {c: r for c, r in results.items() if r}


def report(title: str, results: dict) -> None:
    print(f"\n{title}")
    print(f"  {'command':8} {'runs':>5} " + " ".join(f"{k:>9}" for k in ("ok", "clean") + BAD))
    for c, r in results.items():
        t = tally(r)
        print(f"  {c:8} {len(r):5d} " + " ".join(f"{t.get(k, 0):9d}" for k in ("ok", "clean") + BAD))


def check(results: dict) -> None:
    bad = [f"{c} {name}: {o}" for c, r in results.items() for name, o in r if o.kind in BAD]
    assert not bad, f"{len(bad)} bad outcomes:\n" + "\n".join(bad[:40])


# -- the default (fast) subset --------------------------------------------------------------------


def test_valid_file_passes_every_command(base, tmp_path):
    results = run_mutants([_bytes_mutant("valid", base.data)], tmp_path, train_every=1)
    assert all(o.kind == "ok" for r in results.values() for _, o in r), results


def test_fuzz_flips_and_truncations_fast(base, tmp_path):
    mutants = [
        *flips(base, "superblock", 6, seed=1),
        *flips(base, "metadata", 16, seed=1),
        *flips(base, "chunk", 3, seed=1),
        *multi_flips(base, 3, seed=1),
        *truncations(base, 8, seed=1),
    ]
    results = run_mutants(mutants, tmp_path, train_every=10)
    report("flips and truncations (fast subset)", results)
    check(results)


def test_fuzz_version1_flips_fast(v1_base, tmp_path):
    """Version-1 files carry no metadata checksums: a flipped byte can crash HDF5, which dkit runs in a
    forked probe first."""
    mutants = [
        *flips(v1_base, "superblock", 3, seed=1),
        *flips(v1_base, "metadata", 10, seed=1),
        *truncations(v1_base, 3, seed=1),
    ]
    results = run_mutants(mutants, tmp_path, train_every=10)
    report("version-1 file: flips and truncations (fast subset)", results)
    check(results)


def test_version1_file_that_crashes_hdf5_is_a_clean_error(v1_base, tmp_path):
    """A byte of this v1 file's metadata that, flipped, makes HDF5 dereference garbage (SIGSEGV while
    reading the root attributes)."""
    mutant = tmp_path / "crash.h5"
    mutant.write_bytes(_flip(v1_base.data, 857, 0xFF))
    for c in ("inspect", "verify", "train"):
        o = run_cli(_commands(mutant, tmp_path, c), timeout=TIMEOUT, memory=MEMORY, env=ENV)
        assert o.kind == "clean" and "crashed the HDF5 library" in o.stderr, (c, o)


def test_fuzz_crafted_fast(base, tmp_path):
    rng = random.Random(5)
    crafted = list(attribute_mutants(base, full=False)) + list(layout_mutants(base))
    mutants = rng.sample(crafted, 24)
    musts = ("layout-rows=2^31", "layout-all-resized-2^31", "layout-labels-out-of-range")
    mutants += [m for m in crafted if m[0] in musts or m[0].startswith("attr-key_params=json-nest")]
    results = run_mutants(mutants, tmp_path, train_every=8)
    report("crafted attributes and layouts (fast subset)", results)
    check(results)


def test_damaged_chunk_in_train_is_a_clean_error(base, tmp_path):
    """fletcher32 catches a damaged chunk; train says which file and rows, and to run dkit verify."""
    off, size = base.chunks[0]
    mutant = tmp_path / "damaged.h5"
    mutant.write_bytes(_flip(base.data, off + size // 2, 0x10))
    o = run_cli(_commands(mutant, tmp_path, "train"), timeout=TIMEOUT, memory=MEMORY, env=ENV)
    assert o.kind == "clean", o
    assert str(mutant) in o.stderr and "rows" in o.stderr and "dkit verify" in o.stderr, o


def test_huge_declared_rows_are_refused_fast(base, tmp_path):
    """rows = 2^31 in a 37 KB file: refused at once, not looped over or allocated."""
    name, write = _edit("rows", base, lambda f: [_resize(f, k, 2**31) for k in f] + [_set(f.attrs, "rows", 2**31)])
    write(tmp_path / "m.h5")
    for c in ("inspect", "verify", "train"):
        o = run_cli(_commands(tmp_path / "m.h5", tmp_path, c), timeout=TIMEOUT, memory=MEMORY, env=ENV)
        assert o.kind == "clean" and "storage" in o.stderr, (c, o)


# -- verify never says OK for a flipped file ------------------------------------------------------


def _content(path: Path) -> str:
    """A digest of everything a reader can see in a file: every attribute and every dataset's bytes."""
    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        for obj in [f] + [f[n] for n in sorted(f)]:
            h.update(obj.name.encode())
            for k in sorted(obj.attrs):
                h.update(k.encode() + repr(obj.attrs[k]).encode())
            if isinstance(obj, h5py.Dataset):
                h.update(repr((obj.shape, obj.dtype, obj.chunks, obj.fletcher32)).encode() + obj[()].tobytes())
    return h.hexdigest()


def _verify_each(data: bytes, positions, workdir: Path, want: str) -> dict[int, str]:
    """``verify`` of the file with each position flipped, in a forked child that runs many in a row
    (a child per position would take an hour for the whole file); a signal or a hang costs only that
    position, recorded as ``signal`` or ``hang``, and the next child carries on. Returns position ->
    ``damage`` (a DkitError), ``unchanged`` (verify passed and the content a reader sees is exactly
    the original's: the byte is unused space), ``missed`` (verify passed on changed content),
    ``signal``, ``hang`` or ``error: ...``."""
    from dkit.data import verify
    from dkit.errors import DkitError

    positions = list(positions)
    out: dict[int, str] = {}
    mutant = workdir / "flip.h5"
    log = workdir / "flip.log"
    while len(out) < len(positions):
        todo = [p for p in positions if p not in out]
        log.write_text("")
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                with open(log, "a", buffering=1) as lf:
                    for p in todo:
                        lf.write(f"{p} start\n")
                        mutant.write_bytes(_flip(data, p, 0xFF))
                        try:
                            verify(mutant)
                            kind = "unchanged" if _content(mutant) == want else "missed"
                        except DkitError:
                            kind = "damage"
                        except BaseException as e:  # noqa: BLE001 - report what escaped, by name
                            kind = f"error: {type(e).__name__}: {str(e)[:80]}"
                        lf.write(f"{p} {kind}\n")
            except BaseException:  # noqa: BLE001
                code = 1
            os._exit(code)
        status, last, size = None, time.monotonic(), -1
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
            elif log.stat().st_size != size:
                last, size = time.monotonic(), log.stat().st_size
            elif time.monotonic() - last > TIMEOUT:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                status = "hang"
            else:
                time.sleep(0.01)
        started = None
        for line in log.read_text().splitlines():
            p, _, kind = line.partition(" ")
            if kind == "start":
                started = int(p)
            else:
                out[int(p)] = kind
                started = None
        if started is not None and started not in out:
            out[started] = "hang" if status == "hang" else ("signal" if os.WIFSIGNALED(status) else "died")
        elif status == "hang" or os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0:
            raise AssertionError(f"the verify child ended with status {status} outside a position")
    return out


def _ranges(positions) -> str:
    spans: list[list[int]] = []
    for p in sorted(positions):
        if spans and p == spans[-1][1] + 1:
            spans[-1][1] = p
        else:
            spans.append([p, p])
    return ", ".join(f"{a}..{b}" for a, b in spans)


def _flip_verdicts(base: Base, tmp_path: Path, positions) -> Counter:
    verdicts = _verify_each(base.data, positions, tmp_path, _content(base.path))
    kinds = {p: v.split(":")[0] for p, v in verdicts.items()}
    meta = set(base.metadata.tolist())
    regions = Counter(
        ("superblock" if p < base.superblock else ("metadata" if p in meta else "chunk"), k) for p, k in kinds.items()
    )
    tally_ = dict(Counter(kinds.values()))
    print(f"\nverify on {len(verdicts)} single-byte flips of a {len(base.data)}-byte file: {tally_}")
    print(f"  by region: {dict(sorted(regions.items()))}")
    unused = _ranges(p for p, k in kinds.items() if k == "unchanged")
    print(f"  unused bytes (a flip there changes nothing a reader sees): {unused}")
    bad = sorted(p for p, k in kinds.items() if k not in ("damage", "unchanged"))
    assert not bad, f"{len(bad)} flips not reported as damage, e.g. " + ", ".join(
        f"{p}: {verdicts[p]}" for p in bad[:20]
    )
    return Counter(kinds.values())


def test_verify_reports_every_flip_sampled(base, tmp_path):
    rng = random.Random(11)
    positions = sorted(rng.sample(range(len(base.data)), 100))
    _flip_verdicts(base, tmp_path, positions)


# -- the full set ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_fuzz_full(base, soft_base, v1_base, tmp_path):
    mutants = [
        *flips(base, "superblock", 60, seed=2),
        *flips(base, "metadata", 200, seed=2),
        *flips(base, "chunk", 40, seed=2),
        *multi_flips(base, 40, seed=2),
        *truncations(base, 60, seed=2),
        *attribute_mutants(base, full=True),
        *layout_mutants(base),
        *flips(soft_base, "metadata", 40, seed=3),
        *truncations(soft_base, 10, seed=3),
        *flips(v1_base, "superblock", 20, seed=4),
        *flips(v1_base, "metadata", 120, seed=4),
        *flips(v1_base, "chunk", 10, seed=4),
        *truncations(v1_base, 20, seed=4),
    ]
    results = run_mutants(mutants, tmp_path, train_every=5)
    report(f"full set: {len(mutants)} mutants", results)
    assert sum(len(r) for r in results.values()) >= 1000
    check(results)


@pytest.mark.slow
def test_verify_reports_every_flip_everywhere(base, tmp_path):
    _flip_verdicts(base, tmp_path, range(len(base.data)))


def test_read_rows_reads_any_range_a_chunk_at_a_time(tmp_path):
    """The chunk-at-a-time reader behind verify and training: every range, aligned or not."""
    from dkit.data.h5format import read_rows

    with h5py.File(tmp_path / "r.h5", "w") as f:
        f.create_dataset("x", data=np.arange(100), chunks=(7,), fletcher32=True)
    with h5py.File(tmp_path / "r.h5", "r") as f:
        for r0, r1 in [(0, 100), (5, 50), (13, 14), (6, 8), (99, 100), (3, 3)]:
            assert read_rows(f["x"], "x", tmp_path, r0, r1).tolist() == list(range(r0, r1))
