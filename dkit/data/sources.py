"""Where images come from: an image folder (labelled by class sub-folders, or flat), numpy arrays
(``.npy``/``.npz``), or a torchvision dataset. Each source lists its items in a fixed order and
decodes any item to the key's geometry on request, so a run can stream, shard and resume."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from .decode import IMAGE_EXTENSIONS, DecodeError, Policy, convert_array, convert_pil, decode


@dataclass
class Source:
    """A fixed, ordered list of items; ``names[i]`` identifies item i (a relative path) and never
    leaves the owner's machine except as a keyed hash."""

    description: str
    names: list[str]
    labels: np.ndarray | None  # (N,) int64, or None for unlabelled data
    classes: list[str] | None
    ignored: list[str] = field(default_factory=list)  # files skipped for their extension

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int, policy: Policy) -> tuple[np.ndarray, tuple[str, ...]]:
        raise NotImplementedError

    def listing_digest(self) -> bytes:
        """A digest of the ordered names and labels (hashed again with a key before it is stored)."""
        h = hashlib.sha256()
        for i, name in enumerate(self.names):
            h.update(name.encode("utf-8") + b"\0")
            if self.labels is not None:
                h.update(int(self.labels[i]).to_bytes(8, "little"))
        return h.digest()


class FolderSource(Source):
    def __init__(self, root: Path, names, labels, classes, ignored):
        super().__init__(f"image folder {root}", names, labels, classes, ignored)
        self.root = root
        self._paths = [os.path.join(root, n) for n in names]

    def load(self, i, policy):
        path = self._paths[i]
        try:
            with open(path, "rb", buffering=0) as f:
                data = bytearray(os.fstat(f.fileno()).st_size)
                got = f.readinto(data)
                if got != len(data):  # the file changed under us
                    data = data[:got]
        except OSError as e:
            raise DecodeError(path, f"cannot read ({e.strerror})") from None
        return decode(data, path, policy)


class ArraySource(Source):
    def __init__(self, description, images, labels, classes, row_name):
        names = [f"{row_name}[{i}]" for i in range(len(images))]
        super().__init__(description, names, labels, classes)
        self.images = images

    def load(self, i, policy):
        return convert_array(self.images[i], self.names[i], policy)


class SubsetSource(Source):
    """Items ``indices`` of another source, in that order (decode a sample without the rest)."""

    def __init__(self, base: Source, indices):
        idx = [int(i) for i in indices]
        labels = None if base.labels is None else np.asarray(base.labels)[idx]
        super().__init__(f"{base.description} ({len(idx)} items)", [base.names[i] for i in idx], labels, base.classes)
        self.base, self.indices = base, idx

    def load(self, i, policy):
        return self.base.load(self.indices[i], policy)


class TorchvisionSource(Source):
    """Any map-style dataset whose items are (image, label) with a PIL image or a (C, H, W) tensor."""

    def __init__(self, dataset, description: str | None = None):
        n = len(dataset)
        targets = getattr(dataset, "targets", None)
        labels = np.asarray(targets, dtype=np.int64) if targets is not None and len(targets) == n else None
        classes = list(getattr(dataset, "classes", []) or []) or None
        super().__init__(
            description or f"torchvision dataset {type(dataset).__name__}",
            [f"{type(dataset).__name__}[{i}]" for i in range(n)],
            labels,
            classes,
        )
        self.dataset = dataset
        if self.labels is None:  # read the labels once (datasets without a targets list)
            ys = [dataset[i][1] for i in range(n)]
            if all(isinstance(y, (int, np.integer)) for y in ys):
                self.labels = np.asarray(ys, dtype=np.int64)

    def load(self, i, policy):
        item = self.dataset[i]
        img = item[0] if isinstance(item, (tuple, list)) else item
        if hasattr(img, "mode"):  # PIL
            return convert_pil(img, self.names[i], policy)
        arr = np.asarray(img)
        if arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4) and arr.shape[2] not in (1, 2, 3, 4):
            arr = arr.transpose(1, 2, 0)  # (C, H, W) tensor
        return convert_array(arr, self.names[i], policy)


def _image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    images, other = [], []
    for p in sorted(folder.iterdir(), key=lambda q: q.name):
        if p.name.startswith(".") or not p.is_file():
            continue
        (images if p.suffix.lower() in IMAGE_EXTENSIONS else other).append(p)
    return images, other


