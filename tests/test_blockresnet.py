"""blockresnet (issue 11): the block-aware ResNet absorbs RMT and a placed permutation exactly; the
placement of a permuting key's blocks is found from disguised images alone; ``--arch auto``."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from dkit.data import Options, disguise_source, open_source
from dkit.engine import Disguise, RandomSource
from dkit.errors import ArtifactError
from dkit.models import TrainOptions, train
from dkit.models import load as load_model
from dkit.models.nets import BlockResNet, to_blocks
from dkit.models.training import auto_arch
from dkit.params import KeyParams
from dkit.placement import place_positions, placement_accuracy

from helpers import key_as_affine, make_folder, subset, test_key


@pytest.mark.parametrize("stem", [0, 1])
@pytest.mark.parametrize(
    "pipeline,channels", [("rmt", "joint"), ("perm,rmt", "joint"), ("perm,rmt", "shared"), ("perm", "joint")]
)
def test_blockresnet_absorbs_the_key_exactly(pipeline, channels, stem):
    """The same function: blockresnet on disguised images (noise 0) with arrangement = the key's
    permutation equals blockresnet with the identity arrangement and the key folded into its stem
    (W_perm[j] = M_j E_j, the offset into the bias) on plain images."""
    shape, block = (16, 16, 3), (4, 4)
    t, d = 16, 48
    key = test_key(f"absorb-{pipeline}-{channels}", shape="16x16x3", block="4", pipeline=pipeline, channels=channels)
    perm = np.array(key.material.perm) if key.material.perm is not None else np.arange(t)
    disguise, offset, mt = key_as_affine(key)  # stored position j: x_perm[j] @ mt[j] + offset[j]
    assert not torch.allclose(mt, torch.eye(d, dtype=torch.float64).expand(t, d, d)) or pipeline == "perm"
    assert pipeline == "rmt" or not np.array_equal(perm, np.arange(t))  # a real permutation

    torch.manual_seed(0)
    on_disguised = BlockResNet(shape, block, 7, shared=stem).double().eval()
    if stem:  # a shared stem W behind per-position maps A_j: start them away from the identity
        with torch.no_grad():
            on_disguised.align.add_(torch.randn_like(on_disguised.align) * 0.3)
    for m in on_disguised.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    on_plain = copy.deepcopy(on_disguised)
    with torch.no_grad():
        on_disguised.arrangement.copy_(torch.from_numpy(np.array(perm)))
        e, b = on_disguised.embeddings(), on_disguised.embed_b
        if stem:  # E_j = A_j W: fold the key into A_j, W stays shared
            on_plain.align[perm] = torch.bmm(mt, on_disguised.align)
        else:
            on_plain.embed_w[perm] = torch.bmm(mt, e)
        on_plain.embed_b[perm] = b + torch.einsum("td,tdk->tk", offset, e)
    x = torch.rand(5, *shape, dtype=torch.float64) * 255
    with torch.no_grad():
        a = on_disguised(disguise(x).permute(0, 3, 1, 2))
        p = on_plain(x.permute(0, 3, 1, 2))
        wrong = copy.deepcopy(on_disguised)
        wrong.arrangement.copy_(torch.arange(t))
        scrambled = wrong(disguise(x).permute(0, 3, 1, 2))
    torch.testing.assert_close(a, p, rtol=1e-9, atol=1e-7)
    if pipeline != "rmt":  # the arrangement matters: left out, the function differs
        assert not torch.allclose(scrambled, p, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("pipeline,channels", [("rmt", "joint"), ("perm,rmt", "joint"), ("perm,rmt", "shared")])
def test_the_pixels_stem_on_disguised_images_is_resnet18_on_plain_images(pipeline, channels):
    """blockresnet pixels=1 with the key folded into its per-position maps (A_j = M_j^-1, the offset
    into the bias) and the key's permutation as its arrangement, on disguised images (noise 0),
    computes what ``resnet18`` with the same weights computes on the plain images."""
    from dkit.models.nets import resnet18

    shape, block = (16, 16, 3), (4, 4)
    t, d = 16, 48
    key = test_key(f"pixels-{pipeline}-{channels}", shape="16x16x3", block="4", pipeline=pipeline, channels=channels)
    perm = np.array(key.material.perm) if key.material.perm is not None else np.arange(t)
    disguise, offset, mt = key_as_affine(key)
    torch.manual_seed(1)
    net = BlockResNet(shape, block, 7, pixels=1).double().eval()
    plain = resnet18(shape, 7).double().eval()
    for m in plain.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    layers = torch.nn.Sequential(plain.layer1, plain.layer2, plain.layer3, plain.layer4)
    with torch.no_grad():  # resnet18's weights, the key folded into the per-position maps
        net.conv1.load_state_dict(plain.conv1.state_dict())
        net.stem_norm.load_state_dict(plain.bn1.state_dict())
        net.trunk.load_state_dict(layers.state_dict())
        net.head[2].load_state_dict(plain.fc.state_dict())
        net.arrangement.copy_(torch.from_numpy(perm))
        net.align.copy_(torch.linalg.inv(mt))
        net.embed_b.copy_(-torch.einsum("td,tde->te", offset, net.align))
    x = torch.rand(5, *shape, dtype=torch.float64) * 255
    with torch.no_grad():
        a = net(disguise(x).permute(0, 3, 1, 2))
        p = plain(x.permute(0, 3, 1, 2))
        net.align.copy_(torch.eye(d, dtype=torch.float64).expand(t, d, d))  # the key left out
        unfolded = net(disguise(x).permute(0, 3, 1, 2))
    torch.testing.assert_close(a, p, rtol=1e-9, atol=1e-7)
    assert not torch.allclose(unfolded, p, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("pipeline", ["rmt", "perm,rmt"])
def test_blockvit_absorbs_the_key_exactly(pipeline):
    """BlockViT: per-position embeddings absorb the matrices (E_perm[j] = M_j E'_j), its position
    embeddings the permutation (pos'_j = pos_perm[j]); attention and the class token do not care
    about token order. The same function on plain images, noise 0."""
    from dkit.models.nets import BlockViT

    shape, block, t = (16, 16, 3), (4, 4), 16
    key = test_key(f"vit-absorb-{pipeline}", shape="16x16x3", block="4", pipeline=pipeline)
    perm = np.array(key.material.perm) if key.material.perm is not None else np.arange(t)
    disguise, offset, mt = key_as_affine(key)
    torch.manual_seed(0)
    on_disguised = BlockViT(shape, block, 7, dim=32, depth=2, heads=4).double().eval()
    on_plain = copy.deepcopy(on_disguised)
    with torch.no_grad():
        e = on_disguised.embed_w
        on_plain.embed_w[perm] = torch.bmm(mt, e)
        on_plain.embed_b[perm] = on_disguised.embed_b + torch.einsum("td,tdk->tk", offset, e)
        on_plain.pos[0, perm] = on_disguised.pos[0]
    x = torch.rand(5, *shape, dtype=torch.float64) * 255
    with torch.no_grad():
        a = on_disguised(disguise(x).permute(0, 3, 1, 2))
        p = on_plain(x.permute(0, 3, 1, 2))
    torch.testing.assert_close(a, p, rtol=1e-9, atol=1e-7)


@pytest.mark.parametrize(
    "block,kw",
    [(4, {"noise": 25}), (4, {"noise": 25, "rmt_kind": "projection"}), (2, {"noise": 25, "channels": "shared"})],
)
def test_placement_finds_the_permutation_from_disguised_images_alone(cifar_folder, tmp_path, block, kw):
    """Canonical correlations between stored positions do not change under any linear map of a
    position, and neighbouring blocks of natural images correlate: the grid follows from the
    disguised data, up to a grid symmetry. On 6,000 CIFAR-10 images every position of the default
    4x4 key (and of a general invertible RMT) is placed, and at least 90% for the papers' 2x2 shared
    setting (docs/benchmarks.md has the figures of the training runs)."""
    src = subset(cifar_folder, tmp_path / "src", per_class=600)
    key = test_key(f"place-{block}-{sorted(kw.items())}", shape=(32, 32, 3), block=block, pipeline="perm,rmt", **kw)
    params = key.params
    out = tmp_path / "d.h5"
    disguise_source(open_source(src), out, key, Options(workers=0), rng=RandomSource.fixed(3))
    from dkit.data import DisguisedDataset

    x, _ = DisguisedDataset(out, in_memory=False).read_all()
    grid = params.grid
    blocks = to_blocks(torch.from_numpy(x).permute(0, 3, 1, 2), (block, block), grid).permute(1, 0, 2).numpy()
    cells = place_positions(blocks, grid)
    acc = placement_accuracy(cells, key.material.perm, grid)
    assert acc >= (1.0 if block == 4 else 0.9), acc
    # chance: a random placement scores about 1/t under the best of 8 symmetries
    assert placement_accuracy(np.random.default_rng(0).permutation(len(cells)), key.material.perm, grid) < 0.2


def test_auto_picks_the_architecture_from_the_public_pipeline():
    def arch(pipeline, **kw):
        return auto_arch(KeyParams.create((32, 32, 3), 4, pipeline, **kw))

    assert arch("identity") == "resnet18"
    assert arch("instahide", k=2) == "resnet18"
    assert arch("rmt") == "blockresnet"
    assert arch("perm,rmt") == "blockresnet"
    assert arch("perm") == "blockresnet"
    assert arch("perm,aes") == "blockresnet"


def test_a_stored_arrangement_that_is_not_a_permutation_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = make_folder(tmp_path / "src", classes=("a", "b"), per_class=6, shape=(8, 8, 3))
    key = test_key("arr", shape="8x8x3", block="4", pipeline="perm,rmt")
    disguise_source(open_source(folder), tmp_path / "d.h5", key, Options(workers=0))
    metrics = train(tmp_path / "d.h5", tmp_path / "m", TrainOptions(arch="blockresnet", epochs=1, batch_size=4))
    assert metrics["placement"]["estimated_from_rows"] > 0
    model, meta = load_model(tmp_path / "m")
    assert meta.arch == "blockresnet" and sorted(model[1].arrangement.tolist()) == [0, 1, 2, 3]
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state["1.arrangement"] = torch.tensor([0, 0, 1, 2])
    save_file(state, str(weights), metadata={"format": "dkit-model", "version": "1"})
    with pytest.raises(ArtifactError, match=r"1\.arrangement is not a permutation of the block positions"):
        load_model(tmp_path / "m")


def test_train_without_arch_picks_blockresnet_and_predict_uses_it(cli, tmp_path):
    """Must-show 2 of issue 11, through the CLI: no --arch, a block key -> blockresnet; predict runs it."""
    folder = make_folder(tmp_path / "src", classes=("a", "b"), per_class=8, shape=(16, 16, 3))
    assert cli("keygen", "k", "--shape", "16x16x3", "--block", "4", "--pipeline", "perm,rmt").exit_code == 0
    assert cli("disguise", str(folder), str(tmp_path / "d.h5"), "--key", "k").exit_code == 0
    r = cli("train", str(tmp_path / "d.h5"), "-o", str(tmp_path / "m"), "--epochs", "1", "--batch-size", "8")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert doc["arch"] == "blockresnet" and doc["arch_params"] == {"pixels": 1}  # the default stem
    r = cli("predict", str(tmp_path / "m"), str(folder), "--key", "k", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["labelled"] == 16 and 0.0 <= doc["accuracy"] <= 1.0
    r = cli("train", str(tmp_path / "d.h5"), "-o", str(tmp_path / "n"), "--arch", "blockresnet", "--epochs", "1")
    assert r.exit_code == 0, r.output  # and it can be named
    args = ("--arch", "blockresnet", "--epochs", "1", "--arch-param", "shared=1")
    r = cli("train", str(tmp_path / "d.h5"), "-o", str(tmp_path / "s"), *args)
    assert r.exit_code == 0, r.output  # naming another stem's setting leaves the default pixels=1 out
    assert json.loads((tmp_path / "s" / "model.json").read_text())["arch_params"] == {"shared": 1}


def test_a_pixels_stem_starts_from_the_estimated_frames_and_predicts(cli, tmp_path):
    """--arch-param pixels=1 through the CLI: train starts the per-position maps from the principal
    frames of the disguised training images (recorded in the metrics), predict rebuilds the model."""
    from safetensors.torch import load_file

    folder = make_folder(tmp_path / "src", classes=("a", "b"), per_class=8, shape=(16, 16, 3))
    assert cli("keygen", "k", "--shape", "16x16x3", "--block", "4", "--pipeline", "perm,rmt").exit_code == 0
    assert cli("disguise", str(folder), str(tmp_path / "d.h5"), "--key", "k").exit_code == 0
    args = ("--epochs", "1", "--batch-size", "8", "--arch-param", "pixels=1")
    r = cli("train", str(tmp_path / "d.h5"), "-o", str(tmp_path / "m"), *args)
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert doc["arch"] == "blockresnet" and doc["arch_params"] == {"pixels": 1}
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["placement"]["alignment"]["rows"] == 14  # the training rows, validation held back
    align = load_file(str(tmp_path / "m" / "model.safetensors"))["1.align"]
    assert align.shape == (16, 48, 48) and not torch.allclose(align, torch.eye(48).expand(16, 48, 48), atol=0.1)
    r = cli("predict", str(tmp_path / "m"), str(folder), "--key", "k", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["labelled"] == 16
    r = cli("train", str(tmp_path / "d.h5"), "-o", str(tmp_path / "n"), *args, "--arch-param", "shared=1")
    assert r.exit_code != 0 and "pixels" in r.output and "neither shared nor cells" in r.output


def test_the_arrangement_is_estimated_within_bounds(monkeypatch):
    from dkit.models import training

    x = torch.rand(50, 1, 8, 8)
    cells, info = training.estimate_arrangement(x, (2, 2), (4, 4), seed=0)
    assert sorted(cells.tolist()) == list(range(16)) and info["estimated_from_rows"] == 50
    monkeypatch.setattr(training, "PLACEMENT_VALUES", 64 * 300)  # 300 images' worth of values
    _, info = training.estimate_arrangement(torch.rand(1000, 1, 8, 8), (2, 2), (4, 4), seed=0)
    assert info["estimated_from_rows"] == 300
    cells, info = training.estimate_arrangement(torch.rand(2, 1, 1, 4097), (1, 1), (1, 4097), seed=0)
    assert cells is None and "4097 block positions" in info["skipped"]


def test_alignment_brings_every_position_into_one_frame(cifar_folder, tmp_path):
    """align_positions on disguised CIFAR (orthogonal RMT, noise 25) finds at each position the
    plain block's principal components: the top ten match those of the plain images (|corr| > 0.95
    at the median position), the two strongest with one sign over most of the grid. Signs can split
    into regions where a component's neighbour links are weak (seen in CI: component 4 at 69/31,
    component 1 at 57/7 with random noise; over 30 local noise draws component 1 kept 59-64 of 64),
    which the trainable per-position maps then have to fix. The noise is seeded, so a run is
    repeatable; the bound leaves room for another machine's linear algebra."""
    from dkit.data import decode_all
    from dkit.data.decode import Policy
    from dkit.placement import align_positions

    src = open_source(subset(cifar_folder, tmp_path / "src", per_class=500))
    x = decode_all(src, Policy((32, 32, 3))).astype(np.float64)
    key = test_key("align", shape=(32, 32, 3), block=4, pipeline="rmt", noise=25)
    y = Disguise.from_key(key).apply(x, rng=RandomSource.fixed(0))

    def blocks(a):
        return to_blocks(torch.from_numpy(a).permute(0, 3, 1, 2), (4, 4), (8, 8)).permute(1, 0, 2).numpy()

    yb, xb = blocks(y), blocks(x)
    cells = np.arange(64)
    u = np.einsum("ntd,tde->nte", yb - yb.mean(0), align_positions(yb, cells, (8, 8)))
    w = np.einsum("ntd,tde->nte", xb - xb.mean(0), align_positions(xb, cells, (8, 8)))
    for p in range(10):
        c = np.array([np.corrcoef(u[:, j, p], w[:, j, p])[0, 1] for j in range(64)])
        assert np.median(np.abs(c)) > 0.95, p  # the frame, up to each position's sign
        if p < 2:  # the strong components keep one sign over the grid; weaker ones may split in regions
            assert max((c > 0.9).mean(), (c < -0.9).mean()) >= 0.85, p
    # the brightness component keeps its sign everywhere: it is set by the mean block
    c0 = np.array([np.corrcoef(u[:, j, 0], w[:, j, 0])[0, 1] for j in range(64)])
    assert (c0 > 0.99).all()


