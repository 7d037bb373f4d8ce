"""The disguised-dataset container, format version 1 (``formats/SPEC-v1.md``).

Writing goes to a temporary name and is renamed into place when complete; a reader dispatches on
the format version and refuses newer ones with "upgrade dkit"; ``verify`` reads every chunk so that
HDF5 checks each one's Fletcher-32 checksum.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .. import __version__
from ..errors import FormatError, InputError
from ..params import KeyParams, canonical_json

FORMAT = "dkit-disguised-dataset"
VERSION = 1
READABLE_VERSIONS = (1,)
CHUNK_TARGET_BYTES = 256 * 1024
IMAGES, LABELS, SOFT_LABELS, SOURCE_IDS = "images", "labels", "soft_labels", "source_ids"
IMAGES_ATTRS = {"encoding_type": "dkit-images", "encoding_version": 1}  # on ``images``, however written
ID_BYTES = 16


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def chunk_rows(row_bytes: int) -> int:
    return max(1, CHUNK_TARGET_BYTES // row_bytes)


@dataclass
class Meta:
    """Everything a file says about itself, all public."""

    key_id: str
    key_version: int
    params: KeyParams
    label_kind: str  # hard | soft | none
    num_classes: int
    class_names: list[str] | None  # None when withheld or unknown
    encodings: int
    dtype: str
    options: dict
    listing_id: str
    source_count: int
    shard: tuple[int, int, int, int] | None = None  # (index, count, first source, end source)
    dataset_id: str = ""
    created: str = ""
    dkit_version: str = __version__
    rows: int = 0
    complete: bool = False
    source_skipped: int = 0
    progress_sources: int = 0
    format_version: int = VERSION

    def attrs(self) -> dict:
        a = {
            "dkit_format": FORMAT,
            "dkit_format_version": VERSION,
            "dkit_version": self.dkit_version,
            "created": self.created,
            "complete": int(self.complete),
            "dataset_id": self.dataset_id,
            "key_id": self.key_id,
            "key_version": int(self.key_version),
            "key_params": self.params.canonical().decode(),
            "rows": int(self.rows),
            "label_kind": self.label_kind,
            "num_classes": int(self.num_classes),
            "class_names": json.dumps(self.class_names),
            "encodings": int(self.encodings),
            "dtype": self.dtype,
            "layout": "NHWC",
            "options": canonical_json(self.options).decode(),
            "listing_id": self.listing_id,
            "source_count": int(self.source_count),
            "source_skipped": int(self.source_skipped),
            "progress_sources": int(self.progress_sources),
        }
        if self.shard is not None:
            a["shard"] = np.asarray(self.shard, dtype=np.int64)
        return a

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.attrs().items() if k not in ("key_params", "class_names", "options", "shard")}
        d.update(
            key_params=self.params.to_dict(),
            class_names=self.class_names,
            options=self.options,
            shard=list(self.shard) if self.shard else None,
            complete=self.complete,
        )
        return d


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


REQUIRED = (
    "dkit_format_version",
    "key_id",
    "key_version",
    "key_params",
    "rows",
    "label_kind",
    "num_classes",
    "class_names",
    "encodings",
    "dtype",
    "options",
    "listing_id",
    "source_count",
    "complete",
)


def read_meta(f: h5py.File, path: Path) -> Meta:
    a = f.attrs
    if _str(a.get("dkit_format", "")) != FORMAT:
        raise FormatError(f"{path}: not a dkit disguised dataset (an HDF5 file without dkit's format marker)")
    try:
        version = int(a["dkit_format_version"])
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{path}: the format version is missing or malformed") from None
    if version not in READABLE_VERSIONS:
        newer = version > VERSION
        raise FormatError(
            f"{path}: written with disguised-dataset format version {version}, which this dkit "
            f"({__version__}) cannot read" + ("; upgrade dkit" if newer else ""),
            hint="pip install --upgrade dkit" if newer else None,
        )
    missing = [k for k in REQUIRED if k not in a]
    if missing:
        raise FormatError(f"{path}: damaged metadata (missing {', '.join(missing)})")
    try:
        shard = tuple(int(v) for v in a["shard"]) if "shard" in a else None
        meta = Meta(
            key_id=_str(a["key_id"]),
            key_version=int(a["key_version"]),
            params=KeyParams.from_dict(json.loads(_str(a["key_params"]))),
            label_kind=_str(a["label_kind"]),
            num_classes=int(a["num_classes"]),
            class_names=json.loads(_str(a["class_names"])),
            encodings=int(a["encodings"]),
            dtype=_str(a["dtype"]),
            options=json.loads(_str(a["options"])),
            listing_id=_str(a["listing_id"]),
            source_count=int(a["source_count"]),
            shard=shard,
            dataset_id=_str(a.get("dataset_id", "")),
            created=_str(a.get("created", "")),
            dkit_version=_str(a.get("dkit_version", "")),
            rows=int(a["rows"]),
            complete=bool(int(a["complete"])),
            source_skipped=int(a.get("source_skipped", 0)),
            progress_sources=int(a.get("progress_sources", 0)),
            format_version=version,
        )
    except (ValueError, TypeError, KeyError) as e:
        raise FormatError(f"{path}: damaged metadata ({e})") from None
    except Exception as e:  # ParameterError from the key parameters
        raise FormatError(f"{path}: damaged key parameters ({e})") from None
    if meta.label_kind not in ("hard", "soft", "none") or meta.dtype not in ("float32", "float16"):
        raise FormatError(f"{path}: damaged metadata (label kind {meta.label_kind!r}, dtype {meta.dtype!r})")
    return meta


def check_layout(f: h5py.File, meta: Meta, path: Path) -> None:
    """The datasets agree with the metadata."""
    h, w, c = meta.params.shape
    if IMAGES not in f:
        raise FormatError(f"{path}: no 'images' dataset")
    imgs = f[IMAGES]
    if imgs.shape[1:] != (h, w, c) or imgs.dtype != np.dtype(meta.dtype):
        raise FormatError(
            f"{path}: images are {imgs.shape} {imgs.dtype}, the metadata says (N, {h}, {w}, {c}) {meta.dtype}"
        )
    kind, version = _str(imgs.attrs.get("encoding_type", "")), imgs.attrs.get("encoding_version")
    if kind != IMAGES_ATTRS["encoding_type"] or version != IMAGES_ATTRS["encoding_version"]:
        raise FormatError(f"{path}: the images' encoding_type and encoding_version are missing or unknown")
    n = meta.rows
    if imgs.shape[0] < n:
        raise FormatError(f"{path}: {imgs.shape[0]} images but the metadata says {n} rows")
    want = {"hard": LABELS, "soft": SOFT_LABELS}.get(meta.label_kind)
    if want and (want not in f or f[want].shape[0] < n):
        raise FormatError(f"{path}: the {want} dataset is missing or short")
    if want == SOFT_LABELS and f[want].shape[1:] != (meta.num_classes,):
        raise FormatError(f"{path}: soft labels have {f[want].shape[1:]} classes, metadata {meta.num_classes}")
    if SOURCE_IDS not in f or f[SOURCE_IDS].shape[0] < n or f[SOURCE_IDS].shape[1:] != (ID_BYTES,):
        raise FormatError(f"{path}: the source_ids dataset is missing, short or malformed")


def open_h5(path: Path, mode: str = "r") -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        return h5py.File(path, mode)
    except OSError as e:
        if not h5py.is_hdf5(path):
            raise FormatError(f"{path}: not an HDF5 file") from None
        raise FormatError(f"{path}: the HDF5 file is damaged or unreadable ({str(e).splitlines()[0][:120]})") from None


def inspect(path: Path) -> Meta:
    """Validate a file against the spec and return its metadata. No key needed."""
    path = Path(path)
    with open_h5(path) as f:
        meta = read_meta(f, path)
        check_layout(f, meta, path)
        if not meta.complete:
            raise FormatError(f"{path}: incomplete (an interrupted write)", hint="rerun dkit disguise with --resume")
    return meta


def verify(path: Path) -> dict:
    """Read every chunk of every dataset; HDF5 checks each chunk's Fletcher-32 checksum on read."""
    path = Path(path)
    meta = inspect(path)
    checked = {}
    with open_h5(path) as f:
        for name in (IMAGES, LABELS, SOFT_LABELS, SOURCE_IDS):
            if name not in f:
                continue
            ds = f[name]
            # A virtual dataset (dkit merge --virtual) has no filters itself; reading it reads, and
            # checks, the chunks of the shards it points to.
            if not ds.is_virtual and not ds.fletcher32:
                raise FormatError(f"{path}: dataset {name} has no checksums (not written by dkit)")
            step = ds.chunks[0] if ds.chunks else 4096
            for r0 in range(0, ds.shape[0], step):
                r1 = min(ds.shape[0], r0 + step)
                try:
                    ds[r0:r1]
                except OSError as e:
                    raise FormatError(
                        f"{path}: dataset {name}, rows {r0}..{r1 - 1}: checksum mismatch or unreadable data "
                        f"({str(e).splitlines()[0][:100]})",
                        hint="the file is damaged; disguise or copy it again",
                    ) from None
            checked[name] = int(ds.shape[0])
    return {"file": str(path), "ok": True, "rows": meta.rows, "datasets": checked}


