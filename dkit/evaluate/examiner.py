"""The poster's two utility-side privacy measures.

- **Visual privacy** = 1 - the accuracy of a "DNN examiner": a classifier trained on plain images
  (public images of the same kind) and tested on disguised ones. If the disguise still looks like
  the image to a network, the examiner recognises it. Reported with chance level beside it.
- **Model misusability** = the accuracy of the disguised-trained model on plain images: can the
  cloud use the model it trained on real images? Lower is better.

Both are level 1: the cloud has public images and the model. Both are measured on held-out images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..models.nets import build
from ..params import KeyParams
from .common import AttackResult


def _nchw(x: np.ndarray, params: KeyParams) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32).reshape((-1,) + tuple(params.shape))).permute(0, 3, 1, 2)


def accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, params: KeyParams, batch: int = 512):
    model.eval()
    device = next(iter(model.parameters())).device
    right = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = _nchw(images[i : i + batch], params).to(device)
            right += int((model(x).argmax(1).cpu().numpy() == labels[i : i + batch]).sum())
    return right / max(1, len(images))


def train_examiner(
    images: np.ndarray, labels: np.ndarray, params: KeyParams, num_classes: int, *, epochs: int = 8, seed: int = 0
) -> torch.nn.Module:
    """The paper's simple CNN on plain images (flip augmentation for colour), Adam, cosine schedule."""
    torch.manual_seed(seed)
    x = _nchw(images, params)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    c = params.shape[2]
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp_min(1.0).tolist()
    net = build("cnn", params.shape, params.block, num_classes, mean, std)
    steps = epochs * ((len(x) + 127) // 128)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 128):
            idx = order[i : i + 128]
            xb = x[idx]
            if c == 3:  # a flip is a free augmentation of plain colour images
                flip = torch.rand(len(xb), generator=gen) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def examiner(
    train_plain: np.ndarray,
    train_labels: np.ndarray,
    targets_disguised: np.ndarray,
    targets_plain: np.ndarray,
    target_labels: np.ndarray,
    params: KeyParams,
    num_classes: int,
    *,
    epochs: int = 8,
) -> AttackResult:
    net = train_examiner(train_plain, train_labels, params, num_classes, epochs=epochs)
    acc = accuracy(net, targets_disguised, target_labels, params)
    plain_acc = accuracy(net, targets_plain, target_labels, params)
    chance = float(np.bincount(target_labels, minlength=num_classes).max() / len(target_labels))
    margin = 2 * np.sqrt(chance * (1 - chance) / len(target_labels))  # two standard errors at chance
    verdict = "holds" if acc <= chance + margin else ("partial" if acc < (chance + plain_acc) / 2 else "broken")
    return AttackResult(
        attack="examiner",
        level=1,
        params={"train_images": len(train_plain), "epochs": epochs},
        figures={"examiner_accuracy": acc, "visual_privacy": 1 - acc, "chance": chance, "plain_accuracy": plain_acc},
        verdict=verdict,
        note="plain_accuracy: the examiner on the same targets undisguised (what it can do at best)",
    )


def misusability(
    model: torch.nn.Module, targets_plain: np.ndarray, target_labels: np.ndarray, params: KeyParams, num_classes: int
) -> AttackResult:
    acc = accuracy(model, targets_plain, target_labels, params)
    chance = float(np.bincount(target_labels, minlength=num_classes).max() / len(target_labels))
    margin = 2 * np.sqrt(chance * (1 - chance) / len(target_labels))
    return AttackResult(
        attack="misusability",
        level=1,
        params={"images": len(targets_plain)},
        figures={"misusability": acc, "chance": chance},
        verdict="holds" if acc <= chance + margin else ("partial" if acc < 0.5 else "broken"),
        note="the disguised-trained model on plain images (lower is better)",
    )
