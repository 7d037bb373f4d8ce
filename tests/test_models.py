"""Training, safe model artifacts, prediction with the key, and the inference wrapper."""

from __future__ import annotations

import json
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

from dkit.data import Options, disguise_source, open_source
from dkit.data.decode import DecodeError
from dkit.derive import source_id
from dkit.engine import RandomSource
from dkit.errors import ArtifactError, FormatError, InputError, KeyMismatch, KeyStateError
from dkit.models import DisguisedModel, TrainOptions, predict, train
from dkit.models import load as load_model
from dkit.models.artifact import META, WEIGHTS
from dkit.models.nets import BlockViT, build

from helpers import key_as_affine, make_folder, subset, test_key, train_and_held_out

TINY_VIT = {"dim": 32, "depth": 1, "heads": 2}


@pytest.fixture(scope="module")
def mnist_small(mnist_folder, tmp_path_factory):
    """A disguised MNIST subset (rmt 7x7, noise 100), a held-out folder and a trained CNN."""
    work = tmp_path_factory.mktemp("mnist-model")
    train_dir, test_dir = train_and_held_out(mnist_folder, work, per_class=200, held_out=30)
    key = test_key("mnist", shape="28x28", block="7", pipeline="rmt", noise=100, channels="shared")
    h5 = work / "train.h5"
    disguise_source(open_source(train_dir), h5, key, Options(workers=0))
    metrics = train(h5, work / "model", TrainOptions(arch="cnn", epochs=4))
    return {"work": work, "key": key, "h5": h5, "test": test_dir, "metrics": metrics, "model": work / "model"}


def test_training_writes_a_complete_artifact(mnist_small):
    m, model_dir = mnist_small["metrics"], mnist_small["model"]
    assert sorted(p.name for p in model_dir.iterdir()) == ["metrics.json", "model.json", "model.safetensors"]
    meta = json.loads((model_dir / META).read_text())
    assert meta["format"] == "dkit-model" and meta["version"] == 1 and meta["arch"] == "cnn"
    assert meta["key_id"] == mnist_small["key"].key_id and meta["key_version"] == 1
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["num_classes"] == 10
    assert len(meta["dataset"]["sha256"]) == 64 and meta["dataset"]["rows"] == 2000
    assert len(meta["normalization"]["mean"]) == 1
    assert json.loads((model_dir / "metrics.json").read_text())["final"] == m["final"]
    assert len(m["epochs"]) == 4 and m["train_rows"] + m["val_rows"] == 2000
    assert m["final"]["val_acc"] > 0.5  # it learned (chance is 0.1)


