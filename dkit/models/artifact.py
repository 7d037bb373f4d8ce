"""The model artifact, format version 1 (``formats/MODEL-v1.md``): a folder with weights in
safetensors and JSON metadata. A model comes back from an untrusted cloud, so loading it never
unpickles anything and never runs code from it: the JSON is data, the weights are raw tensors, and
the architecture is rebuilt from dkit's own code.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import __version__, jsonload
from ..data.decode import FITS, FLOAT_RANGES
from ..errors import ArtifactError
from ..home import atomic_write
from ..params import MAX_CHANNELS, MAX_SIDE, KeyParams
from ..text import shown
from .nets import ARCHS, build, check_params

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


# Bounds on what a model.json may hold (formats/MODEL-v1.md, "Bounds"). It comes from an untrusted
# cloud: it is checked against these, and for consistency, before anything is built.
MAX_META_BYTES = 16 << 20
MAX_NESTING = 16  # levels of lists and objects, the document itself being 1
MAX_CLASSES = 1 << 20
MAX_NAME_CHARS = 1024  # a class name
MAX_TEXT_CHARS = 4096  # created, dkit_version
MAX_KEY_VERSION = (1 << 31) - 1
MAX_HEADER_BYTES = 16 << 20  # model.safetensors' JSON header
LABEL_KINDS = ("hard", "soft")
# safetensors dtype names of the tensors a dkit model can hold
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

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
_OPTIONAL = {
    "class_names": ((list, type(None)), "list or null"),
    "data_options": (dict, "dict"),
    "metrics": (dict, "dict"),
    "created": (str, "str"),
    "dkit_version": (str, "str"),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _nesting(doc) -> int:
    """How deeply lists and objects nest in a parsed JSON document (iteratively: no recursion)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_NESTING:
                return depth
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def _read_json(path: Path) -> object:
    size = path.stat().st_size
    if size > MAX_META_BYTES:
        raise ArtifactError(f"{path}: {size:,} bytes, more than a model description may hold ({MAX_META_BYTES:,})")
    try:
        return jsonload.loads(path.read_bytes().decode("utf-8"))
    except ValueError as e:  # also not UTF-8, and nesting too deep
        raise ArtifactError(f"{path}: not valid JSON ({str(e).splitlines()[0][:80]})") from None


