"""JSON from untrusted files (records, backups, journals, model descriptions, HDF5 attributes)."""

from __future__ import annotations

import json


def loads(data: bytes | str):
    """``json.loads`` for strict JSON: ``NaN`` and ``Infinity`` (which Python accepts and no dkit file
    holds) are refused, and nesting too deep for the decoder is a ``ValueError`` like any other
    damage, not a ``RecursionError``."""
    try:
        return json.loads(data, parse_constant=_refuse)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _refuse(name: str):
    raise ValueError(f"{name} is not JSON")