def test_predict_matches_the_training_report(mnist_small):
    """Predicting the validation images (found by their keyed source IDs, which only the owner can
    link to files) with fresh noise reproduces the validation accuracy training reported."""
    import h5py

    from dkit.models.training import split

    key, work = mnist_small["key"], mnist_small["work"]
    from dkit.data import inspect

    meta = inspect(mnist_small["h5"])
    _, val_rows = split(mnist_small["h5"], meta, 0.1, 0)
    with h5py.File(mnist_small["h5"], "r") as f:
        val_ids = {bytes(r) for r in f["source_ids"][:][val_rows]}
    src = open_source(work / "train")
    val_dir = work / "val"
    for name in src.names:
        if source_id(key.material, name) in val_ids:
            (val_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(work / "train" / name, val_dir / name)
    doc = predict(mnist_small["model"], open_source(val_dir), key)
    assert doc["labelled"] == len(val_rows) == 200
    # Fresh noise moves a few borderline images either way (noise 100 is strong): 0.05 is 10 of 200.
    assert abs(doc["accuracy"] - mnist_small["metrics"]["final"]["val_acc"]) <= 0.05
    held_out = predict(mnist_small["model"], open_source(mnist_small["test"]), key)
    assert held_out["labelled"] == 300 and abs(held_out["accuracy"] - doc["accuracy"]) <= 0.12


def test_predict_refuses_other_keys_before_predicting(mnist_small, monkeypatch):
    import dkit.models.prediction as pred

    def boom(*a, **k):
        raise AssertionError("no image may be decoded before the key is checked")

    monkeypatch.setattr(pred, "_batches", boom)
    other = test_key("other", shape="28x28", block="7", pipeline="rmt", noise=100, channels="shared")
    with pytest.raises(KeyMismatch, match=r"is not the key .* was trained with \(key ID"):
        predict(mnist_small["model"], open_source(mnist_small["test"]), other)


def test_rotate_then_old_version_predicts_then_disable_refuses(mnist_small, keystore, cli, isolated_home, tmp_path):
    """The Tink flow end to end through the CLI."""
    r = cli("keygen", "m", "--shape", "28x28", "--block", "7", "--pipeline", "rmt", "--noise", "100")
    assert r.exit_code == 0
    src = subset(mnist_small["work"] / "train", tmp_path / "src", per_class=20)
    assert cli("disguise", src, tmp_path / "m.h5", "--key", "m").exit_code == 0
    r = cli("train", tmp_path / "m.h5", "-o", tmp_path / "model", "--arch", "cnn", "--epochs", "1", "--json")
    assert r.exit_code == 0, r.output
    assert cli("keys", "rotate", "m").exit_code == 0
    r = cli("predict", tmp_path / "model", mnist_small["test"], "--key", "m@1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["count"] == 300
    r = cli("predict", tmp_path / "model", mnist_small["test"], "--key", "m")  # the new primary, m@2
    assert r.exit_code == 1 and "is not the key" in r.stderr and "version 1" in r.stderr
    assert cli("keys", "disable", "m@1").exit_code == 0
    r = cli("predict", tmp_path / "model", mnist_small["test"], "--key", "m@1")
    assert r.exit_code == 1 and "m@1 is disabled" in r.stderr
    assert cli("keys", "destroy", "m@1", "--yes").exit_code == 0
    r = cli("predict", tmp_path / "model", mnist_small["test"], "--key", "m@1")
    assert r.exit_code == 1 and "destroyed" in r.stderr
    log = (isolated_home / "audit.jsonl").read_text()
    assert '"action":"predict"' in log


def test_predict_formats_and_bad_inputs(mnist_small, cli, tmp_path, isolated_home, memory_backend):
    from dkit.keystore import Keystore

    # Import the test key into the CLI's store under a name, as an owner would restore a backup.
    ks = Keystore(isolated_home, backend=memory_backend)
    rec = ks.keygen("m", mnist_small["key"].params)  # another seed: the model must refuse it
    assert rec.versions[0].key_id != mnist_small["key"].key_id
    r = cli("predict", mnist_small["model"], mnist_small["test"], "--key", "m")
    assert r.exit_code == 1 and "is not the key" in r.stderr
    doc = predict(mnist_small["model"], open_source(mnist_small["test"]), mnist_small["key"], top_k=2)
    assert len(doc["predictions"][0]["top"]) == 2
    p = doc["predictions"][0]["top"]
    assert p[0]["probability"] >= p[1]["probability"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        predict(mnist_small["model"], open_source(tmp_path / "empty"), mnist_small["key"])
    wrong = make_folder(tmp_path / "wrong", per_class=2, shape=(32, 32, 1))
    with pytest.raises(InputError, match=r"0000.png: size 32x32 \(WxH\), but the key expects 28x28"):
        predict(mnist_small["model"], open_source(wrong), mnist_small["key"])


def test_train_bad_inputs(tmp_path, mnist_small):
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(FormatError, match="not a dkit disguised dataset"):
        train(tmp_path / "other.h5", tmp_path / "m")
    newer = tmp_path / "newer.h5"
    shutil.copy(mnist_small["h5"], newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["dkit_format_version"] = 7
    with pytest.raises(FormatError, match="upgrade dkit"):
        train(newer, tmp_path / "m")
    flat = make_folder(tmp_path / "flat", classes=(), per_class=4, shape=(28, 28, 1))
    disguise_source(open_source(flat), tmp_path / "flat.h5", mnist_small["key"], Options(workers=0))
    with pytest.raises(InputError, match="no labels"):
        train(tmp_path / "flat.h5", tmp_path / "m")
    with pytest.raises(InputError, match="holds a trained model"):
        train(mnist_small["h5"], mnist_small["model"])
    with pytest.raises(InputError, match="unknown --arch"):
        train(mnist_small["h5"], tmp_path / "m2", TrainOptions(arch="vgg"))


def test_interrupted_training_resumes(tmp_path, mnist_small):
    model_dir = tmp_path / "model"

    def stop_after_first_epoch(p):
        if "epoch_done" in p and p["epoch_done"]["epoch"] == 1:
            raise KeyboardInterrupt

    opts = TrainOptions(arch="cnn", epochs=2, seed=3, mixup=0.2)
    with pytest.raises(KeyboardInterrupt):
        train(mnist_small["h5"], model_dir, opts, progress=stop_after_first_epoch)
    assert (model_dir / "checkpoint" / "progress.json").exists() and not (model_dir / META).exists()
    with pytest.raises(InputError, match="interrupted training run"):
        train(mnist_small["h5"], model_dir, opts)
    with pytest.raises(InputError, match="another run"):
        train(mnist_small["h5"], model_dir, TrainOptions(arch="cnn", epochs=2, seed=4, mixup=0.2), resume=True)
    resumed = train(mnist_small["h5"], model_dir, opts, resume=True)
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]
    assert not (model_dir / "checkpoint").exists()
    straight = train(mnist_small["h5"], tmp_path / "straight", opts)
    # Same seed, same shuffles, same weights, optimizer and dropout state at the resume point: same result.
    assert straight["final"]["train_loss"] == pytest.approx(resumed["final"]["train_loss"], rel=1e-6)
    assert straight["final"]["val_acc"] == resumed["final"]["val_acc"]


class Payload:
    """Unpickling this runs code: the attack a model from an untrusted cloud could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_payloads_are_refused(tmp_path, mnist_small):
    marker = tmp_path / "pwned"
    bomb = pickle.dumps({"weights": Payload(marker)})
    tampered = tmp_path / "tampered"
    shutil.copytree(mnist_small["model"], tampered)
    (tampered / WEIGHTS).write_bytes(bomb)
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        load_model(tampered)
    only_pickle = tmp_path / "only-pickle"
    only_pickle.mkdir()
    (only_pickle / "model.pt").write_bytes(bomb)
    with pytest.raises(ArtifactError, match="never loads pickled models"):
        load_model(only_pickle)
    torch_bomb = tmp_path / "optimizer.pt"
    torch.save({"state": Payload(marker)}, torch_bomb)
    from dkit.models.artifact import load_checkpoint_state

    with pytest.raises(ArtifactError, match="refused to load"):
        load_checkpoint_state(torch_bomb)
    assert not marker.exists()  # no payload ever ran


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda d: d.pop("key_id"), "field 'key_id' is missing"),
        (lambda d: d.update(key_id="not-hex"), "malformed key ID"),
        (lambda d: d.update(arch="evil"), "unknown architecture"),
        (lambda d: d.update(version=9), "upgrade dkit"),
        (lambda d: d.update(num_classes=3, class_names=["0", "1", "2"]), "do not fit"),
        (lambda d: d.update(num_classes=3), "field 'class_names' holds 10 names for num_classes 3"),
        (lambda d: d.update(block=[0, 0]), "field 'block' is \\[0, 0\\], which does not tile"),
        (lambda d: d["normalization"].pop("mean"), "field 'normalization.mean' is None"),
        (lambda d: d.update(arch="blockvit", arch_params={"depth": 10**6}), "field 'arch_params.depth' is 1000000"),
    ],
)
def test_damaged_model_descriptions_are_refused(tmp_path, mnist_small, edit, words):
    bad = tmp_path / "bad"
    shutil.copytree(mnist_small["model"], bad)
    doc = json.loads((bad / META).read_text())
    edit(doc)
    (bad / META).write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=words):
        load_model(bad)


def test_wrapper_disguises_then_calls_the_model(mnist_small):
    model, meta = load_model(mnist_small["model"])
    key = mnist_small["key"]
    net = DisguisedModel(model, key).eval()
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8))
    from dkit.engine import Disguise

    want = model(
        torch.from_numpy(
            Disguise.from_key(key).apply(x.permute(0, 2, 3, 1).numpy(), rng=RandomSource.fixed(1))
        ).permute(0, 3, 1, 2)
    )
    got = net(x, rng=RandomSource.fixed(1))
    torch.testing.assert_close(got, want)
    nhwc = DisguisedModel(model, key, layout="NHWC")
    torch.testing.assert_close(nhwc(x.permute(0, 2, 3, 1), rng=RandomSource.fixed(1)), want)
    assert net.unwrap() is model
    model.note = "from the cloud"
    assert net.note == "from the cloud" and net.training is False  # unknown attributes pass through
    assert set(net.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    assert key.material.aes is None and "redacted" not in repr(net) and key.key_id in repr(net)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(net)


def test_wrapper_refuses_a_key_that_is_not_the_models(mnist_small):
    """The README's flow after a rotation: the primary is version 2, the model was trained on version 1."""
    model, meta = load_model(mnist_small["model"])
    assert model.dkit_key_id == meta.key_id == mnist_small["key"].key_id
    other = test_key("rotated", shape="28x28", block="7", pipeline="rmt", noise=100, channels="shared")
    with pytest.raises(KeyMismatch, match=f"key ID {other.key_id}.*not the key.*{meta.key_id}"):
        DisguisedModel(model, other)
    with pytest.raises(KeyMismatch):  # a stated key ID is checked the same way
        DisguisedModel(model, other, key_id=meta.key_id)
    bare = BlockViT((28, 28, 1), (7, 7), 10, **TINY_VIT)  # built by other code: no key ID recorded
    with pytest.raises(InputError, match="does not say which key"):
        DisguisedModel(bare, mnist_small["key"])
    assert DisguisedModel(bare, mnist_small["key"], key_id=mnist_small["key"].key_id).key_id == meta.key_id


def test_blockvit_blocks_match_the_disguise_layout():
    """The block-aware model cuts blocks exactly as the disguise does, so E_i meets R_i."""
    from dkit.engine.geometry import to_blocks
    from dkit.params import KeyParams

    p = KeyParams.create("8x12x3", "4x3", "rmt")
    vit = BlockViT(p.shape, p.block, 5, **TINY_VIT)
    x = np.random.default_rng(0).random((2, 8, 12, 3)).astype(np.float32)
    got = vit.blocks(torch.from_numpy(x).permute(0, 3, 1, 2)).transpose(0, 1).numpy()
    np.testing.assert_array_equal(got, to_blocks(x, p))
    m = build("blockvit", p.shape, p.block, 5, [0] * 3, [1] * 3, **TINY_VIT)
    assert m(torch.zeros(2, 3, 8, 12)).shape == (2, 5)


def test_cifar_block_model_trains_and_predicts(cifar_folder, tmp_path, cli, isolated_home, memory_backend):
    """A disguised CIFAR file through train and predict (CLI): predicting the validation images with
    the right key reproduces the reported validation accuracy; another key is refused."""
    import h5py

    from dkit.data import inspect
    from dkit.keystore import Keystore
    from dkit.models.training import split

    train_dir = subset(cifar_folder, tmp_path / "train", per_class=100)
    assert cli("keygen", "c", "--shape", "32x32x3", "--block", "4", "--pipeline", "perm,rmt").exit_code == 0
    assert cli("keygen", "d", "--shape", "32x32x3", "--block", "4", "--pipeline", "perm,rmt").exit_code == 0
    assert cli("disguise", train_dir, tmp_path / "c.h5", "--key", "c").exit_code == 0
    r = cli(
        "train",
        tmp_path / "c.h5",
        "-o",
        tmp_path / "model",
        "--epochs",
        "3",
        "--arch",
        "blockvit",
        "--arch-param",
        "dim=48",
        "--arch-param",
        "depth=1",
        "--arch-param",
        "heads=2",
        "--val-fraction",
        "0.2",
        "--json",
    )
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)
    assert metrics["arch"] == "blockvit" and len(metrics["epochs"]) == 3 and metrics["val_rows"] == 200
    # The owner finds the validation images by their keyed source IDs and predicts them with fresh noise.
    key = Keystore(isolated_home, backend=memory_backend).load("c")
    _, val_rows = split(tmp_path / "c.h5", inspect(tmp_path / "c.h5"), 0.2, 0)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        val_ids = {bytes(r) for r in f["source_ids"][:][val_rows]}
    val_dir = tmp_path / "val"
    for name in open_source(train_dir).names:
        if source_id(key.material, name) in val_ids:
            (val_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(train_dir / name, val_dir / name)
    r = cli("predict", tmp_path / "model", val_dir, "--key", "c", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["labelled"] == 200
    assert abs(doc["accuracy"] - metrics["final"]["val_acc"]) <= 0.05
    r = cli("predict", tmp_path / "model", val_dir, "--key", "c", "--format", "csv")
    lines = r.stdout.strip().splitlines()
    assert r.exit_code == 0 and lines[0].startswith("input,class1,probability1") and len(lines) == 201
    r = cli("predict", tmp_path / "model", val_dir, "--key", "d")
    assert r.exit_code == 1 and "is not the key" in r.stderr
    assert cli("keys", "rotate", "c").exit_code == 0
    r = cli("predict", tmp_path / "model", val_dir, "--key", "c")  # now c@2
    assert r.exit_code == 1 and "version 1" in r.stderr


def test_instahide_soft_labels_train(tmp_path):
    src = open_source(make_folder(tmp_path / "src", classes=("a", "b", "c"), per_class=20, shape=(8, 8, 3)))
    key = test_key("ih", shape="8x8x3", block="4", pipeline="instahide", k=2)
    disguise_source(src, tmp_path / "ih.h5", key, Options(workers=0, encodings=2))
    m = train(tmp_path / "ih.h5", tmp_path / "model", TrainOptions(arch="cnn", epochs=1))
    assert m["train_rows"] + m["val_rows"] == 120 and m["final"]["train_loss"] > 0
    doc = predict(tmp_path / "model", src, key, samples=2)
    assert doc["count"] == 60 and doc["accuracy"] is not None


def test_disabled_keys_are_refused_at_load(keystore):
    from dkit.params import KeyParams

    keystore.keygen("k", KeyParams.create("28x28", 7, "rmt"))
    keystore.rotate("k")
    keystore.disable("k@1")
    with pytest.raises(KeyStateError, match="disabled"):
        keystore.load("k@1", use="predict")


def test_wrapper_averages_over_fresh_noise(mnist_small):
    model, _ = load_model(mnist_small["model"])
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8))
    noisy = DisguisedModel(model, mnist_small["key"], samples=3).eval()
    out = noisy(x)
    assert out.shape == (5, 10)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(5))
    quiet = test_key("quiet", shape="28x28", block="7", pipeline="rmt", noise=0, channels="shared")
    # quiet is not the model's key: key_id= overrides the check on purpose (only the averaging is tested)
    one = DisguisedModel(model, quiet, key_id=quiet.key_id).eval()
    three = DisguisedModel(model, quiet, samples=3, key_id=quiet.key_id).eval()
    with torch.no_grad():  # without noise every sample is the same disguise: averaging changes nothing
        torch.testing.assert_close(three(x), torch.log_softmax(one(x), dim=1), atol=1e-5, rtol=1e-5)


TINY_KEY = test_key("tiny", shape="8x8x3", block="4", pipeline="perm,rmt")


@pytest.fixture(scope="module")
def tiny_h5(tmp_path_factory):
    """A small disguised set (8x8x3, three classes of ten) that trains in a moment."""
    work = tmp_path_factory.mktemp("tiny")
    src = open_source(make_folder(work / "src", classes=("a", "b", "c"), per_class=10))
    disguise_source(src, work / "tiny.h5", TINY_KEY, Options(workers=0))
    return work / "tiny.h5"


def _saved(model_dir, arch, arch_params, seed=0):
    """A freshly built model (buffers made random, so loading them is seen) saved as an artifact."""
    from dkit.models import artifact

    torch.manual_seed(seed)
    p = TINY_KEY.params
    model = build(arch, p.shape, p.block, 3, [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], **arch_params).eval()
    for name, b in model.named_buffers():
        if b.is_floating_point():
            b.copy_(torch.rand_like(b) + 0.5)
        elif name.endswith("num_batches_tracked"):
            b.fill_(7)
    meta = artifact.ModelMeta(
        arch=arch,
        arch_params=arch_params,
        in_shape=list(p.shape),
        block=list(p.block),
        num_classes=3,
        class_names=["a", "b", "c"],
        label_kind="hard",
        key_id=TINY_KEY.key_id,
        key_version=1,
        key_params=p.to_dict(),
        dataset={},
        normalization={"mean": [0.0] * 3, "std": [1.0] * 3},
    )
    artifact.save(model_dir, model, meta, {})
    return model


@pytest.mark.parametrize(
    "arch,arch_params",
    [
        ("cnn", {"hidden": 16}),
        ("resnet18", {}),
        ("blockvit", TINY_VIT),
        ("blockconv", {"width": 8, "depth": 1}),
        ("blockresnet", {}),
    ],
)
def test_load_assigns_every_stored_tensor(tmp_path, arch, arch_params):
    """The network is built without memory (on the meta device) and takes the stored tensors as they
    are: parameters and buffers (the normalisation, BatchNorm's running statistics) alike."""
    original = _saved(tmp_path / arch, arch, arch_params)
    loaded, _ = load_model(tmp_path / arch, "cpu")
    want, got = original.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert got[k].device.type == "cpu" and got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k
    assert all(p.requires_grad for p in loaded.parameters()) and not loaded.training
    x = torch.rand(2, 3, 8, 8) * 255
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x))


