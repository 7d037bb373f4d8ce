"""Training throughput of each architecture on the same batches, measured in one run.

    python benchmarks/bench_train_speed.py [--shape 32x32x3] [--block 4] [--archs resnet18,blockresnet]
                                           [--steps 20] [--rounds 3] [--batch 128]

A training step's cost does not depend on the pixel values, so disguised and plain data train at
the speed of their architecture: the ratio to print is the block-aware model's images/s against
ResNet-18's (the plaintext baseline), measured in interleaved rounds on the same machine. Each
round runs every architecture for ``--steps`` steps (after 3 warm-up steps) with AdamW, as
``dkit train`` does; the table gives the best and the median round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from dkit.models.nets import build
from dkit.models.training import DEFAULT_ARCH_PARAMS, DEFAULT_LR


def images_per_second(model, opt, x, y, steps: int) -> float:
    model.train()
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * len(x) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="32x32x3")
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--archs", default="resnet18,blockresnet")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    h, w, *c = (int(v) for v in args.shape.split("x"))
    shape = (h, w, c[0] if c else 1)
    torch.manual_seed(0)
    x = torch.rand(args.batch, shape[2], h, w) * 255
    y = torch.randint(0, 10, (args.batch,))
    models = {}
    for arch in args.archs.split(","):
        mean, std = [128.0] * shape[2], [64.0] * shape[2]
        m = build(arch, shape, (args.block, args.block), 10, mean, std, **DEFAULT_ARCH_PARAMS[arch])
        models[arch] = (m, torch.optim.AdamW(m.parameters(), lr=DEFAULT_LR[arch]))
    runs = {a: [] for a in models}
    for r in range(args.rounds):
        for arch, (m, opt) in models.items():
            runs[arch].append(images_per_second(m, opt, x, y, args.steps))
            print(f"round {r + 1} {arch:<12} {runs[arch][-1]:8.1f} img/s", flush=True)
    base = statistics.median(runs[next(iter(runs))])
    print(f"\n{'arch':<12} {'best img/s':>10} {'median':>8} {'vs ' + next(iter(runs)):>14}")
    for arch, v in runs.items():
        print(f"{arch:<12} {max(v):10.1f} {statistics.median(v):8.1f} {statistics.median(v) / base:14.1%}")
    if args.out:
        doc = {
            "shape": list(shape),
            "block": args.block,
            "batch": args.batch,
            "steps": args.steps,
            "img_s": runs,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        }
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
