"""Public key parameters: image geometry, block size, the pipeline of mechanisms and their settings.

These are the public half of a key version (the secret half is the seed). They are stored in the
key record, in every disguised dataset and model artifact, and they enter the key ID. Their
canonical form is specified in ``keys/SPEC-v1.md``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .errors import ParameterError

MECHANISMS = ("identity", "perm", "rmt", "aes", "instahide")
RMT_KINDS = ("orthogonal", "projection")
CHANNEL_MODES = ("joint", "shared")
AES_MODES = ("shared", "per-block")
MIX_MODES = ("inside", "cross")

AES_BLOCK_BYTES = 16
MAX_SIDE = 16384
MAX_CHANNELS = 64
# Joint RMT stores t matrices of d x d; refuse keys whose matrices exceed this many entries.
MAX_MATRIX_ENTRIES = 1 << 25
# Deriving a key costs time per block position (a permutation step, a matrix, an AES key): at most
# this many positions (1024x1024 in 1x1 blocks, 4096x4096 in 4x4), a few seconds per load.
MAX_POSITIONS = 1 << 20
# Predict: disguises per input whose probabilities are averaged (each is a full forward pass).
MAX_SAMPLES = 64

_INT = r"\s*([0-9]+)\s*"


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"32x32x3"`` -> (32, 32, 3); ``"28x28"`` -> (28, 28, 1). Height first."""
    m = re.fullmatch(_INT + r"[xX]" + _INT + r"(?:[xX]" + _INT + r")?", str(text))
    if not m:
        raise ParameterError(f"malformed shape {text!r}: expected HxWxC such as 32x32x3 (or HxW for grey images)")
    h, w = int(m.group(1)), int(m.group(2))
    c = int(m.group(3)) if m.group(3) else 1
    return _check_shape((h, w, c), text)


def _check_shape(shape, text) -> tuple[int, int, int]:
    h, w, c = shape
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise ParameterError(f"shape {text!r}: height and width must be between 1 and {MAX_SIDE}")
    if not 1 <= c <= MAX_CHANNELS:
        raise ParameterError(f"shape {text!r}: channels must be between 1 and {MAX_CHANNELS}")
    return (h, w, c)


def parse_block(text: str | int) -> tuple[int, int]:
    """``"4"`` -> (4, 4); ``"4x2"`` -> (4, 2) (height x width)."""
    m = re.fullmatch(_INT + r"(?:[xX]" + _INT + r")?", str(text))
    if not m:
        raise ParameterError(f"malformed block {text!r}: expected B or BHxBW such as 4 or 4x2")
    bh = int(m.group(1))
    bw = int(m.group(2)) if m.group(2) else bh
    if bh < 1 or bw < 1:
        raise ParameterError(f"block {text!r}: sides must be at least 1")
    return (bh, bw)


# The thumbnail attack (dkit evaluate, level 1) gives an orthogonal-RMT key's grid of block means
# from the disguised data alone. Measured on CIFAR-10: an 8x8 grid is a recognisable thumbnail
# (SSIM 0.56, broken), a 4x4 grid is not (0.29, partial; MNIST 0.22, holds). RMT keys default to
# blocks that cut the image into at most this many blocks per side.
THUMBNAIL_SIDE = 4
DEFAULT_BLOCK = 4  # keys without rmt (perm, aes, instahide): the block the first dkit used