def test_absurd_arch_params_fail_fast(tmp_path, monkeypatch):
    """arch_params come from an untrusted model.json: a huge size must not allocate the network it
    describes before the weights are found not to fit."""

    import dkit.models.artifact as art

    _saved(tmp_path / "m", "cnn", {"hidden": 16})
    devices = []
    real_build = art.build

    def spy(*a, **k):
        devices.append(torch.empty(0).device.type)  # the device that build's tensors go to
        return real_build(*a, **k)

    monkeypatch.setattr(art, "build", spy)
    doc = json.loads((tmp_path / "m" / META).read_text())
    for hidden, words in [
        (10**12, r"field 'arch_params\.hidden' is 1000000000000, out of range \(it must be from 1 to 65536\)"),
        (60_000, r"the weights do not fit the described model \(arch_params hidden=60000, but the weights hold"),
        (50_000, r"1\.classifier\.1\.weight is \(16, 256\) float32 in the weights, \(50000, 256\) float32 in the desc"),
    ]:
        doc["arch_params"] = {"hidden": hidden}
        (tmp_path / "m" / META).write_text(json.dumps(doc))
        with pytest.raises(ArtifactError) as e:
            load_model(tmp_path / "m")
        assert re.search(words, str(e.value)), str(e.value)
    assert devices == ["meta"]  # the second one was built, without memory


