"""Fuzz ``dkit predict`` with seeded mutants of real model folders (``formats/MODEL-v1.md``).

A model comes back from a cloud the owner does not trust: whatever its folder holds, ``dkit
predict`` must either still work (``ok``) or refuse it with a one-line dkit error (``clean``), never
a traceback, a signal, a hang or a memory blow-up. Every command runs in a forked child with a time
and a memory limit (``tests/fuzzing.py``).

Tiny models are trained for real (one per architecture, 8x8x3 images, a disguise with a key kept in
a file store), then each mutant is a copy of a model folder with one thing changed: ``model.json``
(wrong types, missing fields, huge/zero/negative numbers, deep nesting, long strings, inconsistent
shapes), ``model.safetensors`` (byte flips by region, truncations, crafted headers), ``metrics.json``,
or missing files. The mutants are seeded, so a run is reproducible. The default suite runs a fast
subset; ``-m slow`` runs them all. ``pytest -s`` prints the tally.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from dkit.models.nets import check_params

from fuzzing import BAD, Outcome, failures, preload, run_cli, tally
from helpers import make_folder

SEED = 20261122
PHRASE = "a long passphrase for the fuzzed model's file store"
KEY = "fz"
ARCH_RUNS = {  # arch -> dkit train arguments: tiny, so each trains in seconds
    "cnn": ["--arch-param", "hidden=16"],
    "blockvit": ["--arch-param", "dim=16", "--arch-param", "depth=1", "--arch-param", "heads=2"],
    "resnet18": [],
}
FAST_ARCHS = ("cnn", "blockvit")  # ResNet-18 (45 MB of weights) trains for the slow set only
FILES = ("model.json", "model.safetensors", "metrics.json")
TIMEOUT = 20.0  # a mutant that builds a huge network on the old code runs far longer than this
FAST_EVERY = 40


@dataclass(frozen=True)
class Special:
    """A file replaced by something that is not a regular file."""

    kind: str
    target: str = ""


DIR, FIFO = Special("dir"), Special("fifo")
DELETE = None


@dataclass
class Mutant:
    name: str
    arch: str
    change: Callable[[dict], dict]  # {file: bytes} of the original -> {file: bytes | None | Special}
    expect: str = "any"  # "clean": the mutant must be refused; "any": ok or clean


# -- the world: a key, a disguised set, one trained model per architecture -------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Everything runs through the CLI in forked children: the parent never runs a torch operation."""
    preload()
    work = tmp_path_factory.mktemp("fuzz-model")
    env = {"DKIT_HOME": str(work / "home"), "DKIT_KEYSTORE": "file", "DKIT_PASSPHRASE": PHRASE}

    def must(argv, timeout=300.0):
        o = run_cli(argv, timeout=timeout, env=env)
        assert o.kind == "ok", f"dkit {' '.join(map(str, argv))}: {o}"

    must(["keygen", KEY, "--shape", "8x8x3", "--block", "4", "--pipeline", "perm,rmt", "--noise", "4"])
    src = make_folder(work / "src", classes=("a", "b", "c"), per_class=8, shape=(8, 8, 3), seed=1)
    must(["disguise", src, work / "d.h5", "--key", KEY, "--workers", "0"])
    inputs = make_folder(work / "inputs", classes=("a", "b"), per_class=2, shape=(8, 8, 3), seed=2)
    w = {"work": work, "env": env, "models": {}, "inputs": inputs, "originals": {}, "must": must}
    for arch in FAST_ARCHS:
        _train(w, arch)
    return w


def _train(world, arch: str) -> None:
    """A tiny model of ``arch`` trained for real (once), which predicts."""
    if arch in world["models"]:
        return
    work, d = world["work"], world["work"] / arch
    world["must"](
        ["train", work / "d.h5", "-o", d, "--arch", arch, "--epochs", "1", "--batch-size", "8", "--val-fraction", "0"]
        + ["--device", "cpu", *ARCH_RUNS[arch]]
    )
    o = run_cli(["predict", d, world["inputs"], "--key", KEY, "--json"], env=world["env"])
    assert o.kind == "ok", f"{arch}: {o}"
    world["models"][arch] = d
    world["originals"][arch] = {f: (d / f).read_bytes() for f in FILES}