def read_meta(model_dir: Path) -> ModelMeta:
    """The model's description, checked field by field (types, bounds, nesting, consistency) before
    anything is built from it. Every problem is an ``ArtifactError`` naming the file and the field."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ArtifactError(f"{model_dir}: no such model folder")
    path = model_dir / META
    if not path.is_file():
        pickles = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
        extra = f" (it holds {', '.join(pickles)}: dkit never loads pickled models)" if pickles else ""
        what = "is not a regular file" if path.exists() or path.is_symlink() else "is missing"
        raise ArtifactError(f"{model_dir}: not a dkit model, {META} {what}{extra}")
    return check_meta(_read_json(path), path)


def check_meta(doc: object, path: str | Path) -> ModelMeta:
    """A model description from anywhere (a model.json, a server's /v1/model), checked field by
    field; ``path`` names where it came from in every ``ArtifactError``."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a dkit model description")
    if doc.get("version") != VERSION or not _is_int(doc.get("version")):
        newer = _is_int(doc.get("version")) and doc["version"] > VERSION
        raise ArtifactError(
            f"{path}: model format version {shown(doc.get('version'))} is not known to this dkit"
            + ("; upgrade dkit" if newer else ""),
            hint="pip install --upgrade dkit" if newer else None,
        )
    if _nesting(doc) > MAX_NESTING:
        raise ArtifactError(f"{path}: lists and objects nest more than {MAX_NESTING} levels deep")

    def bad(field: str, problem: str, hint: str | None = None):
        raise ArtifactError(f"{path}: field {field!r} {problem}", hint=hint)

    for k, t in _REQUIRED.items():
        if not isinstance(doc.get(k), t) or isinstance(doc.get(k), bool):
            what = "missing" if k not in doc else f"{shown(doc[k])}, not a {t.__name__}"
            why = " (the model does not say which key it was trained with)" if k.startswith("key_") else ""
            bad(k, f"is {what}{why}")
    for k, (types, want) in _OPTIONAL.items():
        if k in doc and not isinstance(doc[k], types):
            bad(k, f"is {shown(doc[k])}, not a {want}")
    for k in ("created", "dkit_version"):
        if len(doc.get(k, "")) > MAX_TEXT_CHARS:
            bad(k, f"is longer than {MAX_TEXT_CHARS} characters")
    if doc["arch"] not in ARCHS:
        raise ArtifactError(f"{path}: unknown architecture {shown(doc['arch'])}: dkit builds " + ", ".join(ARCHS))
    if len(doc["key_id"]) != 32 or any(ch not in "0123456789abcdef" for ch in doc["key_id"]):
        raise ArtifactError(f"{path}: malformed key ID {shown(doc['key_id'])}")
    if not 1 <= doc["key_version"] <= MAX_KEY_VERSION:
        bad("key_version", f"is {shown(doc['key_version'])}, out of range (1 to {MAX_KEY_VERSION})")
    if doc["label_kind"] not in LABEL_KINDS:
        bad("label_kind", f"is {shown(doc['label_kind'])}, not one of " + ", ".join(LABEL_KINDS))
    # the geometry: in_shape, block, and the key parameters they come from
    shape, block = doc["in_shape"], doc["block"]
    if len(shape) != 3 or not all(_is_int(v) for v in shape):
        bad("in_shape", f"is {shown(shape)}, not [height, width, channels] as integers")
    if not (1 <= shape[0] <= MAX_SIDE and 1 <= shape[1] <= MAX_SIDE and 1 <= shape[2] <= MAX_CHANNELS):
        bad("in_shape", f"is {shown(shape)}: sides must be 1 to {MAX_SIDE}, channels 1 to {MAX_CHANNELS}")
    if len(block) != 2 or not all(_is_int(v) for v in block):
        bad("block", f"is {shown(block)}, not [height, width] as integers")
    if not (1 <= block[0] <= shape[0] and 1 <= block[1] <= shape[1]) or shape[0] % block[0] or shape[1] % block[1]:
        bad("block", f"is {shown(block)}, which does not tile in_shape {shape[0]}x{shape[1]}")
    try:
        params = KeyParams.from_dict(doc["key_params"])
    except Exception as e:  # noqa: BLE001 - ParameterError, and whatever a hostile dict provokes
        bad("key_params", f"is malformed ({str(e)[:120]})")
    if list(params.shape) != shape or list(params.block) != block:
        bad(
            "in_shape",
            f"and 'block' ({shown(shape)}, {shown(block)}) are not the key parameters' "
            f"({list(params.shape)}, {list(params.block)})",
        )
    # the classes
    n = doc["num_classes"]
    if not 1 <= n <= MAX_CLASSES:
        bad("num_classes", f"is {shown(n)}, out of range (1 to {MAX_CLASSES:,})")
    names = doc.get("class_names")
    if names is not None:
        if len(names) != n:
            bad("class_names", f"holds {len(names):,} names for num_classes {n}")
        for i, c in enumerate(names):
            if not isinstance(c, str) or len(c) > MAX_NAME_CHARS:
                bad(f"class_names[{i}]", f"is {shown(c)}, not a name (a string of at most {MAX_NAME_CHARS} characters)")
    # the input normalisation: one finite mean and one positive std per channel
    norm = doc["normalization"]
    for k in ("mean", "std"):
        v = norm.get(k)
        if not isinstance(v, list) or len(v) != shape[2] or not all(_is_number(x) for x in v):
            bad(f"normalization.{k}", f"is {shown(v)}, not a list of {shape[2]} finite numbers (one per channel)")
    if not all(x > 0 for x in norm["std"]):
        bad("normalization.std", f"is {shown(norm['std'])}: each must be above 0")
    # how inputs are read
    opts = doc.get("data_options", {})
    if opts.get("fit", "none") not in FITS:
        bad("data_options.fit", f"is {shown(opts['fit'])}, not one of " + ", ".join(FITS))
    if not isinstance(opts.get("convert", True), bool):
        bad("data_options.convert", f"is {shown(opts['convert'])}, not true or false")
    if opts.get("float_range") not in FLOAT_RANGES:
        bad("data_options.float_range", f'is {shown(opts["float_range"])}, not null, "0-1" or "0-255"')
    # the architecture's settings: types and bounds, then what they imply together
    problem = check_params(doc["arch"], doc["arch_params"], shape, block)
    if problem:
        bad(f"arch_params.{problem[0]}", problem[1])
    fields = {k: doc[k] for k in ModelMeta.__dataclass_fields__ if k in doc}
    return ModelMeta(**fields)


