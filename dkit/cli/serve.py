"""``dkit serve``: the model behind HTTP on the cloud side (no key). Needs ``dkit[serve]``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer

from .common import err, escape


def serve(
    model_dir: Path = typer.Argument(..., help="A model folder (dkit train)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port (0: a free one, printed at start)."),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="A file holding a bearer token clients must send (16+ characters)."
    ),
    device: Literal["auto", "cpu", "cuda"] = typer.Option("auto", "--device", help="auto, cpu or cuda (AMP)."),
    max_batch: int = typer.Option(256, "--max-batch", min=1, help="Rows per forward pass (batched across requests)."),
    window_ms: float = typer.Option(5.0, "--window-ms", min=0, help="How long a batch waits for more requests."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Requests waiting; more get 503."),
    max_rows: int = typer.Option(1024, "--max-rows", min=1, help="Rows per request; more get 413."),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", min=0.001, help="Request body limit in MiB (413)."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.001, help="Seconds per request before a 504."),
):
    """Serve a model over HTTP: POST /v1/predict takes disguised batches only (safetensors with the key ID)."""
    from ..serve.server import Limits, bind, create_app, read_token
    from ..serve.server import serve as run

    limits = Limits(
        max_body=int(max_body_mb * (1 << 20)),
        max_rows=max_rows,
        max_batch=max_batch,
        window=window_ms / 1000.0,
        max_queue=max_queue,
        timeout=timeout,
    )
    app = create_app(model_dir, device=device, token=read_token(token_file), limits=limits)
    sock = bind(host, port)
    name, bound = sock.getsockname()[:2]
    url_host = f"[{name}]" if ":" in name else name
    err.print(
        f"dkit serve: {escape(str(model_dir))} on http://{url_host}:{bound} "
        f"({'token required' if token_file else 'no token'}; Ctrl-C or SIGTERM stops it after the queue drains)",
        highlight=False,
    )
    run(app, sock, drain=limits.drain)