def _materialise(dest: Path, base: Path, changes: dict) -> None:
    """The mutant folder: changed files written, the others hard-linked (never written through)."""
    dest.mkdir(parents=True)
    for name in FILES:
        if name not in changes:
            os.link(base / name, dest / name)
    for name, v in changes.items():
        p = dest / name
        if v is None:
            continue
        if isinstance(v, Special):
            if v.kind == "dir":
                p.mkdir()
            elif v.kind == "fifo":
                os.mkfifo(p)
            elif v.kind == "symlink":
                p.symlink_to(v.target)
            continue
        p.write_bytes(v)


def run_mutants(world, mutants: list[Mutant]) -> list[tuple[str, Outcome]]:
    results, wrong = [], []
    root = world["work"] / "mutants"
    for i, m in enumerate(mutants):
        d = root / f"{i:04d}"
        _materialise(d, world["models"][m.arch], m.change(dict(world["originals"][m.arch])))
        o = run_cli(["predict", d, world["inputs"], "--key", KEY, "--format", "csv"], env=world["env"])
        shutil.rmtree(d, ignore_errors=True)
        name = f"{m.arch}/{m.name}"
        results.append((name, o))
        if o.kind not in BAD and m.expect == "clean" and o.kind != "clean":
            wrong.append(f"{name}: expected a refusal, got {o}")
        if o.kind == "clean" and len([x for x in o.stderr.strip().splitlines() if "error:" in x]) != 1:
            wrong.append(f"{name}: not one error line: {o}")
    counts = tally(results)
    print(f"\nmodel fuzz: {len(results)} mutants: {dict(sorted(counts.items()))}")
    bad = failures(results)
    assert not bad, f"{len(bad)} of {len(results)} mutants crashed, hung or blew up:\n" + "\n".join(bad[:40])
    assert not wrong, "\n".join(wrong[:40])
    assert sum(counts.values()) == len(mutants)
    return results


# -- model.json mutants ------------------------------------------------------------------------------------


def _meta(edit, raw: bool = False):
    """A change of model.json: ``edit(doc)`` edits the parsed document in place (or returns bytes)."""

    def change(files):
        doc = json.loads(files["model.json"])
        got = edit(doc)
        return {"model.json": got if isinstance(got, bytes) else json.dumps(doc).encode()}

    return change


def _set(path: tuple, value):
    def edit(doc):
        node = doc
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return edit


def _drop(path: tuple):
    def edit(doc):
        node = doc
        for k in path[:-1]:
            node = node[k]
        node.pop(path[-1], None)

    return edit


def _deep(depth: int, leaf=0):
    """A nested list ``depth`` levels deep, as JSON text (json.dumps would recurse)."""
    return "[" * depth + json.dumps(leaf) + "]" * depth


def _raw_field(field: str, text: str):
    """model.json with ``field``'s value replaced by raw JSON text (deep nesting, huge literals)."""

    def edit(doc):
        doc[field] = "@@RAW@@"
        return json.dumps(doc).replace('"@@RAW@@"', text).encode()

    return edit


