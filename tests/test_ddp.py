"""``dkit train`` under torchrun: two CPU processes (gloo) train one model with DDP; rank 0 alone
writes it, and it is as good as one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dkit.data import Options, disguise_source, open_source
from dkit.models import predict

from helpers import test_key, train_and_held_out


@pytest.fixture(scope="module")
def mnist_h5(mnist_folder, tmp_path_factory):
    work = tmp_path_factory.mktemp("ddp")
    train_dir, test_dir = train_and_held_out(mnist_folder, work, per_class=150, held_out=20)
    key = test_key("ddp", shape="28x28", block="7", pipeline="perm,rmt", noise=25)
    disguise_source(open_source(train_dir), work / "train.h5", key, Options(workers=0))
    return {"work": work, "h5": work / "train.h5", "test": test_dir, "key": key}


def dkit_train(h5: Path, out: Path, processes: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    args = ["train", str(h5), "-o", str(out), "--arch", "cnn", "--epochs", "3", "--json"]
    if processes == 1:
        cmd = [sys.executable, "-m", "dkit", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        cmd += ["-m", "dkit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_torchrun_trains_one_model_with_two_processes(mnist_h5):
    work = mnist_h5["work"]
    two = dkit_train(mnist_h5["h5"], work / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    reports = [line for line in two.stdout.splitlines() if line.startswith("{")]
    metrics = json.loads(two.stdout[two.stdout.index("{") :])  # rank 0 alone reports
    assert len(reports) == 1 and metrics["processes"] == 2
    assert sorted(p.name for p in (work / "two").iterdir()) == ["metrics.json", "model.json", "model.safetensors"]
    # every epoch saw the whole training split once, across the two processes
    assert all(e["images_per_second"] > 0 for e in metrics["epochs"])
    one = dkit_train(mnist_h5["h5"], work / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    solo = json.loads(one.stdout[one.stdout.index("{") :])
    assert solo["processes"] == 1 and solo["train_rows"] == metrics["train_rows"]
    acc = {}
    for name in ("one", "two"):
        acc[name] = predict(work / name, open_source(mnist_h5["test"]), mnist_h5["key"])["accuracy"]
    # the same global batch, schedule and data: the same quality within noise (10 classes: chance 0.1)
    assert acc["one"] > 0.6 and acc["two"] > 0.6, acc
    assert abs(acc["one"] - acc["two"]) < 0.08, acc
    assert abs(solo["final"]["val_acc"] - metrics["final"]["val_acc"]) < 0.1
