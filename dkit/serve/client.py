"""The owner's side of ``dkit serve``: disguise locally, send only the disguised batch.

    net = remote_model("http://gpu-box:8000", keystore.load("cifar@1"), token=token)
    logits = net(images)     # plain pixels (N, C, H, W); the same interface as DisguisedModel

``RemoteNet`` is an ``nn.Module`` whose forward posts a disguised batch to the server and returns
its logits; ``remote_model`` wraps it in ``DisguisedModel``, so the key check, fresh noise, noise
averaging and InstaHide's mixing are the local wrapper's own code. The server's model description
is checked like a model.json (``artifact.check_meta``) and its key ID against the key's, before any
image is disguised; the server checks the key ID again. The standard library's HTTP client is
enough here, so the owner needs no extra.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import torch
from torch import nn

from .. import jsonload
from ..errors import InputError, KeyMismatch
from . import wire

MAX_ANSWER = 256 << 20


def is_url(text) -> bool:
    return isinstance(text, str) and text.startswith(("http://", "https://"))


class RemoteNet(nn.Module):
    """A model served by ``dkit serve`` at ``url``: forward(disguised (N, C, H, W)) -> logits."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 120.0):
        super().__init__()
        from ..models import artifact

        self.url = url.rstrip("/")
        self._token = token
        self.timeout = timeout
        doc = self._call("GET", "/v1/model")
        self.meta = artifact.check_meta(doc, f"{self.url}/v1/model")
        limits = doc.get("serve") if isinstance(doc.get("serve"), dict) else {}
        h, w, c = self.meta.in_shape
        rows = limits.get("max_rows", 64)
        by_size = (limits.get("max_body", 1 << 20) - 4096) // (4 * h * w * c)
        self.rows_per_request = max(1, min(rows, by_size) if isinstance(rows, int) and isinstance(by_size, int) else 64)
        self.dkit_key_id = self.meta.key_id  # what DisguisedModel checks the key against
        self.dkit_key_version = self.meta.key_version

    def __repr__(self) -> str:
        return f"RemoteNet(url={self.url!r}, key_id={getattr(self, 'dkit_key_id', None)!r})"

    def __reduce_ex__(self, protocol):
        raise TypeError("a RemoteNet holds a bearer token and cannot be pickled")

    def _call(self, method: str, path: str, body: bytes | None = None) -> dict:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = wire.CONTENT_TYPE
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        where = f"{self.url}{path}"
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = resp.read(MAX_ANSWER + 1)
        except urllib.error.HTTPError as e:
            message = _server_message(e)
            if e.code == 409:
                raise KeyMismatch(f"{where}: {message}") from None
            hint = "pass the server's token with --token-file" if e.code == 401 else None
            raise InputError(f"{where} answered {e.code}: {message}", hint=hint) from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", None) or e
            raise InputError(f"cannot reach {where} ({why})", hint="is dkit serve running there?") from None
        if len(data) > MAX_ANSWER:
            raise InputError(f"{where}: the answer is larger than {MAX_ANSWER:,} bytes")
        try:
            doc = jsonload.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"{where}: the answer is not JSON (is this a dkit server?)") from None
        if not isinstance(doc, dict):
            raise InputError(f"{where}: the answer is not a JSON object")
        return doc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a disguised batch, sent in requests the server's limits allow."""
        step = self.rows_per_request
        return torch.cat([self._predict(x[i : i + step]) for i in range(0, len(x), step)])

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        doc = self._call("POST", "/v1/predict", wire.encode(x, self.dkit_key_id))
        where = f"{self.url}/v1/predict"
        try:
            logits = torch.tensor(doc["logits"], dtype=torch.float32)
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}: the answer holds no logits") from None
        if tuple(logits.shape) != (len(x), self.meta.num_classes):
            raise InputError(
                f"{where}: {tuple(logits.shape)} logits for {len(x)} images of {self.meta.num_classes} classes"
            )
        if doc.get("key_id") != self.dkit_key_id:
            raise KeyMismatch(
                f"{where}: the answer names key ID {str(doc.get('key_id'))[:40]!r}, not {self.dkit_key_id}"
            )
        return logits


def _server_message(e) -> str:
    try:
        return str(json.loads(e.read(1 << 16).decode("utf-8"))["error"])[:300]
    except Exception:  # noqa: BLE001 - any answer that is not our JSON
        return e.reason if isinstance(e.reason, str) else "no message"


def remote_model(url: str, key, *, token: str | None = None, timeout: float = 120.0, **kw):
    """A ``DisguisedModel`` around the model served at ``url``: call it with plain images."""
    from ..models.wrapper import DisguisedModel

    return DisguisedModel(RemoteNet(url, token=token, timeout=timeout), key, **kw)
