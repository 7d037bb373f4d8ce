"""A 256-bit seed that does not print, pickle or compare in variable time."""

from __future__ import annotations

import hmac
import os

SEED_BYTES = 32


class Seed:
    """The secret of one key version. Everything else is derived from it (``keys/SPEC-v1.md``).

    ``repr`` and ``str`` are redacted and pickling is refused, so a seed cannot leak through a
    log line, a traceback's locals or a DataLoader worker. ``expose()`` is the explicit access.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes):
        if not isinstance(value, (bytes, bytearray)) or len(value) != SEED_BYTES:
            raise ValueError(f"a seed is exactly {SEED_BYTES} bytes")
        self._value = bytes(value)

    @classmethod
    def generate(cls) -> Seed:
        """A fresh seed from the operating system's CSPRNG."""
        return cls(os.urandom(SEED_BYTES))

    def expose(self) -> bytes:
        """The raw bytes. Callers must not log, print or store them outside a secret store."""
        return self._value

    def __repr__(self) -> str:
        return "Seed(<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Seed):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        raise TypeError("Seed is not hashable")

    def __reduce__(self):
        raise TypeError("a Seed cannot be pickled; pass the key reference instead")

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


class Sealed:
    """Tink's handle rules for objects that hold secret material (key material, a loaded key, an
    unlocked store): attributes live in slots (no ``vars``), the class is no dataclass (no
    ``dataclasses.asdict``), pickling is refused, copies are the object itself, and attributes are
    read-only once set. Subclasses declare ``__slots__`` and set them with ``_init``."""

    __slots__ = ()

    def _init(self, **fields) -> None:
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __reduce_ex__(self, protocol):
        raise TypeError(f"{type(self).__name__} holds secret material and cannot be pickled; load it in each process")

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self
