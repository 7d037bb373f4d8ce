"""The wire format of ``POST /v1/predict``, shared by the server and the owner's client.

A request body is a safetensors file (never a pickle) holding one tensor ``x``: the disguised
batch, (N, C, H, W), float32 or float16. Its string metadata carries ``key_id`` (the key version's
public ID, checked against the model's) and ``output`` (``logits``, or ``top`` with ``top_k``).
The answer is JSON: ``{"key_id", "count", "logits": [[...], ...]}`` or ``{"key_id", "count", "top":
[[{"class", "index", "probability"}, ...], ...]}``. Errors are JSON ``{"error": message}`` with a
4xx or 5xx status.

The server parses a body from a stranger: ``decode`` checks the header (size, one tensor, dtype,
rank, extents) before the tensor is read, and every problem is a ``WireError`` with the status to
answer, never an exception that could reach the server loop.
"""

from __future__ import annotations

import json
import struct

import torch

from .. import jsonload

CONTENT_TYPE = "application/vnd.dkit.safetensors"
PROTOCOL = "dkit-predict/1"
OUTPUTS = ("logits", "top")
MAX_HEADER = 1 << 16  # a one-tensor header is about 200 bytes
DTYPES = {"F32": (torch.float32, 4), "F16": (torch.float16, 2)}


class WireError(Exception):
    """A request the server refuses: ``status`` is the HTTP code to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def encode(x: torch.Tensor, key_id: str, *, output: str = "logits", top_k: int = 3) -> bytes:
    """A disguised batch (N, C, H, W) -> a request body."""
    from safetensors.torch import save

    x = x.detach().to("cpu")
    if x.dtype not in (torch.float32, torch.float16):
        x = x.float()
    meta = {"protocol": PROTOCOL, "key_id": key_id, "output": output, "top_k": str(int(top_k))}
    return save({"x": x.contiguous()}, metadata=meta)


def _looks_pickled(body: bytes) -> bool:
    # protocol 2+ starts with PROTO (0x80) and the protocol number; torch.save writes a zip of pickles
    return (len(body) >= 2 and body[0] == 0x80 and 2 <= body[1] <= 5) or body[:4] == b"PK\x03\x04"


def decode(body: bytes, *, max_rows: int) -> tuple[torch.Tensor, dict]:
    """A request body -> (x, metadata), or ``WireError``. Nothing is unpickled."""
    if _looks_pickled(body):
        raise WireError(415, "pickle payloads are refused: send the disguised batch as safetensors")
    if len(body) < 8:
        raise WireError(400, f"the body ({len(body)} bytes) is not a safetensors file")
    (n,) = struct.unpack("<Q", body[:8])
    if n > MAX_HEADER or 8 + n > len(body):
        raise WireError(400, f"the safetensors header claims {n:,} bytes; the body has {len(body) - 8:,}")
    try:
        header = jsonload.loads(body[8 : 8 + n].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise WireError(400, "the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise WireError(400, "the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise WireError(400, "the safetensors metadata is not a map of strings")
    if set(header) != {"x"}:
        raise WireError(400, f"the body must hold one tensor named 'x', not {sorted(header)[:5]}")
    t = header["x"]
    if not isinstance(t, dict) or t.get("dtype") not in DTYPES:
        got = t.get("dtype") if isinstance(t, dict) else t
        raise WireError(400, f"tensor 'x' has dtype {str(got)[:20]!r}: send float32 (F32) or float16 (F16)")
    shape, offsets = t.get("shape"), t.get("data_offsets")
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(v) is int and v >= 0 for v in shape)):
        raise WireError(400, f"tensor 'x' has shape {str(shape)[:60]}: send (N, C, H, W)")
    if not 1 <= shape[0] <= max_rows:
        raise WireError(413 if shape[0] > max_rows else 400, f"{shape[0]} rows: send 1 to {max_rows} per request")
    dtype, size = DTYPES[t["dtype"]]
    want = size * shape[0] * shape[1] * shape[2] * shape[3]
    if offsets != [0, want] or 8 + n + want != len(body):
        raise WireError(
            400, f"tensor 'x' of shape {shape} needs {want:,} data bytes; the body holds {len(body) - 8 - n:,}"
        )
    x = torch.frombuffer(bytearray(body[8 + n :]), dtype=dtype).view(*shape)
    if meta.get("protocol") != PROTOCOL:
        raise WireError(400, f"unknown protocol {str(meta.get('protocol'))[:40]!r}: this server speaks {PROTOCOL}")
    if meta.get("output", "logits") not in OUTPUTS:
        raise WireError(400, f"unknown output {meta['output'][:20]!r}: choose logits or top")
    try:
        meta["top_k"] = int(meta.get("top_k", "3"))
    except ValueError:
        raise WireError(400, f"top_k {meta['top_k'][:20]!r} is not a whole number") from None
    return x, meta


def answer(logits: torch.Tensor, meta: dict, key_id: str, class_names: list[str]) -> dict:
    """The model's output for one request, as the JSON document the client reads."""
    doc: dict = {"key_id": key_id, "count": len(logits)}
    logits = logits.float().cpu()
    if meta.get("output", "logits") == "logits":
        doc["logits"] = logits.tolist()
        return doc
    k = max(1, min(int(meta["top_k"]), logits.shape[1]))
    p, idx = torch.softmax(logits, dim=1).topk(k, dim=1)
    doc["top"] = [
        [{"class": class_names[int(i)], "index": int(i), "probability": float(q)} for q, i in zip(pr, ir, strict=True)]
        for pr, ir in zip(p, idx, strict=True)
    ]
    return doc


def error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
