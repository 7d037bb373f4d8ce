"""The dkit state folder (``DKIT_HOME``) and safe file writing."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

ENV_HOME = "DKIT_HOME"


def default_home() -> Path:
    """``$DKIT_HOME``, else the platform's per-user data folder plus ``dkit``."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "dkit"


def ensure_home(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    return path


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    A crash leaves either the old file or the new one, never a half-written one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def append_line(path: Path, line: bytes, *, mode: int = 0o600) -> None:
    """Append one line (with its newline) and fsync. The file is created with ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