def test_artifact_and_checkpoint_files_are_written_atomically(tmp_path, tiny_h5, monkeypatch):
    """Weights and checkpoint files go through dkit.home.atomic_write (temporary file, fsync, rename)."""
    import dkit.models.artifact as art
    import dkit.models.training as tr
    from dkit.home import atomic_write

    written = []

    def spy(path, data, **kw):
        written.append(path.name)
        return atomic_write(path, data, **kw)

    monkeypatch.setattr(art, "atomic_write", spy)
    monkeypatch.setattr(tr, "atomic_write", spy)
    train(tiny_h5, tmp_path / "model", TrainOptions(arch="cnn", epochs=1))
    assert {"model.safetensors", "optimizer.pt", "progress.json", WEIGHTS, META} <= set(written)
    assert written.count("model.safetensors") == 2  # the checkpoint's, then the artifact's
    assert load_model(tmp_path / "model")[1].arch == "cnn"


def test_checkpoint_swap_never_loses_the_checkpoint(tmp_path, monkeypatch):
    """A crash while a new checkpoint replaces the old one leaves the old one, and training finds it."""
    from pathlib import Path

    from dkit.models import training as tr

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = tmp_path / "model" / tr.CHECKPOINT
    tr._save_checkpoint(ckpt, {"run": 1}, model, opt, sched, 1, [])
    real_rename = Path.rename

    def crash(self, target):
        if self.name.endswith(".tmp"):
            raise OSError("killed while renaming the new checkpoint in")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash)
    with pytest.raises(OSError, match="killed"):
        tr._save_checkpoint(ckpt, {"run": 1}, model, opt, sched, 2, [])
    monkeypatch.setattr(Path, "rename", real_rename)
    tr._recover_checkpoint(ckpt)
    assert json.loads((ckpt / "progress.json").read_text())["epoch"] == 1
    tr._save_checkpoint(ckpt, {"run": 1}, model, opt, sched, 2, [])
    assert json.loads((ckpt / "progress.json").read_text())["epoch"] == 2
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [tr.CHECKPOINT]


