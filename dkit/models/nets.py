"""The models dkit trains on disguised images. All take (N, C, H, W) float input in the disguise's
value range; each carries its input normalisation as buffers, so weights alone describe it.

- ``cnn``: the DisguisedNets paper's simple CNN (conv 5x5x32, pool, conv 5x5x64, pool, FC 1024, FC).
- ``resnet18``: torchvision's ResNet-18 with a 3x3 stride-2 stem and no max-pool, so a 32x32 input
  keeps 16x16 feature maps (torchvision's 7x7 stem and max-pool leave 8x8).
- ``blockresnet``: ResNet-18's trunk behind a per-position linear stem; a fixed arrangement of the
  positions on the grid (estimated from the data when the key permutes) absorbs the permutation.
- ``blockvit``: a block-aware transformer. Its patches are the disguise's blocks, and each block
  position has its own patch embedding ``E_i`` (a d x D matrix), so ``E_i`` can absorb the
  position's secret matrix (``E_i = R_i^T W``) and the learned position embeddings absorb the
  permutation. On RMT data it can therefore reach plaintext accuracy, up to the noise.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..text import shown

ARCHS = ("cnn", "resnet18", "blockvit", "blockconv", "blockresnet")

# The settings each architecture takes, with their type and bounds (formats/MODEL-v1.md). A model's
# arch_params come from an untrusted model.json: they are checked against these (``check_params``)
# before anything is built, so no description can make dkit build a network for minutes or hours.
# The bounds are far above any model dkit trains on a single GPU.
MAX_HIDDEN = 1 << 16
MAX_DIM = 8192
MAX_DEPTH = 256
MAX_HEADS = 256
MAX_MLP_RATIO = 64.0
MAX_WIDTH = 4096  # blockconv channels
MAX_CONV_DEPTH = 64  # blockconv residual blocks
MAX_CELLS = 16  # blockresnet: feature-map cells per block side
ARCH_PARAMS: dict[str, dict[str, tuple[type, float, float]]] = {  # name -> (int or float, least, most)
    "cnn": {"hidden": (int, 1, MAX_HIDDEN), "drop_conv": (float, 0.0, 1.0), "drop_hidden": (float, 0.0, 1.0)},
    "resnet18": {},
    "blockvit": {
        "dim": (int, 1, MAX_DIM),
        "depth": (int, 1, MAX_DEPTH),
        "heads": (int, 1, MAX_HEADS),
        "mlp_ratio": (float, 0.0, MAX_MLP_RATIO),
        "dropout": (float, 0.0, 1.0),
    },
    "blockconv": {"width": (int, 1, MAX_WIDTH), "depth": (int, 1, MAX_CONV_DEPTH), "dropout": (float, 0.0, 1.0)},
    "blockresnet": {"cells": (int, 1, MAX_CELLS), "shared": (int, 0, 1), "pixels": (int, 0, 1)},
}


def check_params(arch: str, params: dict, shape, block) -> tuple[str, str] | None:
    """The first problem of ``params`` for ``arch`` on inputs of ``shape`` cut in ``block``, as
    (setting, problem), or None. Types: an int setting takes a JSON integer, a float one any finite
    number (never a bool); each lies within its bounds in ``ARCH_PARAMS``."""
    if arch not in ARCH_PARAMS:
        return "arch", f"is {arch!r}, not one of " + ", ".join(ARCHS)
    spec = ARCH_PARAMS[arch]
    for name, value in params.items():
        if name not in spec:
            known = ", ".join(spec) if spec else "none"
            return str(name)[:40], f"is not a setting of {arch} (its settings: {known})"
        kind, least, most = spec[name]
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            return name, f"is {shown(value)}, not {'a number' if kind is float else 'an integer'}"
        if not (least <= value <= most) or (kind is float and name == "mlp_ratio" and value <= 0):
            low = "above 0" if name == "mlp_ratio" else f"from {least:g}"
            return name, f"is {shown(value)}, out of range (it must be {low} to {most:g})"
    if arch in ("blockvit", "blockconv", "blockresnet"):
        h, w, _ = shape
        bh, bw = block
        if h % bh or w % bw:
            return "block", f"{bh}x{bw} does not tile {h}x{w}"
    if arch == "blockresnet" and params.get("pixels") and (params.get("shared") or params.get("cells")):
        return "pixels", "rebuilds the image for ResNet-18's own stem: it takes neither shared nor cells"
    if arch == "blockvit":
        defaults = inspect.signature(BlockViT).parameters
        p = {k: defaults[k].default for k in ("dim", "heads", "mlp_ratio")} | params
        if p["dim"] % p["heads"]:
            return "heads", f"is {p['heads']}, which does not divide dim {p['dim']}"
        if int(p["dim"] * p["mlp_ratio"]) < 1:
            return "mlp_ratio", f"is {p['mlp_ratio']}: dim x mlp_ratio must be at least 1"
    return None


def block_geometry(shape, block) -> tuple[tuple[int, int], int, int]:
    """(grid, positions t, values per block d) of ``shape`` cut in ``block``; ValueError if it does not tile."""
    h, w, c = shape
    bh, bw = block
    if h % bh or w % bw:
        raise ValueError(f"block {bh}x{bw} does not tile {h}x{w}")
    grid = (h // bh, w // bw)
    return grid, grid[0] * grid[1], bh * bw * c


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class SimpleCNN(nn.Module):
    def __init__(self, shape, num_classes, *, hidden: int = 1024, drop_conv: float = 0.2, drop_hidden: float = 0.4):
        super().__init__()
        h, w, c = shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Dropout(drop_conv),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Dropout(drop_conv),
        )
        flat = 64 * math.ceil(math.ceil(h / 2) / 2) * math.ceil(math.ceil(w / 2) / 2)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(drop_hidden),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def resnet18(shape, num_classes):
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(shape[2], 64, kernel_size=3, stride=2, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


class BlockViT(nn.Module):
    def __init__(
        self,
        shape,
        block,
        num_classes,
        *,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.shape, self.block = tuple(shape), tuple(block)
        self.grid, t, d = block_geometry(shape, block)
        self.embed_w = nn.Parameter(torch.randn(t, d, dim) / math.sqrt(d))
        self.embed_b = nn.Parameter(torch.zeros(t, dim))
        self.pos = nn.Parameter(torch.randn(1, t, dim) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, int(dim * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def blocks(self, x):
        return to_blocks(x, self.block, self.grid)

    def forward(self, x):
        tokens = torch.bmm(self.blocks(x), self.embed_w).transpose(0, 1) + self.embed_b + self.pos
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.head(self.norm(self.encoder(tokens))[:, 0])


def from_blocks(tokens, block, grid, channels):
    """(t, N, d) in grid cell order -> (N, C, H, W): the inverse of ``to_blocks``."""
    _, n, _ = tokens.shape
    bh, bw = block
    gh, gw = grid
    x = tokens.reshape(gh, gw, n, bh, bw, channels).permute(2, 5, 0, 3, 1, 4)
    return x.reshape(n, channels, gh * bh, gw * bw)


def to_blocks(x, block, grid):
    """(N, C, H, W) -> (t, N, d): block position-major, each block in (row, column, channel) order
    (``keys/SPEC-v1.md`` section 12), so that position i's weights meet the values its key mixed."""
    n, c, _, _ = x.shape
    bh, bw = block
    gh, gw = grid
    return x.permute(0, 2, 3, 1).reshape(n, gh, bh, gw, bw, c).permute(1, 3, 0, 2, 4, 5).reshape(gh * gw, n, -1)