def auto_block(shape, pipeline, *, channels: str = "joint") -> tuple[int, int]:
    """The default block of a key: for rmt, the largest block that leaves at least THUMBNAIL_SIDE
    blocks per side (the coarsest thumbnail the key can leak) and whose matrices fit the key size
    limit; the coarsest such grid wins, then the squarest block. Without rmt, DEFAULT_BLOCK."""
    h, w, c = shape
    if "rmt" not in pipeline:
        return (DEFAULT_BLOCK, DEFAULT_BLOCK)

    def divisors(n):
        return [b for b in range(1, n // THUMBNAIL_SIDE + 1) if n % b == 0] or [1]

    best = None
    for bh in divisors(h):
        for bw in divisors(w):
            t = (h // bh) * (w // bw)
            side = bh * bw * c if channels == "joint" else bw
            if t > MAX_POSITIONS or t * side * side > MAX_MATRIX_ENTRIES:
                continue
            rank = (t, abs(bh - bw))
            if best is None or rank < best[0]:
                best = (rank, (bh, bw))
    if best is None:
        raise ParameterError(
            f"no block of a {h}x{w}x{c} image fits the rmt key size limit",
            hint="give --block, or use --channels shared",
        )
    return best[1]


def thumbnail_warning(params: KeyParams) -> str | None:
    """A sentence for keys whose grid the thumbnail attack turns into a recognisable thumbnail."""
    gh, gw = params.grid
    if not params.has("rmt") or (gh <= THUMBNAIL_SIDE and gw <= THUMBNAIL_SIDE):
        return None
    return (
        f"the disguised data alone give a {gh}x{gw} grey thumbnail of every image (the thumbnail attack, "
        f"threat level 1; an 8x8 one of CIFAR images is recognisable): blocks that leave at most "
        f"{THUMBNAIL_SIDE} per side shrink it (the default, --block auto); see SECURITY.md"
    )


def parse_pipeline(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"perm,rmt"`` -> ("perm", "rmt"), validated and in canonical order."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [s.strip().lower() for s in items if s.strip()]
    if not names:
        raise ParameterError("empty pipeline: name at least one of " + ", ".join(MECHANISMS))
    unknown = [n for n in names if n not in MECHANISMS]
    if unknown:
        raise ParameterError(f"unknown mechanism {unknown[0]!r}: the mechanisms are " + ", ".join(MECHANISMS))
    if len(set(names)) != len(names):
        raise ParameterError(f"pipeline {','.join(names)!r} names a mechanism twice")
    s = set(names)
    if "identity" in s and len(s) > 1:
        raise ParameterError("identity is the no-disguise baseline and cannot be combined")
    if {"rmt", "aes"} <= s:
        raise ParameterError("rmt and aes both transform each block; choose one of them")
    if "instahide" in s and len(s) > 1:
        raise ParameterError("instahide is a stand-alone mechanism in this version; use it alone")
    return tuple(n for n in MECHANISMS if n in s)


@dataclass(frozen=True)
class KeyParams:
    """All public parameters of a key version. Build with :meth:`create`, which validates."""

    shape: tuple[int, int, int]
    block: tuple[int, int]
    pipeline: tuple[str, ...]
    rmt_kind: str = "orthogonal"
    channels: str = "joint"
    noise: float = 0.0
    aes_keys: str = "per-block"
    k: int = 4
    bound: float = 0.65
    mix: str = "inside"
    spec: int = field(default=1)

    @classmethod
    def create(
        cls,
        shape,
        block="auto",
        pipeline="perm,rmt",
        *,
        rmt_kind: str = "orthogonal",
        channels: str = "joint",
        noise: float | None = None,
        aes_keys: str = "per-block",
        k: int = 4,
        bound: float = 0.65,
        mix: str = "inside",
    ) -> KeyParams:
        shape = parse_shape(shape) if isinstance(shape, str) else _check_shape(tuple(shape), shape)
        pipeline = parse_pipeline(pipeline)
        if isinstance(block, str) and block.strip().lower() == "auto":
            block = auto_block(shape, pipeline, channels=channels)
        block = parse_block(block) if isinstance(block, (str, int)) else tuple(block)
        if noise is None:
            noise = 25.0 if "rmt" in pipeline else 0.0
        p = cls(
            shape=tuple(int(v) for v in shape),
            block=tuple(int(v) for v in block),
            pipeline=pipeline,
            rmt_kind=rmt_kind,
            channels=channels,
            noise=float(noise),
            aes_keys=aes_keys,
            k=int(k),
            bound=float(bound),
            mix=mix,
        )
        p.validate()
        return p

    # -- geometry ---------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """Blocks per column and per row: (H / bh, W / bw)."""
        return (self.shape[0] // self.block[0], self.shape[1] // self.block[1])

    @property
    def positions(self) -> int:
        """t, the number of block positions."""
        gh, gw = self.grid
        return gh * gw

    @property
    def block_size(self) -> int:
        """d, the number of values in one block: bh * bw * C."""
        return self.block[0] * self.block[1] * self.shape[2]

    @property
    def matrix_side(self) -> int:
        """The side of one stored RMT matrix: d (joint) or bw (shared, the papers' variant)."""
        return self.block_size if self.channels == "joint" else self.block[1]

    def has(self, mechanism: str) -> bool:
        return mechanism in self.pipeline

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        h, w, c = _check_shape(self.shape, "x".join(map(str, self.shape)))
        bh, bw = self.block
        if bh < 1 or bw < 1:
            raise ParameterError(f"block {bh}x{bw}: sides must be at least 1")
        if h % bh or w % bw:
            bad = f"{h} is not a multiple of {bh}" if h % bh else f"{w} is not a multiple of {bw}"
            raise ParameterError(
                f"block {bh}x{bw} does not tile a {h}x{w} image ({bad})",
                hint="choose a block whose sides divide the image's, or resize the images "
                "to a shape that the block tiles (dkit disguise --fit resize)",
            )
        if self.spec != 1:
            raise ParameterError(f"derivation spec version {self.spec} is not known to this dkit")
        if self.positions > MAX_POSITIONS:
            raise ParameterError(
                f"a {h}x{w} image in {bh}x{bw} blocks has {self.positions:,} block positions; "
                f"dkit derives at most {MAX_POSITIONS:,} (each costs time at every key load)",
                hint="use larger blocks",
            )
        if self.has("rmt"):
            if self.rmt_kind not in RMT_KINDS:
                raise ParameterError(f"unknown rmt kind {self.rmt_kind!r}: choose " + " or ".join(RMT_KINDS))
            if self.channels not in CHANNEL_MODES:
                raise ParameterError(f"unknown channel mode {self.channels!r}: choose " + " or ".join(CHANNEL_MODES))
            side = self.matrix_side
            if self.positions * side * side > MAX_MATRIX_ENTRIES:
                raise ParameterError(
                    f"rmt with {self.positions} blocks of {side}x{side} matrices is too large a key",
                    hint="use smaller blocks or --channels shared",
                )
        if not 0.0 <= self.noise <= 255.0:
            raise ParameterError(f"noise {self.noise}: the noise level is in 0..255 pixel units")
        if self.noise and not self.has("rmt"):
            raise ParameterError("--noise is a setting of rmt; add rmt to the pipeline or drop it")
        if self.has("aes"):
            if self.aes_keys not in AES_MODES:
                raise ParameterError(f"unknown aes key mode {self.aes_keys!r}: choose shared or per-block")
            if self.block_size < AES_BLOCK_BYTES:
                raise ParameterError(
                    f"aes needs blocks of at least {AES_BLOCK_BYTES} bytes; a {bh}x{bw}x{c} block "
                    f"has {self.block_size}",
                    hint="use a larger block (4x4 for grey images, 3x3 for colour)",
                )
        if self.has("instahide"):
            if not 1 <= self.k <= 16:
                raise ParameterError(f"instahide k={self.k}: k is between 1 and 16")
            if not (0.0 < self.bound <= 1.0) or (self.k > 1 and self.bound <= 1.0 / self.k):
                raise ParameterError(f"instahide bound {self.bound}: it must lie in (1/k, 1] = ({1 / self.k:.3g}, 1]")
            if self.k == 1 and self.bound < 1.0:  # one image's coefficient is 1: no draw could ever pass
                raise ParameterError(
                    f"instahide k=1 with bound {self.bound:g}: one image's coefficient is always 1",
                    hint="k=1 (sign masks only) needs bound 1; mixing needs k >= 2",
                )
            if self.mix not in MIX_MODES:
                raise ParameterError(f"unknown instahide mix {self.mix!r}: choose inside or cross")

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The public parameters as stored: only the settings of mechanisms in the pipeline."""
        d: dict = {
            "spec": self.spec,
            "shape": list(self.shape),
            "block": list(self.block),
            "pipeline": list(self.pipeline),
        }
        if self.has("rmt"):
            d["rmt"] = {"kind": self.rmt_kind, "channels": self.channels, "noise": float(self.noise)}
        if self.has("aes"):
            d["aes"] = {"keys": self.aes_keys}
        if self.has("instahide"):
            d["instahide"] = {"k": self.k, "bound": float(self.bound), "mix": self.mix}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> KeyParams:
        try:
            rmt = d.get("rmt", {})
            aes = d.get("aes", {})
            ih = d.get("instahide", {})
            p = cls(
                shape=tuple(int(v) for v in d["shape"]),
                block=tuple(int(v) for v in d["block"]),
                pipeline=parse_pipeline(list(d["pipeline"])),
                rmt_kind=rmt.get("kind", "orthogonal"),
                channels=rmt.get("channels", "joint"),
                noise=float(rmt.get("noise", 0.0)),
                aes_keys=aes.get("keys", "per-block"),
                k=int(ih.get("k", 4)),
                bound=float(ih.get("bound", 0.65)),
                mix=ih.get("mix", "inside"),
                spec=int(d.get("spec", 1)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ParameterError(f"malformed key parameters: {e}") from None
        if len(p.shape) != 3 or len(p.block) != 2:
            raise ParameterError("malformed key parameters: shape needs 3 sides and block 2")
        p.validate()
        return p

    def canonical(self) -> bytes:
        """The canonical byte string of the parameters (``keys/SPEC-v1.md``, "Canonical form")."""
        return canonical_json(self.to_dict())

    def describe(self) -> str:
        """A one-line human summary."""
        h, w, c = self.shape
        parts = [f"{h}x{w}x{c}", f"block {self.block[0]}x{self.block[1]}", "+".join(self.pipeline)]
        if self.has("rmt"):
            parts.append(f"rmt {self.rmt_kind}/{self.channels} noise {self.noise:g}")
        if self.has("aes"):
            parts.append(f"aes {self.aes_keys}")
        if self.has("instahide"):
            parts.append(f"instahide k={self.k} bound {self.bound:g} {self.mix}")
        return ", ".join(parts)


def canonical_json(obj) -> bytes:
    """Sorted keys, no white space, ASCII, floats as their shortest round-trip decimal."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
