"""The streaming disguise run, through the library: sources, labels, resume after SIGKILL, shards,
skip/fail, full disks, and the torch Dataset."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

from dkit.data import DisguisedDataset, Options, decode_all, disguise_source, inspect, merge, open_source, verify
from dkit.data.decode import DecodeError, Policy
from dkit.data.h5format import partial_path
from dkit.data.sources import TorchvisionSource
from dkit.derive import source_id
from dkit.engine import Disguise, RandomSource
from dkit.errors import DkitError, FormatError, InputError

from conftest import REPO
from helpers import make_folder, subset, test_key

KEY = test_key("run", shape="8x8x3", block="4", pipeline="perm,rmt", noise=10)


def read(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in f.keys()}, dict(f.attrs)


def test_image_folder_round_trip(tmp_path):
    src = make_folder(tmp_path / "src", classes=("cat", "dog", "eel"), per_class=7)
    out = tmp_path / "out.h5"
    source = open_source(src)
    assert source.classes == ["cat", "dog", "eel"] and len(source) == 21
    rep = disguise_source(source, out, KEY, Options(workers=0), rng=RandomSource.fixed(1))
    assert rep.rows == 21 and rep.images == 21 and not rep.skipped
    meta = inspect(out)
    assert meta.rows == 21 and meta.label_kind == "hard" and meta.class_names == ["cat", "dog", "eel"]
    assert meta.key_id == KEY.key_id and meta.complete
    data, attrs = read(out)
    assert data["labels"].tolist() == [0] * 7 + [1] * 7 + [2] * 7
    # Row r is the disguise of listing item r, with the randomness of index r.
    pixels = np.stack([source.load(i, Policy((8, 8, 3)))[0] for i in range(21)])
    want = Disguise.from_key(KEY).apply(pixels, rng=RandomSource.fixed(1))
    np.testing.assert_array_equal(data["images"], want)
    assert data["source_ids"].shape == (21, 16)
    assert bytes(data["source_ids"][3]) == source_id(KEY.material, "cat/0003.png")
    assert verify(out)["ok"]
    assert not partial_path(out).exists()


def test_flat_folder_arrays_and_torchvision(tmp_path):
    flat = make_folder(tmp_path / "flat", classes=(), per_class=4)
    m = inspect(_run(open_source(flat), tmp_path / "flat.h5"))
    assert m.label_kind == "none" and m.num_classes == 0 and m.rows == 4
    x = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "xy.npz", images=x, labels=np.array([0, 1, 2, 0, 1, 2]), classes=np.array(["a", "b", "c"]))
    assert inspect(_run(open_source(tmp_path / "x.npy"), tmp_path / "x.h5")).label_kind == "none"
    m = inspect(_run(open_source(tmp_path / "xy.npz"), tmp_path / "xy.h5"))
    assert m.class_names == ["a", "b", "c"] and read(tmp_path / "xy.h5")[0]["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    import torchvision

    fake = torchvision.datasets.FakeData(size=5, image_size=(3, 8, 8), num_classes=3, random_offset=1)
    m = inspect(_run(TorchvisionSource(fake), tmp_path / "fake.h5"))
    assert m.rows == 5 and m.label_kind == "hard"
    tv = open_source(f"torchvision:ImageFolder:{make_folder(tmp_path / 'tv', per_class=2)}")
    assert inspect(_run(tv, tmp_path / "tv.h5")).class_names == ["cat", "dog"]


def _run(source, out, key=KEY, **kw):
    disguise_source(source, out, key, Options(workers=0, **kw))
    return out


def test_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found .*empty"):
        open_source(tmp_path / "empty")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "readme.txt").write_text("hi")
    with pytest.raises(InputError, match="no images found .*1 files without an image extension"):
        open_source(tmp_path / "texts")
    mixed = make_folder(tmp_path / "mixed", per_class=1)
    make_folder(mixed, classes=(), per_class=1)
    with pytest.raises(InputError, match="mixes image files"):
        open_source(mixed)
    with pytest.raises(InputError, match="no such file or folder"):
        open_source(tmp_path / "nope")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable"):
        open_source(tmp_path / "bad.npz")
    np.save(tmp_path / "flat.npy", np.zeros((3, 4)))
    with pytest.raises(InputError, match=r"expected \(N, H, W\)"):
        open_source(tmp_path / "flat.npy")


@pytest.fixture
def dirty_folder(tmp_path):
    src = make_folder(tmp_path / "src", per_class=6)
    (src / "cat" / "0002.png").write_bytes(b"")  # zero bytes
    (src / "dog" / "0004.png").write_bytes((src / "dog" / "0001.png").read_bytes()[:30])  # truncated
    (src / "dog" / "notes.txt").write_text("ignored: no image extension")
    return src


def test_on_error_fail_names_the_file_and_writes_nothing(dirty_folder, tmp_path):
    out = tmp_path / "out.h5"
    with pytest.raises(InputError) as e:
        disguise_source(open_source(dirty_folder), out, KEY, Options(workers=0, batch=4))
    assert "cat/0002.png" in str(e.value) and "empty file" in str(e.value)
    assert "--on-error skip" in e.value.hint
    assert not out.exists() and not partial_path(out).exists()


def test_on_error_skip_counts(dirty_folder, tmp_path):
    out = tmp_path / "out.h5"
    source = open_source(dirty_folder)
    assert source.ignored == ["dog/notes.txt"]
    rep = disguise_source(source, out, KEY, Options(workers=2, on_error="skip", batch=4))
    assert rep.rows == 10 and len(rep.skipped) == 2
    assert sorted(p for _, p in rep.skipped)[0].startswith("corrupt or truncated PNG")
    meta = inspect(out)
    assert meta.rows == 10 and meta.source_skipped == 2
    labels = read(out)[0]["labels"]
    assert labels.tolist() == [0] * 5 + [1] * 5


def test_existing_output_and_partials_are_protected(tmp_path):
    src = open_source(make_folder(tmp_path / "src", per_class=2))
    out = tmp_path / "out.h5"
    out.write_bytes(b"precious")
    with pytest.raises(InputError, match="exists") as e:
        disguise_source(src, out, KEY, Options(workers=0))
    assert "--force" in e.value.hint and out.read_bytes() == b"precious"
    disguise_source(src, out, KEY, Options(workers=0), force=True)
    assert inspect(out).rows == 4
    partial_path(out).write_bytes(b"left over")
    out2 = out
    out2.unlink()
    with pytest.raises(InputError, match="interrupted run"):
        disguise_source(src, out2, KEY, Options(workers=0))
    with pytest.raises(InputError, match="cannot resume"):
        disguise_source(src, out2, KEY, Options(workers=0), resume=True)


_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from helpers import test_key
    from dkit.data import Options, disguise_source, open_source
    from dkit.engine import RandomSource
    key = test_key("resume", shape="32x32x3", block="4", pipeline="perm,rmt", noise=25)
    def tick(done, total):
        print(done, total, flush=True)
        time.sleep(float(sys.argv[4]))
    disguise_source(open_source(sys.argv[1]), sys.argv[2], key, Options(workers=1, batch=256),
                    rng=RandomSource.fixed(5), resume=sys.argv[3] == "resume", progress=tick)
""")


