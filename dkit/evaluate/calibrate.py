"""``dkit calibrate``: the poster's calibration toolkit. For each setting (block size x noise level)
it makes a throw-away key (in memory, never stored), disguises a sample of the owner's images,
trains briefly for utility (held-out accuracy), runs the DNN examiner and the attacks that fit for
privacy, and reports the frontier of utility against privacy with the settings on it.

Privacy of a setting is ``1 - worst SSIM``: the best reconstruction any attack made of held-out
images (at any level measured), so a setting is as private as its weakest point.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import Options, disguise_source
from ..data.sources import Source, SubsetSource
from ..errors import DkitError
from ..keystore import Keystore, MemoryBackend
from ..params import KeyParams
from .runner import ATTACKS, Settings, evaluate


@dataclass
class Grid:
    shape: str
    pipeline: str
    blocks: tuple[int, ...] = (2, 4, 8)
    noises: tuple[float, ...] = (0, 25, 50, 100)
    rmt_kind: str = "orthogonal"
    channels: str = "joint"
    epochs: int = 3
    arch: str = "auto"
    max_images: int = 4000
    # every attack but those that need a model or copies, which calibrate's throw-away files lack
    attacks: tuple[str, ...] = tuple(a for a in ATTACKS if a not in ("model-leak", "copies"))
    pairs: tuple[int, ...] = (10,)
    seed: int = 0


def frontier(points: list[dict]) -> list[int]:
    """Indices of the settings no other setting beats on both utility and privacy (ties kept)."""
    keep = []
    for i, p in enumerate(points):
        dominated = any(
            q["utility"] >= p["utility"]
            and q["privacy"] >= p["privacy"]
            and (q["utility"] > p["utility"] or q["privacy"] > p["privacy"])
            for j, q in enumerate(points)
            if j != i
        )
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: points[i]["privacy"])


def calibrate(source: Source, grid: Grid, *, progress=None) -> dict:
    from ..models import TrainOptions, train

    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    rng = np.random.default_rng(grid.seed)
    pick = np.sort(rng.permutation(len(source))[: grid.max_images])
    sample = SubsetSource(source, pick)
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="dkit-calibrate-") as tmp:
        work = Path(tmp)
        ks = Keystore(work / "home", backend=MemoryBackend())  # throw-away keys: this process only
        has_rmt = "rmt" in [m.strip() for m in grid.pipeline.split(",")]
        for block in grid.blocks:
            for noise in grid.noises if has_rmt else (0,):
                label = f"block {block}, noise {noise:g}"
                try:
                    params = KeyParams.create(
                        grid.shape,
                        block,
                        grid.pipeline,
                        noise=noise if has_rmt else None,
                        rmt_kind=grid.rmt_kind,
                        channels=grid.channels,
                    )
                except DkitError as e:
                    skipped.append({"setting": label, "reason": e.message})
                    continue
                name = f"cal-{block}-{int(noise)}"
                ks.keygen(name, params)
                key = ks.load(name)
                h5 = work / f"{name}.h5"
                say(f"{label}: disguise {len(sample):,} images")
                disguise_source(sample, h5, key, Options(workers=0))
                say(f"{label}: train {grid.epochs} epochs")
                metrics = train(h5, work / name, TrainOptions(arch=grid.arch, epochs=grid.epochs, seed=grid.seed))
                say(f"{label}: attacks")
                ev = evaluate(
                    h5,
                    key,
                    sample,
                    model_dir=work / name,
                    settings=Settings(
                        attacks=grid.attacks,
                        pairs=grid.pairs,
                        targets=200,
                        max_images=grid.max_images,
                        examiner_epochs=grid.epochs,
                        encodings=(1,),
                        seed=grid.seed,
                    ),
                )
                doc = ev.to_dict()
                recon = [a for a in doc["attacks"] if "ssim" in a]
                worst = max(recon, key=lambda a: a["ssim"]) if recon else None
                by_level = {}
                for a in recon:
                    by_level[str(a["level"])] = max(by_level.get(str(a["level"]), 0.0), a["ssim"])
                vp = doc["visual_privacy"]
                rows.append(
                    {
                        "setting": label,
                        "block": block,
                        "noise": noise,
                        "params": params.to_dict(),
                        "utility": metrics["final"]["val_acc"],
                        "privacy": round(1 - worst["ssim"], 4) if worst else (vp["visual_privacy"] if vp else 0.0),
                        "worst_attack": f"{worst['attack']} (level {worst['level']}, {worst['params']})"
                        if worst
                        else None,
                        "worst_ssim_by_level": by_level,
                        "visual_privacy": vp["visual_privacy"] if vp else None,
                        "misusability": doc["misusability"],
                        "verdicts": {f"{a['attack']}@{a['level']}:{a['params']}": a["verdict"] for a in doc["attacks"]},
                    }
                )
    front = frontier(rows)
    for i, r in enumerate(rows):
        r["on_frontier"] = i in front
    safe = [r for r in rows if r["on_frontier"] and not any(v == "broken" for v in r["verdicts"].values())]
    best = max(safe, key=lambda r: r["utility"]) if safe else None
    return {
        "shape": grid.shape,
        "pipeline": grid.pipeline,
        "epochs": grid.epochs,
        "images": len(sample),
        "settings": rows,
        "skipped": skipped,
        "frontier": [rows[i]["setting"] for i in front],
        "recommended": best["setting"] if best else None,
        "recommendation": (
            f"{best['setting']}: the most useful setting on the frontier that no measured attack breaks"
            if best
            else "no setting on the frontier holds against every attack measured: see the worst attack per row"
        ),
        "seconds": round(time.perf_counter() - t0, 1),
    }