class _Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )

    def forward(self, x):
        return F.relu(x + self.body(x))


class BlockConv(nn.Module):
    """A block-aware convolutional network for disguises that keep blocks in place (rmt, aes without
    perm). Its stem is a linear map per block position (d values -> ``width`` channels): whatever
    invertible linear map a key applies at a position, the stem can absorb it exactly (the same
    function on plain images has the stem ``M_i^T W_i``). A residual conv trunk then runs on the grid
    of block positions, where neighbouring blocks are still neighbours, so convolution's bias for
    locality survives. It has no arrangement: for a permuting key use blockresnet, which places the
    blocks first."""

    def __init__(self, shape, block, num_classes, *, width: int = 128, depth: int = 4, dropout: float = 0.0):
        super().__init__()
        self.shape, self.block = tuple(shape), tuple(block)
        self.grid, t, d = block_geometry(shape, block)
        self.embed_w = nn.Parameter(torch.randn(t, d, width) / math.sqrt(d))
        self.embed_b = nn.Parameter(torch.zeros(t, width))
        self.stem_norm = nn.BatchNorm2d(width)
        self.trunk = nn.Sequential(*[_Residual(width) for _ in range(depth)])
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, num_classes)
        )

    def stem(self, x):
        """(N, C, H, W) -> (N, width, GH, GW): one linear map per block position."""
        tokens = torch.bmm(to_blocks(x, self.block, self.grid), self.embed_w) + self.embed_b[:, None]
        return tokens.permute(1, 2, 0).reshape(x.shape[0], -1, *self.grid)

    def forward(self, x):
        return self.head(self.trunk(F.relu(self.stem_norm(self.stem(x)))))


def default_cells(block) -> tuple[int, int]:
    """Feature-map cells per block side: half the block side (rounded, at least 1), so that the
    trunk sees the half-resolution map ResNet-18's stride-2 stem gives (16x16 for CIFAR)."""
    return tuple(max(1, round(b / 2)) for b in block)