def test_the_per_position_maps_learn_at_a_hundredth_of_the_rate(tmp_path, monkeypatch):
    """blockresnet's align maps get their own optimiser group (lr x ALIGN_LR_SCALE, no weight decay);
    other models keep one group. A checkpoint whose optimiser has another grouping is refused with
    a message, not a traceback."""
    from dkit.models import training
    from dkit.models.nets import build

    model = build("blockresnet", (16, 16, 3), (4, 4), 3, [0.0] * 3, [1.0] * 3, pixels=1)
    groups = training.param_groups(model, 2e-3)
    assert len(groups) == 2 and groups[1]["params"] == [model[1].align]
    assert groups[1]["lr"] == pytest.approx(2e-3 * training.ALIGN_LR_SCALE) and groups[1]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    plain = build("resnet18", (16, 16, 3), (4, 4), 3, [0.0] * 3, [1.0] * 3)
    assert len(training.param_groups(plain, 2e-3)) == 1

    folder = make_folder(tmp_path / "src", classes=("a", "b"), per_class=6, shape=(8, 8, 3))
    key = test_key("groups", shape="8x8x3", block="4", pipeline="rmt")
    disguise_source(open_source(folder), tmp_path / "d.h5", key, Options(workers=0))
    opts = TrainOptions(arch="blockresnet", epochs=2, batch_size=4)

    def stop(p):
        if "epoch_done" in p:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:  # a checkpoint from a trainer with one group for everything
        m.setattr(training, "param_groups", lambda model, lr: [{"params": list(model.parameters())}])
        with pytest.raises(KeyboardInterrupt):
            train(tmp_path / "d.h5", tmp_path / "m", opts, progress=stop)
    with pytest.raises(ArtifactError, match="optimizer state does not fit this trainer"):
        train(tmp_path / "d.h5", tmp_path / "m", opts, resume=True)
    assert train(tmp_path / "d.h5", tmp_path / "m2", opts)["final"]["val_acc"] is not None