def load(model_dir: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelMeta]:
    """Rebuild the network from dkit's code and fill it with the stored tensors. Nothing is unpickled.

    The description is checked first (``read_meta``), then the weights' header is read and checked
    against the network built without memory (on the meta device), and only then are the tensors read."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        what = "is not a regular file" if weights.exists() or weights.is_symlink() else "is missing"
        raise ArtifactError(f"{model_dir}: {WEIGHTS} {what}")
    header = read_header(weights)
    _check_size(meta, header, model_dir)
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
    want = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}
    misfit = _misfit(want, header)
    if misfit:
        raise ArtifactError(f"{model_dir}: the weights do not fit the described model ({misfit})")
    try:
        state = load_file(str(weights), device="cpu")
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as e:  # noqa: BLE001 - SafetensorError, OSError, and a pyo3 PanicException
        why = str(e).splitlines()[0][:100] if str(e).strip() else type(e).__name__
        raise ArtifactError(
            f"{weights}: not a valid safetensors file ({why}); dkit never loads pickled weights"
        ) from None
    misfit = _misfit(want, {k: (tuple(t.shape), t.dtype) for k, t in state.items()})
    if misfit:
        raise ArtifactError(f"{model_dir}: the weights do not fit the described model ({misfit})")
    try:
        nonfinite = next((k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if nonfinite:
            raise ArtifactError(
                f"{model_dir}: the weights hold NaN or infinite values ({nonfinite}); "
                "such a model predicts garbage (its training diverged, or the file was altered)"
            )
        scrambled = next((k for k, t in state.items() if k.endswith("arrangement") and not _is_permutation(t)), None)
        if scrambled:  # it indexes the grid: anything but a permutation would drop or repeat blocks
            raise ArtifactError(f"{model_dir}: the weights' {scrambled} is not a permutation of the block positions")
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


def _is_permutation(t: torch.Tensor) -> bool:
    return t.dtype == torch.int64 and t.dim() == 1 and torch.equal(torch.sort(t).values, torch.arange(len(t)))


def read_header(weights: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors a safetensors file declares, name -> (shape, dtype), from its header alone: checked
    (types, extents within the file, no overlaps) before a byte of tensor data is read."""

    def bad(why: str):
        raise ArtifactError(f"{weights}: not a valid safetensors file ({why}); dkit never loads pickled weights")

    size = weights.stat().st_size
    with open(weights, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            bad(f"{size} bytes, shorter than a header")
        n = int.from_bytes(head, "little")
        if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
            bad(f"a header of {n:,} bytes in a file of {size:,}")
        text = f.read(n)
    try:
        doc = json.loads(text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        bad("its header is not JSON")
    if not isinstance(doc, dict):
        bad("its header is not a JSON object")
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    spans = []
    data = size - 8 - n
    for name, entry in doc.items():
        if name == "__metadata__":
            continue
        label = shown(name)
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            bad(f"tensor {label} is not described by dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            bad(f"tensor {label} has dtype {shown(dtype)}, which no dkit model holds")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(v) and 0 <= v < 1 << 48 for v in shape):
            bad(f"tensor {label} has shape {shown(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(v) for v in offsets)):
            bad(f"tensor {label} has data_offsets {shown(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end <= data:
            bad(f"tensor {label} lies at bytes {begin:,} to {end:,}, outside the {data:,} bytes of data")
        if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
            bad(f"tensor {label} has {end - begin:,} bytes for shape {shown(shape)} {dtype}")
        out[name] = (tuple(shape), DTYPES[dtype])
        spans.append((begin, end))
    spans.sort()
    for (_, e1), (b2, _) in zip(spans, spans[1:], strict=False):
        if b2 < e1:
            bad("two tensors overlap")
    return out


def _check_size(meta: ModelMeta, header: dict, model_dir: Path) -> None:
    """No size (``hidden``, ``dim``) or count (``depth``, ``heads``) in the description can exceed the
    number of stored values: an absurd one is refused before anything is built."""
    values = sum(math.prod(shape) for shape, _ in header.values())
    for k, v in meta.arch_params.items():
        if isinstance(v, int) and not isinstance(v, bool) and v > values:
            raise ArtifactError(
                f"{model_dir}: the weights do not fit the described model "
                f"(arch_params {k}={v}, but the weights hold {values:,} values in all)"
            )


def _misfit(want: dict, got: dict) -> str:
    """What differs between the described model's tensors and the stored ones (name -> (shape,
    dtype) each), or ""."""
    problems = [f"{k} is missing" for k in want if k not in got]
    problems += [f"{shown(k)} is not in the described model" for k in got if k not in want]
    problems += [
        f"{k} is {got[k][0]} {str(got[k][1])[6:]} in the weights, {t[0]} {str(t[1])[6:]} in the description"
        for k, t in want.items()
        if k in got and got[k] != t
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
