"""``dkit evaluate``: the owner's side. With the key, it makes what each threat level grants the
attacker (disguised images, known pairs, unpaired plain images of the same kind), hands only those
arrays and the public parameters to the attacks, and scores their output on held-out images.

The plain images (``SRC``) are split once, at random: ``targets`` (held out: what the attacks try
to recover), a pool of ``pairs`` (level 2 known plaintext; the first m of them for each m) and the
rest, ``public`` (level 3: the data distribution, unpaired; also what the examiner trains on). The
cloud's own view, for level 1, is a sample of the disguised dataset ``DATA.h5`` itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import h5format
from ..data.decode import Policy
from ..data.run import decode_all
from ..data.sources import Source, SubsetSource
from ..engine import Disguise
from ..errors import InputError, KeyMismatch
from .common import LEVELS, AttackResult

ATTACKS = (
    "examiner",
    "misusability",
    "kpa",
    "covariance",
    "placement",
    "thumbnail",
    "copies",
    "codebook",
    "jigsaw",
    "instahide",
    "model-leak",
)


@dataclass
class Settings:
    attacks: tuple[str, ...] = ATTACKS
    pairs: tuple[int, ...] = (1, 10, 100)
    targets: int = 200  # held-out images every figure is measured on
    max_images: int = 6000  # plain images decoded at most (chosen at random)
    cloud_rows: int = 5000  # rows of DATA.h5 read as the cloud's level-1 sample
    examiner_epochs: int = 8
    encodings: tuple[int, ...] = (1, 4, 10)  # InstaHide: T values measured
    instahide_images: int = 200
    seed: int = 0


@dataclass
class Evaluation:
    key_id: str
    key_version: int
    pipeline: list[str]
    params: dict
    setting: str
    data: str
    counts: dict
    results: list[AttackResult] = field(default_factory=list)
    seconds: float = 0.0

    def find(self, attack: str) -> list[AttackResult]:
        return [r for r in self.results if r.attack == attack]

    def to_dict(self) -> dict:
        ex = self.find("examiner")
        mis = self.find("misusability")
        return {
            "key_id": self.key_id,
            "key_version": self.key_version,
            "pipeline": self.pipeline,
            "params": self.params,
            "setting": self.setting,
            "data": self.data,
            "counts": self.counts,
            "levels": {str(k): v for k, v in LEVELS.items()},
            "visual_privacy": (
                {
                    "visual_privacy": round(ex[0].figures["visual_privacy"], 4),
                    "examiner_accuracy": round(ex[0].figures["examiner_accuracy"], 4),
                    "chance": round(ex[0].figures["chance"], 4),
                }
                if ex
                else None
            ),
            "misusability": round(mis[0].figures["misusability"], 4) if mis else None,
            "attacks": [r.to_dict() for r in self.results],
            "seconds": round(self.seconds, 1),
        }


def applicable(params, model_arch: str | None) -> list[str]:
    """The attacks that fit a pipeline (and a model, when one is given)."""
    p = set(params.pipeline)
    out = ["examiner"]
    if model_arch:
        out.append("misusability")
    if "rmt" in p:
        out += ["kpa", "covariance"]
        if "perm" in p:
            out.append("placement")
        if params.rmt_kind == "orthogonal" and not p & {"aes", "instahide"}:
            out.append("thumbnail")
    if "aes" in p:
        out.append("codebook")
    if p == {"perm"}:
        out.append("jigsaw")
    if "instahide" in p:
        out.append("instahide")
    if model_arch in ("blockvit", "blockconv", "blockresnet") and "rmt" in p:
        out.append("model-leak")
    return out


def evaluate(
    data: str | Path,
    key,
    plain: Source,
    *,
    model_dir: str | Path | None = None,
    settings: Settings | None = None,
    progress=None,
) -> Evaluation:
    """Run the attacks that fit ``key``'s pipeline. ``key`` must be the key that made ``data`` (and the
    model, when given): its ID is checked against both before anything else."""
    s = settings or Settings()
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    data = Path(data)
    meta = h5format.inspect(data)
    if meta.key_id != key.key_id:
        raise KeyMismatch(
            f"{data} was disguised with key ID {meta.key_id} (version {meta.key_version}), "
            f"not with {key.ref} (key ID {key.key_id})",
            hint="evaluate with the key version that made the file; dkit inspect shows it",
        )
    model = model_meta = None
    if model_dir is not None:
        from ..models import artifact
        from ..models.prediction import check_key

        model_meta = artifact.read_meta(Path(model_dir))
        check_key(model_meta, key, Path(model_dir))
        model, model_meta = artifact.load(Path(model_dir))
    params = key.params
    unknown = [a for a in s.attacks if a not in ATTACKS]
    if unknown:
        raise InputError(f"unknown attack {unknown[0]!r}: choose all or any of " + ", ".join(ATTACKS))
    todo = [a for a in applicable(params, model_meta.arch if model_meta else None) if a in s.attacks]
    if meta.encodings > 1 and not params.has("instahide") and "copies" in s.attacks:
        todo.append("copies")  # --copies: several noisy views of each image

    opts = meta.options or {}
    policy = Policy(
        tuple(params.shape),
        convert=opts.get("convert", True),
        fit=opts.get("fit", "none"),
        float_range=opts.get("float_range"),
    )
    rng = np.random.default_rng(s.seed)
    n_src = len(plain)
    pick = np.sort(rng.permutation(n_src)[: s.max_images])
    say(f"decoding {len(pick):,} of {n_src:,} plain images")
    images = decode_all(SubsetSource(plain, pick), policy)
    labels = None if plain.labels is None else np.asarray(plain.labels)[pick].astype(np.int64)
    order = rng.permutation(len(images))
    images = images[order]
    labels = None if labels is None else labels[order]
    n_pairs = max(s.pairs) if ("kpa" in todo or "codebook" in todo) else 0
    n_targets = min(s.targets, len(images) // 4)
    if n_targets < 20 or len(images) - n_targets - n_pairs < 50:
        raise InputError(
            f"{plain.description}: {len(images)} plain images are too few to evaluate "
            f"({n_targets} held out, {n_pairs} pairs, and at least 50 more of the same kind are needed)",
            hint="give more plain images, or fewer --pairs",
        )
    targets, pairs, public = np.split(images, [n_targets, n_targets + n_pairs])
    t_labels = None if labels is None else labels[:n_targets]
    p_labels = None if labels is None else labels[n_targets + n_pairs :]
    num_classes = meta.num_classes or (int(labels.max()) + 1 if labels is not None else 0)
    d = Disguise.from_key(key)
    counts = {
        "plain": int(len(images)),
        "targets": int(n_targets),
        "pair_pool": int(n_pairs),
        "public": int(len(public)),
    }
    ev = Evaluation(
        key.key_id, key.version, list(params.pipeline), params.to_dict(), params.describe(), str(data), counts
    )

    if d.instahide is None:
        targets_d = d.apply(targets)
        pairs_d = d.apply(pairs, start=n_targets) if n_pairs else pairs
    else:
        enc, _ = d.encode(targets, None, pool=targets if params.mix == "inside" else public)
        targets_d = (np.asarray(enc, dtype=np.float64) + 1) * 127.5  # shown to the examiner as pixels
    cloud = _cloud_sample(data, meta, s.cloud_rows, rng)
    counts["cloud_rows"] = int(len(cloud))

    for name in todo:
        say(f"attack: {name}")
        if name == "examiner":
            if labels is None:
                continue
            from .examiner import examiner

            ev.results.append(
                examiner(public, p_labels, targets_d, targets, t_labels, params, num_classes, epochs=s.examiner_epochs)
            )
        elif name == "misusability" and labels is not None:
            from .examiner import misusability

            to_model = _model_labels(plain, model_meta, t_labels)
            keep = to_model >= 0
            ev.results.append(misusability(model, targets[keep], to_model[keep], params, model_meta.num_classes))
        elif name == "kpa":
            from .kpa import kpa

            for m in s.pairs:
                ev.results.append(kpa(pairs[:m], pairs_d[:m], targets_d, targets, params, public_plain=public))
        elif name == "covariance":
            from .covariance import covariance_attack

            ev.results.append(covariance_attack(cloud, public, targets_d, targets, params, level=3))
        elif name == "thumbnail":
            from .thumbnail_attack import thumbnail_attack

            ev.results.append(thumbnail_attack(cloud, targets_d, targets, params, public=public))
        elif name == "copies":
            from .copies_attack import copies_attack

            ev.results.append(copies_attack(data, meta, params))
        elif name == "placement":
            from .placement_attack import placement_attack

            ev.results.append(placement_attack(cloud, targets_d, targets, params))
        elif name == "codebook":
            from .codebook import codebook, frequency

            ev.results.append(frequency(cloud, public, targets_d, targets, params))
            for m in s.pairs:
                ev.results.append(codebook(pairs[:m], pairs_d[:m], targets_d, targets, params, public_plain=public))
        elif name == "jigsaw":
            from .jigsaw import jigsaw

            ev.results.append(jigsaw(cloud, targets_d, targets, params))
        elif name == "instahide":
            from .instahide_attack import instahide_attack

            private = targets[: min(s.instahide_images, len(targets))]
            for t in s.encodings:
                pool = private if params.mix == "inside" else public
                enc, _ = d.encode(private, None, encodings=t, pool=pool)
                ev.results.append(instahide_attack(enc, t, private, params, public=public))
        elif name == "model-leak":
            from .model_leak import model_leak

            ev.results.append(model_leak(model, params, public, targets_d, targets, disguised=cloud))
    ev.seconds = time.perf_counter() - t0
    return ev


def _model_labels(plain: Source, model_meta, labels: np.ndarray) -> np.ndarray:
    """The plain source's labels as the model's class indices (by class name when both have names);
    -1 for a class the model does not know."""
    names = model_meta.class_names
    if not plain.classes or not names:
        return labels
    index = {c: i for i, c in enumerate(names)}
    lut = np.array([index.get(c, -1) for c in plain.classes], dtype=np.int64)
    if (lut < 0).all():
        raise InputError(
            f"{plain.description}: none of its classes ({', '.join(plain.classes[:4])}...) is a class of the model"
        )
    return lut[labels]


def _cloud_sample(path: Path, meta, rows: int, rng, runs: int = 50) -> np.ndarray:
    """Up to ``rows`` rows of the disguised dataset, as the cloud holds them: ``runs`` contiguous runs
    at random places spread over the whole file (a file in listing order is sorted by class, so one
    contiguous slice would hold a few classes only; single random rows would read a chunk each)."""
    n = int(meta.rows)
    with h5format.open_h5(path) as f:
        images = f["images"]
        if n <= rows:
            return np.asarray(images[:], dtype=np.float32)
        length = max(1, rows // runs)
        slots = n // length
        starts = np.sort(rng.choice(slots, size=min(runs, slots), replace=False)) * length
        return np.concatenate([np.asarray(images[a : a + length], dtype=np.float32) for a in starts])
