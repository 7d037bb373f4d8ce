"""Write the archive files of the format version this dkit writes, into formats/archives/vN (once
per new format version; it refuses to touch a folder that exists, so old archives are never rewritten).

    python formats/archives/make.py

Each file is made from tiny synthetic images with a public test seed and injected randomness, and
manifest.json records what a reader must find in it (metadata, and SHA-256 of each dataset's bytes).
"""

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from dkit import __version__
from dkit.data import Options, disguise_source, open_source
from dkit.data.decode import Policy
from dkit.data.h5format import VERSION
from dkit.derive import derive
from dkit.engine import RandomSource
from dkit.keystore import LoadedKey
from dkit.keystore.records import VersionRecord
from dkit.params import KeyParams
from dkit.secret import Seed

CASES = [
    ("perm-rmt-hard", dict(shape="8x8x3", block="4", pipeline="perm,rmt", noise=10), "classes", {}),
    ("aes-unlabelled-float16", dict(shape="8x8x3", block="4", pipeline="perm,aes"), "flat", {"dtype": "float16"}),
    ("instahide-soft", dict(shape="8x8x3", block="4", pipeline="instahide", k=2), "classes", {"encodings": 2}),
    (
        "identity-grey-withheld",
        dict(shape="8x8", block="4", pipeline="identity"),
        "classes",
        {"withhold_classes": True},
    ),
]


def test_key(name: str, **kw) -> tuple[LoadedKey, bytes]:
    seed = hashlib.sha256(f"dkit format archive {name}".encode()).digest()
    params = KeyParams.create(**kw)
    material = derive(Seed(seed), params)
    rec = VersionRecord(1, "enabled", "2026-11-22T00:00:00Z", material.key_id, params, "memory", "2026-11-22T00:00:00Z")
    return LoadedKey(name=name, record=rec, material=material), seed


def images(folder: Path, layout: str, channels: int) -> list[str]:
    rng = np.random.default_rng(7)
    names = []
    for cls in ("cat", "dog") if layout == "classes" else ("",):
        d = folder / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            arr = rng.integers(0, 256, size=(8, 8, channels), dtype=np.uint8)
            Image.fromarray(arr[:, :, 0] if channels == 1 else arr).save(d / f"img{i}.png")
            names.append(f"{cls}/img{i}.png" if cls else f"img{i}.png")
    return names


def plain(v):
    """An attribute as JSON (version 2 stores text as fixed-length UTF-8 bytes)."""
    v = v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v
    if isinstance(v, bytes):
        return v.decode()
    return v.tolist() if hasattr(v, "tolist") else v


def sha(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def main(out_dir: Path) -> None:
    if out_dir.exists():
        raise SystemExit(f"{out_dir} exists: archives of a released format version are never rewritten")
    out_dir.mkdir(parents=True)
    about = f"format v{VERSION} files written by dkit {__version__} with formats/archives/make.py"
    manifest = {"about": about, "files": {}}
    for name, kw, layout, opts in CASES:
        key, seed = test_key(name, **kw)
        with tempfile.TemporaryDirectory() as tmp:
            src_dir = Path(tmp) / "src"
            images(src_dir, layout, key.params.shape[2])
            source = open_source(src_dir)
            pixels = np.stack([source.load(i, Policy(key.params.shape))[0] for i in range(len(source))])
            path = out_dir / f"{name}.h5"
            if path.exists():
                path.unlink()
            disguise_source(source, path, key, Options(workers=0, **opts), rng=RandomSource.fixed(11))
        with h5py.File(path, "r") as f:
            entry = {
                "seed": seed.hex(),
                "params": key.params.to_dict(),
                "key_id": key.key_id,
                "source_pixels_hex": pixels.tobytes().hex(),
                "attrs": {
                    k: plain(v) for k, v in f.attrs.items() if k not in ("created", "dataset_id", "dkit_version")
                },
                "datasets": {
                    k: {"shape": list(f[k].shape), "dtype": str(f[k].dtype), "sha256": sha(f[k][:])} for k in f.keys()
                },
            }
        manifest["files"][path.name] = entry
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else f"formats/archives/v{VERSION}"))
