"""Text from untrusted files (class names, file names, metadata values) made safe to show."""

from __future__ import annotations


def printable(text, limit: int | None = None) -> str:
    """``text`` with every control character (C0, DEL, C1) and bidirectional override shown as an
    escape (``\\x1b``), so that a name from an untrusted file cannot drive the terminal: no OSC-52
    clipboard write, no screen clear, no reordered text. Cut to ``limit`` characters if given."""
    text = str(text)
    if not all(ch.isprintable() for ch in text):
        text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def shown(value, limit: int = 40) -> str:
    """A value for a message: its repr, cut short (a hostile file may hold megabytes)."""
    return printable(repr(value), limit)
