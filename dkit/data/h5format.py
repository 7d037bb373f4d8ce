"""The disguised-dataset container, format version 2 (``formats/SPEC-v2.md``; version 1,
``formats/SPEC-v1.md``, is still read).

Writing goes to a temporary name and is renamed into place when complete; a reader dispatches on
the format version and refuses newer ones with "upgrade dkit"; ``verify`` reads every chunk so that
HDF5 checks each one's Fletcher-32 checksum.

Files come back from an untrusted cloud, so reading treats every byte as hostile: every HDF5 call
that reads the file maps its errors to ``FormatError`` naming the file, every attribute is checked
for its type and range, and every declared size is checked against the storage the file really
holds before anything is allocated or looped over. Version 2 writes HDF5's newer file-format
structures (superblock v3, object headers v2, extensible-array chunk indexes), which carry
checksums, and stores string attributes inline in the checksummed object headers, so that a
flipped byte in the metadata is detected rather than followed.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .. import __version__, jsonload
from ..errors import DkitError, FormatError, InputError
from ..params import KeyParams, canonical_json
from ..text import printable

FORMAT = "dkit-disguised-dataset"
VERSION = 2
READABLE_VERSIONS = (1, 2)
CHUNK_TARGET_BYTES = 256 * 1024
COMPACT_ATTRS = 64  # attributes kept in an object header (HDF5's default is 8)
MAX_CHUNK_BYTES = 64 << 20  # a reader refuses larger chunks (each read allocates one) unless one row is larger
MAX_CLASSES = 1 << 16
MAX_ENCODINGS = 1 << 16
MAX_ATTR_CHARS = 16 << 20  # a string attribute longer than this is not dkit's
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
        """The root attributes as written."""
        # Strings as fixed-length UTF-8 bytes: stored inside the (checksummed) object header, where
        # variable-length strings would go to a global heap that carries no checksum.
        return {k: np.bytes_(v.encode()) if isinstance(v, str) else v for k, v in self._plain().items()}

    def _plain(self) -> dict:
        a = {
            "dkit_format": FORMAT,
            "dkit_format_version": int(self.format_version),
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
        d = {k: v for k, v in self._plain().items() if k not in ("key_params", "class_names", "options", "shard")}
        d.update(
            key_params=self.params.to_dict(),
            class_names=self.class_names,
            options=self.options,
            shard=list(self.shard) if self.shard else None,
            complete=self.complete,
        )
        return d


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
OPTIONAL = ("shard", "dataset_id", "created", "dkit_version", "source_skipped", "progress_sources")
# HDF5 reports a damaged file through these (h5py maps library errors to OSError, KeyError, RuntimeError
# and ValueError; a damaged dataspace or type surfaces as TypeError); they are caught only around calls
# into h5py, never around dkit's own code.
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)
INT64 = (-(2**63), 2**63 - 1)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:120]


def damaged(path: Path, what: str, e: BaseException | None = None) -> FormatError:
    detail = f" ({first_line(e)})" if e is not None else ""
    return FormatError(
        f"{path}: the file is damaged: {what}{detail}", hint=f"run dkit verify {path}; disguise or copy it again"
    )


def _attributes(obj, names, path: Path, where: str) -> dict:
    """The attributes ``names`` of an HDF5 object that it has, read into plain values."""
    out = {}
    try:
        for name in names:
            if name in obj.attrs:
                out[name] = obj.attrs[name]
    except RecursionError:
        raise damaged(path, f"{where} attributes nest too deeply") from None
    except H5_ERRORS as e:
        raise damaged(path, f"{where} attributes are unreadable", e) from None
    return out


def _text(a: dict, name: str, path: Path, default: str | None = None) -> str:
    if name not in a:
        if default is None:
            raise FormatError(f"{path}: damaged metadata (missing {name})")
        return default
    v = a[name]
    if isinstance(v, np.ndarray) and v.shape == () and v.dtype.kind in "SUO":
        v = v[()]
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{path}: damaged metadata ({name} is not UTF-8 text)") from None
    if not isinstance(v, str):
        raise FormatError(f"{path}: damaged metadata ({name} is not text)")
    if len(v) > MAX_ATTR_CHARS:
        raise FormatError(f"{path}: damaged metadata ({name} is {len(v):,} characters long)")
    return v


def _int(a: dict, name: str, path: Path, lo: int = 0, hi: int = INT64[1], default: int | None = None) -> int:
    if name not in a:
        if default is None:
            raise FormatError(f"{path}: damaged metadata (missing {name})")
        return default
    v = a[name]
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v[()]
    if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer):
        raise FormatError(f"{path}: damaged metadata ({name} is not an integer)")
    v = int(v)
    if not lo <= v <= hi:
        raise FormatError(f"{path}: damaged metadata ({name} = {v} lies outside {lo}..{hi})")
    return v


def _json(a: dict, name: str, path: Path):
    text = _text(a, name, path)
    try:
        return jsonload.loads(text)
    except ValueError as e:  # also nesting too deep, and a number too long to convert
        raise FormatError(f"{path}: damaged metadata ({name} is not JSON: {first_line(e)})") from None


def read_meta(f: h5py.File, path: Path) -> Meta:
    a = _attributes(f, ("dkit_format",), path, "the root")
    try:
        marker = _text(a, "dkit_format", path, default="")
    except FormatError:
        marker = ""
    if marker != FORMAT:
        raise FormatError(f"{path}: not a dkit disguised dataset (an HDF5 file without dkit's format marker)")
    a = _attributes(f, ("dkit_format", "layout") + REQUIRED + OPTIONAL, path, "the root")
    if "dkit_format_version" not in a:
        raise FormatError(f"{path}: the format version is missing or malformed")
    try:
        version = _int(a, "dkit_format_version", path, lo=INT64[0])
    except FormatError:
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
    shard = None
    if "shard" in a:
        v = np.asarray(a["shard"])
        if v.shape != (4,) or v.dtype.kind not in "iu":
            raise FormatError(f"{path}: damaged metadata (shard is not four integers)")
        shard = tuple(int(x) for x in v)
        index, count, first, end = shard
        if not (0 <= index < count and 0 <= first <= end):
            raise FormatError(f"{path}: damaged metadata (shard {shard})")
    params_doc = _json(a, "key_params", path)
    try:
        params = KeyParams.from_dict(params_doc)
    except DkitError as e:
        raise FormatError(f"{path}: damaged key parameters ({e})") from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:  # not the dict from_dict expects
        raise FormatError(f"{path}: damaged key parameters ({type(e).__name__}: {first_line(e)})") from None
    meta = Meta(
        key_id=_text(a, "key_id", path),
        key_version=_int(a, "key_version", path, hi=2**31 - 1),
        params=params,
        label_kind=_text(a, "label_kind", path),
        num_classes=_int(a, "num_classes", path, hi=MAX_CLASSES),
        class_names=_json(a, "class_names", path),
        encodings=_int(a, "encodings", path, lo=1, hi=MAX_ENCODINGS),
        dtype=_text(a, "dtype", path),
        options=_json(a, "options", path),
        listing_id=_text(a, "listing_id", path),
        source_count=_int(a, "source_count", path),
        shard=shard,
        dataset_id=_text(a, "dataset_id", path, default=""),
        created=_text(a, "created", path, default=""),
        dkit_version=_text(a, "dkit_version", path, default=""),
        rows=_int(a, "rows", path),
        complete=bool(_int(a, "complete", path, hi=1)),
        source_skipped=_int(a, "source_skipped", path, default=0),
        progress_sources=_int(a, "progress_sources", path, default=0),
        format_version=version,
    )
    if meta.label_kind not in ("hard", "soft", "none") or meta.dtype not in ("float32", "float16"):
        raise FormatError(f"{path}: damaged metadata (label kind {meta.label_kind!r}, dtype {meta.dtype!r})")
    names = meta.class_names
    if names is not None and (
        not isinstance(names, list) or len(names) != meta.num_classes or not all(isinstance(n, str) for n in names)
    ):
        raise FormatError(f"{path}: damaged metadata (class_names is not a list of {meta.num_classes} names)")
    if not isinstance(meta.options, dict):
        raise FormatError(f"{path}: damaged metadata (options is not a JSON object)")
    return meta


def _dataset(f: h5py.File, name: str, path: Path) -> h5py.Dataset | None:
    """The dataset ``name``, or None when the file has no such object."""
    try:
        if name not in f:
            return None
        ds = f[name]
    except H5_ERRORS as e:
        raise damaged(path, f"the {name} dataset cannot be opened", e) from None
    if not isinstance(ds, h5py.Dataset):
        raise FormatError(f"{path}: {name} is not a dataset")
    return ds


def _layout_of(ds: h5py.Dataset, name: str, path: Path):
    """(shape, dtype, chunks, virtual, fletcher32) of a dataset, each read under the error mapping."""
    try:
        shape, dtype = ds.shape, ds.dtype
        virtual = ds.is_virtual
        chunks = None if virtual else ds.chunks
        fletcher = False if virtual else ds.fletcher32
    except H5_ERRORS as e:
        raise damaged(path, f"the {name} dataset's layout is unreadable", e) from None
    if shape is None:
        raise FormatError(f"{path}: the {name} dataset has no shape")
    return shape, dtype, chunks, virtual, fletcher


def _check_storage(ds: h5py.Dataset, name: str, rows: int, shape, dtype, chunks, virtual: bool, path: Path) -> None:
    """The first ``rows`` rows of a dataset must be backed by storage the file really holds, and its
    chunks must be of a size that can be read, before anything reads, allocates or loops over them."""
    if virtual:  # its data lives in other files (dkit merge --virtual), read through HDF5
        return
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    need = rows * row_bytes
    try:
        stored = ds.id.get_storage_size()
        size = ds.file.id.get_filesize()
    except H5_ERRORS as e:
        raise damaged(path, f"the {name} dataset's storage is unreadable", e) from None
    if need > stored:
        raise damaged(path, f"{name} declares {rows:,} rows ({need:,} bytes) but its storage holds {stored:,} bytes")
    if stored > size:
        raise damaged(path, f"{name} claims {stored:,} bytes of storage in a file of {size:,} bytes")
    if chunks is not None:
        if len(chunks) != len(shape) or tuple(chunks[1:]) != tuple(shape[1:]):
            raise FormatError(f"{path}: the {name} dataset is chunked as {chunks}, not by rows")
        if chunks[0] > max(1, MAX_CHUNK_BYTES // max(1, row_bytes)):
            raise FormatError(f"{path}: the {name} dataset's chunks of {chunks[0]:,} rows are too large to read")


def check_foreign(f: h5py.File, meta: Meta, path: Path) -> None:
    """Nothing in the file reads from outside it, except a ``dkit merge --virtual`` file's shards.

    A crafted file could otherwise make dkit read any local file as pixels: an external link, a
    dataset with external raw storage, or a virtual dataset whose sources are other files. dkit
    writes none of these, so they are refused; a virtual dataset is accepted only when every source
    is a dkit shard of the same run, in this file's folder or below it."""
    try:
        names = list(f.keys())
        links = {name: f.get(name, getlink=True) for name in names}
    except H5_ERRORS as e:
        raise damaged(path, "its list of objects is unreadable", e) from None
    for name, link in links.items():
        if isinstance(link, h5py.ExternalLink):
            raise FormatError(
                f"{path}: {printable(name, 120)} is an external link to {printable(link.filename, 120)}; "
                "dkit files never link to other files (refused: it could read any file)"
            )
        if isinstance(link, h5py.SoftLink):
            raise FormatError(f"{path}: {printable(name, 120)} is a soft link; dkit files hold none")
    for name in (IMAGES, LABELS, SOFT_LABELS, SOURCE_IDS):
        ds = _dataset(f, name, path)
        if ds is None:
            continue
        try:
            external = ds.id.get_create_plist().get_external_count()
            sources = ds.virtual_sources() if ds.is_virtual else []
        except H5_ERRORS as e:
            raise damaged(path, f"the {name} dataset's storage is unreadable", e) from None
        if external:
            raise FormatError(
                f"{path}: the {name} dataset keeps its data in {external} external file(s); "
                "dkit files never do (refused: it could read any file)"
            )
        for src in sources:
            _check_virtual_source(path, meta, name, src)


