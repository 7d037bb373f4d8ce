"""``DisguisedModel``: wrap any ``nn.Module`` trained on disguised data so that it takes plain images.

    model, meta = dkit.models.load("model/")                  # records the model's key ID
    net = DisguisedModel(model, keystore.load(f"cifar@{meta.key_version}"))
    logits = net(images)          # plain pixels 0..255, (N, C, H, W); disguised on the model's device

The key must be the one the model was trained with: its ID is checked against the ID that
``dkit.models.load`` records on the model (or ``key_id=``, for a model built by other code), and a
mismatch is refused (``KeyMismatch``). A model that says nothing of its key is refused too: a model
paired with the wrong key predicts at chance, silently.

Each call disguises with fresh CSPRNG noise on the model's device (the torch kernels on CUDA, the
fused numpy kernels on the CPU), then calls the wrapped model. Attributes the wrapper does not have
pass through to the model, and ``unwrap()`` returns it. The wrapper holds key material: it cannot be
pickled, and its ``state_dict`` is the wrapped model's (prefixed ``model.``), never the key's.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..engine import Disguise, RandomSource
from ..errors import InputError, KeyMismatch, ParameterError
from ..params import MAX_SAMPLES

KEY_ID_ATTR = "dkit_key_id"  # set on a model by dkit.models.load: the public ID of its key version


def check_model_key(model: nn.Module, key, key_id: str | None = None) -> str:
    """Refuse a key whose public ID is not the model's. ``key_id`` overrides what the model records."""
    want = key_id if key_id is not None else getattr(model, KEY_ID_ATTR, None)
    if not want:
        raise InputError(
            "the model does not say which key it was trained with",
            hint="load it with dkit.models.load (which records its key ID), or pass key_id= from its metadata",
        )
    got = getattr(key, "key_id", None)
    if got != want:
        ref = getattr(key, "ref", "the key")
        raise KeyMismatch(
            f"{ref} (key ID {got}) is not the key this model was trained with (key ID {want})",
            hint='load the model\'s own version: Keystore().load(f"NAME@{meta.key_version}")',
        )
    return want


class DisguisedModel(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        key,
        *,
        layout: str = "NCHW",
        pool=None,
        samples: int | None = None,
        key_id: str | None = None,
    ):
        """``key``: a LoadedKey (or KeyMaterial), checked against the model's key ID (recorded by
        ``dkit.models.load``, or given as ``key_id``). ``layout``: of the inputs, NCHW or NHWC.
        ``samples``: disguise each input that many times (fresh noise, or fresh InstaHide mixes and
        masks) and return the log of the averaged probabilities; default 1, and 4 for InstaHide,
        whose keys mix each input with images of ``pool`` (default: the rest of the batch)."""
        super().__init__()
        if layout not in ("NCHW", "NHWC"):
            raise ValueError("layout is NCHW or NHWC")
        check_model_key(model, key, key_id)
        self.model = model
        self.layout = layout
        is_mix = Disguise.from_key(key).instahide is not None
        self.samples = int(samples) if samples is not None else (4 if is_mix else 1)
        if not 1 <= self.samples <= MAX_SAMPLES:
            raise ParameterError(f"samples must be from 1 to {MAX_SAMPLES}")
        object.__setattr__(self, "_disguise", Disguise.from_key(key))
        object.__setattr__(self, "_pool", None if pool is None else np.asarray(pool))

    @property
    def key_id(self) -> str:
        return self._disguise.key_id

    def unwrap(self) -> nn.Module:
        return self.model

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def __reduce_ex__(self, protocol):
        raise TypeError("a DisguisedModel holds key material and cannot be pickled; save model.unwrap() instead")

    def __repr__(self) -> str:
        return f"DisguisedModel(key_id={self.key_id!r}, model={type(self.model).__name__})"

    def _device(self) -> torch.device:
        for t in self.model.parameters():
            return t.device
        for t in self.model.buffers():
            return t.device
        return torch.device("cpu")

    def disguise(self, x: torch.Tensor, rng: RandomSource | None = None) -> torch.Tensor:
        """Plain images -> disguised (N, C, H, W) float32 on the model's device."""
        device = self._device()
        x = torch.as_tensor(x).to(device)
        nhwc = x.permute(0, 2, 3, 1) if self.layout == "NCHW" else x
        y = self._disguise.apply(nhwc.contiguous(), rng=rng)
        return y.permute(0, 3, 1, 2).contiguous().to(device)

    def forward(self, x, rng: RandomSource | None = None):
        if self._disguise.instahide is not None:
            return self._instahide_forward(x, rng)
        if self.samples == 1:
            return self.model(self.disguise(x, rng))
        # Average over fresh noise: the noise is what the owner can average away, the key is not.
        n = len(x)
        rep = torch.as_tensor(x).repeat((self.samples,) + (1,) * (torch.as_tensor(x).ndim - 1))
        probs = torch.softmax(self.model(self.disguise(rep, rng)).float(), dim=1)
        return torch.log(probs.view(self.samples, n, -1).mean(dim=0))

    def _instahide_forward(self, x, rng):
        device = self._device()
        nhwc = torch.as_tensor(x).permute(0, 2, 3, 1) if self.layout == "NCHW" else torch.as_tensor(x)
        plain = nhwc.detach().cpu().numpy()
        pool = self._pool if self._pool is not None else plain
        rng = rng or RandomSource()
        probs = 0
        for s in range(self.samples):
            enc, _ = self._disguise.encode(plain, None, pool=pool, rng=rng, start=s * len(plain))
            logits = self.model(torch.from_numpy(enc).permute(0, 3, 1, 2).contiguous().to(device))
            probs = probs + torch.softmax(logits.float(), dim=1)
        return torch.log(probs / self.samples)
