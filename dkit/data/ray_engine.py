"""``dkit disguise --engine ray``: disguise shards on a Ray cluster, then merge them.

Ray Data runs one ``map_batches`` over the shard numbers with actors (``ShardWriter``): each actor
rebuilds the key once, in its constructor, and each shard it is handed goes through the ordinary
``disguise_source(..., Options(shard=(i, n)))`` into an HDF5 shard in a folder beside the output.
The driver then joins the shards with ``merge`` (the output is written under a temporary name
and renamed) and removes the folder. The result is the local run's: noise is addressed by image,
so with the same randomness root the rows are identical (tested).

What travels where: the key's 32-byte seed and the run's 32-byte randomness root go to one small
courier actor as its constructor arguments, which Ray inlines in the actor's creation message
(arguments under 100 KiB never enter the object store, so they are never spilled to disk); the GCS
keeps that message in memory. Each ``ShardWriter`` asks the courier once, in its constructor, and
the small reply is inlined too. (Ray Data itself puts the writers' constructor arguments in the
object store, which may spill to disk under memory pressure: that is why the secret is not among
them; they hold only the courier's handle.) The courier is killed when the run ends. Nothing is
on a command line, in an environment variable, in a file or in a log line (the test reads Ray's
logs for the seed). On a cluster that spans machines the secret crosses the network inside Ray's
own connections, which Ray encrypts only with its TLS configured (RAY_USE_TLS): SECURITY.md. Each actor opens the
source itself from its description (a folder, an .npy/.npz file), so the source must be readable
at the same path on every node.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ..errors import DkitError, InputError
from .merge import merge
from .run import Options

EXTRA_HINT = "install the Ray extra: pip install 'dkit[ray]'"


class ShardWriter:
    """A Ray Data actor: the key is rebuilt once per actor; each call writes the shards it is given."""

    def __init__(self, *, src: str, folder: str, count: int, name: str, record: dict, courier, options):
        import ray

        from ..derive import derive
        from ..keystore.manager import LoadedKey
        from ..keystore.records import VersionRecord
        from ..secret import Seed

        seed, self.root = ray.get(courier.secrets.remote())
        rec = VersionRecord.from_dict(record)
        self.key = LoadedKey(name=name, record=rec, material=derive(Seed(seed), rec.params))
        del seed
        self.src, self.folder, self.count, self.options = src, Path(folder), count, options

    def __repr__(self) -> str:
        return f"ShardWriter(src={self.src!r}, shards={self.count})"

    def __call__(self, batch: dict) -> dict:
        from ..engine import RandomSource
        from .run import disguise_source
        from .sources import open_source

        paths, rows, skipped, errors = [], [], [], []
        for i in batch["shard"]:
            i = int(i)
            path = self.folder / f"shard-{i:05d}-of-{self.count:05d}.h5"
            opts = replace(self.options, shard=(i, self.count), workers=0)
            try:
                report = disguise_source(open_source(self.src), path, self.key, opts, rng=RandomSource(self.root))
            except DkitError as e:  # returned as data: dkit's errors do not survive Ray's pickling intact
                paths.append(""), rows.append(0), skipped.append(0)
                errors.append(json.dumps({"message": e.message, "hint": e.hint, "exit": e.exit_code}))
                continue
            paths.append(str(path))
            rows.append(report.rows)
            skipped.append(len(report.skipped))
            errors.append("")
        return {"shard": batch["shard"], "path": paths, "rows": rows, "skipped": skipped, "error": errors}


def disguise_with_ray(
    src: str,
    out: str | Path,
    key,
    options: Options | None = None,
    *,
    seed,
    workers: int = 2,
    address: str | None = None,
    force: bool = False,
    rng_root: bytes | None = None,
    quiet: bool = True,
) -> dict:
    """Disguise the source described by ``src`` with ``key`` into ``out`` on Ray: ``workers``
    actors, one shard each. ``seed``: the key's seed (``Keystore.seed(key)``), from which each
    actor derives the key once. ``address``: an existing cluster (default: start a local one of
    ``workers`` CPUs). ``rng_root``: fixed randomness, for tests only."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise InputError("--engine ray needs Ray", hint=EXTRA_HINT) from None
    options = options or Options()
    out = Path(out)
    from ..derive import derive

    if derive(seed, key.params).key_id != key.key_id:
        raise InputError(f"the seed given is not the seed of {key.ref}")
    if workers < 1:
        raise InputError("--workers must be at least 1 with --engine ray")
    if options.shard is not None:
        raise InputError("--engine ray makes its own shards; drop --shard")
    if out.exists() and not force:
        raise InputError(f"{out} exists", hint="use --force to overwrite it")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such folder")
    from .sources import open_source

    n_items = len(open_source(src))  # a bad source fails here, before a cluster starts
    count = max(1, min(workers, n_items))
    started = False
    if not ray.is_initialized():
        kw = {"address": address} if address else {"num_cpus": workers, "include_dashboard": False}
        ray.init(**kw, log_to_driver=not quiet, logging_level="ERROR" if quiet else "INFO")
        started = True
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.shards-", dir=out.parent))
    t0 = time.perf_counter()
    courier = None
    try:
        root = rng_root if rng_root is not None else os.urandom(32)
        courier = ray.remote(num_cpus=0)(_Courier).remote(seed.expose(), root)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = not quiet
        ctx.print_on_execution_start = not quiet
        args = {
            "src": src,
            "folder": str(folder),
            "count": count,
            "name": key.name,
            "record": key.record.to_dict(),
            "courier": courier,
            "options": options,
        }
        ds = ray.data.from_items([{"shard": i} for i in range(count)], override_num_blocks=count)
        # one shard in flight per actor: otherwise the first actor up takes every shard
        pool = ray.data.ActorPoolStrategy(size=min(workers, count), max_tasks_in_flight_per_actor=1)
        ds = ds.map_batches(ShardWriter, fn_constructor_kwargs=args, batch_size=1, compute=pool, num_cpus=1)
        try:
            done = ds.take_all()
        except Exception as e:  # noqa: BLE001 - a worker's error arrives wrapped; give the user ours
            cause = _cause(e)
            if isinstance(cause, DkitError):
                raise cause from None
            raise InputError(f"the Ray run failed: {type(cause).__name__}: {str(cause)[:300]}") from None
        failed = next((json.loads(d["error"]) for d in sorted(done, key=lambda d: int(d["shard"])) if d["error"]), None)
        if failed:
            err = DkitError(failed["message"], hint=failed["hint"])
            err.exit_code = failed["exit"]
            raise err
        seconds = time.perf_counter() - t0
        shards = [d["path"] for d in sorted(done, key=lambda d: int(d["shard"]))]
        merged = merge(out, shards, force=force)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if courier is not None:
            ray.kill(courier)
        if started:
            ray.shutdown()
    total = time.perf_counter() - t0
    return {
        "output": str(out),
        "rows": merged["rows"],
        "shards": count,
        "workers": workers,
        "skipped": sum(int(d["skipped"]) for d in done),
        "seconds": {"disguise": seconds, "total": total},
        "images_per_second": n_items / total if total else 0.0,
    }


class _Courier:
    """Holds the seed and the randomness root for the writers of one run (a Ray actor)."""

    def __init__(self, seed: bytes, root: bytes):
        self._secrets = (seed, root)

    def __repr__(self) -> str:
        return "_Courier(<redacted>)"

    def secrets(self) -> tuple[bytes, bytes]:
        return self._secrets


def _cause(e: BaseException) -> BaseException:
    """The worker's own exception inside Ray's wrappers (RayTaskError's ``cause``, exception
    chains): the first dkit error found, else the innermost exception."""
    seen, todo, last = set(), [e], e
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DkitError):
            return e
        last = e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return last
