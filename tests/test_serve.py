"""``dkit serve`` as a real process on a loopback port, and the owner's remote prediction.

The server holds the model and never the key; the owner disguises locally and sends only the
disguised batch. Each refused request (wrong key ID, pickle, oversized, malformed, no token) must
get a 4xx with a message, and the server must keep serving afterwards."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from dkit.data import Options, disguise_source, open_source
from dkit.engine import RandomSource
from dkit.keystore import Keystore, MemoryBackend
from dkit.models import TrainOptions, predict, train
from dkit.params import KeyParams
from dkit.serve import remote_model, wire
from dkit.serve.batching import Batcher, Busy

from helpers import train_and_held_out

TOKEN = "a-test-token-of-some-length-0123456789"


@pytest.fixture(scope="module")
def model(mnist_folder, tmp_path_factory):
    """A CNN trained on disguised MNIST (perm + rmt 7x7, noise 25), with its key in a key store."""
    work = tmp_path_factory.mktemp("serve")
    train_dir, test_dir = train_and_held_out(mnist_folder, work, per_class=100, held_out=8)
    ks = Keystore(work / "home", backend=MemoryBackend())
    ks.keygen("m", KeyParams.create("28x28", 7, "perm,rmt", noise=25))
    ks.keygen("other", KeyParams.create("28x28", 7, "perm,rmt", noise=25))
    key = ks.load("m")
    disguise_source(open_source(train_dir), work / "train.h5", key, Options(workers=0))
    train(work / "train.h5", work / "model", TrainOptions(arch="cnn", epochs=4))
    (work / "token").write_text(TOKEN + "\n")
    return {"work": work, "ks": ks, "key": key, "dir": work / "model", "test": test_dir, "token": work / "token"}


def start(model_dir, *args):
    """``dkit serve`` on a free loopback port; returns (process, base URL)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dkit", "serve", str(model_dir), "--port", "0", *map(str, args)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 120
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if " on http://" in line:
            url = line.split(" on ", 1)[1].split()[0]
            for _ in range(100):  # bounded: the socket listens before uvicorn starts
                if call(url, "GET", "/healthz")[0] == 200:
                    return proc, url
                time.sleep(0.1)
    proc.kill()
    raise AssertionError("dkit serve did not start: " + "".join(seen))


def call(url, method, path, body=None, token=TOKEN, headers=None):
    """(status, JSON document) of one request; connection failures are status 0."""
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except (urllib.error.URLError, ConnectionError):
        return 0, {}


@pytest.fixture(scope="module")
def server(model):
    proc, url = start(model["dir"], "--token-file", model["token"], "--max-body-mb", "1", "--max-rows", "64")
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0  # a graceful stop, not a crash


def batch(n=4, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(0, 255, (n, 1, 28, 28)).astype(np.float32))


