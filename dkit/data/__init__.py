"""Data in and out: sources (image folders, arrays, torchvision), the disguised HDF5 container,
the streaming disguise run, shard merging, previews, and a torch Dataset for training."""

from .h5format import Meta, inspect, verify
from .merge import merge
from .run import Options, Report, decode_all, disguise_source, parse_shard
from .sources import Source, TorchvisionSource, open_source


def __getattr__(name):
    if name == "DisguisedDataset":  # imports torch: only when asked for
        from .dataset import DisguisedDataset

        return DisguisedDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DisguisedDataset",
    "Meta",
    "Options",
    "Report",
    "Source",
    "TorchvisionSource",
    "decode_all",
    "disguise_source",
    "inspect",
    "merge",
    "open_source",
    "parse_shard",
    "verify",
]
