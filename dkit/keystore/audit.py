"""The append-only audit log: JSON lines, each carrying the hash of the one before.

Line n holds ``{"n": n, "time", "event", ..., "prev": <hash of line n-1>, "hash": <its own hash>}``
where ``hash = sha256(canonical JSON of the entry without "hash")`` and line 1's ``prev`` is 64 zeros.
The key store records the last line's number and hash (the head), so cutting lines off the end
is caught too. Editing any line breaks either its own hash or the next line's ``prev``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .. import jsonload
from ..params import canonical_json

LOG_NAME = "audit.jsonl"
GENESIS = "0" * 64


def entry_hash(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def entry_line(head: dict | None, fields: dict) -> tuple[bytes, dict]:
    """The line of an entry that follows ``head`` ({"n", "hash"}), and the new head."""
    n = (head or {}).get("n", 0) + 1
    entry = {"n": n, **fields, "prev": (head or {}).get("hash", GENESIS)}
    entry["hash"] = entry_hash(entry)
    return canonical_json(entry) + b"\n", {"n": n, "hash": entry["hash"]}


@dataclass(frozen=True)
class ChainProblem:
    line: int
    problem: str

    def to_dict(self) -> dict:
        return {"line": self.line, "problem": self.problem}


def read(path: Path, head: dict | None) -> tuple[list[dict], list[ChainProblem]]:
    """All entries that parse, and every problem with the chain, each naming its line."""
    entries: list[dict] = []
    problems: list[ChainProblem] = []
    if not path.exists():
        if head and head.get("n", 0) > 0:
            problems.append(ChainProblem(1, f"the audit log is missing; the store expects {head['n']} lines"))
        return entries, problems
    prev = GENESIS
    by_line: dict[int, dict] = {}
    raw_lines = path.read_bytes().split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    for i, raw in enumerate(raw_lines, start=1):
        try:
            entry = jsonload.loads(raw)
            if not isinstance(entry, dict):
                raise ValueError
        except ValueError:
            problems.append(ChainProblem(i, "not a JSON object (the line was edited or damaged)"))
            prev = None
            continue
        if entry.get("n") != i:
            problems.append(ChainProblem(i, f"numbered {entry.get('n')!r}, expected {i} (lines removed or reordered)"))
        if entry.get("hash") != entry_hash(entry):
            problems.append(ChainProblem(i, "its content does not match its hash (the line was edited)"))
        elif prev is not None and entry.get("prev") != prev:
            problems.append(
                ChainProblem(i, f"its link does not match line {i - 1} (a line before it was changed or removed)")
            )
        prev = entry.get("hash")
        entries.append(entry)
        by_line[i] = entry
    count = len(raw_lines)
    if not head and count:
        problems.append(
            ChainProblem(
                1,
                f"the key store records no log head, but the log has {count} lines "
                "(keys.json was deleted, replaced or edited)",
            )
        )
    if head:
        hn = head.get("n", 0)
        if count < hn:
            problems.append(
                ChainProblem(
                    count + 1, f"the log ends at line {count} but the store recorded {hn} lines (lines cut off)"
                )
            )
        else:
            at = by_line.get(hn)
            if hn > 0 and (at is None or at.get("hash") != head.get("hash")):
                problems.append(ChainProblem(hn, "does not match the head recorded in the key store"))
            if count > hn:
                problems.append(
                    ChainProblem(
                        hn + 1,
                        f"the store recorded {hn} lines but the log goes on to line {count} "
                        "(lines added outside dkit, or a change whose record was not saved)",
                    )
                )
    return entries, problems
