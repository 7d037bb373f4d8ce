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

from ..errors import FormatError
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
        """All rows of this dataset's indices, as float32 (N, H, W, C) and targets. A damaged chunk is
        a ``FormatError`` naming the file and the rows (run ``dkit verify``)."""
        idx = self._checked(self.indices)
        with h5format.open_h5(self.path) as f:
            imgs = self._ds(f, h5format.IMAGES)
            if len(idx) and np.all(np.diff(idx) == 1):
                x = np.empty((len(idx),) + self.meta.params.shape, dtype=np.float32)
                h5format.read_rows(imgs, h5format.IMAGES, self.path, int(idx[0]), int(idx[-1]) + 1, out=x)
            else:
                x = self._read(imgs, h5format.IMAGES, idx, np.float32)
            y = self._read_targets(f, idx)
        return x, y

    def _ds(self, f, name: str):
        try:
            return f[name]
        except h5format.H5_ERRORS as e:
            raise h5format.damaged(self.path, f"the {name} dataset cannot be opened", e) from None

    def _checked(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) and (rows.min() < 0 or rows.max() >= self.meta.rows):
            raise IndexError(f"rows outside 0..{self.meta.rows - 1} of {self.path}")
        return rows

    def _read(self, ds, name: str, rows: np.ndarray, dtype) -> np.ndarray:
        """Rows in any order (each at most once), read in increasing order, as HDF5 requires."""
        out = np.empty((len(rows),) + ds.shape[1:], dtype=dtype)
        if len(rows):
            order = np.argsort(rows)
            try:
                out[order] = ds[rows[order]]
            except h5format.H5_ERRORS as e:
                lo, hi = int(rows.min()), int(rows.max())
                raise FormatError(
                    f"{self.path}: dataset {name}, rows {lo}..{hi}: checksum mismatch or unreadable data "
                    f"({h5format.first_line(e)})",
                    hint=f"the file is damaged: run dkit verify {self.path}, then disguise or copy it again",
                ) from None
        return out

    def _read_targets(self, f, idx, *, batch: bool = False):
        """The targets of rows ``idx``: a batch's rows read by selection, else every row read (in
        chunks; ``inspect`` checked that the file stores them) and picked."""
        name = {"hard": h5format.LABELS, "soft": h5format.SOFT_LABELS}.get(self.meta.label_kind)
        if name is None:
            return None
        ds = self._ds(f, name)
        dtype = np.int64 if name == h5format.LABELS else np.float32
        if batch:
            y = self._read(ds, name, idx, dtype)
        else:
            y = h5format.read_rows(ds, name, self.path, 0, self.meta.rows)[idx].astype(dtype, copy=False)
        if name == h5format.LABELS:
            k = self.meta.num_classes or h5format.MAX_CLASSES
            if len(y) and (y.min() < 0 or y.max() >= k):
                raise FormatError(f"{self.path}: damaged labels (values outside 0..{k - 1})")
        return y

    def get_batch(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """Several items at once (positions into this dataset), images (B, C, H, W) float32."""
        positions = np.asarray(positions, dtype=np.int64)
        if self._images is not None:
            x = self._images[positions]
            y = self._targets[positions] if self._targets is not None else None
        else:
            rows = self._checked(self.indices[positions])
            f = self._h5()
            x = self._read(self._ds(f, h5format.IMAGES), h5format.IMAGES, rows, np.float32)
            y = self._read_targets(f, rows, batch=True)
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(0, 3, 1, 2)
        yt = torch.from_numpy(y) if y is not None else torch.full((len(positions),), -1, dtype=torch.long)
        return xt, yt

    def __getitem__(self, i: int):
        x, y = self.get_batch([i])
        return x[0], y[0]