def test_force_retrain_drops_the_old_description_first(tmp_path, tiny_h5):
    """A --force retrain that stops half-way leaves no model.json to describe weights it did not write."""
    model_dir = tmp_path / "model"
    train(tiny_h5, model_dir, TrainOptions(arch="cnn", epochs=1))
    assert (model_dir / META).exists()

    def stop(p):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_h5, model_dir, TrainOptions(arch="cnn", epochs=1, seed=1), force=True, progress=stop)
    assert not (model_dir / META).exists()
    with pytest.raises(ArtifactError, match="not a dkit model"):
        load_model(model_dir)


def test_training_holds_the_data_once(tmp_path, tiny_h5, monkeypatch):
    """Once split into training and validation copies, the full array read from the file is freed."""
    import weakref

    from dkit.data import DisguisedDataset

    refs = []
    real = DisguisedDataset.read_all

    def read_all(self):
        x, y = real(self)
        refs.append(weakref.ref(x))
        return x, y

    monkeypatch.setattr(DisguisedDataset, "read_all", read_all)
    freed = []
    train(
        tiny_h5,
        tmp_path / "model",
        TrainOptions(arch="cnn", epochs=1),
        progress=lambda p: freed.append(refs[0]() is None),
    )
    assert len(refs) == 1 and freed and all(freed)


