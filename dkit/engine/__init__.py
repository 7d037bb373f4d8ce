"""The disguise engine: mechanisms built from a key version, applied in batches with numpy or torch.

``Disguise`` is the safe entry point. ``mechanisms`` and the ``kernels_*`` modules are the low-level
layer: they hold raw key material and do no checking of their own.
"""

from .disguise import Disguise
from .randomness import RandomSource

__all__ = ["Disguise", "RandomSource"]
