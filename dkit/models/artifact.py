"""The model artifact, format version 1 (``formats/MODEL-v1.md``): a folder with weights in
safetensors and JSON metadata. A model comes back from an untrusted cloud, so loading it never
unpickles anything and never runs code from it: the JSON is data, the weights are raw tensors, and
the architecture is rebuilt from dkit's own code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import ArtifactError
from ..home import atomic_write
from ..params import KeyParams
from .nets import ARCHS, build

FORMAT = "dkit-model"
VERSION = 1
WEIGHTS = "model.safetensors"
META = "model.json"
METRICS = "metrics.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


@dataclass
class ModelMeta:
    arch: str
    arch_params: dict
    in_shape: list[int]
    block: list[int]
    num_classes: int
    class_names: list[str] | None
    label_kind: str
    key_id: str
    key_version: int
    key_params: dict
    dataset: dict
    normalization: dict
    data_options: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created: str = ""
    dkit_version: str = __version__

    @property
    def params(self) -> KeyParams:
        return KeyParams.from_dict(self.key_params)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}


def save(model_dir: Path, model: torch.nn.Module, meta: ModelMeta, metrics: dict) -> None:
    """Weights, then metrics, then the description: the description is written last, so a folder
    that has one has the weights it describes."""
    from safetensors.torch import save as to_bytes

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights = to_bytes(state, metadata={"format": FORMAT, "version": str(VERSION)})
    atomic_write(model_dir / WEIGHTS, weights, mode=0o644)
    atomic_write(model_dir / METRICS, json.dumps(metrics, indent=2, sort_keys=True).encode() + b"\n", mode=0o644)
    atomic_write(model_dir / META, json.dumps(meta.to_dict(), indent=2, sort_keys=True).encode() + b"\n", mode=0o644)


_REQUIRED = {
    "arch": str,
    "arch_params": dict,
    "in_shape": list,
    "block": list,
    "num_classes": int,
    "label_kind": str,
    "key_id": str,
    "key_version": int,
    "key_params": dict,
    "dataset": dict,
    "normalization": dict,
}


def read_meta(model_dir: Path) -> ModelMeta:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ArtifactError(f"{model_dir}: no such model folder")
    path = model_dir / META
    if not path.is_file():
        pickles = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
        extra = f" (it holds {', '.join(pickles)}: dkit never loads pickled models)" if pickles else ""
        raise ArtifactError(f"{model_dir}: not a dkit model, {META} is missing{extra}")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ArtifactError(f"{path}: not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a dkit model description")
    if doc.get("version") != VERSION:
        newer = isinstance(doc.get("version"), int) and doc["version"] > VERSION
        raise ArtifactError(
            f"{path}: model format version {doc.get('version')!r} is not known to this dkit"
            + ("; upgrade dkit" if newer else ""),
            hint="pip install --upgrade dkit" if newer else None,
        )
    for k, t in _REQUIRED.items():
        if not isinstance(doc.get(k), t) or isinstance(doc.get(k), bool):
            what = "missing" if k not in doc else f"not a {t.__name__}"
            raise ArtifactError(
                f"{path}: field {k!r} is {what}"
                + (" (the model does not say which key it was trained with)" if k.startswith("key_") else "")
            )
    if doc["arch"] not in ARCHS:
        raise ArtifactError(f"{path}: unknown architecture {doc['arch']!r}")
    if len(doc["key_id"]) != 32 or any(ch not in "0123456789abcdef" for ch in doc["key_id"]):
        raise ArtifactError(f"{path}: malformed key ID {doc['key_id']!r}")
    fields = {k: doc[k] for k in ModelMeta.__dataclass_fields__ if k in doc}
    meta = ModelMeta(**fields)
    try:
        meta.params  # noqa: B018 - validates the key parameters
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path}: malformed key parameters ({e})") from None
    return meta


def load(model_dir: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelMeta]:
    """Rebuild the network from dkit's code and fill it with the stored tensors. Nothing is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{model_dir}: {WEIGHTS} is missing")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(
            f"{weights}: not a valid safetensors file ({str(e)[:100]}); dkit never loads pickled weights"
        ) from None
    _check_size(meta, state, model_dir)
    norm = meta.normalization
    try:
        with torch.device("meta"):  # no memory until the stored tensors are assigned
            model = build(
                meta.arch,
                tuple(meta.in_shape),
                tuple(meta.block),
                meta.num_classes,
                norm["mean"],
                norm["std"],
                **meta.arch_params,
            )
    except (KeyError, TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise ArtifactError(
            f"{model_dir}: the weights do not fit the described model ({str(e).splitlines()[0][:160]})"
        ) from None
    misfit = _misfit(model.state_dict(), state)
    if misfit:
        raise ArtifactError(f"{model_dir}: the weights do not fit the described model ({misfit})")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ArtifactError(f"{model_dir}: the weights do not fit the described model ({str(e)[:160]})") from None
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise ArtifactError(f"{model_dir}: the weights do not fit the described model ({empty[0]} is not in them)")
    model = model.to(device).eval()
    # Public, and what DisguisedModel checks a key against: a model is only ever used with its own key.
    model.dkit_key_id = meta.key_id
    model.dkit_key_version = meta.key_version
    return model, meta


def _check_size(meta: ModelMeta, state: dict, model_dir: Path) -> None:
    """No size (``hidden``, ``dim``) or count (``depth``, ``heads``) in the description can exceed the
    number of stored values: an absurd one is refused before anything is built."""
    values = sum(t.numel() for t in state.values())
    for k, v in meta.arch_params.items():
        if isinstance(v, int) and not isinstance(v, bool) and v > values:
            raise ArtifactError(
                f"{model_dir}: the weights do not fit the described model "
                f"(arch_params {k}={v}, but the weights hold {values:,} values in all)"
            )


def _misfit(want: dict, got: dict) -> str:
    """What differs between the described model's tensors and the stored ones, or ""."""
    problems = [f"{k} is missing" for k in want if k not in got]
    problems += [f"{k} is not in the described model" for k in got if k not in want]
    problems += [
        f"{k} is {tuple(got[k].shape)} {str(got[k].dtype)[6:]} in the weights, "
        f"{tuple(t.shape)} {str(t.dtype)[6:]} in the description"
        for k, t in want.items()
        if k in got and (got[k].shape != t.shape or got[k].dtype != t.dtype)
    ]
    return "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")


def load_checkpoint_state(path: Path) -> dict:
    """A training checkpoint's optimizer state: torch.load with weights_only=True refuses any pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError and friends
        raise ArtifactError(
            f"{path}: refused to load ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "only plain tensors and numbers are accepted"
        ) from None
