"""Run the ``dkit`` CLI on untrusted input in a forked child with a time and a memory limit, and say
how it ended. The fuzz suites feed it seeded mutants of valid files.

A fork is a real, separate process (a segfault in the HDF5 library, a hang or a memory blow-up
kills only the child), but it starts in milliseconds because the parent has imported dkit,
torch and h5py already. The parent never runs a torch operation, so no thread pool is forked.

Outcomes:
- ``ok``: exit 0;
- ``clean``: exit 1 or 2 with a dkit ``error:`` line (or ``keys audit``'s findings) and no traceback;
- ``traceback``: an exception escaped dkit's error mapping (the child prints it);
- ``signal``: the child died of a signal (a segfault, an abort);
- ``timeout``: still running at the time limit (killed);
- ``memory``: MemoryError, or the address-space limit was hit.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass

BAD = ("traceback", "signal", "timeout", "memory")
EXIT_TRACEBACK = 70
EXIT_MEMORY = 71


@dataclass
class Outcome:
    kind: str
    code: int
    stderr: str
    seconds: float

    def __str__(self) -> str:
        tail = self.stderr.strip().splitlines()[-6:]
        return f"{self.kind} (exit {self.code}, {self.seconds:.1f}s): " + " | ".join(tail)


def preload() -> None:
    """Import everything a command may import, so children start warm (and the memory limit counts
    only what the command allocates)."""
    import h5py  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import dkit.cli  # noqa: F401
    import dkit.data  # noqa: F401
    import dkit.models  # noqa: F401
    import dkit.models.prediction  # noqa: F401
    import dkit.models.training  # noqa: F401


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def run_cli(argv: list[str], *, timeout: float = 30.0, memory: int = 2 << 30, env: dict | None = None) -> Outcome:
    """``dkit ARGV`` in a forked child; ``memory`` bytes of address space beyond what is mapped now."""
    out = tempfile.TemporaryFile()
    t0 = time.monotonic()
    limit = _vm_bytes() + memory
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = EXIT_TRACEBACK
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            # pytest's capture replaces sys.stdout and sys.stderr: write to the descriptors, always
            sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), write_through=True)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.environ.update(env or {})
            import torch

            torch.set_num_threads(1)
            from dkit.cli import app

            try:
                app([str(a) for a in argv], prog_name="dkit")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except MemoryError:
                code = EXIT_MEMORY
            except BaseException:  # noqa: BLE001 - what escaped dkit's mapping: print it, as python would
                traceback.print_exc()
                code = EXIT_TRACEBACK
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    deadline = t0 + timeout
    status = None
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = -1
        else:
            time.sleep(0.005)
    seconds = time.monotonic() - t0
    out.seek(0)
    text = out.read().decode(errors="replace")
    out.close()
    if status == -1:
        return Outcome("timeout", -1, text, seconds)
    if os.WIFSIGNALED(status):
        return Outcome("signal", -os.WTERMSIG(status), text, seconds)
    code = os.WEXITSTATUS(status)
    if code == EXIT_MEMORY or "MemoryError" in text or "std::bad_alloc" in text:
        return Outcome("memory", code, text, seconds)
    if code == EXIT_TRACEBACK or "Traceback" in text:
        return Outcome("traceback", code, text, seconds)
    if code == 0:
        return Outcome("ok", code, text, seconds)
    if code in (1, 2) and ("error:" in text or "Usage:" in text or "finding (" in text):  # findings: keys audit
        return Outcome("clean", code, text, seconds)
    return Outcome("traceback", code, text, seconds)  # an exit code dkit never gives


def tally(outcomes: list[tuple[str, Outcome]]) -> Counter:
    return Counter(o.kind for _, o in outcomes)


def failures(outcomes: list[tuple[str, Outcome]]) -> list[str]:
    """One line per bad outcome, naming the mutant."""
    return [f"{name}: {o}" for name, o in outcomes if o.kind in BAD]