def test_predict_refuses_a_broken_public_image(tmp_path):
    """InstaHide cross: the public pool is decoded whole, and an image that fails names its file
    (rather than mixing uninitialised memory into the inputs)."""
    from PIL import Image

    key = test_key("cross", shape="8x8x3", block="4", pipeline="instahide", k=2, mix="cross")
    src = open_source(make_folder(tmp_path / "src", classes=("a", "b", "c"), per_class=8))
    public_dir = make_folder(tmp_path / "public", classes=(), per_class=6, seed=1)
    disguise_source(src, tmp_path / "x.h5", key, Options(workers=0), public=open_source(public_dir))
    train(tmp_path / "x.h5", tmp_path / "model", TrainOptions(arch="cnn", epochs=1))
    assert predict(tmp_path / "model", src, key, public=open_source(public_dir))["count"] == 24
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(public_dir / "0003.png")  # the wrong size
    with pytest.raises(DecodeError, match=r"0003\.png: size 5x5") as e:
        predict(tmp_path / "model", src, key, public=open_source(public_dir))
    assert e.value.name.endswith("0003.png")


def test_predict_refuses_0_1_floats_and_scales_them_on_request(mnist_small, tmp_path):
    from PIL import Image

    files = sorted((mnist_small["test"] / "3").iterdir())[:8]
    plain = np.stack([np.asarray(Image.open(f)) for f in files])
    np.save(tmp_path / "plain.npy", plain)
    np.save(tmp_path / "scaled.npy", plain / 255.0)
    with pytest.raises(DecodeError, match="look scaled to 0..1"):
        predict(mnist_small["model"], open_source(tmp_path / "scaled.npy"), mnist_small["key"])
    want = predict(mnist_small["model"], open_source(tmp_path / "plain.npy"), mnist_small["key"], top_k=1)
    got = predict(
        mnist_small["model"], open_source(tmp_path / "scaled.npy"), mnist_small["key"], top_k=1, float_range="0-1"
    )
    # fresh noise per call, so compare the classes the model is sure of, not the probabilities
    sure = [
        (a["top"][0]["class"], b["top"][0]["class"])
        for a, b in zip(want["predictions"], got["predictions"], strict=True)
        if a["top"][0]["probability"] > 0.9
    ]
    assert sure and all(a == b for a, b in sure)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_with_nan_or_inf_are_refused(tmp_path, bad):
    from safetensors.torch import load_file, save_file

    _saved(tmp_path / "m", "cnn", {})
    load_model(tmp_path / "m")  # the intact model loads
    state = load_file(str(tmp_path / "m" / WEIGHTS))
    name = next(k for k, t in state.items() if t.is_floating_point() and t.numel() > 1)
    state[name].view(-1)[1] = bad
    save_file(state, str(tmp_path / "m" / WEIGHTS), metadata={"format": "dkit-model", "version": "1"})
    with pytest.raises(ArtifactError, match=rf"NaN or infinite values \({re.escape(name)}\)"):
        load_model(tmp_path / "m")


