"""``dkit disguise``: a source to a disguised HDF5 dataset, streaming, resumable and sharded.

Items are decoded in batches by a pool of threads while the previous batch is disguised and
written, so memory stays bounded (two batches) whatever the size of the set. After each batch the
file records how far it got; ``resume`` continues from there. The randomness of item ``i`` of the
listing is addressed by ``i`` (see ``engine.randomness``), so a resumed or sharded run draws what
one uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hmac
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..derive import source_id
from ..engine import Disguise, RandomSource
from ..errors import DkitError, InputError
from ..keystore import LoadedKey
from ..keystore.records import fmt_time, utcnow
from . import augment, h5format
from .decode import DEFAULT_MAX_PIXELS, DecodeError, Policy, warm
from .sources import Source

BATCH = 2048
BATCH_BYTES = 64 << 20  # a batch's disguised rows; memory stays bounded whatever the image size


@dataclass
class Options:
    fit: str = "none"
    convert: bool = True
    on_error: str = "fail"  # fail | skip
    workers: int | None = None
    dtype: str = "float32"
    withhold_classes: bool = False
    encodings: int = 1  # rows per image: InstaHide's encodings, or copies (--copies) for other keys
    augment: tuple[str, ...] = ()  # owner-side augmentation of copies 1.. (augment.KINDS)
    max_pixels: int = DEFAULT_MAX_PIXELS
    float_range: str | None = None  # float pixels: "0-1" or "0-255"; None refuses fractional floats
    shard: tuple[int, int] | None = None  # (index, count)
    batch: int = BATCH

    def public(self) -> dict:
        """What a file records of the options (all public; the ones that shape its rows)."""
        return {
            "fit": self.fit,
            "convert": self.convert,
            "dtype": self.dtype,
            "encodings": self.encodings,
            "withhold_classes": self.withhold_classes,
            # only when set, so files written without them keep their recorded options
            **({"float_range": self.float_range} if self.float_range else {}),
            **({"augment": ",".join(self.augment)} if self.augment else {}),
        }


@dataclass
class Report:
    out: str
    rows: int = 0
    images: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    conversions: Counter = field(default_factory=Counter)
    ignored: int = 0
    seconds: dict = field(default_factory=lambda: {"decode": 0.0, "disguise": 0.0, "write": 0.0, "total": 0.0})
    resumed_from: int = 0

    def to_dict(self) -> dict:
        total = self.seconds["total"] or 1e-9
        return {
            "output": self.out,
            "rows": self.rows,
            "images": self.images,
            "skipped": len(self.skipped),
            "skipped_problems": dict(Counter(p for _, p in self.skipped)),
            "conversions": dict(self.conversions),
            "ignored_files": self.ignored,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "images_per_second": round((self.images - self.resumed_from) / total, 1),
            "resumed_from_source": self.resumed_from,
        }


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise InputError(f"malformed shard {text!r}: expected I/N such as 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise InputError(f"shard {text!r}: need 0 <= I < N")
    return i, n


def _listing_id(d: Disguise, source: Source) -> str:
    return hmac.new(d.material.source_key, source.listing_digest(), "sha256").hexdigest()[:32]


def _class_info(source: Source, options: Options) -> tuple[int, list[str] | None]:
    if source.labels is None:
        return 0, None
    n = len(source.classes) if source.classes else int(source.labels.max()) + 1
    return n, (None if options.withhold_classes else source.classes)


class _Batches:
    """Batch k decodes listing positions [starts[k], starts[k] + batch). Failures come back as data;
    ``notes`` holds each item's conversion notes (empty for a failed one)."""

    def __init__(self, source: Source, policy: Policy, starts: list[int], end: int, batch: int):
        self.source, self.policy, self.starts, self.end, self.batch = source, policy, starts, end, batch

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, k: int):
        t0 = time.perf_counter()
        positions = np.arange(self.starts[k], min(self.end, self.starts[k] + self.batch))
        out = np.empty((len(positions),) + self.policy.shape, dtype=np.uint8)
        ok = np.zeros(len(positions), dtype=bool)
        errors, notes = [], [()] * len(positions)
        for j, pos in enumerate(positions):
            try:
                img, notes[j] = self.source.load(int(pos), self.policy)
                out[j] = img
                ok[j] = True
            except DecodeError as e:
                errors.append((j, e.name, e.problem, e.hint))
        return positions, out, ok, errors, notes, time.perf_counter() - t0