def _check_virtual_source(path: Path, meta: Meta, name: str, src) -> None:
    rel = Path(src.file_name)
    if rel.is_absolute() or ".." in rel.parts or src.file_name in ("", ".") or src.dset_name.lstrip("/") != name:
        raise FormatError(
            f"{path}: the virtual {name} dataset reads "
            f"{printable(src.file_name, 120)}:{printable(src.dset_name, 120)}; "
            "dkit merge --virtual only points at the same dataset of shard files in its own folder (refused)"
        )
    shard = path.parent / rel
    try:
        with open_h5(shard) as g:
            other = read_meta(g, shard)
    except DkitError as e:
        raise FormatError(
            f"{path}: the virtual {name} dataset reads {shard}, which is not a dkit shard ({e.message})"
        ) from None
    if other.shard is None or (other.listing_id, other.key_id, other.key_version) != (
        meta.listing_id,
        meta.key_id,
        meta.key_version,
    ):
        raise FormatError(f"{path}: the virtual {name} dataset reads {shard}, which is not a shard of this run")


def check_layout(f: h5py.File, meta: Meta, path: Path) -> None:
    """The datasets agree with the metadata, and their declared sizes with the storage the file holds."""
    check_foreign(f, meta, path)
    h, w, c = meta.params.shape
    n = meta.rows
    imgs = _dataset(f, IMAGES, path)
    if imgs is None:
        raise FormatError(f"{path}: no 'images' dataset")
    shape, dtype, chunks, virtual, _ = _layout_of(imgs, IMAGES, path)
    if shape[1:] != (h, w, c) or dtype != np.dtype(meta.dtype):
        raise FormatError(f"{path}: images are {shape} {dtype}, the metadata says (N, {h}, {w}, {c}) {meta.dtype}")
    a = _attributes(imgs, tuple(IMAGES_ATTRS), path, "the images'")
    try:
        kind = _text(a, "encoding_type", path, default="")
        version = _int(a, "encoding_version", path, lo=INT64[0], default=-1)
    except FormatError:
        kind, version = "", -1
    if kind != IMAGES_ATTRS["encoding_type"] or version != IMAGES_ATTRS["encoding_version"]:
        raise FormatError(f"{path}: the images' encoding_type and encoding_version are missing or unknown")
    if shape[0] < n or (meta.complete and shape[0] != n):
        raise FormatError(f"{path}: {shape[0]} images but the metadata says {n} rows")
    _check_storage(imgs, IMAGES, n, shape, dtype, chunks, virtual, path)
    want = {"hard": LABELS, "soft": SOFT_LABELS}.get(meta.label_kind)
    expect = {
        LABELS: ((), np.dtype(np.int64)),
        SOFT_LABELS: ((meta.num_classes,), np.dtype(np.float32)),
        SOURCE_IDS: ((ID_BYTES,), np.dtype(np.uint8)),
    }
    for name in (want, SOURCE_IDS):
        if name is None:
            continue
        ds = _dataset(f, name, path)
        if ds is None:
            raise FormatError(f"{path}: the {name} dataset is missing")
        shape, dtype, chunks, virtual, _ = _layout_of(ds, name, path)
        tail, kind = expect[name]
        if len(shape) != 1 + len(tail) or tuple(shape[1:]) != tail or dtype != kind:
            raise FormatError(
                f"{path}: the {name} dataset is {shape} {dtype}, expected (rows{', ' if tail else ''}"
                f"{', '.join(map(str, tail))}) {kind}"
            )
        if shape[0] < n or (meta.complete and shape[0] != n):
            raise FormatError(f"{path}: the {name} dataset has {shape[0]} rows, the metadata says {n}")
        _check_storage(ds, name, n, shape, dtype, chunks, virtual, path)