def test_training_refuses_garbage_and_shows_its_folder_at_once(tiny_h5, tmp_path, monkeypatch):
    import h5py

    from dkit.errors import ParameterError
    from dkit.models import training

    seen = []

    def progress(p):
        seen.append((tmp_path / "m").is_dir())

    train(tiny_h5, tmp_path / "m", TrainOptions(arch="cnn", epochs=1), progress=progress)
    assert seen and seen[0]  # the model folder is there from the first step, before epoch 1 ends

    with pytest.raises(ParameterError, match=r"--arch-param depth is 100000, out of range"):
        train(tiny_h5, tmp_path / "p", TrainOptions(arch="blockvit", epochs=1, arch_params={"depth": 100_000}))

    nan = tmp_path / "nan.h5"
    shutil.copy(tiny_h5, nan)
    with h5py.File(nan, "r+") as f:
        f["images"][4, 0, 0, 0] = np.nan
    with pytest.raises(FormatError, match=r"1 images hold NaN or infinite values \(first at row 4\)"):
        train(nan, tmp_path / "n", TrainOptions(arch="cnn", epochs=1))

    monkeypatch.setattr(training, "_loss", lambda logits, y: logits.sum() * float("nan"))
    with pytest.raises(InputError, match="training diverged: the loss is nan at epoch 1, step 1"):
        train(tiny_h5, tmp_path / "d", TrainOptions(arch="cnn", epochs=1))