def _batches(source: Source, policy: Policy, starts: list[int], end: int, batch: int, workers: int):
    """Decoded batches in order. ``workers`` > 0 decodes in that many processes (torch's DataLoader),
    ahead of the consumer; 0 decodes in this process."""
    ds = _Batches(source, policy, starts, end, batch)
    warm()
    if workers <= 0 or len(starts) <= 1:
        return (ds[k] for k in range(len(ds)))
    import torch.utils.data

    ctx = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None
    # Signals wait while the workers are forked: a Ctrl-C or SIGTERM landing inside a fork hook
    # would be swallowed there with a traceback; held back, it arrives once the workers exist.
    with _signals_held():
        return iter(
            torch.utils.data.DataLoader(
                ds,
                batch_size=None,
                shuffle=False,
                num_workers=min(workers, len(starts)),
                collate_fn=_identity,
                prefetch_factor=2,
                multiprocessing_context=ctx,
                worker_init_fn=functools.partial(_tie_to_parent, os.getpid()),
            )
        )


@contextlib.contextmanager
def _signals_held():
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _tie_to_parent(parent: int, _worker: int) -> None:
    """A decoding worker ends with its parent, however the parent ends (SIGKILL included): Linux
    delivers SIGKILL to it when the parent dies (PR_SET_PDEATHSIG). Ctrl-C reaches the whole process
    group; the parent alone handles it and shuts the workers down, so they ignore SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the CLI's handler: a worker just ends
    if hasattr(signal, "pthread_sigmask"):  # forked while the parent held signals back
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _identity(x):
    return x


def decode_all(
    source: Source, policy: Policy, workers: int = 0, *, batch: int = BATCH, notes: list | None = None
) -> np.ndarray:
    """Every item of ``source`` decoded into one (N, H, W, C) uint8 array; any item that fails raises
    its DecodeError (naming the file). ``notes``, when given, receives each item's conversion notes."""
    out = np.empty((len(source),) + policy.shape, dtype=np.uint8)
    for positions, imgs, _, errors, item_notes, _ in _batches(
        source, policy, list(range(0, len(source), batch)), len(source), batch, workers
    ):
        if errors:
            _, name, problem, hint = errors[0]
            raise DecodeError(name, problem, hint=hint)
        out[positions[0] : positions[-1] + 1] = imgs
        if notes is not None:
            notes += item_notes
    return out


def _pool_batches(images: np.ndarray, notes: list, starts: list[int], end: int, batch: int):
    """Batches as ``_batches`` yields them, cut from items already decoded (InstaHide ``inside``:
    the mixing pool is the whole listing, so its items are not decoded twice)."""
    for s in starts:
        e = min(end, s + batch)
        yield np.arange(s, e), images[s:e], np.ones(e - s, dtype=bool), [], notes[s:e], 0.0