WRONG_TYPES = [None, True, False, 0, -1, 7, 2**64, 1.5, float("nan"), "", "x", [], [1, "a"], {}, {"k": [1]}]
NUMBERS = [0, -1, 1, 2, 3, 4, 255, 10**4, 10**6, 10**9, 2**31, 2**63, 10**30, -(10**30), 1e308, float("inf"), 2.0]
OPTIONAL = {"class_names", "data_options", "metrics", "created", "dkit_version"}
FREE = {"created", "dkit_version", "dataset", "metrics"}  # informational: predict does not use their content
ARCH_PARAMS = {
    "cnn": ["hidden", "drop_conv", "drop_hidden"],
    "blockvit": ["dim", "depth", "heads", "mlp_ratio", "dropout"],
    "resnet18": [],
}
PARAM_VALUES = [0, -1, 1, 2, 3, 16, 10**3, 10**5, 10**6, 10**9, 10**12, 2**63, 1e308, float("nan"), 0.5, 1.0, 1.5]
PARAM_WRONG = ["16", None, True, [], {}, [16]]


def _same_type(a, b) -> bool:
    return type(a) is type(b)


def meta_mutants(arch: str, doc: dict) -> list[Mutant]:
    out: list[Mutant] = []

    def add(name, edit, expect="any"):
        out.append(Mutant(name, arch, _meta(edit), expect))

    # Every field: missing, then each wrong type.
    for field in sorted(doc):
        add(f"drop {field}", _drop((field,)), "any" if field in OPTIONAL else "clean")
        for v in WRONG_TYPES:
            harmless = _same_type(v, doc[field]) or (field == "class_names" and v is None)
            add(f"type {field}={v!r}", _set((field,), v), "any" if harmless else "clean")
        add(f"{field} deep", _raw_field(field, _deep(100_000)), "clean")
        add(f"{field} nested 200", _raw_field(field, _deep(200)), "clean")
        add(f"{field} long string", _set((field,), "x" * 1_000_000), "any" if field in FREE else "clean")
    # Numbers: huge, zero, negative.
    for field in ("num_classes", "key_version", "version"):
        for v in NUMBERS:
            harmless = v == doc[field] and _same_type(v, doc[field])
            add(f"{field}={v!r}", _set((field,), v), "any" if harmless or field == "key_version" else "clean")
        add(f"{field} 5000 digits", _raw_field(field, "1" * 5000), "clean")
    add("num_classes=0 with names", lambda d: d.update(num_classes=0, class_names=[]), "clean")
    for i in range(3):
        for v in [0, -1, 1, 16, 10**6, 2**40, 2**63, "8", 8.0, None, [8]]:
            add(f"in_shape[{i}]={v!r}", _set(("in_shape", i), v), "clean" if v != doc["in_shape"][i] else "any")
    for v in [[], [8, 8], [8, 8, 3, 1], [16, 16, 3], [8, 8, 1], [4, 4, 3], "8x8x3", [[8], [8], [3]]]:
        add(f"in_shape={v!r}", _set(("in_shape",), v), "clean")
    for v in [
        [0, 0],
        [0, 4],
        [4, 0],
        [-4, 4],
        [3, 3],
        [8, 8],
        [2, 2],
        [1, 1],
        ["4", "4"],
        [4],
        [4, 4, 4],
        [2**40, 4],
        [4.0, 4.0],
        [None, 4],
    ]:
        add(f"block={v!r}", _set(("block",), v), "clean")
    add("in_shape and block agree, not the key", lambda d: d.update(in_shape=[16, 16, 3], block=[8, 8]), "clean")
    # class names
    n = doc["num_classes"]
    for name, v in [
        ("fewer", (doc["class_names"] or [])[:-1]),
        ("more", (doc["class_names"] or []) + ["z"]),
        ("ints", list(range(n))),
        ("nulls", [None] * n),
        ("long", ["y" * 100_000] * n),
        ("nested", [["a"]] * n),
        ("empty", []),
        ("huge", ["c"] * 200_000),
    ]:
        add(f"class_names {name}", _set(("class_names",), v), "any" if name == "long" else "clean")
    for v in ["none", "soft", "HARD", "x", ""]:
        add(f"label_kind={v!r}", _set(("label_kind",), v), "any" if v == "soft" else "clean")
    # key identity
    kid = doc["key_id"]
    for name, v in [
        ("upper", kid.upper()),
        ("other", "0" * 32),
        ("short", kid[:-1]),
        ("long", kid + "0"),
        ("non-hex", "g" * 32),
        ("unicode", "é" * 32),
        ("huge", "a" * 10**6),
    ]:
        add(f"key_id {name}", _set(("key_id",), v), "clean")
    for k in sorted(doc["key_params"]):
        add(f"drop key_params.{k}", _drop(("key_params", k)), "any")
        for v in [None, 0, -1, "x", [], {}, 2**63]:
            add(f"key_params.{k}={v!r}", _set(("key_params", k), v), "any")
    for name, v in [
        ("shape", [16, 16, 3]),
        ("block", [2, 2]),
        ("pipeline", ["aes"]),
        ("shape 0", [0, 0, 3]),
        ("block 0", [0, 0]),
        ("shape huge", [2**40, 2**40, 3]),
        ("block huge", [2**62, 2**62]),
    ]:
        add(f"key_params {name}", _set(("key_params", name.split()[0]), v), "clean")
    # normalization
    c = doc["in_shape"][2]
    norm_cases = [
        ("no mean", _drop(("normalization", "mean"))),
        ("no std", _drop(("normalization", "std"))),
        ("mean []", _set(("normalization", "mean"), [])),
        ("mean short", _set(("normalization", "mean"), [0.0] * (c - 1))),
        ("mean long", _set(("normalization", "mean"), [0.0] * (c + 1))),
        ("mean huge", _set(("normalization", "mean"), [0.0] * 1_000_000)),
        ("mean strings", _set(("normalization", "mean"), ["a"] * c)),
        ("mean nested", _set(("normalization", "mean"), [[0.0]] * c)),
        ("mean null", _set(("normalization", "mean"), None)),
        ("mean dict", _set(("normalization", "mean"), {"a": 1})),
        ("std zero", _set(("normalization", "std"), [0.0] * c)),
        ("std negative", _set(("normalization", "std"), [-1.0] * c)),
        ("std nan", _set(("normalization", "std"), [float("nan")] * c)),
        ("std inf", _set(("normalization", "std"), [float("inf")] * c)),
        ("mean 1e308", _set(("normalization", "mean"), [1e308] * c)),
        ("mean bools", _set(("normalization", "mean"), [True] * c)),
        ("extra key", _set(("normalization", "extra"), 1)),
    ]
    for name, edit in norm_cases:
        add(f"normalization {name}", edit, "any" if name == "extra key" else "clean")
    # data options
    for k, vals in [
        ("fit", ["bogus", 5, None, ["none"], "resize"]),
        ("convert", ["yes", 2, None, []]),
        ("float_range", ["0-7", 1, [], "0-1"]),
    ]:
        for v in vals:
            valid = v in ("resize", "0-1") or (k == "float_range" and v is None)
            add(f"data_options.{k}={v!r}", _set(("data_options", k), v), "any" if valid else "clean")
    # arch and its parameters
    for other in ("cnn", "resnet18", "blockvit", "CNN", "evil", "__init__", ""):
        if other != arch:
            add(f"arch={other}", _set(("arch",), other), "clean")
    for name in ARCH_PARAMS[arch]:
        add(f"drop arch_params.{name}", _drop(("arch_params", name)), "any")
        for v in PARAM_VALUES + PARAM_WRONG:
            valid = check_params(arch, {**doc["arch_params"], name: v}, doc["in_shape"], doc["block"]) is None
            # in bounds, a setting that shapes no tensor (dropout, heads) still loads
            add(f"arch_params.{name}={v!r}", _set(("arch_params", name), v), "any" if valid else "clean")
    for name, v in [
        ("unknown", {"evil": 1}),
        ("dunder", {"__class__": 1}),
        ("huge unknown", {"depth": 10**6}),
        ("huge dim", {"dim": 10**9, "depth": 1, "heads": 1}),
        ("nested", {"dim": {"a": [1]}}),
        ("many keys", {f"k{i}": i for i in range(10_000)}),
    ]:
        add(f"arch_params {name}", _set(("arch_params",), v), "clean")
    # another architecture over these weights, with huge sizes: the old code built them (a hang)
    for other, params in [
        ("blockvit", {"dim": 16, "depth": 10**5, "heads": 2}),
        ("blockvit", {"dim": 16, "depth": 4000, "heads": 1}),
        ("blockvit", {"dim": 2**20, "depth": 1, "heads": 1}),
        ("blockvit", {"dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 1e6}),
        ("blockvit", {"dim": 16, "depth": 1, "heads": 3}),
        ("cnn", {"hidden": 10**7}),
        ("cnn", {"hidden": 16, "drop_conv": 2.0}),
        ("resnet18", {"hidden": 16}),
    ]:
        if other != arch or params != doc["arch_params"]:
            add(f"arch={other} {params}", lambda d, o=other, p=params: d.update(arch=o, arch_params=p), "clean")
    # whole-document damage
    whole = [
        ("empty", b""),
        ("list", b"[]"),
        ("string", b'"dkit-model"'),
        ("null", b"null"),
        ("empty object", b"{}"),
        ("half", None),
        ("not utf-8", b'{"format": "\xff\xfe"}'),
        ("deep top", _deep(100_000).encode()),
        ("deep object", ('{"a":' * 50_000 + "1" + "}" * 50_000).encode()),
        ("nan format", b'{"format": NaN}'),
        ("padded 20 MB", None),
        ("duplicate arch", None),
        ("bom", None),
    ]
    for name, raw in whole:
        if name == "half":
            out.append(
                Mutant(
                    "model.json half",
                    arch,
                    lambda f: {"model.json": f["model.json"][: len(f["model.json"]) // 2]},
                    "clean",
                )
            )
        elif name == "padded 20 MB":
            out.append(
                Mutant(
                    "model.json padded 20 MB",
                    arch,
                    lambda f: {"model.json": f["model.json"] + b" " * (20 << 20)},
                    "any",
                )
            )
        elif name == "duplicate arch":
            out.append(
                Mutant(
                    "model.json duplicate arch",
                    arch,
                    lambda f: {"model.json": f["model.json"].replace(b"{", b'{"arch": "evil", ', 1)},
                    "any",
                )
            )
        elif name == "bom":
            out.append(
                Mutant("model.json bom", arch, lambda f: {"model.json": b"\xef\xbb\xbf" + f["model.json"]}, "any")
            )
        else:
            out.append(Mutant(f"model.json {name}", arch, lambda f, r=raw: {"model.json": r}, "clean"))
    return out


# -- model.safetensors mutants -----------------------------------------------------------------------------


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header, body: bytes, *, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


def _weights(fn):
    return lambda files: {"model.safetensors": fn(files["model.safetensors"])}


def _header_edit(edit):
    def fn(data):
        header, body = _split(data)
        got = edit(header, body)
        return got if isinstance(got, bytes) else _join(header, body)

    return _weights(fn)


def _tensors(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _biggest(header: dict) -> str:
    return max(_tensors(header), key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])


def weight_mutants(arch: str, data: bytes, rng: random.Random) -> list[Mutant]:
    out: list[Mutant] = []
    (n,) = struct.unpack("<Q", data[:8])
    size = len(data)

    def add(name, change, expect="any"):
        out.append(Mutant(name, arch, change, expect))

    # byte flips by region
    for region, lo, hi, count in [("length", 0, 8, 6), ("header", 8, 8 + n, 14), ("data", 8 + n, size, 8)]:
        for pos in sorted(rng.sample(range(lo, hi), count)):
            bit = 1 << rng.randrange(8)

            def flip(d, p=pos, b=bit):
                return d[:p] + bytes([d[p] ^ b]) + d[p + 1 :]

            add(f"flip {region} byte {pos} bit {bit}", _weights(flip), "any")
        burst = rng.randrange(lo, max(lo + 1, hi - 8))
        add(f"burst {region} at {burst}", _weights(lambda d, p=burst: d[:p] + bytes(8) + d[p + 8 :]), "any")
    # truncations and appendices
    for cut in sorted({0, 1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, (8 + n + size) // 2, size - 1}):
        add(f"truncate to {cut}", _weights(lambda d, c=cut: d[:c]), "clean")
    add("append 100 bytes", _weights(lambda d: d + bytes(100)), "any")
    add("pickle", _weights(lambda d: pickle.dumps({"weights": [1, 2, 3]})), "clean")
    add("text", _weights(lambda d: b"not a safetensors file\n" * 10), "clean")
    # crafted header lengths
    for length in (0, 1, size, size - 7, 100_000_001, 2**31, 2**63, 2**64 - 1):
        add(f"header length {length}", _weights(lambda d, L=length: struct.pack("<Q", L) + d[8:]), "clean")

    def t0(h):
        return _biggest(h)

    crafted = [
        ("huge shape", lambda h, b: h[t0(h)].update(shape=[2**31, 2**31]), "clean"),
        ("overflowing shape", lambda h, b: h[t0(h)].update(shape=[2**62, 2**62, 2**62]), "clean"),
        ("negative shape", lambda h, b: h[t0(h)].update(shape=[-1, 4]), "clean"),
        ("float shape", lambda h, b: h[t0(h)].update(shape=[1.5]), "clean"),
        ("string shape", lambda h, b: h[t0(h)].update(shape="16"), "clean"),
        (
            "deep shape",
            lambda h, b: json.dumps(h).replace('"shape": [', '"shape": ' + "[" * 5000 + "[", 1).encode(),
            "clean",
        ),
        ("offsets past the end", lambda h, b: h[t0(h)].update(data_offsets=[0, 2**40]), "clean"),
        ("offsets reversed", lambda h, b: h[t0(h)].update(data_offsets=h[t0(h)]["data_offsets"][::-1]), "clean"),
        ("offsets negative", lambda h, b: h[t0(h)].update(data_offsets=[-4, 0]), "clean"),
        (
            "offsets overlapping",
            lambda h, b: (
                [
                    h[k].update(data_offsets=[0, h[k]["data_offsets"][1] - h[k]["data_offsets"][0]])
                    for k in _tensors(h)[:2]
                ]
                and None
            ),
            "clean",
        ),
        ("offsets missing", lambda h, b: h[t0(h)].pop("data_offsets"), "clean"),
        ("dtype missing", lambda h, b: h[t0(h)].pop("dtype"), "clean"),
        ("drop a tensor", lambda h, b: h.pop(_tensors(h)[0]), "clean"),
        ("drop the biggest", lambda h, b: h.pop(t0(h)), "clean"),
        ("rename a tensor", lambda h, b: h.__setitem__("evil", h.pop(_tensors(h)[0])), "clean"),
        (
            "extra tensor",
            lambda h, b: _join(
                {**h, "extra": {"dtype": "F32", "shape": [1], "data_offsets": [len(b), len(b) + 4]}}, b + bytes(4)
            ),
            "clean",
        ),
        ("scalar", lambda h, b: h[t0(h)].update(shape=[]), "clean"),
        ("zero-size", lambda h, b: h[t0(h)].update(shape=[0]), "clean"),
        ("metadata not strings", lambda h, b: h.__setitem__("__metadata__", {"format": [1, {"a": None}]}), "any"),
        ("metadata huge", lambda h, b: h.__setitem__("__metadata__", {"x": "y" * 1_000_000}), "any"),
        ("header a list", lambda h, b: _join(b"[1, 2, 3]", b), "clean"),
        ("header not json", lambda h, b: _join(b"{not json" + b" " * 20, b), "clean"),
        ("header null", lambda h, b: _join(b"null", b), "clean"),
        ("header empty object", lambda h, b: _join(b"{}", b), "clean"),
        ("header deep", lambda h, b: _join(_deep(100_000).encode(), b), "clean"),
        ("header padded", lambda h, b: _join(json.dumps(h).encode() + b" " * 4096, b), "any"),
        (
            "duplicate names",
            lambda h, b: _join(
                json.dumps(h)
                .replace("{", '{"' + _tensors(h)[0] + '": ' + json.dumps(h[_tensors(h)[-1]]) + ", ", 1)
                .encode(),
                b,
            ),
            "any",
        ),
    ]
    for dtype in ("F64", "F16", "BF16", "I32", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XX", "", None, 7):
        crafted.append((f"dtype {dtype!r}", lambda h, b, dt=dtype: h[t0(h)].update(dtype=dt), "clean"))

    def same_bytes_other_dtype(h, b):  # consistent for the file, wrong for the model
        k = t0(h)
        h[k].update(dtype="F16", shape=[(h[k]["data_offsets"][1] - h[k]["data_offsets"][0]) // 2])

    def swap_shapes(h, b):  # two tensors of the same size exchange shapes
        ks = _tensors(h)
        by_size: dict[int, list[str]] = {}
        for k in ks:
            by_size.setdefault(h[k]["data_offsets"][1] - h[k]["data_offsets"][0], []).append(k)
        for group in by_size.values():
            for a in group:
                for b2 in group:
                    if h[a]["shape"] != h[b2]["shape"]:
                        h[a]["shape"], h[b2]["shape"] = h[b2]["shape"], h[a]["shape"]
                        return None
        h[ks[0]]["shape"] = [int(x) for x in reversed(h[ks[0]]["shape"])] + [1]
        return None

    def flatten(h, b):
        k = t0(h)
        total = 1
        for s in h[k]["shape"]:
            total *= s
        h[k]["shape"] = [total]

    crafted += [
        ("F16 reinterpretation", same_bytes_other_dtype, "clean"),
        ("swapped shapes", swap_shapes, "clean"),
        ("flattened", flatten, "clean"),
    ]
    for name, edit, expect in crafted:
        add(f"header {name}", _header_edit(edit), expect)
    return out


# -- metrics.json and missing files ------------------------------------------------------------------------


def file_mutants(arch: str) -> list[Mutant]:
    out = []
    for f in FILES:
        expect = "any" if f == "metrics.json" else "clean"
        out += [
            Mutant(f"{f} missing", arch, lambda x, f=f: {f: DELETE}, expect),
            Mutant(f"{f} a folder", arch, lambda x, f=f: {f: DIR}, expect),
            Mutant(f"{f} a fifo", arch, lambda x, f=f: {f: FIFO}, expect),
            Mutant(f"{f} -> /dev/zero", arch, lambda x, f=f: {f: Special("symlink", "/dev/zero")}, expect),
            Mutant(f"{f} dangling link", arch, lambda x, f=f: {f: Special("symlink", "/nonexistent/x")}, expect),
            Mutant(f"{f} -> itself", arch, lambda x, f=f: {f: Special("symlink", f)}, expect),
        ]
    out += [
        Mutant("metrics.json garbage", arch, lambda x: {"metrics.json": b"\x00\xff garbage"}),
        Mutant("metrics.json deep", arch, lambda x: {"metrics.json": _deep(100_000).encode()}),
        Mutant("metrics.json list", arch, lambda x: {"metrics.json": b"[]"}),
        Mutant("metrics.json 10 MB", arch, lambda x: {"metrics.json": b"[" + b"1," * (5 << 20) + b"1]"}),
        Mutant("nothing at all", arch, lambda x: dict.fromkeys(FILES), "clean"),
        Mutant("only a pickle", arch, lambda x: {**dict.fromkeys(FILES), "model.pt": pickle.dumps([1])}, "clean"),
        Mutant("a pickle beside", arch, lambda x: {"model.pt": pickle.dumps([1])}, "any"),
    ]
    return out


def all_mutants(world) -> list[Mutant]:
    mutants: list[Mutant] = []
    for arch in world["models"]:
        files = world["originals"][arch]
        meta = meta_mutants(arch, json.loads(files["model.json"]))
        weights = weight_mutants(arch, files["model.safetensors"], random.Random(f"{SEED}/{arch}"))
        # A seeded sample of the model.json mutants, larger on the CNN, with every mutant of the
        # architecture and its parameters (ResNet-18's 45 MB of weights make each run slower).
        share = {"cnn": 0.4, "blockvit": 0.15, "resnet18": 0.05}[arch]
        keep = random.Random(f"{SEED}/{arch}/sample")
        meta = [m for m in meta if f"{arch}/{m.name}" in FAST or m.name.startswith("arch") or keep.random() < share]
        weights = [
            m for m in weights if f"{arch}/{m.name}" in FAST or keep.random() < (0.4 if arch == "resnet18" else 1)
        ]
        mutants += meta + weights + file_mutants(arch)
    names = [f"{m.arch}/{m.name}" for m in mutants]
    assert len(set(names)) == len(names), Counter(names).most_common(3)
    return mutants


# The default suite: each crash and hang the first fuzz found, one or two of each family, and a
# seeded sample (every FAST_EVERY-th) of the rest.
FAST = {
    "blockvit/block=[0, 0]",  # ZeroDivisionError
    "cnn/in_shape deep",  # RecursionError
    "cnn/model.json deep top",
    "cnn/in_shape[0]='8'",  # strings in in_shape
    "cnn/normalization no mean",  # KeyError
    "cnn/type data_options=[]",  # a list where a dict is expected
    "cnn/class_names fewer",
    "cnn/key_params block 0",
    "cnn/arch=blockvit {'dim': 16, 'depth': 4000, 'heads': 1}",  # builds 4000 layers: a hang
    "blockvit/arch_params.depth=1000",
    "blockvit/arch_params.mlp_ratio=1e+308",
    "blockvit/arch_params.heads=3",
    "cnn/arch_params.hidden='16'",
    "cnn/header length 9223372036854775808",
    "cnn/header huge shape",
    "cnn/header offsets past the end",
    "blockvit/header dtype 'F64'",
    "cnn/header F16 reinterpretation",
    "cnn/pickle",
    "blockvit/truncate to 0",
    "cnn/model.json missing",
    "cnn/model.safetensors a folder",
    "blockvit/metrics.json garbage",
}


def fast_subset(mutants: list[Mutant]) -> list[Mutant]:
    names = {f"{m.arch}/{m.name}" for m in mutants}
    assert FAST <= names, sorted(FAST - names)
    return [m for i, m in enumerate(mutants) if f"{m.arch}/{m.name}" in FAST or i % FAST_EVERY == 0]


def test_model_fuzz_fast(world):
    """A seeded sample of every family, including each crash and hang the first fuzz found."""
    mutants = fast_subset(all_mutants(world))
    assert len(mutants) >= 30
    run_mutants(world, mutants)


@pytest.mark.slow
def test_model_fuzz_full(world):
    """Every mutant (at least 300), on every architecture."""
    for arch in ARCH_RUNS:
        _train(world, arch)
    mutants = all_mutants(world)
    assert len(mutants) >= 300
    run_mutants(world, mutants)


def test_mutants_are_seeded(world):
    """The same seed gives the same mutants, byte for byte."""
    a, b = all_mutants(world), all_mutants(world)
    print(f"\n{len(a)} mutants, {len(fast_subset(a))} in the fast subset: {dict(Counter(m.arch for m in a))}")
    assert [m.name for m in a] == [m.name for m in b]
    for m, n in list(zip(a, b, strict=True))[::7]:
        assert m.change(dict(world["originals"][m.arch])) == n.change(dict(world["originals"][n.arch]))