@pytest.mark.parametrize("channels", ["joint", "shared"])
def test_blockconv_absorbs_an_unpermuted_rmt_key_exactly(channels):
    """The same function on plain images with the key folded into the stem: BlockConv on disguised
    images equals BlockConv with stem M_i^T W_i (and the offset folded into the bias) on plain ones."""
    import copy

    from dkit.models.nets import BlockConv

    key = test_key(f"absorb-{channels}", shape="8x8x3", block="4", pipeline="rmt", channels=channels)
    block, t, d = (4, 4), 4, 48
    # the disguise is affine per block position: its offset and matrix from basis images
    disguise, offset, mt = key_as_affine(key)  # mt (t, d, d): row k is M_i e_k, so this is M_i^T
    assert not torch.allclose(mt, torch.eye(d, dtype=torch.float64).expand(t, d, d))  # a real key

    torch.manual_seed(0)
    on_disguised = BlockConv((8, 8, 3), block, 5, width=16, depth=2).double().eval()
    for m in on_disguised.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    on_plain = copy.deepcopy(on_disguised)
    with torch.no_grad():
        w = on_disguised.embed_w
        on_plain.embed_w.copy_(torch.bmm(mt, w))
        on_plain.embed_b.copy_(on_disguised.embed_b + torch.einsum("td,tdk->tk", offset, w))
    x = torch.rand(6, 8, 8, 3, dtype=torch.float64) * 255
    with torch.no_grad():
        a = on_disguised(disguise(x).permute(0, 3, 1, 2))
        b = on_plain(x.permute(0, 3, 1, 2))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-7)


def test_blockconv_trains_saves_and_predicts(tiny_h5, tmp_path):
    metrics = train(
        tiny_h5, tmp_path / "m", TrainOptions(arch="blockconv", epochs=2, arch_params={"width": 8, "depth": 1})
    )
    assert metrics["arch"] == "blockconv" and len(metrics["epochs"]) == 2
    model, meta = load_model(tmp_path / "m")
    assert meta.arch == "blockconv" and meta.arch_params == {"width": 8, "depth": 1}
