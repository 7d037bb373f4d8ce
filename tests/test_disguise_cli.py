"""dkit disguise / inspect / verify / merge / preview through the CLI."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from PIL import Image

from dkit.errors import EXIT_ACTION

from helpers import make_folder, subset
from test_cli_keys import seed_forms


def keygen(cli, name="k", shape="32x32x3", *extra):
    r = cli("keygen", name, "--shape", shape, *extra)
    assert r.exit_code == 0, r.output


def test_cifar_20k_disguised_inspected_verified_and_clean(cli, cifar_folder, tmp_path, memory_backend, isolated_home):
    keygen(cli, "cifar", "32x32x3", "--block", "4", "--pipeline", "perm,rmt", "--noise", "25")
    out = tmp_path / "cifar.h5"
    r = cli("disguise", cifar_folder, out, "--key", "cifar", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["rows"] == 20000 and report["skipped"] == 0 and report["images"] == 20000
    meta = json.loads(cli("inspect", out, "--json").stdout)
    classes = sorted(p.name for p in cifar_folder.iterdir() if p.is_dir())
    assert meta["rows"] == 20000 and meta["class_names"] == classes and meta["label_kind"] == "hard"
    assert meta["key_id"] == report["key_id"] and meta["complete"]
    r = cli("verify", out, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"]
    with h5py.File(out, "r") as f:
        labels = f["labels"][:]
        assert f["images"].shape == (20000, 32, 32, 3)
    # Labels match the folders: the listing is class folders in name order, files in name order.
    expected = np.concatenate([np.full(len(list((cifar_folder / c).iterdir())), i) for i, c in enumerate(classes)])
    assert np.array_equal(labels, expected) and np.bincount(labels).tolist() == [2000] * 10
    # No secret and no file name anywhere in the file's bytes.
    raw = out.read_bytes()
    from dkit.keystore import Keystore

    key = Keystore(isolated_home, backend=memory_backend).load("cifar")
    secrets = [s.expose() for s in memory_backend._items.values()]
    assert secrets
    for seed in secrets:
        for form in seed_forms(seed):
            assert form not in raw
    m = key.material
    for secret in (
        m.source_key,
        m.perm.astype("<i8").tobytes()[:64],
        m.matrices[0, 0].astype("<f8").tobytes(),
        m.matrices[0, 0].astype("<f4").tobytes(),
    ):
        assert secret not in raw
    assert b".jpg" not in raw and b"0000" not in raw  # no file names (they all end in .jpg)
    for c in classes:
        assert f"{c}/".encode() not in raw  # no relative paths
    log = (isolated_home / "audit.jsonl").read_text()
    assert '"action":"disguise"' in log and str(out) in log


def test_withheld_classes_leave_no_class_name(cli, tmp_path):
    keygen(cli, "k", "8x8x3")
    src = make_folder(tmp_path / "src", classes=("tumour", "healthy"), per_class=3)
    out = tmp_path / "o.h5"
    assert cli("disguise", src, out, "--key", "k", "--withhold-classes").exit_code == 0
    raw = out.read_bytes()
    assert b"tumour" not in raw and b"healthy" not in raw
    meta = json.loads(cli("inspect", out, "--json").stdout)
    assert meta["class_names"] is None and meta["num_classes"] == 2


def test_a_flipped_byte_is_caught_by_verify(cli, tmp_path):
    keygen(cli, "k", "8x8x3")
    src = make_folder(tmp_path / "src", per_class=50)
    out = tmp_path / "o.h5"
    assert cli("disguise", src, out, "--key", "k").exit_code == 0
    with h5py.File(out, "r") as f:
        info = f["images"].id.get_chunk_info(0)
        chunk_rows = f["images"].chunks[0]
    data = bytearray(out.read_bytes())
    data[info.byte_offset + info.size // 2] ^= 0x01
    out.write_bytes(bytes(data))
    assert cli("inspect", out).exit_code == 0  # metadata intact
    r = cli("verify", out)
    assert r.exit_code == EXIT_ACTION
    assert f"dataset images, rows 0..{chunk_rows - 1}" in r.stderr and "checksum" in r.stderr


def test_cli_bad_inputs(cli, tmp_path):
    keygen(cli, "k", "8x8x3")
    (tmp_path / "empty").mkdir()
    r = cli("disguise", tmp_path / "empty", tmp_path / "o.h5", "--key", "k")
    assert r.exit_code == EXIT_ACTION and "no images found" in r.stderr
    src = make_folder(tmp_path / "src", per_class=3)
    (src / "dog" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    out = tmp_path / "o.h5"
    r = cli("disguise", src, out, "--key", "k", "--workers", "0")
    assert r.exit_code == EXIT_ACTION and "dog/0001.png" in r.stderr and "corrupt or truncated PNG" in r.stderr
    assert not out.exists()
    r = cli("disguise", src, out, "--key", "k", "--on-error", "skip", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] == 1
    r = cli("disguise", src, out, "--key", "k")
    assert r.exit_code == EXIT_ACTION and "exists" in r.stderr and "--force" in r.stderr
    r = cli("disguise", src, out, "--key", "nope")
    assert r.exit_code == EXIT_ACTION and "no key named 'nope'" in r.stderr
    r = cli("disguise", src, tmp_path / "p.h5", "--key", "k", "--shard", "3/2")
    assert r.exit_code == EXIT_ACTION and "shard" in r.stderr
    big = make_folder(tmp_path / "big", per_class=2, shape=(16, 16, 3))
    r = cli("disguise", big, tmp_path / "b.h5", "--key", "k")
    assert r.exit_code == EXIT_ACTION and "size 16x16 (WxH), but the key expects 8x8" in r.stderr
    r = cli("disguise", big, tmp_path / "b.h5", "--key", "k", "--fit", "resize", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["conversions"] == {"resize 16x16->8x8": 4}
    grey = make_folder(tmp_path / "grey", per_class=2, shape=(8, 8, 1))
    r = cli("disguise", grey, tmp_path / "g.h5", "--key", "k", "--no-convert")
    assert r.exit_code == EXIT_ACTION and "needs conversion" in r.stderr and "grey->RGB" in r.stderr


def test_inspect_refuses_foreign_and_newer_files(cli, tmp_path):
    (tmp_path / "text.h5").write_text("hello")
    r = cli("inspect", tmp_path / "text.h5")
    assert r.exit_code == EXIT_ACTION and "not an HDF5 file" in r.stderr
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.arange(3)
    r = cli("inspect", tmp_path / "other.h5")
    assert r.exit_code == EXIT_ACTION and "not a dkit disguised dataset" in r.stderr
    keygen(cli, "k", "8x8x3")
    out = tmp_path / "o.h5"
    cli("disguise", make_folder(tmp_path / "src", per_class=2), out, "--key", "k")
    with h5py.File(out, "r+") as f:
        f.attrs["dkit_format_version"] = 3
    r = cli("inspect", out)
    assert r.exit_code == EXIT_ACTION and "format version 3" in r.stderr and "upgrade dkit" in r.stderr
    r = cli("verify", tmp_path / "missing.h5")
    assert r.exit_code == EXIT_ACTION and "no such file" in r.stderr


def test_cli_resume_and_merge(cli, tmp_path, isolated_home, memory_backend):
    from dkit.data import Options, disguise_source, open_source
    from dkit.keystore import Keystore

    keygen(cli, "k", "32x32x3")
    src = make_folder(tmp_path / "src", per_class=40, shape=(32, 32, 3))
    out = tmp_path / "o.h5"
    key = Keystore(isolated_home, backend=memory_backend).load("k")

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        disguise_source(open_source(src), out, key, Options(workers=0, batch=21), progress=stop)
    r = cli("disguise", src, out, "--key", "k")
    assert r.exit_code == EXIT_ACTION and "interrupted run" in r.stderr and "--resume" in r.stderr
    r = cli("disguise", src, out, "--key", "k", "--resume", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["resumed_from_source"] > 0
    assert json.loads(cli("inspect", out, "--json").stdout)["rows"] == 80
    shards = [tmp_path / f"s{i}.h5" for i in range(2)]
    for i, s in enumerate(shards):
        assert cli("disguise", src, s, "--key", "k", "--shard", f"{i}/2").exit_code == 0
    r = cli("merge", tmp_path / "m.h5", *shards, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["rows"] == 80
    with h5py.File(out, "r") as a, h5py.File(tmp_path / "m.h5", "r") as b:
        assert np.array_equal(a["labels"][:], b["labels"][:]) and np.array_equal(a["source_ids"][:], b["source_ids"][:])
    r = cli("merge", tmp_path / "m2.h5", shards[0])
    assert r.exit_code == EXIT_ACTION and "missing shard" in r.stderr


def test_preview(cli, tmp_path):
    keygen(cli, "k", "8x8x3")
    keygen(cli, "other", "8x8x3")
    keygen(cli, "ih", "8x8x3", "--pipeline", "instahide")
    src = make_folder(tmp_path / "src", per_class=5)
    out = tmp_path / "o.h5"
    cli("disguise", src, out, "--key", "k")
    r = cli("preview", out, "--key", "k", "-o", tmp_path / "grid.png", "--count", "4", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["columns"] == ["revealed", "disguised"] and doc["rows"] == 4
    img = np.asarray(Image.open(tmp_path / "grid.png"))
    assert img.shape[0] > 4 * 8 and img.shape[1] > 2 * 8
    r = cli("preview", out, "--key", "other", "-o", tmp_path / "x.png")
    assert r.exit_code == EXIT_ACTION and "was disguised with key ID" in r.stderr and not (tmp_path / "x.png").exists()
    ih = tmp_path / "ih.h5"
    assert cli("disguise", src, ih, "--key", "ih", "--encodings", "2").exit_code == 0
    assert json.loads(cli("inspect", ih, "--json").stdout)["rows"] == 20
    r = cli("preview", ih, "--key", "ih", "-o", tmp_path / "ih.png", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["columns"] == ["disguised"]


def test_mnist_grey_png_folder(cli, mnist_folder, tmp_path):
    keygen(cli, "m", "28x28", "--block", "7", "--pipeline", "perm,rmt", "--noise", "100")
    src = subset(mnist_folder, tmp_path / "src", per_class=30)
    r = cli("disguise", src, tmp_path / "m.h5", "--key", "m", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"] == 300 and json.loads(r.stdout)["conversions"] == {}
    meta = json.loads(cli("inspect", tmp_path / "m.h5", "--json").stdout)
    assert meta["class_names"] == [str(i) for i in range(10)]