def _fapl(low: int):
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(low, h5py.h5f.LIBVER_LATEST)
    fapl.set_meta_block_size(512)  # less unused space between metadata blocks
    return fapl


def create_file(path: Path) -> h5py.File:
    """A new, empty file in format version 2's HDF5 layout: checksummed metadata throughout.

    The file is created with HDF5 1.8's structures (a version-2 superblock, checksummed, without the
    version-3 "open for write" mark that would make a file killed mid-write unreadable to plain
    readers) and reopened with 1.10's, so that its datasets get checksummed extensible-array chunk
    indexes (1.8's version-1 B-trees carry no checksum)."""
    fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    # Every root attribute inside the root group's object header (covered by its checksum), not in
    # dense storage (a fractal heap, its free-space manager and a B-tree: more places to damage).
    fcpl.set_attr_phase_change(COMPACT_ATTRS, COMPACT_ATTRS - 1)
    name = os.fsencode(str(path))
    h5py.h5f.create(name, h5py.h5f.ACC_TRUNC, fcpl=fcpl, fapl=_fapl(h5py.h5f.LIBVER_V18)).close()
    return h5py.File(h5py.h5f.open(name, h5py.h5f.ACC_RDWR, fapl=_fapl(h5py.h5f.LIBVER_V110)))


