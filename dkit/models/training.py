"""``dkit train``: fit a model to a disguised dataset. No key is needed: this is the cloud side.

CUDA when present (automatic mixed precision, channels-last for the CNNs), the CPU otherwise.
A checkpoint is written after every epoch, so ``resume`` continues an interrupted run; the finished
artifact is weights (safetensors) plus JSON metadata (``formats/MODEL-v1.md``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import DisguisedDataset, h5format
from ..errors import ArtifactError, FormatError, InputError, ParameterError
from ..home import atomic_write
from ..keystore.records import fmt_time, utcnow
from . import artifact, distributed
from .nets import ARCHS, build, check_params, soft_cross_entropy

CHECKPOINT = "checkpoint"
ALIGN_LR_SCALE = 0.01  # blockresnet's per-position maps: see param_groups
DEFAULT_LR = {"cnn": 1e-3, "resnet18": 2e-3, "blockvit": 1e-3, "blockconv": 2e-3, "blockresnet": 2e-3}
DEFAULT_ARCH_PARAMS = {
    "cnn": {},
    "resnet18": {},
    "blockvit": {"dim": 128, "depth": 6, "heads": 4},
    "blockconv": {"width": 128, "depth": 4},
    "blockresnet": {"pixels": 1},  # since 2026-12-03 (docs/benchmarks.md); a model.json without it is pixels=0
}
PLACEMENT_ROWS = 20_000  # training rows the arrangement of a permuting key is estimated from,
PLACEMENT_VALUES = 1 << 27  # and at most this many values of them (512 MiB as float32)


@dataclass
class TrainOptions:
    arch: str = "auto"
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None
    weight_decay: float = 0.05
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    arch_params: dict = field(default_factory=dict)
    mixup: float = 0.0  # Beta(alpha, alpha) mixing; 0 turns it off

    def resolved_arch(self, meta: h5format.Meta) -> str:
        if self.arch != "auto":
            if self.arch not in ARCHS:
                raise InputError(f"unknown --arch {self.arch!r}: choose auto, " + ", ".join(ARCHS))
            return self.arch
        return auto_arch(meta.params)


def default_params(arch: str, given: dict) -> dict:
    """The defaults ``given`` settings are added to. Naming a setting of blockresnet's other stems
    (``shared``, ``cells``) asks for that stem, so the default ``pixels=1`` then stays out."""
    if arch == "blockresnet" and given.keys() & {"shared", "cells"}:
        return {k: v for k, v in DEFAULT_ARCH_PARAMS[arch].items() if k != "pixels"}
    return DEFAULT_ARCH_PARAMS[arch]


def auto_arch(params) -> str:
    """The architecture ``--arch auto`` picks from a file's public pipeline: ResNet-18 for plain and
    InstaHide images (which keep the image's layout), the block-aware ResNet for anything cut in
    blocks (rmt, perm, aes): per-position stems absorb RMT, the estimated arrangement absorbs perm."""
    if any(params.has(m) for m in ("perm", "rmt", "aes")):
        return "blockresnet"
    return "resnet18"


def _sample_rows(x: torch.Tensor, most: int, seed: int) -> torch.Tensor:
    """Up to ``most`` rows of ``x`` (in file order, drawn with ``seed``) and at most PLACEMENT_VALUES
    values of them (bounded memory, whatever the image size)."""
    n = min(len(x), most, max(256, PLACEMENT_VALUES // math.prod(x.shape[1:])))
    if len(x) <= n:
        return x
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n].sort().values]


def estimate_arrangement(x: torch.Tensor, block, grid, seed: int) -> tuple[torch.Tensor | None, dict]:
    """The grid cell of each stored block position from training images (N, C, H, W) alone
    (``dkit.placement``), and what to record of it. None (and why) when there are too many
    positions to place: the model then sees the blocks where the key put them."""
    from ..placement import MAX_POSITIONS, place_positions
    from .nets import to_blocks

    t = grid[0] * grid[1]
    if t > MAX_POSITIONS:
        return None, {"skipped": f"{t} block positions, more than the {MAX_POSITIONS} dkit places"}
    t0 = time.perf_counter()
    rows = _sample_rows(x, PLACEMENT_ROWS, seed)
    blocks = to_blocks(rows.float(), block, grid).permute(1, 0, 2).numpy()
    cells = place_positions(blocks, grid)
    return torch.from_numpy(cells.astype(np.int64)), {
        "estimated_from_rows": len(rows),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def estimate_alignment(x: torch.Tensor, block, grid, arrangement: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
    """The initial per-position maps of blockresnet's shared or pixels stem (``dkit.placement.align_positions``),
    from up to 5,000 training images alone."""
    from ..placement import align_positions
    from .nets import to_blocks

    t0 = time.perf_counter()
    rows = _sample_rows(x, 5000, seed)
    blocks = to_blocks(rows.float(), block, grid).permute(1, 0, 2).numpy()
    a = align_positions(blocks, arrangement.numpy(), grid)
    return torch.from_numpy(a.astype(np.float32)), {"rows": len(rows), "seconds": round(time.perf_counter() - t0, 3)}


def param_groups(model: torch.nn.Module, lr: float) -> list[dict]:
    """The optimiser's parameter groups: blockresnet's per-position maps ``align`` (which start from
    ``estimate_alignment``) learn at ``ALIGN_LR_SCALE`` times the rate and without weight decay.
    Adam moves every entry by about the rate at each step, so at the full rate the t separate d x d
    maps, each fed by one position's gradients only, drift apart from the common frame they start
    in within the first epoch. Measured on CIFAR, RMT 8x8 noise 25, 2 epochs, validation accuracy:
    0.514 at the full rate, 0.540 at 1/100, 0.541 at 1/100 started from the key's exact inverse
    (plaintext ResNet-18: 0.586). The shared ``mix`` at 5x the rate did worse (0.533)."""
    slow = [p for name, p in model.named_parameters() if name.endswith(".align")]
    ids = {id(p) for p in slow}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": rest}]
    if slow:
        groups.append({"params": slow, "lr": lr * ALIGN_LR_SCALE, "weight_decay": 0.0})
    return groups


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here")
    if name not in ("cpu", "cuda"):
        raise InputError(f"unknown --device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def source_groups(path: Path, meta: h5format.Meta) -> tuple[int, np.ndarray]:
    """The number of source images and, for each row, the index of its image (rows of one image
    share a source ID: InstaHide's encodings, or the copies of ``--copies``)."""
    with h5format.open_h5(path) as f:
        try:
            ds = f[h5format.SOURCE_IDS]
        except h5format.H5_ERRORS as e:
            raise h5format.damaged(path, "the source_ids dataset cannot be opened", e) from None
        ids = h5format.read_rows(ds, h5format.SOURCE_IDS, path, 0, meta.rows)
    groups, inverse = np.unique(ids, axis=0, return_inverse=True)
    return len(groups), inverse.reshape(-1)


def split(
    path: Path, meta: h5format.Meta, fraction: float, seed: int, groups: tuple[int, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation rows, split by source image (all encodings of one image on the same side).
    ``groups``: ``source_groups(path, meta)`` when the caller has it already."""
    if not 0 <= fraction < 1:
        raise InputError("--val-fraction must lie in [0, 1)")
    n_groups, inverse = groups or source_groups(path, meta)
    digest = hashlib.sha256(f"{meta.dataset_id}/{seed}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    n_val = int(round(n_groups * fraction))
    val_groups = np.zeros(n_groups, dtype=bool)
    val_groups[rng.permutation(n_groups)[:n_val]] = True
    is_val = val_groups[inverse]
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


class CopyPicker:
    """For files with ``--copies``: an epoch visits each training image once, through one of its
    copies drawn at random, so T copies cost no more per epoch than one (the same budget); the
    validation rows are each image's first copy, the image as it is (like the images predicted)."""

    def __init__(self, groups: np.ndarray):
        order = np.argsort(groups, kind="stable")
        _, first, counts = np.unique(groups[order], return_index=True, return_counts=True)
        self.order, self.first, self.counts = torch.from_numpy(order), torch.from_numpy(first), torch.from_numpy(counts)

    def __len__(self) -> int:
        return len(self.first)

    def epoch(self, gen: torch.Generator) -> torch.Tensor:
        """Positions into the rows, one per image, in a random order."""
        pick = self.first + (torch.rand(len(self.first), generator=gen, dtype=torch.float64) * self.counts).long()
        return self.order[pick][torch.randperm(len(self.first), generator=gen)]

    def firsts(self) -> torch.Tensor:
        return self.order[self.first]


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (N, C, H, W) data, in float64."""
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    ss = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(x), 4096):
        b = x[i : i + 4096].to(torch.float64)
        s += b.sum(dim=(0, 2, 3))
        ss += (b * b).sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / max(1, count)
    std = torch.sqrt(torch.clamp(ss / max(1, count) - mean * mean, min=1e-12))
    return mean.tolist(), std.clamp(min=1e-6).tolist()


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    seconds: float
    images_per_second: float


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> int:
    target = y.argmax(dim=1) if y.ndim == 2 else y
    return int((logits.argmax(dim=1) == target).sum())


def _mixup(x, y, num_classes: int, alpha: float, rng: np.random.Generator):
    """Mixup (Zhang et al. 2018): a convex mix of two images and of their labels. It is valid on
    disguised data: perm and RMT are linear, so mixing disguised images is disguising mixed images
    (with mixed noise). AES is not linear, so mixup only regularises there."""
    lam = float(rng.beta(alpha, alpha))
    other = torch.from_numpy(rng.permutation(len(x))).to(x.device)
    onehot = y if y.ndim == 2 else F.one_hot(y, num_classes).to(x.dtype)
    return lam * x + (1 - lam) * x[other], lam * onehot + (1 - lam) * onehot[other]


def _loss(logits, y):
    return soft_cross_entropy(logits, y) if y.ndim == 2 else F.cross_entropy(logits, y)


def evaluate(model, x, y, device, batch_size=512, amp=None) -> tuple[float, float]:
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device, non_blocking=True)
            yb = y[i : i + batch_size].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(xb)
            total_loss += float(_loss(logits.float(), yb)) * len(xb)
            correct += _accuracy(logits, yb)
    return total_loss / max(1, len(x)), correct / max(1, len(x))


def train(
    data: str | Path,
    model_dir: str | Path,
    options: TrainOptions | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Train, write the artifact, and return the metrics. Under ``torchrun`` every process trains
    its share with DistributedDataParallel and rank 0 writes (``dkit.models.distributed``)."""
    options = options or TrainOptions()
    device = pick_device(options.device)
    rank, n_proc, local_rank = distributed.world()
    if n_proc > 1 and device.type == "cuda":  # one GPU per process
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    with distributed.process_group(device):
        return _train(data, model_dir, options, device, resume=resume, force=force, progress=progress)


def _train(data, model_dir, options: TrainOptions, device: torch.device, *, resume, force, progress) -> dict:
    rank, n_proc, _ = distributed.world()
    main = rank == 0
    if not main:
        progress = None
    data, model_dir = Path(data), Path(model_dir)
    meta = h5format.inspect(data)
    if meta.label_kind == "none":
        raise InputError(f"{data}: the dataset has no labels, so there is nothing to train a classifier on")
    if meta.rows == 0:
        raise InputError(f"{data}: the dataset has no rows, so there is nothing to train on")
    if options.epochs < 1 or options.batch_size < 1:
        raise InputError("--epochs and --batch-size must be at least 1")
    ckpt_dir = model_dir / CHECKPOINT
    if main:  # one process mends an interrupted checkpoint swap; the others read after it
        _recover_checkpoint(ckpt_dir)
    distributed.barrier()
    if (model_dir / artifact.META).exists() and not force:
        raise InputError(f"{model_dir} holds a trained model", hint="use --force to replace it")
    if ckpt_dir.exists() and not resume:
        if not force:
            raise InputError(
                f"{model_dir} holds an interrupted training run",
                hint="use --resume to continue it, or --force to start over",
            )
        distributed.barrier()  # every process has seen it before rank 0 removes it
        if main:
            shutil.rmtree(ckpt_dir)
    arch = options.resolved_arch(meta)
    arch_params = {**default_params(arch, options.arch_params), **options.arch_params}
    problem = check_params(arch, arch_params, meta.params.shape, meta.params.block)
    if problem:  # the bounds a model folder is read with: never train a model that cannot be loaded
        raise ParameterError(f"--arch-param {problem[0]} {problem[1]}")
    amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.type == "cuda" else None
    torch.manual_seed(options.seed)
    for name in (artifact.META, artifact.METRICS):  # --force: old metadata must never describe new weights
        if main:
            (model_dir / name).unlink(missing_ok=True)

    x_np, y_np = DisguisedDataset(data, in_memory=False).read_all()
    bad = np.flatnonzero(~np.isfinite(x_np.reshape(len(x_np), -1)).all(axis=1))
    if len(bad):  # dkit never writes them; a model trained on them is garbage with exit 0
        raise FormatError(
            f"{data}: {len(bad):,} images hold NaN or infinite values (first at row {int(bad[0])})",
            hint="the file was not written by dkit as it is; disguise the images again",
        )
    x_all = torch.from_numpy(x_np).permute(0, 3, 1, 2)  # (N, C, H, W), a view
    y_all = torch.from_numpy(y_np)
    n_groups, groups = source_groups(data, meta)
    tr, va = split(data, meta, options.val_fraction, options.seed, (n_groups, groups))
    picker = None
    if meta.encodings > 1 and meta.label_kind == "hard":  # --copies: one copy per image per epoch
        picker = CopyPicker(groups[tr])
        if len(va):
            va = np.sort(va[CopyPicker(groups[va]).firsts().numpy()])
    x_tr, y_tr = x_all[tr], y_all[tr]
    x_va, y_va = x_all[va], y_all[va]
    num_classes = meta.num_classes or int(y_all.max()) + 1
    del x_np, y_np, x_all, y_all  # the splits are copies: hold the data once, not twice
    mean, std = channel_stats(x_tr)
    model = build(arch, meta.params.shape, meta.params.block, num_classes, mean, std, **arch_params)
    placement = None
    if arch == "blockresnet" and meta.params.has("perm"):
        plain_copies = x_tr if picker is None else x_tr[picker.firsts()]
        cells, placement = estimate_arrangement(plain_copies, meta.params.block, model[1].grid, options.seed)
        if cells is not None:
            model[1].arrangement.copy_(cells)
    if arch == "blockresnet" and (model[1].shared or model[1].pixels) and meta.params.has("rmt"):
        plain_copies = x_tr if picker is None else x_tr[picker.firsts()]
        align, info = estimate_alignment(
            plain_copies, meta.params.block, model[1].grid, model[1].arrangement, options.seed
        )
        model[1].align.data.copy_(align)
        placement = {**(placement or {}), "alignment": info}
    model = model.to(device)
    if device.type == "cuda" and arch != "blockvit":
        model = model.to(memory_format=torch.channels_last)
    net = model  # what the steps call: the model, or its DistributedDataParallel wrapper
    if n_proc > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    share = math.ceil(options.batch_size / n_proc)  # each process's part of the global batch
    lr = options.lr or DEFAULT_LR[arch]
    opt = torch.optim.AdamW(param_groups(model, lr), lr=lr, weight_decay=options.weight_decay)
    per_epoch = len(picker) if picker else len(x_tr)
    steps_per_epoch = math.ceil(math.ceil(per_epoch / n_proc) / share)
    total_steps = steps_per_epoch * options.epochs
    warmup = min(steps_per_epoch, max(1, total_steps // 10))

    def lr_at(step):  # linear warm-up, then cosine decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    history: list[dict] = []
    start_epoch = 0
    sha = file_sha256(data)
    run_id = {
        "dataset_id": meta.dataset_id,
        "dataset_sha256": sha,
        "arch": arch,
        "arch_params": arch_params,
        "options": {k: v for k, v in asdict(options).items() if k not in ("device", "arch_params")},
    }
    if resume and ckpt_dir.exists():
        start_epoch, history = _load_checkpoint(ckpt_dir, run_id, model, opt, sched)
    gen = torch.Generator().manual_seed(options.seed)

    def epoch_order() -> torch.Tensor:
        """This process's rows of the epoch: the same shuffle everywhere, a DistributedSampler's share."""
        order = picker.epoch(gen) if picker else torch.randperm(len(x_tr), generator=gen)
        if n_proc == 1:
            return order
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(len(order)), num_replicas=n_proc, rank=rank, shuffle=False)
        return order[list(sampler)]

    for _ in range(start_epoch):  # replay the shuffles of finished epochs
        epoch_order()
    on_gpu = device.type == "cuda"
    if on_gpu:
        x_tr_dev, y_tr_dev = x_tr.to(device), y_tr.to(device)
    model_dir.mkdir(parents=True, exist_ok=True)  # visible from the start; the checkpoint comes after epoch 1
    for epoch in range(start_epoch, options.epochs):
        model.train()
        t0 = time.perf_counter()
        order = epoch_order()
        mix_rng = np.random.default_rng([options.seed, epoch])  # per epoch, so a resumed run mixes alike
        seen, correct, loss_sum = 0, 0, 0.0
        for step in range(steps_per_epoch):
            idx = order[step * share : (step + 1) * share]
            if on_gpu:
                idx = idx.to(device)
                xb, yb = x_tr_dev[idx], y_tr_dev[idx]
                if arch != "blockvit":
                    xb = xb.contiguous(memory_format=torch.channels_last)
            else:
                xb, yb = x_tr[idx], y_tr[idx]
            target = _mixup(xb, yb, num_classes, options.mixup, mix_rng) if options.mixup > 0 else None
            if target is not None:
                xb, target = target
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = net(xb)
                loss = _loss(logits.float(), yb if target is None else target)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            seen += len(xb)
            step_loss = float(loss.detach())
            if not math.isfinite(step_loss):
                raise InputError(
                    f"training diverged: the loss is {step_loss} at epoch {epoch + 1}, step {step + 1}",
                    hint="train again with a lower --lr (and --force to start over)",
                )
            loss_sum += step_loss * len(xb)
            correct += _accuracy(logits.detach(), yb)
            if progress:
                progress(
                    {
                        "epoch": epoch + 1,
                        "epochs": options.epochs,
                        "step": step + 1,
                        "steps": steps_per_epoch,
                        "loss": loss_sum / seen,
                        "acc": correct / seen,
                    }
                )
        train_seconds = time.perf_counter() - t0
        seen, correct, loss_sum = distributed.summed(seen, correct, loss_sum)  # the whole epoch's
        val_loss = val_acc = None
        if len(x_va) and main:  # rank 0's weights are the ones written
            val_loss, val_acc = evaluate(model, x_va, y_va, device, amp=amp)
        val_loss, val_acc = distributed.from_main((val_loss, val_acc))
        stats = EpochStats(
            epoch + 1,
            loss_sum / seen,
            correct / seen,
            val_loss,
            val_acc,
            round(train_seconds, 3),
            round(seen / train_seconds, 1),
        )
        history.append(asdict(stats))
        if main:
            _save_checkpoint(ckpt_dir, run_id, model, opt, sched, epoch + 1, history)
        distributed.barrier()
        if progress:
            progress({"epoch_done": asdict(stats)})
    metrics = {
        "arch": arch,
        "arch_params": arch_params,
        "device": str(device),
        "amp": str(amp).replace("torch.", "") if amp else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_rows": len(tr),
        "train_images": len(picker) if picker else None,
        "val_rows": len(va),
        "epochs": history,
        "final": history[-1],
        "best_val_acc": max((h["val_acc"] for h in history if h["val_acc"] is not None), default=None),
        "lr": lr,
        "batch_size": options.batch_size,
        "seed": options.seed,
        "placement": placement,
        "processes": n_proc,
    }
    model_meta = artifact.ModelMeta(
        arch=arch,
        arch_params=arch_params,
        in_shape=list(meta.params.shape),
        block=list(meta.params.block),
        num_classes=num_classes,
        class_names=meta.class_names,
        label_kind=meta.label_kind,
        key_id=meta.key_id,
        key_version=meta.key_version,
        key_params=meta.params.to_dict(),
        dataset={
            "dataset_id": meta.dataset_id,
            "sha256": sha,
            "rows": meta.rows,
            "file": data.name,
            "encodings": meta.encodings,
        },
        normalization={"mean": mean, "std": std},
        data_options=meta.options,
        metrics={
            "val_acc": history[-1]["val_acc"],
            "train_acc": history[-1]["train_acc"],
            "epochs": len(history),
            "val_rows": len(va),
        },
        created=fmt_time(utcnow()),
    )
    if main:
        artifact.save(model_dir, model, model_meta, metrics)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    distributed.barrier()
    return metrics


def _aside(ckpt_dir: Path) -> Path:
    return ckpt_dir.with_name(ckpt_dir.name + ".old")


def _recover_checkpoint(ckpt_dir: Path) -> None:
    """Put back a checkpoint that a crash inside ``_save_checkpoint`` left set aside."""
    old = _aside(ckpt_dir)
    if old.is_dir() and not ckpt_dir.exists():
        old.rename(ckpt_dir)


def _save_checkpoint(ckpt_dir: Path, run_id: dict, model, opt, sched, epoch: int, history: list) -> None:
    """Write the new checkpoint beside the old one, set the old one aside, rename the new one in, and
    only then delete the old one: a crash at any point leaves a complete checkpoint."""
    from safetensors.torch import save

    tmp, old = ckpt_dir.with_name(ckpt_dir.name + ".tmp"), _aside(ckpt_dir)
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(tmp / "model.safetensors", save(weights), mode=0o644)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(tmp / "optimizer.pt", buf.getvalue(), mode=0o644)
    atomic_write(
        tmp / "progress.json", json.dumps({"run": run_id, "epoch": epoch, "history": history}).encode(), mode=0o644
    )
    if ckpt_dir.exists():
        ckpt_dir.rename(old)
    tmp.rename(ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(ckpt_dir: Path, run_id: dict, model, opt, sched) -> tuple[int, list]:
    from safetensors.torch import load_file

    try:
        progress = json.loads((ckpt_dir / "progress.json").read_text())
    except (OSError, ValueError):
        raise ArtifactError(f"{ckpt_dir}: the checkpoint is damaged", hint="use --force to start over") from None
    if progress.get("run") != json.loads(json.dumps(run_id)):
        raise InputError(
            f"{ckpt_dir} belongs to another run (other data or options)",
            hint="use the same data and options, or --force to start over",
        )
    try:
        model.load_state_dict(load_file(str(ckpt_dir / "model.safetensors"), device="cpu"))
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{ckpt_dir}: the checkpoint's weights are unreadable ({type(e).__name__})") from None
    state = artifact.load_checkpoint_state(ckpt_dir / "optimizer.pt")
    try:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    except (KeyError, ValueError):  # e.g. another parameter grouping, from another version of dkit
        raise ArtifactError(
            f"{ckpt_dir}: the checkpoint's optimizer state does not fit this trainer",
            hint="use --force to start over",
        ) from None
    torch.set_rng_state(state["rng"])  # dropout continues as if never interrupted
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(progress["epoch"]), list(progress["history"])
