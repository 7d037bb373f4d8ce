"""``dkit predict``: the owner disguises new images locally (fresh noise) and runs the model on them.

The key's ID must match the model's before anything is decoded or predicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.decode import DecodeError, Policy
from ..data.run import _batches, decode_all
from ..data.sources import Source
from ..engine import RandomSource
from ..errors import ArtifactError, InputError, KeyMismatch
from . import artifact
from .training import pick_device
from .wrapper import DisguisedModel


@dataclass
class Prediction:
    name: str
    top: list[tuple[str, float]]
    label: str | None = None

    def to_dict(self) -> dict:
        return {
            "input": self.name,
            "top": [{"class": c, "probability": round(p, 6)} for c, p in self.top],
            "label": self.label,
        }


def check_key(meta: artifact.ModelMeta, key, model_dir: Path) -> None:
    if key.key_id != meta.key_id:
        raise KeyMismatch(
            f"{key.ref} (key ID {key.key_id}) is not the key {model_dir} was trained with "
            f"(key ID {meta.key_id}, version {meta.key_version})",
            hint="predict with the key version whose data trained the model; dkit keys show NAME lists the IDs",
        )
    # The key's ID covers its parameters, so with the right key any other key_params in the model's
    # description were edited: the description (in_shape, block) would not fit what the key produces.
    if key.params.canonical() != meta.params.canonical():
        where = model_dir if isinstance(model_dir, str) and "://" in model_dir else Path(model_dir) / artifact.META
        raise ArtifactError(
            f"{where}: field 'key_params' is not the parameters of {key.ref} "
            f"(key ID {key.key_id}), the key the model names"
        )


def predict(
    model_dir: str | Path,
    source: Source,
    key,
    *,
    top_k: int = 3,
    device: str = "auto",
    batch_size: int = 256,
    fit: str | None = None,
    convert: bool | None = None,
    public: Source | None = None,
    samples: int | None = None,
    float_range: str | None = None,
    token: str | None = None,
    rng: RandomSource | None = None,
) -> dict:
    """``model_dir``: a model folder, or the URL of ``dkit serve`` (then the images are disguised
    here and only the disguised batches are sent). ``rng``: fixed randomness, for tests only."""
    from ..serve.client import RemoteNet, is_url

    if is_url(model_dir):
        model = RemoteNet(str(model_dir), token=token)
        meta = model.meta
        check_key(meta, key, model_dir)
    else:
        model_dir = Path(model_dir)
        meta = artifact.read_meta(model_dir)
        check_key(meta, key, model_dir)  # before any image is touched
        model, meta = artifact.load(model_dir, pick_device(device))
    names = meta.class_names or [str(i) for i in range(meta.num_classes)]
    opts = meta.data_options or {}
    policy = Policy(
        tuple(meta.in_shape),
        convert=opts.get("convert", True) if convert is None else convert,
        fit=fit or opts.get("fit", "none"),
        float_range=float_range or opts.get("float_range"),
    )
    pool = decode_all(public, policy) if public is not None else None
    if key.params.has("instahide") and key.params.mix == "cross" and pool is None:
        raise InputError("this model's key mixes with a public image set (instahide cross): pass --public SRC")
    net = DisguisedModel(model, key, layout="NHWC", pool=pool, samples=samples).eval()
    label_map = _label_map(source, names)
    rows: list[Prediction] = []
    correct = counted = 0
    k = max(1, min(top_k, meta.num_classes))
    with torch.no_grad():
        for positions, imgs, _ok, errors, _, _ in _batches(
            source, policy, list(range(0, len(source), batch_size)), len(source), batch_size, 0
        ):
            if errors:
                _, name, problem, hint = errors[0]
                raise DecodeError(name, problem, hint=hint)
            logits = net(torch.from_numpy(imgs), rng)
            probs = torch.softmax(logits.float(), dim=1).cpu()
            p, idx = probs.topk(k, dim=1)
            for j, pos in enumerate(positions):
                label = None
                if label_map is not None:
                    label = label_map[int(source.labels[pos])]
                    if label is not None:
                        counted += 1
                        correct += int(names[int(idx[j, 0])] == label)
                rows.append(
                    Prediction(
                        source.names[pos], [(names[int(i)], float(q)) for q, i in zip(p[j], idx[j], strict=True)], label
                    )
                )
    return {
        "model": str(model_dir),
        "key_id": meta.key_id,
        "key_version": meta.key_version,
        "count": len(rows),
        "accuracy": (correct / counted) if counted else None,
        "labelled": counted,
        "predictions": [r.to_dict() for r in rows],
    }


def _label_map(source: Source, names: list[str]) -> list[str | None] | None:
    """Source label index -> the model's class name, when the inputs carry labels."""
    if source.labels is None:
        return None
    if source.classes:
        return [c if c in names else None for c in source.classes]
    return [names[i] if i < len(names) else None for i in range(int(source.labels.max()) + 1)]