def disguise_source(
    source: Source,
    out: str | Path,
    key: LoadedKey,
    options: Options | None = None,
    *,
    rng: RandomSource | None = None,
    resume: bool = False,
    force: bool = False,
    public: Source | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Disguise every item of ``source`` with ``key`` into the HDF5 file ``out``."""
    options = options or Options()
    out = Path(out)
    partial = h5format.partial_path(out)
    if options.on_error not in ("fail", "skip"):
        raise InputError(f"unknown --on-error {options.on_error!r}: choose fail or skip")
    if out.exists() and not force:
        raise InputError(f"{out} exists", hint="use --force to overwrite it")
    if partial.exists() and not (resume or force):
        raise InputError(
            f"{partial} holds an interrupted run", hint="rerun with --resume to continue it, or --force to start over"
        )
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such folder")
    if force:
        _remove(partial)
    d = Disguise.from_key(key)
    params = key.params
    if options.encodings < 1 or options.encodings > h5format.MAX_ENCODINGS:
        raise InputError(f"--copies (--encodings) must be 1 to {h5format.MAX_ENCODINGS}")
    kinds = options.augment if isinstance(options.augment, str) else ",".join(options.augment)
    options = replace(options, augment=augment.parse(kinds))  # known kinds, canonical order
    if options.augment:
        if d.instahide is not None:
            raise InputError("--augment applies to keys without instahide (InstaHide mixes images instead)")
        if options.encodings < 2:
            raise InputError("--augment needs --copies 2 or more: copy 0 is the image as it is")
    if d.instahide is not None and params.mix == "cross" and public is None and params.k > 1:
        raise InputError("this key mixes with a public image set (instahide cross): pass --public SRC")
    policy = Policy(
        params.shape,
        convert=options.convert,
        fit=options.fit,
        max_pixels=options.max_pixels,
        float_range=options.float_range,
    )
    n_all = len(source)
    first, end = 0, n_all
    if options.shard:
        i, n = options.shard
        first, end = i * n_all // n, (i + 1) * n_all // n
    num_classes, class_names = _class_info(source, options)
    label_kind = "none" if source.labels is None else ("soft" if d.instahide is not None else "hard")
    meta = h5format.Meta(
        key_id=key.key_id,
        key_version=key.version,
        params=params,
        label_kind=label_kind,
        num_classes=num_classes,
        class_names=class_names,
        encodings=options.encodings,
        dtype=options.dtype,
        options=options.public(),
        listing_id=_listing_id(d, source),
        source_count=end - first,
        shard=(options.shard[0], options.shard[1], first, end) if options.shard else None,
        created=fmt_time(utcnow()),
    )
    report = Report(out=str(out), ignored=len(source.ignored))
    pos, rows, skipped = first, 0, 0
    resumed = None
    if resume and partial.exists() and _nothing_committed(partial):
        partial.unlink()  # killed while the file was being laid out: start afresh, nothing is lost
    if resume and partial.exists():
        resumed = _resumable(partial, meta)
        pos, rows, skipped = resumed.progress_sources, resumed.rows, resumed.source_skipped
        report.resumed_from = pos - first
        report.images = pos - first - skipped
    rng = rng or RandomSource()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = cpus if options.workers is None else max(0, options.workers)
    pool_images = pool_labels = pool_notes = None
    t_start = time.perf_counter()
    if d.instahide is not None and params.k > 1:
        pool_images, pool_labels, pool_notes = _instahide_pool(d, source, public, policy, workers, options.batch)
        report.seconds["decode"] += time.perf_counter() - t_start
    chunk = h5format.Writer.chunk_for(meta)
    row_bytes = _row_bytes(meta)
    rows_per_batch = min(options.batch, max(1, BATCH_BYTES // (row_bytes * options.encodings)))
    batch = max(chunk, rows_per_batch // chunk * chunk)
    _check_space(partial, (end - pos) * options.encodings * row_bytes, partial.exists())
    # Fork the decoding workers before the output is opened, so that none of them holds its file
    # (and HDF5's lock on it) should this process be killed.
    if pool_notes is not None:
        batches = _pool_batches(pool_images, pool_notes, list(range(pos, end, batch)), end, batch)
    else:
        batches = _batches(source, policy, list(range(pos, end, batch)), end, batch, workers)
    try:
        writer = h5format.Writer(out, resumed or meta, resume=resumed is not None)
    except OSError as e:
        if resumed is None:
            _remove(partial)
        raise _write_error(partial, e) from None
    rows_out = batch * options.encodings
    buf = None if d.instahide is not None else np.empty((rows_out,) + params.shape, dtype=options.dtype)
    try:
        for positions, imgs, ok, errors, notes, t_dec in batches:
            report.seconds["decode"] += t_dec
            report.conversions.update(n for item in notes for n in item)
            if errors:
                if options.on_error == "fail":
                    _, name, problem, hint = errors[0]
                    more = "or pass --on-error skip, then rerun with --resume to continue"
                    raise DecodeError(name, problem, hint=f"{hint}; {more}" if hint else f"fix the file, {more}")
                report.skipped += [(name, problem) for _, name, problem, _ in errors]
                skipped += len(errors)
            t0 = time.perf_counter()
            y, lab, ids = _disguise_batch(
                d, source, positions, imgs, ok, options, num_classes, label_kind, pool_images, pool_labels, rng, buf
            )
            t1 = time.perf_counter()
            report.seconds["disguise"] += t1 - t0
            if y is not None:
                _check_space(partial, len(y) * row_bytes, True)
                writer.append(y, lab, ids)
                rows += len(y)
                report.images += int(ok.sum())
            writer.commit(rows, int(positions[-1]) + 1, skipped)
            report.seconds["write"] += time.perf_counter() - t1
            if progress:
                progress(int(positions[-1]) + 1 - first, end - first)
        if rows == 0:
            raise InputError(
                f"no image could be used: {skipped} of {end - first} skipped",
                hint="see the problems listed; nothing was written",
            )
        writer.finish()
    except BaseException as e:
        writer.close()
        if rows == 0 and not report.resumed_from:
            _remove(partial)  # nothing worth resuming
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and "write failed" in str(e)):
            raise _write_error(partial, e) from None
        raise
    report.rows = rows
    report.seconds["total"] = time.perf_counter() - t_start
    return report


def _disguise_batch(
    d, source, positions, imgs, ok, options, num_classes, label_kind, pool_images, pool_labels, rng, buf
):
    """Disguise the decoded items of one batch. Each run of consecutive items is disguised with the
    randomness of its listing positions. Returns (rows, labels, source IDs), or Nones for none."""
    out_rows, out_labels, out_ids = [], [], []
    for run in _runs(ok):
        p0, p1 = int(positions[run[0]]), int(positions[run[-1]]) + 1
        x = imgs[run[0] : run[-1] + 1]
        labels = source.labels[p0:p1] if source.labels is not None else None
        names = source.names[p0:p1]
        if d.instahide is not None:
            y, soft = d.encode(
                x,
                labels,
                num_classes=max(1, num_classes),
                encodings=options.encodings,
                pool=pool_images,
                pool_labels=pool_labels,
                rng=rng,
                start=p0,
                dtype=options.dtype,
            )
            out_rows.append(y)
            out_labels.append(soft)
            out_ids += [source_id(d.material, nm) for nm in names for _ in range(options.encodings)]
        else:
            copies = options.encodings  # each image's copies are consecutive, with their own noise
            if copies > 1:
                x = augment.expand(x, copies, options.augment, rng, p0)
                labels = None if labels is None else np.repeat(labels, copies)
            k = sum(len(r) for r in out_rows)
            out_rows.append(d.apply(x, rng=rng, start=p0 * copies, dtype=options.dtype, out=buf[k : k + len(x)]))
            out_labels.append(labels)
            out_ids += [source_id(d.material, nm) for nm in names for _ in range(copies)]
    if not out_rows:
        return None, None, None
    y = np.concatenate(out_rows) if len(out_rows) > 1 else out_rows[0]
    lab = None if label_kind == "none" else (np.concatenate(out_labels) if len(out_labels) > 1 else out_labels[0])
    ids = np.frombuffer(b"".join(out_ids), dtype=np.uint8).reshape(-1, h5format.ID_BYTES)
    return y, lab, ids


def _row_bytes(meta: h5format.Meta) -> int:
    """Bytes one row takes on disk: the image, its label or soft label, its source ID."""
    h, w, c = meta.params.shape
    label = {"hard": 8, "soft": 4 * meta.num_classes}.get(meta.label_kind, 0)
    return h * w * c * np.dtype(meta.dtype).itemsize + label + h5format.ID_BYTES


def _check_space(partial: Path, need: int, started: bool) -> None:
    """Refuse to write what the disk cannot hold. HDF5 is not reliable once a write fails with a
    full disk (its caches and the file can end up inconsistent), so dkit stops before that happens:
    the partial file then holds every committed batch intact, ready for --resume."""
    need = int(need * 1.02) + (1 << 20)  # chunk indexes, metadata, slack
    free = shutil.disk_usage(partial.parent).free
    if free < need:
        raise DkitError(
            f"cannot write {partial}: not enough space left on the device ({_size(free)} free, "
            f"{_size(need)} needed{' for the next batch' if started else ''})",
            hint=(
                "free space (or write elsewhere), then rerun"
                + (" with --resume" if started else "")
                + "; nothing was written under the output's name"
            ),
        )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _write_error(partial: Path, e: Exception) -> DkitError:
    text = str(e)
    reason = (
        "no space left on device"
        if ("No space left" in text or getattr(e, "errno", None) == errno.ENOSPC)
        else (text.splitlines()[0][:160] if text else type(e).__name__)
    )
    return DkitError(
        f"cannot write {partial}: {reason}",
        hint="free space (or fix the folder's permissions), then rerun with --resume; "
        "nothing was written under the output's name",
    )


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _runs(ok: np.ndarray) -> list[np.ndarray]:
    """Index runs of consecutive True values."""
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        return []
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    return np.split(idx, cuts)


def _nothing_committed(partial: Path) -> bool:
    """An interrupted file that records no committed row and no progress (or cannot say so)."""
    try:
        with h5format.open_h5(partial) as f:
            a = f.attrs
            return int(a.get("rows", 0)) == 0 and int(a.get("progress_sources", 0)) == 0 and not a.get("complete")
    except Exception:  # noqa: BLE001 - not even the root attributes: not a file we can resume
        return False


def _resumable(partial: Path, meta: h5format.Meta) -> h5format.Meta:
    """The metadata of an interrupted run, if it was made with the same settings."""
    try:
        with h5format.open_h5(partial) as f:
            old = h5format.read_meta(f, partial)
            h5format.check_layout(f, old, partial)
    except Exception as e:  # noqa: BLE001 - any damage means we cannot trust it
        raise InputError(f"{partial}: cannot resume from it ({e})", hint="use --force to start over") from None
    for name in (
        "key_id",
        "key_version",
        "params",
        "listing_id",
        "label_kind",
        "num_classes",
        "class_names",
        "encodings",
        "dtype",
        "shard",
        "options",
    ):
        if getattr(old, name) != getattr(meta, name):
            what = {"listing_id": "list of source files", "options": "set of options"}.get(name, name.replace("_", " "))
            raise InputError(
                f"{partial} was written with another {what}; it cannot be resumed with these settings",
                hint="use --force to start over",
            )
    return old


def _instahide_pool(d: Disguise, source: Source, public: Source | None, policy: Policy, workers: int, batch: int):
    """The images partners are drawn from (the private set, or the public set), decoded into memory,
    with their labels and, for the private set (which the run then reuses), each item's notes."""
    inside = d.params.mix == "inside"
    src = source if inside else public
    notes = [] if inside else None
    try:
        imgs = decode_all(src, policy, workers, batch=batch, notes=notes)
    except DecodeError as e:
        raise DecodeError(e.name, e.problem + " (every image of the InstaHide mixing pool must decode)") from None
    return imgs, (src.labels if inside else None), notes
