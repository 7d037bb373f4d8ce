"""Models that learn from disguised data: the networks, training (cloud side, no key), the safe
artifact format, prediction (owner side, with the key) and the inference wrapper."""

from .artifact import ModelMeta, load
from .nets import ARCHS, BlockViT, SimpleCNN, build
from .prediction import predict
from .training import TrainOptions, train
from .wrapper import DisguisedModel

__all__ = [
    "ARCHS",
    "BlockViT",
    "DisguisedModel",
    "ModelMeta",
    "SimpleCNN",
    "TrainOptions",
    "build",
    "load",
    "predict",
    "train",
]