def write_images_attrs(ds: h5py.Dataset) -> None:
    """Fixed-length text, inside the dataset's checksummed object header (version 1 wrote a
    variable-length string, which lives in a global heap without a checksum: a flipped byte in
    its length can make HDF5 loop)."""
    for k, v in IMAGES_ATTRS.items():
        ds.attrs[k] = np.bytes_(v.encode()) if isinstance(v, str) else v


def open_h5(path: Path, mode: str = "r") -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        return h5py.File(path, mode)
    except H5_ERRORS as e:
        try:
            hdf5 = h5py.is_hdf5(path)
        except H5_ERRORS:
            hdf5 = False
        if not hdf5:
            raise FormatError(f"{path}: not an HDF5 file") from None
        raise FormatError(f"{path}: the HDF5 file is damaged or unreadable ({first_line(e)})") from None


PROBE_SECONDS = 15.0  # a valid file's metadata walk takes milliseconds


def _checksummed(path: Path) -> bool:
    """Does the file start with a superblock of version 2 or later (format version 2), whose
    structures carry checksums? (Version 1 files, and HDF5 files with a user block, do not.)"""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({e.strerror or e})") from None
    return len(head) == 9 and head[:8] == b"\x89HDF\r\n\x1a\n" and head[8] >= 2


def _walk(path: Path) -> None:
    """What a reader of a file touches before reading rows: its metadata, its layout, and every
    chunk's index entry."""
    with open_h5(path) as f:
        meta = read_meta(f, path)
        check_layout(f, meta, path)
        for name in (IMAGES, LABELS, SOFT_LABELS, SOURCE_IDS):
            ds = _dataset(f, name, path)
            if ds is None or ds.is_virtual or ds.chunks is None:
                continue
            try:
                ds.id.chunk_iter(lambda info: None)  # one pass over the index (get_chunk_info(i) is O(i))
            except H5_ERRORS as e:
                raise damaged(path, f"the {name} dataset's chunk index is unreadable", e) from None