def _child(*args):
    code = _CHILD.format(tests=str(REPO / "tests"))
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True)


def test_sigkill_then_resume_equals_an_uninterrupted_run(cifar_folder, tmp_path):
    src = subset(cifar_folder, tmp_path / "src", per_class=150)  # 1,500 images, 6 batches
    whole, cut = tmp_path / "whole.h5", tmp_path / "cut.h5"
    assert _child(src, whole, "fresh", 0).wait(120) == 0
    p = _child(src, cut, "fresh", 0.5)
    line = p.stdout.readline()  # the first batch is committed; kill during the pause that follows
    assert 0 < int(line.split()[0]) < 1500
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    assert p.returncode == -signal.SIGKILL
    assert not cut.exists() and partial_path(cut).exists()
    with h5py.File(partial_path(cut), "r") as f:
        assert f.attrs["complete"] == 0 and 0 < f.attrs["rows"] < 1500
    with pytest.raises(FormatError, match="incomplete"):
        inspect(partial_path(cut))
    assert _child(src, cut, "resume", 0).wait(120) == 0
    a, b = read(whole)[0], read(cut)[0]
    for name in ("images", "labels", "source_ids"):
        assert np.array_equal(a[name], b[name]), name
    assert inspect(cut).rows == 1500 and verify(cut)["ok"]