def open_folder(root: Path) -> FolderSource:
    root = Path(root)
    subdirs = [p for p in sorted(root.iterdir(), key=lambda q: q.name) if p.is_dir() and not p.name.startswith(".")]
    top_images, top_other = _image_files(root)
    if subdirs and top_images:
        raise InputError(
            f"{root}: mixes image files ({top_images[0].name}, ...) with class folders ({subdirs[0].name}, ...)",
            hint="use an ImageFolder layout (one sub-folder per class) or a flat folder of images",
        )
    ignored = [p.relative_to(root).as_posix() for p in top_other]
    if top_images or not subdirs:
        names = [p.name for p in top_images]
        src = FolderSource(root, names, None, None, ignored)
    else:
        names, labels = [], []
        for label, d in enumerate(subdirs):
            imgs, other = _image_files(d)
            ignored += [p.relative_to(root).as_posix() for p in other]
            names += [p.relative_to(root).as_posix() for p in imgs]
            labels += [label] * len(imgs)
        src = FolderSource(root, names, np.asarray(labels, dtype=np.int64), [d.name for d in subdirs], ignored)
    if not src.names:
        raise InputError(
            f"{root}: no images found"
            + (f" ({len(ignored)} files without an image extension)" if ignored else " (the folder is empty)"),
            hint="image extensions: " + " ".join(sorted(IMAGE_EXTENSIONS)),
        )
    return src


def open_arrays(path: Path) -> ArraySource:
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError, OSError, zipfile errors
        raise InputError(f"{path}: not a readable .npy/.npz array file ({type(e).__name__})") from None
    labels = classes = None
    if isinstance(loaded, np.ndarray):
        images = loaded
    else:
        with loaded:
            keys = set(loaded.files)
            ik = next((k for k in ("images", "x", "X", "data") if k in keys), None)
            if ik is None:
                raise InputError(f"{path}: no 'images' (or 'x') array in the .npz (it has {sorted(keys)})")
            images = loaded[ik]
            lk = next((k for k in ("labels", "y", "Y", "targets") if k in keys), None)
            labels = np.asarray(loaded[lk]) if lk else None
            classes = [str(c) for c in loaded["classes"]] if "classes" in keys else None
    if images.ndim not in (3, 4):
        raise InputError(f"{path}: images have shape {images.shape}; expected (N, H, W) or (N, H, W, C)")
    if len(images) == 0:
        raise InputError(f"{path}: the array holds no images")
    if labels is not None:
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise InputError(f"{path}: labels must be {len(images)} non-negative integers")
        labels = labels.astype(np.int64)
    return ArraySource(f"arrays {path}", images, labels, classes, path.name)


def open_torchvision(spec: str, download: bool = False) -> TorchvisionSource:
    """``torchvision:NAME:ROOT[:train|test]``, e.g. ``torchvision:CIFAR10:~/data:test`` or
    ``torchvision:ImageFolder:/path``."""
    import torchvision.datasets as tvd

    parts = spec.split(":", 3)
    if len(parts) < 3 or parts[0] != "torchvision":
        raise InputError(f"{spec}: expected torchvision:NAME:ROOT[:train|test]")
    name, root = parts[1], os.path.expanduser(parts[2])
    split = parts[3] if len(parts) > 3 else "train"
    cls = getattr(tvd, name, None)
    if cls is None or not isinstance(cls, type):
        raise InputError(f"{spec}: torchvision has no dataset {name!r}")
    try:
        if name in ("ImageFolder", "DatasetFolder"):
            ds = cls(root)
        else:
            ds = cls(root, train=(split != "test"), download=download)
    except TypeError:
        ds = cls(root, split=split, download=download)
    except Exception as e:  # noqa: BLE001 - datasets raise RuntimeError for missing files
        raise InputError(
            f"{spec}: cannot open the dataset ({str(e).splitlines()[0][:160]})",
            hint="torchvision needs the files locally; --download fetches them where allowed",
        ) from None
    return TorchvisionSource(ds, f"torchvision {name} at {root} ({split})")


def open_source(src: str | Path, download: bool = False) -> Source:
    text = str(src)
    if text.startswith("torchvision:"):
        return open_torchvision(text, download)
    path = Path(text).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return open_folder(path)
    if path.suffix.lower() in (".npy", ".npz"):
        return open_arrays(path)
    raise InputError(f"{path}: not a folder, .npy or .npz file", hint="give an image folder or arrays")