def test_remote_prediction_equals_local_for_the_same_noise(model, server):
    key, source = model["key"], open_source(model["test"])
    local = predict(model["dir"], source, key, rng=RandomSource.fixed(7))
    remote = predict(server, source, key, token=TOKEN, rng=RandomSource.fixed(7))
    assert remote["count"] == local["count"] == 80 and remote["key_id"] == key.key_id
    for a, b in zip(local["predictions"], remote["predictions"], strict=True):
        assert a["input"] == b["input"] and [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert np.allclose([t["probability"] for t in a["top"]], [t["probability"] for t in b["top"]], atol=1e-5)
    assert remote["accuracy"] == local["accuracy"] and remote["accuracy"] > 0.3  # 10 classes: chance is 0.1
    # the Python wrapper: the same interface as DisguisedModel, plain images in, logits out
    net = remote_model(server, key, token=TOKEN)
    x = batch(6)
    local_net = __import__("dkit.models", fromlist=["DisguisedModel"]).DisguisedModel(
        __import__("dkit.models", fromlist=["load"]).load(model["dir"])[0], key
    )
    with torch.no_grad():
        assert torch.allclose(net(x, RandomSource.fixed(3)), local_net(x, RandomSource.fixed(3)), atol=1e-4)
    assert net.key_id == key.key_id and "m@1" not in repr(net)


def test_refused_requests_get_4xx_and_the_server_stays_up(model, server):
    key_id = model["key"].key_id
    good = wire.encode(batch(), key_id)
    assert call(server, "POST", "/v1/predict", good)[0] == 200
    buf = io.BytesIO()
    torch.save(batch(), buf)
    x = batch()
    cases = [
        (wire.encode(x, model["ks"].load("other").key_id), 409, "is not this model's key ID"),
        (pickle.dumps(x), 415, "pickle payloads are refused"),
        (buf.getvalue(), 415, "pickle payloads are refused"),
        (wire.encode(batch(65), key_id), 413, "send 1 to 64"),  # over --max-rows 64
        (wire.encode(torch.zeros(2, 3, 28, 28), key_id), 400, "this model takes (N, 1, 28, 28)"),
        (wire.encode(torch.zeros(2, 28, 28), key_id), 400, "send (N, C, H, W)"),
        (good[:-10], 400, "data bytes"),
        (wire.encode(torch.full((1, 1, 28, 28), float("nan")), key_id), 400, "NaN"),
        (b"hello, world", 400, "header"),
        (b"", 400, "not a safetensors file"),
    ]
    from safetensors.torch import save

    cases.append((save({"x": torch.zeros(1, 1, 28, 28, dtype=torch.int64)}), 400, "dtype"))
    for body, status, words in cases:
        got, doc = call(server, "POST", "/v1/predict", body)
        assert got == status and words in doc.get("error", ""), (status, got, doc)
    # an oversized body is refused from its declared length, before it is read (--max-body-mb 1)
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/v1/predict")
    conn.putheader("Content-Length", str(2 << 20))
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.endheaders()
    conn.send(b"\0" * 65536)
    resp = conn.getresponse()
    assert resp.status == 413 and "at most 1,048,576 bytes" in json.loads(resp.read())["error"]
    conn.close()
    assert call(server, "POST", "/v1/predict", good, token=None)[0] == 401
    assert call(server, "POST", "/v1/predict", good, token="wrong-token-of-the-same-len")[0] == 401
    assert call(server, "GET", "/v1/model", token=None)[0] == 401
    status, doc = call(server, "GET", "/v1/model")
    assert status == 200 and doc["key_id"] == key_id and "metrics" not in doc
    assert call(server, "GET", "/healthz", token=None)[0] == 200
    status, doc = call(server, "POST", "/v1/predict", good)  # still serving
    assert status == 200 and len(doc["logits"]) == 4 and doc["key_id"] == key_id
    top = wire.encode(batch(), key_id, output="top", top_k=2)
    status, doc = call(server, "POST", "/v1/predict", top)
    assert status == 200 and [len(r) for r in doc["top"]] == [2, 2, 2, 2]


def test_concurrent_requests_are_batched(model, server):
    key_id = model["key"].key_id
    before = call(server, "GET", "/healthz")[1]
    bodies = [wire.encode(batch(2, seed=i), key_id) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda b: call(server, "POST", "/v1/predict", b), bodies))
    assert all(s == 200 for s, _ in answers)
    for i, (_, doc) in enumerate(answers):  # each request gets its own rows back, batched or not
        alone = call(server, "POST", "/v1/predict", bodies[i])[1]
        assert np.allclose(doc["logits"], alone["logits"], atol=1e-4)
    after = call(server, "GET", "/healthz")[1]
    served, passes = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert served == 32 and passes < served  # 16 concurrent + 16 alone, in fewer forward passes


