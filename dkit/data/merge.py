"""``dkit merge``: join the shards of one listing into one dataset (a copy, or HDF5 virtual datasets)."""

from __future__ import annotations

import os
import secrets
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np

from ..errors import InputError
from ..keystore.records import fmt_time, utcnow
from . import h5format

SAME = (
    "key_id",
    "key_version",
    "params",
    "listing_id",
    "options",
    "label_kind",
    "num_classes",
    "class_names",
    "encodings",
    "dtype",
)


def merge(out: str | Path, shards: list[str | Path], *, virtual: bool = False, force: bool = False) -> dict:
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} exists", hint="use --force to overwrite it")
    if not shards:
        raise InputError("merge needs at least one shard")
    metas = []
    for s in shards:
        m = h5format.inspect(Path(s))
        if m.shard is None:
            raise InputError(f"{s}: not a shard (written without --shard)")
        metas.append((Path(s), m))
    first = metas[0][1]
    for path, m in metas[1:]:
        for name in SAME:
            if getattr(m, name) != getattr(first, name):
                raise InputError(
                    f"{path}: its {name.replace('_', ' ')} differs from {metas[0][0]}'s; "
                    "shards of different runs cannot be merged"
                )
    count = first.shard[1]
    by_index = {}
    for path, m in metas:
        if m.shard[1] != count:
            raise InputError(f"{path}: shard of {m.shard[1]}, the others are of {count}")
        if m.shard[0] in by_index:
            raise InputError(f"{path}: shard {m.shard[0]} is given twice")
        by_index[m.shard[0]] = (path, m)
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        raise InputError(f"missing shard(s) {', '.join(f'{i}/{count}' for i in missing)}")
    ordered = [by_index[i] for i in range(count)]
    if virtual:  # a reader accepts a virtual file only with its shards in its folder or below it
        outside = [p for p, _ in ordered if ".." in Path(os.path.relpath(p.resolve(), out.resolve().parent)).parts]
        if outside:
            raise InputError(
                f"{outside[0]}: a virtual merge points at its shards by relative path, and readers accept "
                f"only shards in {out.resolve().parent} or below it",
                hint="move the shards beside the output, or merge without --virtual (a copy)",
            )
    for (pa, ma), (pb, mb) in zip(ordered, ordered[1:], strict=False):
        if ma.shard[3] != mb.shard[2]:
            raise InputError(f"{pb}: its sources do not follow {pa}'s")
    rows = sum(m.rows for _, m in ordered)
    meta = h5format.Meta(
        **{k: getattr(first, k) for k in SAME},
        source_count=sum(m.source_count for _, m in ordered),
        source_skipped=sum(m.source_skipped for _, m in ordered),
        shard=None,
        created=fmt_time(utcnow()),
        dataset_id=secrets.token_hex(16),
        rows=rows,
        progress_sources=sum(m.source_count for _, m in ordered),
        complete=True,
    )
    tmp = h5format.partial_path(out)
    try:
        if virtual:
            _write_virtual(tmp, out, meta, ordered)
            os.replace(tmp, out)
        else:
            _write_copy(out, meta, ordered)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return {"output": str(out), "rows": rows, "shards": count, "virtual": virtual}


def _datasets(f) -> list[str]:
    return [n for n in (h5format.IMAGES, h5format.LABELS, h5format.SOFT_LABELS, h5format.SOURCE_IDS) if n in f]


def _write_copy(out: Path, meta: h5format.Meta, ordered) -> None:
    """Copy the shards' rows in order; the Writer checks the file reads back and renames it into place."""
    w = h5format.Writer(out, replace(meta, rows=0, progress_sources=0, source_skipped=0, complete=False), resume=False)
    try:
        rows = done = skipped = 0
        for path, m in ordered:
            with h5format.open_h5(path) as f:
                step = 4096

                def read(name, r0, r1, f=f, path=path):  # a damaged chunk: a FormatError naming the rows
                    return h5format.read_rows(f[name], name, path, r0, r1)

                for r0 in range(0, m.rows, step):
                    r1 = min(m.rows, r0 + step)
                    labels = None
                    if m.label_kind != "none":
                        labels = read(h5format.LABELS if m.label_kind == "hard" else h5format.SOFT_LABELS, r0, r1)
                    w.append(read(h5format.IMAGES, r0, r1), labels, read(h5format.SOURCE_IDS, r0, r1))
                    rows += r1 - r0
                    w.commit(rows, done, skipped)
            done, skipped = m.shard[3], skipped + m.source_skipped  # this shard's listing range is in
            w.commit(rows, done, skipped)
        w.finish()
    except BaseException:
        w.close()
        raise


def _write_virtual(tmp: Path, out: Path, meta: h5format.Meta, ordered) -> None:
    with h5format.create_file(tmp) as f:
        for k, v in meta.attrs().items():
            f.attrs[k] = v
        with h5py.File(ordered[0][0], "r") as f0:
            names = _datasets(f0)
            shapes = {n: f0[n].shape[1:] for n in names}
            dtypes = {n: f0[n].dtype for n in names}
        for name in names:
            layout = h5py.VirtualLayout(shape=(meta.rows,) + shapes[name], dtype=dtypes[name])
            r = 0
            for path, m in ordered:
                rel = os.path.relpath(path.resolve(), out.resolve().parent)
                layout[r : r + m.rows] = h5py.VirtualSource(rel, name, shape=(m.rows,) + shapes[name])
                r += m.rows
            ds = f.create_virtual_dataset(name, layout, fillvalue=np.zeros((), dtypes[name]))
            if name == h5format.IMAGES:
                ds.attrs.update(h5format.IMAGES_ATTRS)  # as version 1 wrote them (read as str)