def test_resume_refuses_other_settings(tmp_path):
    src = open_source(make_folder(tmp_path / "src", per_class=30, shape=(32, 32, 3)))
    key = test_key("big", shape="32x32x3", block="4", pipeline="perm,rmt")
    out = tmp_path / "o.h5"
    opts = Options(workers=0, batch=21)  # one chunk of 32x32x3 float32 per batch

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        disguise_source(src, out, key, opts, progress=stop)
    assert partial_path(out).exists() and not out.exists()
    other = test_key("other", shape="32x32x3", block="4", pipeline="perm,rmt")
    with pytest.raises(InputError, match="another key id"):
        disguise_source(src, out, other, opts, resume=True)
    with pytest.raises(InputError, match="another dtype"):
        disguise_source(src, out, key, Options(workers=0, batch=21, dtype="float16"), resume=True)
    with pytest.raises(InputError, match="another set of options"):
        disguise_source(src, out, key, Options(workers=0, batch=21, fit="resize"), resume=True)
    rep = disguise_source(src, out, key, opts, resume=True)
    assert rep.resumed_from == 21 and inspect(out).rows == 60


def test_shards_merge_to_one_run(tmp_path):
    src = open_source(make_folder(tmp_path / "src", classes=("a", "b", "c"), per_class=5))
    whole = tmp_path / "whole.h5"
    disguise_source(src, whole, KEY, Options(workers=0), rng=RandomSource.fixed(3))
    shards = []
    for i in range(3):
        shards.append(tmp_path / f"s{i}.h5")
        disguise_source(src, shards[-1], KEY, Options(workers=0, shard=(i, 3)), rng=RandomSource.fixed(3))
        assert inspect(shards[-1]).shard[:2] == (i, 3)
    for virtual in (False, True):
        out = tmp_path / f"merged-{virtual}.h5"
        merge(out, [shards[2], shards[0], shards[1]], virtual=virtual)
        m = inspect(out)
        assert m.rows == 15 and m.shard is None
        a, b = read(whole)[0], read(out)[0]
        for name in ("labels", "source_ids"):
            assert np.array_equal(a[name], b[name]), name
        # The randomness follows the listing position; BLAS may round differently for other batch sizes.
        np.testing.assert_allclose(a["images"], b["images"], rtol=1e-6, atol=1e-4)
        assert verify(out)["ok"]
    with pytest.raises(InputError, match="missing shard"):
        merge(tmp_path / "m.h5", shards[:2])
    with pytest.raises(InputError, match="given twice"):
        merge(tmp_path / "m.h5", [shards[0], shards[0], shards[1]])
    with pytest.raises(InputError, match="not a shard"):
        merge(tmp_path / "m.h5", [whole])
    other = tmp_path / "other.h5"
    disguise_source(
        src, other, test_key("x", shape="8x8x3", block="4", pipeline="perm"), Options(workers=0, shard=(1, 3))
    )
    with pytest.raises(InputError, match="differs"):
        merge(tmp_path / "m.h5", [shards[0], other, shards[2]])


def test_full_disk_never_leaves_the_real_name(tmp_path, monkeypatch):
    import dkit.data.h5format as h5f

    src = open_source(make_folder(tmp_path / "src", per_class=30, shape=(32, 32, 3)))
    key = test_key("big", shape="32x32x3", block="4", pipeline="perm,rmt")
    out = tmp_path / "out.h5"
    calls = {"n": 0}
    real = h5f.Writer.append

    def full(self, *a):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a)

    monkeypatch.setattr(h5f.Writer, "append", full)
    with pytest.raises(DkitError, match="no space left on device") as e:
        disguise_source(src, out, key, Options(workers=0, batch=21))
    assert "--resume" in e.value.hint and not out.exists() and partial_path(out).exists()


