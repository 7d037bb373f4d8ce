"""JSON from untrusted files (records, backups, journals, model descriptions, HDF5 attributes)."""

from __future__ import annotations

import json


def loads(data: bytes | str):
    """``json.loads``, except that nesting too deep for the decoder is a ``ValueError``, like any
    other damage, instead of a ``RecursionError``."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
