"""``Disguise``: a key version's pipeline, applied to batches of images with numpy or torch.

    d = Disguise.from_key(keystore.load("cifar"))
    y = d.apply(images)                # (N, 32, 32, 3) uint8 -> float32, fresh noise per image
    x_hat = d.reveal(y)                # the owner's inverse (exact, or an estimate with noise)

numpy arrays go through the fused numpy kernels; torch tensors stay on their device (CPU or CUDA).
Per-image randomness comes from a ``RandomSource`` (a fresh CSPRNG root unless one is passed) and
is addressed by the image's global index ``start + i``, so chunked runs equal one run.
"""

from __future__ import annotations

import numpy as np

from ..derive import KeyMaterial
from ..errors import InputError
from ..params import KeyParams
from . import kernels_np
from .geometry import batch_shape, check_values_np, from_blocks, out_dtype, to_blocks
from .instahide import InstaHide
from .mechanisms import AES, RMT, Identity, Mechanism, Permutation
from .randomness import RandomSource

NOISE_LABEL = "noise"
NOISE_LEVELS = 65536  # noise = N * m / 65536 with m a uniform 16-bit integer


class Disguise:
    """The disguise of one key version. Holds key material: never printed, never pickled."""

    def __init__(self, material: KeyMaterial):
        self.material = material
        self.params: KeyParams = material.params
        p = self.params
        self.perm = Permutation(material.perm) if material.perm is not None else None
        self.rmt = (
            RMT(material.matrices, p.channels, p.block, p.shape[2], p.noise, p.rmt_kind)
            if material.matrices is not None
            else None
        )
        self.aes = AES(material.aes) if material.aes is not None else None
        self.instahide = InstaHide(p.k, p.bound, p.mix) if p.has("instahide") else None
        self._plan = None
        self._inverse_plan = None
        self._torch_cache: dict = {}

    @classmethod
    def from_key(cls, key) -> Disguise:
        """From a ``LoadedKey`` (``Keystore.load``) or a ``KeyMaterial``."""
        return cls(getattr(key, "material", key))

    @property
    def key_id(self) -> str:
        return self.material.key_id

    @property
    def mechanisms(self) -> list[Mechanism]:
        """The pipeline in application order: block transform, permutation (noise is RMT's)."""
        if self.instahide is not None:
            return [self.instahide]
        ms = [m for m in (self.rmt, self.aes, self.perm) if m is not None]
        return ms or [Identity()]

    @property
    def invertible(self) -> bool:
        return self.instahide is None

    @property
    def noise(self) -> float:
        return self.rmt.noise if self.rmt is not None else 0.0

    def __repr__(self) -> str:
        return f"Disguise(key_id={self.key_id!r}, {'+'.join(self.params.pipeline)})"

    def __reduce__(self):
        raise TypeError("a Disguise holds key material and cannot be pickled; rebuild it from the key")

    # -- numpy ------------------------------------------------------------------------------
    def _noise_fn(self, rng: RandomSource, start: int):
        per = int(np.prod(self.params.shape)) * 2

        def fn(i0: int, n: int) -> np.ndarray:
            return rng.bytes_at(NOISE_LABEL, (start + i0) * per, n * per).view("<u2")

        return fn

    def noise_for(self, rng: RandomSource, start: int, n: int) -> np.ndarray:
        """The uint16 noise draws m of images start..start+n-1, (n, H, W, C); noise = N * m / 65536."""
        return self._noise_fn(rng, start)(0, n).reshape((n,) + self.params.shape)

    def apply(
        self, x, *, rng: RandomSource | None = None, start: int = 0, dtype="float32", out=None, backend: str = "auto"
    ):
        """Disguise a batch (N, H, W, C) or one image (H, W, C). numpy in, numpy out; torch in, torch out.

        ``start`` is the global index of the first image (it selects the per-image randomness).
        ``out`` (numpy, optional) is a preallocated output of the right shape and dtype, for loops
        that disguise chunk after chunk without touching fresh memory each time.
        ``backend``: ``auto`` runs CPU data (numpy or torch) through the fused numpy kernels and CUDA
        tensors through the torch kernels on their device; ``torch`` forces the torch kernels.
        """
        if self.instahide is not None:
            raise InputError("instahide mixes a labelled set of images; use Disguise.encode")
        if backend not in ("auto", "numpy", "torch"):
            raise InputError(f"unknown backend {backend!r}: choose auto, numpy or torch")
        if _is_torch(x):
            if out is not None:
                raise InputError("out is for numpy input; a torch input gets a new tensor on its device")
            if backend == "torch" or (backend == "auto" and x.device.type != "cpu"):
                from .kernels_torch import apply_torch

                return apply_torch(self, x, rng=rng, start=start, dtype=dtype)
            import torch

            xc = x.detach().cpu()
            if xc.dtype == torch.bfloat16:  # numpy has no bfloat16
                xc = xc.float()
            y = self.apply(xc.numpy(), rng=rng, start=start, dtype=dtype)
            return torch.from_numpy(y).to(x.device)
        x = np.asarray(x)
        n, single = batch_shape(x.shape, self.params, "images")
        check_values_np(x, "images", need_bytes=self.aes is not None)
        dt = out_dtype(dtype)
        x = x.reshape((n,) + self.params.shape)
        if out is not None:
            if not isinstance(out, np.ndarray) or out.shape != x.shape or out.dtype != dt:
                raise InputError(f"out must be a numpy array of shape {x.shape} and dtype {dt}")
        else:
            out = np.empty(x.shape, dtype=dt)
        if self.aes is not None:
            self._apply_aes(x, out)
        else:
            if self._plan is None:
                self._plan = kernels_np.LinearPlan(
                    self.params, self.material.perm, self.rmt.compact if self.rmt is not None else None
                )
            noisy = self.noise > 0
            rng = rng or (RandomSource() if noisy else None)
            self._plan.run(x, out, self._noise_fn(rng, start) if noisy else None, self.noise / NOISE_LEVELS)
        return out[0] if single else out

    def _apply_aes(self, x: np.ndarray, out: np.ndarray) -> None:
        if x.dtype != np.uint8:
            x = np.rint(x).astype(np.uint8)
        if self._plan is None:
            self._plan = kernels_np.AESPlan(self.params, self.material.perm, self.aes)
        self._plan.run(x, out)

    def reveal(self, y) -> np.ndarray:
        """The owner's inverse, float64. Exact for perm and AES (uint8 values), to ~1e-4 for orthogonal
        RMT without noise; with noise, an unbiased estimate: the noise mean is subtracted and the
        matrices undone, leaving (Delta - mean) R^-1 (for orthogonal R, RMS error N / sqrt(12))."""
        if not self.invertible:
            raise InputError("instahide cannot be inverted: its sign masks are not kept")
        if _is_torch(y):
            y = y.detach().cpu().numpy()
        y = np.asarray(y)
        n, single = batch_shape(y.shape, self.params, "disguised images")
        y = y.reshape((n,) + self.params.shape)
        if self.aes is not None:
            out = from_blocks(
                self.aes.invert(
                    self.perm.invert(to_blocks(y, self.params)) if self.perm else to_blocks(y, self.params)
                ),
                self.params,
            ).astype(np.float64)
        else:
            mean = self.noise * (NOISE_LEVELS - 1) / 2 / NOISE_LEVELS
            if self._inverse_plan is None:
                inv = self.rmt.inverse_matrices if self.rmt is not None else None
                self._inverse_plan = kernels_np.InversePlan(self.params, self.material.perm, inv)
            out = self._inverse_plan.run(y, mean)
        return out[0] if single else out

    def reference(self, x, noise: np.ndarray | None = None) -> np.ndarray:
        """The spec computed plainly from the mechanism objects (float64): for tests, not for speed."""
        x = np.asarray(x).reshape((-1,) + self.params.shape)
        b = to_blocks(x.astype(np.uint8) if self.aes is not None else x.astype(np.float64), self.params)
        for m in self.mechanisms:
            if not isinstance(m, Identity):
                b = m.apply(b)
        y = from_blocks(b, self.params).astype(np.float64)
        if self.noise and noise is not None:
            y = y + self.noise * noise.astype(np.float64) / NOISE_LEVELS
        return y

    # -- InstaHide --------------------------------------------------------------------------
    def encode(
        self,
        x,
        labels=None,
        *,
        num_classes: int | None = None,
        encodings: int = 1,
        pool=None,
        pool_labels=None,
        rng: RandomSource | None = None,
        start: int = 0,
        dtype="float32",
    ):
        """Disguise a labelled set: (images, labels). For InstaHide: T encodings per image with soft
        labels (N*T, K); for other pipelines ``apply`` with the labels passed through."""
        x = np.asarray(x)
        n, single = batch_shape(x.shape, self.params, "images")
        if single:
            x = x[None]
        x = x.reshape((n,) + self.params.shape)
        if self.instahide is None:
            return self.apply(x, rng=rng, start=start, dtype=dtype), labels
        check_values_np(x, "images")
        if pool is not None:
            pool = np.asarray(pool)
            pn, _ = batch_shape(pool.shape, self.params, "public images")
            pool = pool.reshape((pn,) + self.params.shape)
            check_values_np(pool, "public images")
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64)
            if labels.shape != (n,):
                raise InputError(f"labels: expected {n} labels, got shape {labels.shape}")
            if num_classes is None:
                num_classes = int(labels.max()) + 1 if n else 0
            if n and (labels.min() < 0 or labels.max() >= num_classes):
                raise InputError(f"labels must lie in 0..{num_classes - 1}")
        return self.instahide.encode(
            x,
            labels,
            num_classes or 0,
            encodings=encodings,
            pool=pool,
            pool_labels=pool_labels,
            rng=rng,
            start=start,
            dtype=out_dtype(dtype),
        )


def _is_torch(x) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch")