def _probe(path: Path) -> None:
    """Version-1 metadata has no checksums, and HDF5 follows a damaged pointer in it wherever it
    leads: a flipped byte can crash the process (SIGSEGV inside the library) or make it loop. So a
    forked child walks the file first; its death, or its hang, is reported as a damaged file. The
    parent then reads the same structures the child survived."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 3
        try:
            import faulthandler
            import signal

            faulthandler.disable()  # a crash here is expected and reported by the parent
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _walk(path)
            code = 0
        except BaseException:  # noqa: BLE001 - the parent reads the file again and reports the error itself
            code = 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + PROBE_SECONDS
    delay = 0.0005
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise damaged(path, f"reading its (unchecksummed, version-1) metadata did not end in {PROBE_SECONDS:.0f}s")
        time.sleep(delay)
        delay = min(0.02, delay * 2)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        raise damaged(path, f"its (unchecksummed, version-1) metadata crashed the HDF5 library (signal {sig})")


def inspect(path: Path) -> Meta:
    """Validate a file against the spec and return its metadata. No key needed."""
    path = Path(path)
    if path.exists() and not _checksummed(path) and hasattr(os, "fork"):
        _probe(path)
    with open_h5(path) as f:
        meta = read_meta(f, path)
        check_layout(f, meta, path)
        if not meta.complete:
            raise FormatError(f"{path}: incomplete (an interrupted write)", hint="rerun dkit disguise with --resume")
    return meta


def read_rows(ds: h5py.Dataset, name: str, path: Path, r0: int, r1: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows r0..r1-1 of a dataset, a chunk at a time; damage (a checksum mismatch, a broken chunk
    index) becomes a ``FormatError`` naming the file, the dataset and the rows."""
    try:
        step = ds.chunks[0] if ds.chunks else 4096
    except H5_ERRORS as e:
        raise damaged(path, f"the {name} dataset's layout is unreadable", e) from None
    if out is None:
        out = np.empty((r1 - r0,) + ds.shape[1:], dtype=ds.dtype)
    a = r0
    while a < r1:
        b = min(r1, (a // step + 1) * step)  # to the end of a's chunk
        try:
            out[a - r0 : b - r0] = ds[a:b]
        except H5_ERRORS as e:
            raise FormatError(
                f"{path}: dataset {name}, rows {a}..{b - 1}: checksum mismatch or unreadable data ({first_line(e)})",
                hint=f"the file is damaged: run dkit verify {path}, then disguise or copy it again",
            ) from None
        a = b
    return out


def verify(path: Path) -> dict:
    """Read every chunk of every dataset; HDF5 checks each chunk's Fletcher-32 checksum on read."""
    path = Path(path)
    meta = inspect(path)
    checked = {}
    shards: dict[str, dict] = {}
    with open_h5(path) as f:
        labels = {"hard": LABELS, "soft": SOFT_LABELS}.get(meta.label_kind)
        for name in (IMAGES, labels, SOURCE_IDS):  # the datasets inspect checked against their storage
            ds = _dataset(f, name, path) if name else None
            if ds is None:
                continue
            shape, dtype, chunks, virtual, fletcher = _layout_of(ds, name, path)
            if virtual:  # dkit merge --virtual: its data is the shards' (check_foreign vetted them)
                for shard in sorted({path.parent / src.file_name for src in ds.virtual_sources()}):
                    if str(shard) not in shards:
                        shards[str(shard)] = verify(shard)  # every chunk of every shard, with its checksum
                checked[name] = int(shape[0])
                continue  # reading it again through the mapping would read the same chunks twice
            if not fletcher:
                raise FormatError(f"{path}: dataset {name} has no checksums (not written by dkit)")
            step = chunks[0] if chunks else 4096
            for r0 in range(0, shape[0], step):
                read_rows(ds, name, path, r0, min(shape[0], r0 + step))
            checked[name] = int(shape[0])
    doc = {"file": str(path), "ok": True, "rows": meta.rows, "datasets": checked}
    if shards:
        doc["shards"] = sorted(shards)
    return doc


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
        self.f = create_file(self.path)
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
            write_images_attrs(ds)
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
