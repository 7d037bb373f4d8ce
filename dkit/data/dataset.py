"""A torch ``Dataset`` over a disguised HDF5 file. No key is needed: this runs on the cloud side.

h5py objects do not pickle, so the file is opened lazily in each process (each DataLoader worker
opens its own handle on first access). ``in_memory=True`` reads everything once, which is the fast
choice whenever the file fits in RAM; otherwise rows are read on demand.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from . import h5format


class DisguisedDataset(torch.utils.data.Dataset):
    """Items are (image, target): image a float32 tensor (C, H, W) of disguised values, target an int
    class (hard labels), a float vector (soft labels), or -1 (unlabelled)."""

    def __init__(self, path: str | Path, indices=None, *, in_memory: bool | None = None):
        self.path = Path(path)
        self.meta = h5format.inspect(self.path)
        self.indices = np.arange(self.meta.rows) if indices is None else np.asarray(indices, dtype=np.int64)
        if in_memory is None:
            h, w, c = self.meta.params.shape
            in_memory = self.meta.rows * h * w * c * 4 <= (2 << 30)
        self._file = None
        self._pid = None
        self._images = self._targets = None
        if in_memory:
            self._images, self._targets = self.read_all()

    @property
    def label_kind(self) -> str:
        return self.meta.label_kind

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None  # reopened in the worker
        state["_pid"] = None
        return state

    def _h5(self):
        if self._file is None or self._pid != os.getpid():
            self._file = h5format.open_h5(self.path)
            self._pid = os.getpid()
        return self._file

    def read_all(self) -> tuple[np.ndarray, np.ndarray | None]:
        """All rows of this dataset's indices, as float32 (N, H, W, C) and targets."""
        with h5format.open_h5(self.path) as f:
            imgs = f[h5format.IMAGES]
            idx = self.indices
            if len(idx) and np.all(np.diff(idx) == 1):
                x = imgs[idx[0] : idx[-1] + 1]
            else:
                x = imgs[np.sort(idx)][np.argsort(np.argsort(idx))] if len(idx) else imgs[:0]
            y = self._read_targets(f, idx)
        return np.ascontiguousarray(x, dtype=np.float32), y

    def _read_targets(self, f, idx):
        if self.meta.label_kind == "hard":
            return f[h5format.LABELS][:][idx]
        if self.meta.label_kind == "soft":
            return f[h5format.SOFT_LABELS][:][idx].astype(np.float32)
        return None

    def get_batch(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """Several items at once (positions into this dataset), images (B, C, H, W) float32."""
        positions = np.asarray(positions, dtype=np.int64)
        if self._images is not None:
            x = self._images[positions]
            y = self._targets[positions] if self._targets is not None else None
        else:
            rows = self.indices[positions]
            order = np.argsort(rows)
            f = self._h5()
            x = np.empty((len(rows),) + self.meta.params.shape, dtype=np.float32)
            x[order] = f[h5format.IMAGES][rows[order]]
            y = None
            if self.meta.label_kind == "hard":
                y = np.empty(len(rows), dtype=np.int64)
                y[order] = f[h5format.LABELS][rows[order]]
            elif self.meta.label_kind == "soft":
                y = np.empty((len(rows), self.meta.num_classes), dtype=np.float32)
                y[order] = f[h5format.SOFT_LABELS][rows[order]]
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(0, 3, 1, 2)
        yt = torch.from_numpy(y) if y is not None else torch.full((len(positions),), -1, dtype=torch.long)
        return xt, yt

    def __getitem__(self, i: int):
        x, y = self.get_batch([i])
        return x[0], y[0]