def test_a_real_full_disk(tmp_path):
    """The CLI onto a 400 KiB tmpfs (where this machine lets the tests mount one), in its own processes:
    after a failed write HDF5's state is not to be trusted, so the failing process must be a throw-away."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated full disk test covers the logic")
    try:
        src = make_folder(tmp_path / "src", per_class=200, shape=(16, 16, 3))
        env = dict(
            os.environ, DKIT_HOME=str(tmp_path / "home"), DKIT_KEYSTORE="file", DKIT_PASSPHRASE="correct horse battery"
        )

        def dkit(*args):
            return subprocess.run(
                [sys.executable, "-m", "dkit", *map(str, args)], env=env, capture_output=True, text=True, timeout=300
            )

        assert dkit("keygen", "k", "--shape", "16x16x3").returncode == 0
        out = mnt / "out.h5"
        r = dkit("disguise", src, out, "--key", "k", "--workers", "0")
        assert r.returncode == 1, r.stderr
        assert "cannot write" in r.stderr and "not enough space left on the device" in r.stderr
        assert "free space" in r.stderr
        assert "Traceback" not in r.stderr
        assert not out.exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_dataset_reads_lazily_in_workers(tmp_path):
    src = open_source(make_folder(tmp_path / "src", per_class=8))
    out = _run(src, tmp_path / "o.h5")
    full = DisguisedDataset(out, in_memory=True)
    lazy = DisguisedDataset(out, in_memory=False)
    assert len(full) == len(lazy) == 16 and full.num_classes == 2
    x, y = lazy[3]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and int(y) == 0
    assert torch.equal(full[3][0], x)
    loader = torch.utils.data.DataLoader(
        lazy, batch_size=4, num_workers=2, shuffle=True, multiprocessing_context="fork" if os.name != "nt" else None
    )
    seen = torch.cat([yb for _, yb in loader])
    assert sorted(seen.tolist()) == [0] * 8 + [1] * 8
    sub = DisguisedDataset(out, indices=[9, 2, 5], in_memory=False)
    xs, ys = sub.get_batch([0, 1, 2])
    assert ys.tolist() == [1, 0, 0] and torch.equal(xs[1], full[2][0])


def test_decode_all_raises_naming_the_file(dirty_folder, tmp_path):
    source = open_source(dirty_folder)
    with pytest.raises(DecodeError, match="empty file") as e:
        decode_all(source, Policy((8, 8, 3)))
    assert e.value.name.endswith("cat/0002.png")
    clean = open_source(make_folder(tmp_path / "clean", per_class=3))
    notes = []
    for workers in (0, 2):
        got = decode_all(clean, Policy((8, 8, 1)), workers, batch=4, notes=notes)
        want = np.stack([clean.load(i, Policy((8, 8, 1)))[0] for i in range(6)])
        assert np.array_equal(got, want)
    assert notes == [("RGB->grey",)] * 12


IH_KEY = test_key("ih-run", shape="32x32x3", block="4", pipeline="instahide", k=2)


def _counting(source, calls):
    real = source.load

    def load(i, policy):
        calls[i] = calls.get(i, 0) + 1
        return real(i, policy)

    source.load = load
    return source


def test_instahide_inside_decodes_each_image_once(tmp_path):
    """The mixing pool is the whole private set; the run cuts its batches from it instead of decoding
    every image again. Resume and shards still write what one uninterrupted run writes."""
    folder = make_folder(tmp_path / "src", per_class=30, shape=(32, 32, 1))  # grey: each is converted
    opts = Options(workers=0, batch=21)  # 21 images a batch, 3 batches
    calls = {}
    whole = tmp_path / "whole.h5"
    rep = disguise_source(_counting(open_source(folder), calls), whole, IH_KEY, opts, rng=RandomSource.fixed(4))
    assert calls == dict.fromkeys(range(60), 1)
    assert rep.conversions == {"grey->RGB": 60} and rep.rows == rep.images == 60

    def stop(done, total):
        raise KeyboardInterrupt

    cut = tmp_path / "cut.h5"
    with pytest.raises(KeyboardInterrupt):
        disguise_source(open_source(folder), cut, IH_KEY, opts, rng=RandomSource.fixed(4), progress=stop)
    calls.clear()
    rep = disguise_source(
        _counting(open_source(folder), calls), cut, IH_KEY, opts, rng=RandomSource.fixed(4), resume=True
    )
    assert rep.resumed_from == 21 and rep.conversions == {"grey->RGB": 39}
    assert calls == dict.fromkeys(range(60), 1)
    shards = [tmp_path / f"s{i}.h5" for i in range(2)]
    for i, s in enumerate(shards):
        calls.clear()
        rep = disguise_source(
            _counting(open_source(folder), calls),
            s,
            IH_KEY,
            Options(workers=0, batch=21, shard=(i, 2)),
            rng=RandomSource.fixed(4),
        )
        assert calls == dict.fromkeys(range(60), 1) and rep.conversions == {"grey->RGB": 30}
    merge(tmp_path / "merged.h5", shards)
    a = read(whole)[0]
    for other in (cut, tmp_path / "merged.h5"):
        b = read(other)[0]
        for name in ("soft_labels", "source_ids"):
            assert np.array_equal(a[name], b[name]), name
        np.testing.assert_allclose(a["images"], b["images"], rtol=1e-6, atol=1e-4)


def test_copy_merge_finishes_through_the_writer(tmp_path, dirty_folder, monkeypatch):
    """The copy is marked complete, read back and renamed by Writer.finish, which also takes back the
    hook that hides a failed file's late write errors; the progress it records is the listing's."""
    import sys

    import dkit.data.h5format as h5f

    src = open_source(dirty_folder)
    shards = [tmp_path / f"s{i}.h5" for i in range(2)]
    for i, s in enumerate(shards):
        disguise_source(src, s, KEY, Options(workers=0, on_error="skip", shard=(i, 2)))
    finished, commits = [], []
    real_finish, real_commit = h5f.Writer.finish, h5f.Writer.commit
    monkeypatch.setattr(h5f.Writer, "finish", lambda self: (finished.append(self.out), real_finish(self)))
    monkeypatch.setattr(h5f.Writer, "commit", lambda self, *a: (commits.append(a), real_commit(self, *a)))
    hook = sys.unraisablehook
    out = tmp_path / "merged.h5"
    merge(out, shards)
    assert finished == [out] and sys.unraisablehook is hook
    # Listing positions: a shard's range counts as done once its rows are all in (shard 0 is 0..5).
    assert {done for _, done, _ in commits} == {0, 6, 12} and commits[-1] == (10, 12, 2)
    _, attrs = read(out)
    assert attrs["complete"] == 1 and attrs["rows"] == 10
    assert attrs["progress_sources"] == 12 and attrs["source_skipped"] == 2
    assert inspect(out).source_skipped == 2 and verify(out)["ok"]


def test_failed_writers_do_not_pile_up_hooks(tmp_path):
    import sys
    from dataclasses import replace

    import dkit.data.h5format as h5f

    meta = replace(inspect(_run(open_source(make_folder(tmp_path / "src", per_class=2)), tmp_path / "a.h5")), rows=0)
    hooks = set()
    for i in range(3):
        w = h5f.Writer(tmp_path / f"failed{i}.h5", meta, resume=False)
        w.close()  # as after a failure
        hooks.add(sys.unraisablehook)
    assert len(hooks) == 1
    w = h5f.Writer(tmp_path / "failed0.h5", meta, resume=False)  # a rerun of the same output succeeds
    w.finish()
    assert str(partial_path(tmp_path / "failed0.h5")) not in h5f._QUIET


def test_virtual_merge_images_name_their_encoding(tmp_path):
    """formats/SPEC-v1.md: images carry encoding_type and encoding_version, virtual ones too; a reader
    checks them."""
    src = open_source(make_folder(tmp_path / "src", per_class=4))
    shards = [tmp_path / f"s{i}.h5" for i in range(2)]
    for i, s in enumerate(shards):
        disguise_source(src, s, KEY, Options(workers=0, shard=(i, 2)))
    out = tmp_path / "virtual.h5"
    merge(out, shards, virtual=True)
    with h5py.File(out, "r") as f:
        assert f["images"].is_virtual
        assert dict(f["images"].attrs) == {"encoding_type": "dkit-images", "encoding_version": 1}
    assert inspect(out).rows == 8 and verify(out)["ok"]
    with h5py.File(out, "r+") as f:
        del f["images"].attrs["encoding_type"]
    with pytest.raises(FormatError, match="encoding_type and encoding_version are missing or unknown"):
        inspect(out)


def test_a_run_killed_while_laying_out_its_file_resumes_from_scratch(tmp_path):
    """SIGTERM/SIGKILL between creating the partial file and writing the images' attributes left a
    file that --resume refused ("encoding_type ... missing"): nothing was committed, so start afresh."""
    src = open_source(make_folder(tmp_path / "src", per_class=4))
    out = tmp_path / "o.h5"

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        disguise_source(src, out, KEY, Options(workers=0, batch=4), progress=stop)
    with h5py.File(partial_path(out), "r+") as f:  # as if killed before the first batch and the attributes
        del f["images"].attrs["encoding_type"]
        f.attrs["rows"], f.attrs["progress_sources"] = 0, 0
    rep = disguise_source(src, out, KEY, Options(workers=0), resume=True)
    assert rep.resumed_from == 0 and inspect(out).rows == 8 and verify(out)["ok"]