class BlockResNet(nn.Module):
    """ResNet-18 for disguised blocks. The stem is a linear map per stored block position (d values
    -> cells x cells x 64 features), which absorbs any invertible linear map a key applies at that
    position exactly (the same function on plain images has the stem ``M_i^-1 W``). The features of
    stored position j are put at grid cell ``arrangement[j]``; torchvision's ResNet-18 layers then
    run on that map. With the identity arrangement this is the block-aware conv model for keys
    without perm. For a permuting key, ``dkit train`` estimates the arrangement from the disguised
    training images (``dkit.placement``): when it is the key's permutation up to a grid symmetry, the
    network absorbs perm + RMT exactly. The arrangement is a buffer, stored with the weights.

    ``pixels=1``: the stem is an affine d x d map per position (``align``, started from the principal frame
    each position shows in the training data), then one d x d map shared by all positions (``mix``);
    the result is put back together as an image (each block's d values as its pixels, at its cell)
    and the whole of ``resnet18`` runs on it, its 3x3 stem included. With the key folded into the
    per-position maps (A_j = M_j^-1) and ``mix`` the identity, this is exactly ``resnet18`` on the
    plain images, so it keeps convolution's sharing of weights within and across blocks."""

    def __init__(self, shape, block, num_classes, *, cells: int | None = None, shared: int = 0, pixels: int = 0):
        super().__init__()
        from torchvision.models import resnet18 as tv_resnet18

        self.shape, self.block = tuple(shape), tuple(block)
        self.grid, t, d = block_geometry(shape, block)
        self.pixels = bool(pixels)
        self.shared = bool(shared) and not self.pixels
        if self.pixels:  # x_j A_j P, rebuilt as an image, then resnet18's own stem
            self.align = nn.Parameter(torch.eye(d).repeat(t, 1, 1))
            self.embed_b = nn.Parameter(torch.zeros(t, d))
            self.mix = nn.Parameter(torch.eye(d))
            self.conv1 = nn.Conv2d(shape[2], 64, kernel_size=3, stride=2, padding=1, bias=False)
        else:
            self.cells = (cells, cells) if cells else default_cells(block)
            out = self.cells[0] * self.cells[1] * 64
            if self.shared:  # E_j = A_j W: a d x d map per position, one stem W for all
                self.align = nn.Parameter(torch.eye(d).repeat(t, 1, 1))
                self.stem_w = nn.Parameter(torch.randn(d, out) * math.sqrt(2.0 / d))
            else:
                self.embed_w = nn.Parameter(torch.randn(t, d, out) * math.sqrt(2.0 / d))
            self.embed_b = nn.Parameter(torch.zeros(t, out))
        self.register_buffer("arrangement", torch.arange(t))
        self.stem_norm = nn.BatchNorm2d(64)
        net = tv_resnet18(num_classes=num_classes)
        self.trunk = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), net.fc)

    def stem(self, x):
        """(N, C, H, W) -> (N, 64, GH x cells, GW x cells), stored position j at cell arrangement[j]
        (with pixels=1: the rebuilt image through the 3x3 stride-2 conv, (N, 64, H/2, W/2))."""
        n = x.shape[0]
        if self.pixels:
            tokens = torch.bmm(to_blocks(x, self.block, self.grid), self.align) + self.embed_b[:, None]
            tokens = torch.matmul(tokens, self.mix)
            image = from_blocks(tokens[torch.argsort(self.arrangement)], self.block, self.grid, self.shape[2])
            return self.conv1(image)
        tokens = torch.bmm(to_blocks(x, self.block, self.grid), self.embeddings()) + self.embed_b[:, None]
        tokens = tokens[torch.argsort(self.arrangement)]  # grid cell order
        (gh, gw), (sh, sw) = self.grid, self.cells
        return tokens.view(gh, gw, n, sh, sw, -1).permute(2, 5, 0, 3, 1, 4).reshape(n, -1, gh * sh, gw * sw)

    def embeddings(self) -> torch.Tensor:
        """(t, d, out): each stored position's stem matrix (with pixels=1, its map to the rebuilt block)."""
        if self.pixels:  # (t, d, d): A_j P
            return torch.matmul(self.align, self.mix)
        return torch.matmul(self.align, self.stem_w) if self.shared else self.embed_w

    def forward(self, x):
        return self.head(self.trunk(F.relu(self.stem_norm(self.stem(x)))))


def build(arch: str, shape, block, num_classes: int, mean, std, **arch_params) -> nn.Module:
    """The network with its normalisation in front."""
    if arch == "cnn":
        net = SimpleCNN(shape, num_classes, **arch_params)
    elif arch == "resnet18":
        net = resnet18(shape, num_classes)
    elif arch == "blockvit":
        net = BlockViT(shape, block, num_classes, **arch_params)
    elif arch == "blockconv":
        net = BlockConv(shape, block, num_classes, **arch_params)
    elif arch == "blockresnet":
        net = BlockResNet(shape, block, num_classes, **arch_params)
    else:
        raise ValueError(f"unknown architecture {arch!r}: choose " + ", ".join(ARCHS))
    return nn.Sequential(Normalize(mean, std), net)


def soft_cross_entropy(logits, target):
    """Cross-entropy against soft labels (InstaHide): -sum_k y_k log p_k, averaged."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