class Writer:
    """Appends rows to ``OUT.partial`` and renames it to ``OUT`` in ``finish``."""

    @staticmethod
    def chunk_for(meta: Meta) -> int:
        """Rows per chunk of ``images``: about 256 KiB, but no more than the file can hold."""
        h, w, c = meta.params.shape
        return min(chunk_rows(h * w * c * np.dtype(meta.dtype).itemsize), max(1, meta.source_count * meta.encodings))

    def __init__(self, out: Path, meta: Meta, *, resume: bool):
        self.out = Path(out)
        self.path = partial_path(self.out)
        self.meta = meta
        h, w, c = meta.params.shape
        self.chunk = self.chunk_for(meta)
        small = min(4096, max(1, meta.source_count * meta.encodings))
        self._unquiet = _quiet_about(self.path)
        if resume:
            self.f = h5py.File(self.path, "r+")
            self._open_datasets()
            rows = self.rows  # drop anything written after the last commit
            for ds in self.ds.values():
                if ds.shape[0] != rows:
                    ds.resize(rows, axis=0)
            return
        if not meta.dataset_id:
            meta.dataset_id = secrets.token_hex(16)
        self.f = h5py.File(self.path, "w")
        try:
            for k, v in meta.attrs().items():
                self.f.attrs[k] = v
            opts = dict(fletcher32=True)
            ds = self.f.create_dataset(
                IMAGES,
                shape=(0, h, w, c),
                maxshape=(None, h, w, c),
                dtype=meta.dtype,
                chunks=(self.chunk, h, w, c),
                **opts,
            )
            ds.attrs.update(IMAGES_ATTRS)
            if meta.label_kind == "hard":
                self.f.create_dataset(LABELS, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(small,), **opts)
            elif meta.label_kind == "soft":
                k = max(1, meta.num_classes)
                self.f.create_dataset(
                    SOFT_LABELS,
                    shape=(0, k),
                    maxshape=(None, k),
                    dtype=np.float32,
                    chunks=(max(1, min(small, 4096 // k)), k),
                    **opts,
                )
            self.f.create_dataset(
                SOURCE_IDS,
                shape=(0, ID_BYTES),
                maxshape=(None, ID_BYTES),
                dtype=np.uint8,
                chunks=(small, ID_BYTES),
                **opts,
            )
            self._open_datasets()
            self.f.flush()
        except BaseException:
            # Interrupted while laying the file out: nothing is committed, so nothing is lost, and a
            # half-laid-out file would only stand in the way of the next run.
            self.close()
            self.path.unlink(missing_ok=True)
            raise

    def _open_datasets(self) -> None:
        # Held open for the whole run: HDF5 writes cached chunks when a dataset is closed, and a
        # failure there (a full disk) would be lost in a destructor; while they are open, it
        # surfaces in flush().
        self.ds = {n: self.f[n] for n in (IMAGES, LABELS, SOFT_LABELS, SOURCE_IDS) if n in self.f}

    @property
    def rows(self) -> int:
        return int(self.f.attrs["rows"])

    def append(self, images: np.ndarray, labels: np.ndarray | None, ids: np.ndarray) -> None:
        self._append(images, labels, ids)

    def _append(self, images, labels, ids) -> None:
        n0 = self.rows
        n1 = n0 + len(images)
        label_name = LABELS if self.meta.label_kind == "hard" else SOFT_LABELS
        for name, data in ((IMAGES, images), (label_name, labels), (SOURCE_IDS, ids)):
            if data is None or name not in self.ds:
                continue
            ds = self.ds[name]
            ds.resize(n1, axis=0)
            ds[n0:n1] = data

    def commit(self, rows: int, sources_done: int, skipped: int) -> None:
        """Record progress and flush, so an interruption resumes from here."""
        a = self.f.attrs
        a["rows"], a["progress_sources"], a["source_skipped"] = int(rows), int(sources_done), int(skipped)
        self.f.flush()

    def finish(self) -> None:
        """Mark complete, close, check the file reads back, then rename it into place."""
        self.f.attrs["complete"] = 1
        self.f.flush()
        self.ds = {}
        self.f.close()
        with h5py.File(self.path, "r") as f:
            meta = read_meta(f, self.path)
            check_layout(f, meta, self.path)
            if not meta.complete or f[IMAGES].shape[0] != meta.rows:
                raise OSError(f"{self.path} did not read back as written")
        os.replace(self.path, self.out)
        self._unquiet()

    def close(self) -> None:
        """Close after a failure; errors here must not mask the failure (the file stays quiet: h5py
        may report its unwritten blocks later, see ``_quiet_about``)."""
        self.ds = {}
        try:
            self.f.close()
        except Exception:  # noqa: BLE001
            pass


_QUIET: set[str] = set()  # files whose late write reports are hidden
_PREVIOUS = None  # the hook that ``_hook`` replaced, while it is installed


def _hook(unraisable) -> None:
    e = unraisable.exc_value
    if isinstance(e, (OSError, RuntimeError)) and any(name in str(e) for name in _QUIET):
        return
    (_PREVIOUS or sys.__unraisablehook__)(unraisable)


def _quiet_about(path: Path):
    """After a failed write (a full disk), h5py reports every cached block of that file it cannot write
    as the block's object is freed, inside its own error handling and long after dkit has reported
    the failure. Hide those reports, and only those (they name the file). One hook serves every
    writer, so a failed writer's file stays quiet without hooks piling up. Returns an undo."""
    global _PREVIOUS
    name = str(path)
    _QUIET.add(name)
    if sys.unraisablehook is not _hook:
        _PREVIOUS, sys.unraisablehook = sys.unraisablehook, _hook

    def undo():
        global _PREVIOUS
        _QUIET.discard(name)
        if not _QUIET and sys.unraisablehook is _hook:
            sys.unraisablehook, _PREVIOUS = _PREVIOUS, None

    return undo