def test_cli_predicts_through_a_url(model, server, monkeypatch):
    from typer.testing import CliRunner

    from dkit.cli import app, common

    monkeypatch.setattr(common, "open_keystore", lambda: model["ks"])
    run = CliRunner().invoke
    args = [model["test"], "--key", "m", "--format", "json"]
    remote = run(app, ["predict", server, *map(str, args), "--token-file", str(model["token"])])
    assert remote.exit_code == 0, remote.output
    local = run(app, ["predict", str(model["dir"]), *map(str, args)])
    a, b = json.loads(remote.stdout), json.loads(local.stdout)
    pairs = zip(a["predictions"], b["predictions"], strict=True)
    same = np.mean([x["top"][0]["class"] == y["top"][0]["class"] for x, y in pairs])
    assert a["count"] == 80 and same >= 0.85  # fresh noise on each side: nearly the same classes
    r = run(app, ["predict", server, *map(str, args[:1]), "--key", "other", "--token-file", str(model["token"])])
    assert r.exit_code == 1 and "is not the key" in r.stderr
    r = run(app, ["predict", server, *map(str, args)])  # no token
    assert r.exit_code == 1 and "401" in r.stderr and "--token-file" in r.stderr
    r = run(app, ["predict", "http://127.0.0.1:9", *map(str, args)])
    assert r.exit_code == 1 and "cannot reach" in r.stderr


def test_serve_refuses_bad_settings(model, tmp_path):
    short = tmp_path / "short"
    short.write_text("tiny")
    for args, words in [
        (["--token-file", short], "shorter than 16 characters"),
        (["--token-file", tmp_path / "missing"], "cannot read the token file"),
    ]:
        r = subprocess.run(
            [sys.executable, "-m", "dkit", "serve", str(model["dir"]), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 1 and words in r.stderr, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "dkit", "serve", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1 and "not a dkit model" in r.stderr


def test_batcher_bounds_its_queue_and_times_out():
    """A full queue refuses (503 in the server); a request waits at most its timeout (504)."""
    release = threading.Event()

    def forward(x):
        release.wait(10)
        return x * 2

    async def scenario():
        b = Batcher(forward, max_rows=1, window=0.0, max_queue=1)
        b.start()
        first = asyncio.ensure_future(b.submit(torch.ones(1, 2), timeout=20))
        await asyncio.sleep(0.2)  # the first is in the forward pass, blocked
        second = asyncio.ensure_future(b.submit(torch.ones(1, 2), timeout=0.3))
        await asyncio.sleep(0)
        with pytest.raises(Busy):
            await b.submit(torch.ones(1, 2), timeout=1)
        with pytest.raises(TimeoutError):
            await second
        release.set()
        assert torch.equal(await first, torch.full((1, 2), 2.0))
        await b.close(drain=5)

    asyncio.run(scenario())


def test_batcher_gathers_requests_in_its_window():
    calls = []

    def forward(x):
        calls.append(len(x))
        return x + 1

    async def scenario():
        b = Batcher(forward, max_rows=64, window=0.2, max_queue=8)
        b.start()
        outs = await asyncio.gather(*(b.submit(torch.full((i + 1, 1), float(i)), timeout=5) for i in range(3)))
        await b.close(drain=5)
        return outs

    outs = asyncio.run(scenario())
    assert calls == [6]  # one forward pass for 1 + 2 + 3 rows
    for i, o in enumerate(outs):
        assert torch.equal(o, torch.full((i + 1, 1), float(i) + 1))


def test_batcher_drains_its_queue_on_close():
    """Shutdown lets every queued request finish, and refuses new ones."""
    from dkit.serve.batching import Closed

    def forward(x):
        time.sleep(0.05)
        return x * 3

    async def scenario():
        b = Batcher(forward, max_rows=1, window=0.0, max_queue=8)
        b.start()
        waiting = [asyncio.ensure_future(b.submit(torch.full((1, 1), float(i)), timeout=10)) for i in range(5)]
        await asyncio.sleep(0)
        await b.close(drain=10)
        with pytest.raises(Closed):
            await b.submit(torch.ones(1, 1), timeout=1)
        return [float(await w) for w in waiting], b.batches

    outs, passes = asyncio.run(scenario())
    assert outs == [0.0, 3.0, 6.0, 9.0, 12.0] and passes == 5
