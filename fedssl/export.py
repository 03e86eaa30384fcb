"""Exported models: the network's weights, its label names and its input spec.

`fedssl personalize` writes one, `fedssl predict` reads one. A model file is data:
the default format holds tensors and JSON only, and fedssl rebuilds the network
from its own code. Four formats:

- ``safetensors`` (default): two files side by side, ``model.safetensors`` (the
  weights, `safetensors <https://huggingface.co/docs/safetensors>`_: a JSON header
  and raw tensor bytes, nothing that runs) and ``model.json`` (the description:
  labels, input spec, the model's registry name and keyword arguments, the weights'
  SHA-256, the fedssl version). `load_exported` validates every field of the
  description (`check_description`), builds the network with
  `fedssl.models.factory.build_model`, checks the weights' header against the
  network's tensors (names, dtypes, shapes, offsets; strict) and only then reads
  the tensors. Without fedssl, the weights load with `safetensors.torch.load_file`
  into any code that builds the same architecture.

- ``onnx`` (``model.onnx``), for deployment elsewhere, when the optional ``onnx`` and
  ``onnxscript`` packages are installed; the batch dimension is dynamic. The
  description is the ONNX metadata property ``fedssl.json``. onnxruntime, which
  runs no Python, evaluates it; predicting needs ``onnxruntime``.

- ``pt2`` (``model.pt2``): `torch.export` of the model in eval mode with a dynamic
  batch dimension, for AOTInductor or ExecuTorch. Its description is the extra file
  ``fedssl.json``.
- ``torchscript`` (``model.pt``): `torch.jit.trace` of the model in eval mode, for
  libtorch (C++) or older torch; its description is the extra file ``fedssl.json``.

  Both are programs: `torch.export.load` evaluates the shape expressions in the
  archive with sympy (which runs Python) and resolves node targets to arbitrary
  torch attributes, and TorchScript runs what it holds. No check of their strings
  makes them safe, so fedssl loads them only with ``trust_code=True`` (``fedssl
  predict --trust-model-code``): from files you would run as code.

The description says how to feed the model: ``labels`` (one per output, in order) and
``input``: decode the image, convert it to grayscale (``channels`` 1) or RGB (3),
stretch it to ``image_size`` x ``image_size`` (bilinear), normalize uint8 values per
channel by (x / 255 - ``mean``) / ``std`` (0.5 and 0.5, i.e. [-1, 1], unless the model
was built from pretrained weights: then their mean and std), and lay it out as float32
NCHW; the outputs are logits.
This is what training did (`fedssl.data.sources.image_folder.read_image`,
`fedssl.data.transforms.to_tensor`), and what `ExportedModel.predict` does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import math
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedssl import __version__
from fedssl.config.validate import CHANNELS, IMAGE_SIZES, MAX_CLASSES
from fedssl.data.transforms import to_tensor
from fedssl.errors import UserError
from fedssl.io import atomic_write

__all__ = ["DEFAULT_FORMAT", "FORMATS", "TRUST_FLAG", "ExportedModel", "Prediction", "check_description",
           "check_rebuildable", "export_model", "load_exported", "model_metadata", "model_path"]

FORMATS = {"safetensors": "model.safetensors", "onnx": "model.onnx", "pt2": "model.pt2", "torchscript": "model.pt"}
DEFAULT_FORMAT = "safetensors"
CODE_FORMATS = {"pt2": "torch.export (.pt2)", "torchscript": "TorchScript"}  # programs, loaded only when trusted
TRUST_FLAG = "--trust-model-code"
METADATA = "fedssl.json"  # the description's name inside an onnx, pt2 or TorchScript file
FORMAT_NAME = "fedssl-model"
FORMAT_VERSION = 3  # 3: model (registry name, kwargs), weights' sha256, fedssl_version; 2: mean and std; 1: [-1, 1]
READABLE_VERSIONS = (1, 2, 3)
MAX_DESCRIPTION_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20  # about 100 bytes a tensor; safetensors itself allows 100 MB
MAX_NAME_CHARS = 200  # a label's or a keyword argument's
_SUFFIXES = {".safetensors": "safetensors", ".json": "safetensors", ".onnx": "onnx", ".pt2": "pt2"}  # else TorchScript
_ONNX_PACKAGES = ("onnx", "onnxscript")
# safetensors' names of the dtypes a network's state dict holds (safetensors.torch._TYPES)
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def model_metadata(class_names: Sequence[str], image_size: int, channels: int, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, model: Mapping[str, Any] | None = None,
                   **extra: Any) -> dict[str, Any]:
    """The description stored with an exported model (see the module docstring).

    Args:
        class_names: one label per output, in order.
        image_size, channels: the input the network takes.
        mean, std: per channel; None: 0.5 and 0.5, fedssl's [-1, 1].
        model: ``{"name": ..., "kwargs": {...}}``, what `fedssl.models.factory.build_model`
            builds the network from (the recipe's model.name and model.kwargs); the
            safetensors format needs it.
        extra: more keys for the description (e.g. how the model was personalized).
    """
    mean = [float(m) for m in mean] if mean is not None else [0.5] * channels
    std = [float(s) for s in std] if std is not None else [0.5] * channels
    architecture = {"model": {"name": model["name"], "kwargs": dict(model.get("kwargs") or {})}} if model else {}
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "fedssl_version": __version__,
        "labels": list(class_names),
        "input": {
            "image_size": image_size,
            "channels": channels,
            "color": "grayscale" if channels == 1 else "rgb",
            "resize": "stretch to image_size x image_size, bilinear",
            "mean": mean,
            "std": std,
            "scale": [1 / (255 * s) for s in std],
            "offset": [-m / s for m, s in zip(mean, std)],
            "normalize": "(x / 255 - mean) / std per channel, i.e. x * scale + offset",
            "layout": "NCHW",
            "dtype": "float32",
        },
        "output": "logits, one per label (softmax gives the confidences)",
        **architecture,
        **extra,
    }


def check_description(description: Any, name: str = "model.json") -> None:
    """Raise a `UserError` naming the first field of a model description fedssl cannot use.

    Every field a loader reads is checked here, before anything is built from it:
    the format and version, the labels (distinct non-empty strings), the input size,
    channels, mean and std (finite, std > 0), the model's registry name and its
    keyword arguments (plain JSON values), the weights' digest. Whether the labels
    match the network's outputs is checked once the network exists.

    Args:
        description: the parsed JSON.
        name: the file it came from, for the message.
    """
    def bad(key: str, what: str, value: Any) -> UserError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return UserError(f"{name}: {key} {what}, got {shown}; export the model again with fedssl personalize")

    if not isinstance(description, dict) or description.get("format") != FORMAT_NAME:
        raise UserError(f"{name}: not a model exported by fedssl personalize (its description is not fedssl's)")
    version = description.get("version")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise UserError(f"{name}: fedssl model format {version!r}; this fedssl reads formats "
                        f"{', '.join(map(str, READABLE_VERSIONS))}")
    labels = description.get("labels")
    if not (isinstance(labels, list) and 1 <= len(labels) <= MAX_CLASSES and all(map(_is_name, labels))):
        raise bad("labels", f"must be a list of 1 to {MAX_CLASSES} names (strings)", labels)
    if len(set(labels)) < len(labels):
        raise bad("labels", "must be distinct", labels)
    spec = description.get("input")
    if not isinstance(spec, dict):
        raise bad("input", "must be a mapping", spec)
    size, channels = spec.get("image_size"), spec.get("channels")
    if not (_is_int(size) and IMAGE_SIZES[0] <= size <= IMAGE_SIZES[1]):
        raise bad("input.image_size", f"must be a whole number from {IMAGE_SIZES[0]} to {IMAGE_SIZES[1]}", size)
    if not (_is_int(channels) and channels in CHANNELS):
        raise bad("input.channels", "must be 1 (grayscale) or 3 (RGB)", channels)
    if version >= 2:
        for key, low, high in (("mean", -10.0, 10.0), ("std", 1e-4, 10.0)):
            values = spec.get(key)
            if not (isinstance(values, list) and len(values) == channels and all(
                    _is_number(v) and low <= v <= high for v in values)):
                raise bad(f"input.{key}", f"must be one number from {low:g} to {high:g} per channel", values)
    if "model" in description:
        _check_architecture(description["model"], bad)
    weights = description.get("weights", {})
    digest = weights.get("sha256") if isinstance(weights, dict) else None
    if "weights" in description and not (isinstance(digest, str) and len(digest) == 64 and
                                         all(c in "0123456789abcdef" for c in digest)):
        raise bad("weights.sha256", "must be a SHA-256 in hex", digest)
    if not isinstance(description.get("fedssl_version", ""), str):
        raise bad("fedssl_version", "must be a string", description["fedssl_version"])


def _check_architecture(model: Any, bad: Callable[[str, str, Any], UserError]) -> None:
    """The description's model section: a name fedssl's factory builds, and kwargs that
    are plain JSON values (the model's own constructor refuses names it does not take)."""
    import timm

    import fedssl.models.factory  # noqa: F401 - registers fedssl's models with timm

    if not (isinstance(model, dict) and set(model) == {"name", "kwargs"}):
        raise bad("model", "must be a mapping of name and kwargs", model)
    if not (_is_name(model["name"]) and timm.is_model(model["name"])):
        raise bad("model.name", "must name a model fedssl builds (timm.list_models() or fedssl's CNNs)", model["name"])
    kwargs = model["kwargs"]
    if not isinstance(kwargs, dict):
        raise bad("model.kwargs", "must be a mapping", kwargs)
    for key, value in kwargs.items():
        values = value if isinstance(value, list) else [value]
        if not (_is_name(key) and len(values) <= 64 and all(
                v is None or isinstance(v, (bool, int)) or _is_number(v) or _is_name(v) for v in values)):
            raise bad(f"model.kwargs.{str(key)[:MAX_NAME_CHARS]}", "must be a number, string, bool or null "
                      "(or a list of them)", value)


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS


def model_path(out_dir: str | Path, export_format: str) -> Path:
    """Where `export_format` writes in `out_dir` (safetensors: the weights; the
    description is beside them, with the suffix .json).

    Raises:
        UserError: an unknown format, or onnx without its packages installed.
    """
    if export_format not in FORMATS:
        raise UserError(f"--format: unknown format {export_format!r}; choose one of {', '.join(FORMATS)}")
    if export_format == "onnx":
        missing = [name for name in _ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise UserError(
                f"--format onnx needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}: "
                f"pip install 'fedssl[onnx]' (or export safetensors, the default)"
            )
    return Path(out_dir) / FORMATS[export_format]


def export_model(model: nn.Module, path: str | Path, metadata: dict[str, Any], export_format: str = DEFAULT_FORMAT) -> Path:
    """Write `model` (evaluated in eval mode) with its description `metadata` to `path`, atomically.

    The export is read back and checked against `model` on a random batch before it
    is written, so a file that exists computes what `model` computes. safetensors
    writes the weights first, then the description (`path` with the suffix .json),
    which holds the weights' SHA-256: a crash between the two leaves a pair that
    refuses to load rather than one that mixes two exports.
    """
    path = Path(path)
    model_path(path.parent, export_format)  # the format's own checks
    check_description(metadata, f"the description of {path}")
    size, channels = metadata["input"]["image_size"], metadata["input"]["channels"]
    was_training = model.training
    model.eval()
    try:
        probe = torch.rand(3, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with torch.no_grad():
            expected = model(probe)
        if export_format == "safetensors":
            files = _safetensors_files(model, metadata, path)
            exported = _load_safetensors(io.BytesIO(files[path]), json.loads(files[path.with_suffix(".json")]), str(path))
        else:
            files = {path: _program_bytes(model, probe, json.dumps(metadata, indent=2), export_format)}
            exported = _load_bytes(files[path], export_format, str(path))
        torch.testing.assert_close(exported.run(probe), expected, rtol=1e-4, atol=1e-4)
        for target, data in files.items():
            atomic_write(target, lambda file, data=data: file.write(data))
    finally:
        model.train(was_training)
    return path


def check_rebuildable(model: nn.Module, description: dict[str, Any], name: str) -> None:
    """Raise a `UserError` unless the network that `description` names (the safetensors
    format rebuilds it from fedssl's registry) has `model`'s tensors, name for name and
    shape for shape: a FedMA model's widened layers, for one, are not rebuilt."""
    if "model" not in description:
        raise ValueError("the safetensors format needs the description's model section (model_metadata(model=...))")
    check_description(description, name)
    expected, actual = _build(description, name, meta=True).state_dict(), model.state_dict()
    for key in sorted(expected.keys() | actual.keys()):
        if key not in expected or key not in actual or expected[key].shape != actual[key].shape:
            shapes = [tuple(sd[key].shape) if key in sd else "none" for sd in (actual, expected)]
            raise UserError(f"{name}: the model's {key!r} is {shapes[0]}, {description['model']['name']} as fedssl "
                            f"builds it has {shapes[1]}; the safetensors format rebuilds the network from fedssl's "
                            "models, so export this one with --format onnx")


def _safetensors_files(model: nn.Module, metadata: dict[str, Any], path: Path) -> dict[Path, bytes]:
    """The weights and the description naming their digest, in the order they are written."""
    from safetensors.torch import save

    check_rebuildable(model, metadata, str(path))
    weights = save({name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()})
    description = {**metadata, "weights": {"sha256": hashlib.sha256(weights).hexdigest()}}
    return {path: weights, path.with_suffix(".json"): (json.dumps(description, indent=2) + "\n").encode()}


def _program_bytes(model: nn.Module, probe: torch.Tensor, metadata: str, export_format: str) -> bytes:
    if export_format == "pt2":
        return _pt2_bytes(model, probe, metadata)
    if export_format == "torchscript":
        return _torchscript_bytes(model, probe, metadata)
    return _onnx_bytes(model, probe, metadata)


def _pt2_bytes(model: nn.Module, probe: torch.Tensor, metadata: str) -> bytes:
    buffer = io.BytesIO()
    with torch.no_grad():
        program = torch.export.export(model, (probe[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, buffer, extra_files={METADATA: metadata})
    return buffer.getvalue()


def _torchscript_bytes(model: nn.Module, probe: torch.Tensor, metadata: str) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Recent torch (2.14 here) marks TorchScript deprecated for torch.export; it is
        # kept because libtorch (C++) and older torch still load it.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        with torch.no_grad():
            traced = torch.jit.trace(model, probe[:1])
        torch.jit.save(traced, buffer, _extra_files={METADATA: metadata})
    return buffer.getvalue()


def _onnx_bytes(model: nn.Module, probe: torch.Tensor, metadata: str) -> bytes:
    batch = torch.export.Dim("batch")
    with _quiet_loggers("onnxscript", "onnx_ir"):  # their optimizer passes log every step at INFO
        program = torch.onnx.export(model, (probe[:2],), dynamo=True, input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), verbose=False)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA, metadata
    return proto.SerializeToString()


@contextmanager
def _quiet_loggers(*names: str):
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@dataclass(frozen=True)
class Prediction:
    """One image's most likely label and its softmax probability."""

    label: str
    confidence: float
    index: int


@dataclass
class ExportedModel:
    """An exported model read back: `run` maps normalized NCHW batches to logits."""

    metadata: dict[str, Any]
    run: Callable[[torch.Tensor], torch.Tensor]

    @property
    def labels(self) -> list[str]:
        return list(self.metadata["labels"])

    @property
    def image_size(self) -> int:
        return int(self.metadata["input"]["image_size"])

    @property
    def channels(self) -> int:
        return int(self.metadata["input"]["channels"])

    @property
    def normalization(self) -> tuple[list[float] | None, list[float] | None]:
        """The per-channel (mean, std) the model's inputs are normalized with; (None, None) in
        a version-1 file, whose inputs are always in [-1, 1]."""
        spec = self.metadata["input"]
        return spec.get("mean"), spec.get("std")

    def read_images(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Decode image files as the model expects them: uint8 (N, H, W, C).

        Raises:
            UserError: naming the first file that is missing or not a readable image.
        """
        from fedssl.data.sources.image_folder import BadImage, read_image

        images = []
        for path in map(Path, paths):
            if not path.is_file():
                what = "is a folder; give image files (e.g. a folder/*.png glob)" if path.is_dir() else "does not exist"
                raise UserError(f"{path} {what}")
            try:
                images.append(read_image(path, self.image_size, self.channels))
            except BadImage as error:
                raise UserError(f"{path}: unreadable image ({error})") from None
        return np.stack(images)

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> list[Prediction]:
        """The most likely label of each uint8 (N, H, W, C) image, with its probability."""
        predictions = []
        for start in range(0, len(images), batch_size):
            probabilities = self.run(to_tensor(images[start : start + batch_size], *self.normalization)).softmax(dim=1)
            confidence, index = probabilities.max(dim=1)
            predictions += [Prediction(self.labels[i], float(c), int(i)) for c, i in zip(confidence, index.tolist())]
        return predictions


def load_exported(path: str | Path, *, trust_code: bool = False) -> ExportedModel:
    """Read a model written by `export_model`.

    Args:
        path: an export folder (its model.safetensors and model.json), either file of
            a safetensors export, or a model.onnx, model.pt2 or model.pt file.
        trust_code: load pt2 and TorchScript files, which are programs that can run
            any code when loaded (`--trust-model-code`); only for files you trust.

    Raises:
        UserError: a missing file, a program without `trust_code`, a file that is not
            a fedssl export or whose description or weights fedssl cannot use safely
            (naming the field), or an ONNX export without onnxruntime installed.
    """
    path = Path(path)
    if path.is_dir() and (path / FORMATS[DEFAULT_FORMAT]).is_file():
        path = path / FORMATS[DEFAULT_FORMAT]
    if not path.is_file():
        what = f"is a folder without {FORMATS[DEFAULT_FORMAT]}" if path.is_dir() else "does not exist"
        raise UserError(f"{path} {what} (expected a model written by fedssl personalize)")
    export_format = _SUFFIXES.get(path.suffix.lower(), "torchscript")
    if export_format in CODE_FORMATS and not trust_code:
        # Refused before torch opens the file: reading it is what runs its code.
        raise UserError(f"{path}: a {CODE_FORMATS[export_format]} model is a program that can run any code when "
                        f"loaded; pass {TRUST_FLAG} only for a file you trust as a script, or export the default "
                        f"safetensors format")
    if export_format == "safetensors":
        return _load_safetensors_pair(path)
    return _load_bytes(path.read_bytes(), export_format, str(path))


def _load_bytes(data: bytes, export_format: str, name: str) -> ExportedModel:
    """An onnx, pt2 or TorchScript export from its bytes (the caller decided to trust programs)."""
    not_ours = f"{name}: not a model exported by fedssl personalize"
    if export_format == "onnx":
        return _load_onnx(data, name, not_ours)
    extra = {METADATA: ""}
    try:
        if export_format == "pt2":
            module = torch.export.load(io.BytesIO(data), extra_files=extra).module()
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
                module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra).eval()
    except Exception:  # torch raises RuntimeError, ValueError, ... on a file that is not a program it wrote
        raise UserError(f"{not_ours} (not a {CODE_FORMATS[export_format]} file)") from None
    return _checked(ExportedModel(metadata=_parse_description(extra[METADATA], name), run=module), name)


def _load_onnx(data: bytes, name: str, not_ours: str) -> ExportedModel:
    if importlib.util.find_spec("onnxruntime") is None:
        raise UserError(f"{name}: predicting with an ONNX model needs onnxruntime: pip install 'fedssl[onnx]'")
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own exception types on a file that is not ONNX
        raise UserError(f"{not_ours} (not an ONNX file)") from None
    metadata = _parse_description(session.get_modelmeta().custom_metadata_map.get(METADATA, ""), name)
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])

    return _checked(ExportedModel(metadata=metadata, run=run), name)


def _parse_description(text: str | bytes, name: str) -> dict[str, Any]:
    """The JSON description embedded in (or beside) an export, checked field by field."""
    if not text:
        raise UserError(f"{name}: not a model exported by fedssl personalize (it has no {METADATA} with its labels "
                        "and input spec)")
    if len(text) > MAX_DESCRIPTION_BYTES:
        raise UserError(f"{name}: its description is {len(text)} bytes, more than fedssl reads "
                        f"({MAX_DESCRIPTION_BYTES}); not a model exported by fedssl personalize")
    try:
        description = json.loads(text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):  # RecursionError: brackets nested thousands deep
        raise UserError(f"{name}: not a model exported by fedssl personalize (its description is not JSON)") from None
    check_description(description, name)
    return description


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (whose second value a reader could miss)."""
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        raise ValueError("a key given twice")
    return dict(pairs)


def _checked(exported: ExportedModel, name: str) -> ExportedModel:
    """`exported` once its network takes the described input and gives one finite logit per label."""
    labels, size, channels = exported.labels, exported.image_size, exported.channels
    try:
        with torch.no_grad():
            logits = exported.run(torch.zeros(1, channels, size, size))
    except Exception:  # whatever the network raises on an input it was not built for
        raise UserError(f"{name}: the network does not take the {channels}x{size}x{size} images its description "
                        "names; export the model again with fedssl personalize") from None
    if tuple(logits.shape) != (1, len(labels)):
        raise UserError(f"{name}: the network gives outputs of shape {tuple(logits.shape[1:])}, its description names "
                        f"{len(labels)} labels; export the model again with fedssl personalize")
    if not torch.isfinite(logits).all():
        raise UserError(f"{name}: the network's outputs are not finite numbers; export the model again")
    return exported


# --- the safetensors format: the description, then the network fedssl builds, then the tensors ----


def _load_safetensors_pair(path: Path) -> ExportedModel:
    weights, description = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for file in (weights, description):
        if not file.is_file():
            raise UserError(f"{file} does not exist; a safetensors export is {weights.name} and {description.name} "
                            "side by side, as fedssl personalize writes them")
    if description.stat().st_size > MAX_DESCRIPTION_BYTES:
        raise UserError(f"{description}: larger than a model description fedssl reads ({MAX_DESCRIPTION_BYTES} bytes)")
    try:
        text = description.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{description}: not a model description (not UTF-8 text)") from None
    with weights.open("rb") as file:
        return _load_safetensors(file, _parse_description(text, str(description)), str(weights))


def _load_safetensors(file: BinaryIO, description: dict[str, Any], name: str) -> ExportedModel:
    """The network the (checked) `description` names, given the weights in `file` once
    their header matches its tensors exactly."""
    from safetensors.torch import load

    for key in ("model", "weights"):
        if key not in description:
            raise UserError(f"{name}: its description has no {key} section; export the model again")
    expected = _build(description, name, meta=True).state_dict()  # names, shapes and dtypes, nothing allocated
    header, data_size = _read_header(file, name)
    _check_header(header, expected, data_size, name)
    file.seek(0)
    data = file.read()  # as many bytes as the network's tensors take, once the header is checked
    if hashlib.sha256(data).hexdigest() != description["weights"]["sha256"]:
        raise UserError(f"{name}: these weights are not the ones its description was written with (their SHA-256 "
                        "differs); export the model again")
    try:
        tensors = load(data)
    except Exception:  # safetensors' own checks, should the header check above have missed one
        raise UserError(f"{name}: not a safetensors file fedssl can read") from None
    if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        raise UserError(f"{name}: holds weights that are not finite numbers (NaN or infinity); export the model again")
    network = _build(description, name)
    network.load_state_dict(tensors, strict=True)  # every name and shape was checked above
    return _checked(ExportedModel(metadata=description, run=network.eval()), name)


def _build(description: dict[str, Any], name: str, meta: bool = False) -> nn.Module:
    """The network of a checked description, from fedssl's own factory (on the meta
    device: its tensors' shapes without memory, whatever sizes a description asks for)."""
    from fedssl.config.schema import ModelConfig
    from fedssl.models.factory import build_model

    spec, model = description["input"], description["model"]
    try:
        with torch.device("meta") if meta else nullcontext():
            return build_model(ModelConfig(name=model["name"], kwargs=dict(model["kwargs"])), len(description["labels"]),
                               spec["channels"], spec["image_size"])
    except UserError as error:
        raise UserError(f"{name}: {error}") from None
    except Exception as error:  # a model's constructor raises any type on arguments it cannot take
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{name}: fedssl cannot build {model['name']} from its description's model.kwargs and input "
                        f"({type(error).__name__}: {first})") from None


def _read_header(file: BinaryIO, name: str) -> tuple[bytes, int]:
    """A safetensors file's JSON header and the size of the tensor data after it."""
    prefix = file.read(8)
    size = file.seek(0, io.SEEK_END)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
        raise UserError(f"{name}: not a safetensors file (its header length {length} does not fit its {size} bytes)")
    file.seek(8)
    return file.read(length), size - 8 - length


def _check_header(raw: bytes, expected: Mapping[str, torch.Tensor], data_size: int, name: str) -> None:
    """Refuse a header unless it lists exactly the network's tensors, each with the
    network's dtype and shape and the bytes these take, laid end to end over the data."""
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):
        raise UserError(f"{name}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{name}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    unknown, missing = sorted(header.keys() - expected.keys()), sorted(expected.keys() - header.keys())
    if unknown or missing:
        what = f"holds {unknown[0]!r}, which" if unknown else f"lacks {missing[0]!r}, which"
        raise UserError(f"{name}: {what} the network its description names {'does not have' if unknown else 'has'}")
    spans = []
    for key, tensor in expected.items():
        entry, want = header[key], (_DTYPES.get(tensor.dtype), list(tensor.shape))
        have = (entry.get("dtype"), entry.get("shape")) if isinstance(entry, dict) else (None, None)
        if have != want or not all(map(_is_int, have[1])):
            raise UserError(f"{name}: tensor {key!r} is {have[0]} {have[1]}, the network expects {want[0]} {want[1]}")
        offsets, length = entry.get("data_offsets"), tensor.numel() * tensor.element_size()
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
                and offsets[1] - offsets[0] == length):
            raise UserError(f"{name}: tensor {key!r} has data offsets {offsets!r}, which do not span its {length} bytes")
        spans.append(offsets)
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise UserError(f"{name}: its tensors' data {'overlap' if begin < end else 'leave a gap'} at byte {begin}")
        end = stop
    if end != data_size:
        raise UserError(f"{name}: its header describes {end} bytes of tensor data, the file holds {data_size}")
