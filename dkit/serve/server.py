"""``dkit serve MODEL_DIR``: the model behind HTTP on the cloud side, which never holds the key.

FastAPI on uvicorn (the extra ``dkit[serve]``): a well-kept ASGI stack with a production server,
graceful shutdown on SIGTERM/SIGINT, and nothing of ours to maintain at the socket level.

- ``POST /v1/predict``: a disguised batch as safetensors (``dkit.serve.wire``) carrying the
  model's key ID; answers logits or top-k as JSON. Requests are batched across clients
  (``dkit.serve.batching``) and run on CUDA with AMP (float16 autocast) when present, else the CPU.
- ``GET /healthz`` (no authentication) and ``GET /v1/model`` (the public model description).
- Limits: the body size (413), rows per request (413), the queue (503 when full), a timeout per
  request (504). A malformed payload is a 4xx with a message; nothing a client sends stops the
  server.
- ``--token-file``: a bearer token, compared in constant time (401 otherwise). Binds to 127.0.0.1
  unless told otherwise.
"""

# No "from __future__ import annotations": FastAPI reads the handlers' annotations (Request), which
# are imported inside create_app so that the extra is only needed to serve.
import hmac
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from . import wire
from .batching import Batcher, Busy, Closed

EXTRA_HINT = "install the server extra: pip install 'dkit[serve]'"


@dataclass
class Limits:
    max_body: int = 64 << 20  # bytes
    max_rows: int = 1024  # rows per request
    max_batch: int = 256  # rows per forward pass
    window: float = 0.005  # seconds a batch waits for more requests
    max_queue: int = 64  # requests waiting
    timeout: float = 30.0  # seconds per request
    drain: float = 30.0  # seconds shutdown waits for queued requests


def read_token(path: str | Path | None) -> str | None:
    if path is None:
        return None
    path = Path(path)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the token file ({e.__class__.__name__})") from None
    if len(token) < 16:
        raise InputError(
            f"{path}: the token is shorter than 16 characters",
            hint="python -c 'import secrets; print(secrets.token_urlsafe(32))'",
        )
    return token


def make_forward(model: torch.nn.Module, device: torch.device):
    amp = device.type == "cuda"

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            return model(x.to(device, non_blocking=True)).float().cpu()

    return forward


def create_app(model_dir: str | Path, *, device: str = "auto", token: str | None = None, limits: Limits | None = None):
    """The FastAPI application serving the model in ``model_dir``."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, Response
    except ImportError:
        raise InputError("dkit serve needs FastAPI and uvicorn", hint=EXTRA_HINT) from None
    from ..models import artifact
    from ..models.training import pick_device

    limits = limits or Limits()
    dev = pick_device(device)
    model, meta = artifact.load(Path(model_dir), dev)
    names = meta.class_names or [str(i) for i in range(meta.num_classes)]
    h, w, c = meta.in_shape
    public = {k: v for k, v in meta.to_dict().items() if k != "metrics"}
    public["serve"] = {"device": dev.type, "max_rows": limits.max_rows, "max_body": limits.max_body}
    batcher = Batcher(
        make_forward(model, dev), max_rows=limits.max_batch, window=limits.window, max_queue=limits.max_queue
    )

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.close(limits.drain)

    app = FastAPI(title="dkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    def refuse(status: int, message: str, headers: dict | None = None):
        return Response(wire.error(message), status_code=status, media_type="application/json", headers=headers)

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())

    def unauthorised():
        return refuse(401, "a bearer token is required (Authorization: Bearer ...)", {"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    async def healthz():
        return {
            "status": "ok",
            "queued": batcher.queue.qsize(),
            "requests": batcher.requests,
            "batches": batcher.batches,
        }

    @app.get("/v1/model")
    async def model_info(request: Request):
        if not authorised(request):
            return unauthorised()
        return JSONResponse(public)

    @app.post("/v1/predict")
    async def predict(request: Request):
        if not authorised(request):
            return unauthorised()
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body):
            return refuse(413, f"the body may hold at most {limits.max_body:,} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body:
                return refuse(413, f"the body may hold at most {limits.max_body:,} bytes")
        try:
            x, req = wire.decode(bytes(body), max_rows=limits.max_rows)
        except wire.WireError as e:
            return refuse(e.status, e.message)
        if req.get("key_id") != meta.key_id:
            got = str(req.get("key_id"))[:40]
            return refuse(
                409, f"key ID {got!r} is not this model's key ID {meta.key_id}: disguise with the model's key"
            )
        if tuple(x.shape[1:]) != (c, h, w):
            return refuse(400, f"tensor 'x' has shape {list(x.shape)}: this model takes (N, {c}, {h}, {w})")
        x = x.float()
        if not torch.isfinite(x).all():
            return refuse(400, "tensor 'x' holds NaN or infinite values")
        try:
            logits = await batcher.submit(x, limits.timeout)
        except Busy:
            return refuse(503, "the queue is full: retry later", {"Retry-After": "1"})
        except Closed:
            return refuse(503, "the server is shutting down")
        except TimeoutError:
            return refuse(504, f"no answer within {limits.timeout:g} s")
        except Exception as e:  # noqa: BLE001 - the model failed; the server stays up
            return refuse(500, f"the model failed on this batch ({type(e).__name__})")
        return JSONResponse(wire.answer(logits, req, meta.key_id, names))

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), so the caller can say which port it got."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # with the protocol number: asyncio sets TCP_NODELAY only on sockets that say IPPROTO_TCP,
        # and without it every answer waits out a delayed ACK (about 40 ms)
        sock = socket.socket(info[0], info[1], info[2])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(app, sock: socket.socket, *, drain: float = 30.0, log_level: str = "warning") -> None:
    """Run until SIGTERM or SIGINT; then stop accepting and let the requests in flight finish."""
    import signal

    import uvicorn

    # uvicorn turns SIGTERM and SIGINT into a graceful shutdown, then re-raises the signal under the
    # handlers it found: with these, a drained stop ends the process with status 0, not 143 or 130.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=int(drain) + 1, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
