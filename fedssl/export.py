"""Exported models: one file holding the network, its label names and its input spec.

`fedssl personalize` writes one, `fedssl predict` reads one. Three formats:

- ``pt2`` (default, ``model.pt2``): `torch.export` of the model in eval mode with a
  dynamic batch dimension, the format torch maintains (TorchScript is deprecated);
  loadable without fedssl or timm (`torch.export.load(...).module()`), and compiled
  for a server or a phone by AOTInductor or ExecuTorch. The metadata is the extra
  file ``fedssl.json``::

      extra = {"fedssl.json": ""}
      model = torch.export.load("model.pt2", extra_files=extra).module()
      meta = json.loads(extra["fedssl.json"])

  torch.export.load can unpickle parts of an archive; fedssl reads only archives
  whose every part is plain tensors and JSON (`_check_pt2`), and refuses others.

- ``torchscript`` (``model.pt``): `torch.jit.trace` of the model in eval
  mode, loadable from Python (`torch.jit.load`) or C++ (libtorch), kept while torch
  supports it. The metadata is the TorchScript extra file ``fedssl.json``::

      extra = {"fedssl.json": ""}
      model = torch.jit.load("model.pt", _extra_files=extra)
      meta = json.loads(extra["fedssl.json"])

- ``onnx`` (``model.onnx``), when the optional ``onnx`` and ``onnxscript`` packages
  are installed; the batch dimension is dynamic. The metadata is the ONNX metadata
  property ``fedssl.json`` (onnxruntime: `session.get_modelmeta().custom_metadata_map`).
  Predicting from it needs ``onnxruntime``.

The metadata says how to feed the model: ``labels`` (one per output, in order) and
``input``: decode the image, convert it to grayscale (``channels`` 1) or RGB (3),
stretch it to ``image_size`` x ``image_size`` (bilinear), normalize uint8 values per
channel by (x / 255 - ``mean``) / ``std`` (0.5 and 0.5, i.e. [-1, 1], unless the model
was built from pretrained weights: then their mean and std), and lay it out as float32
NCHW; the outputs are logits.
This is what training did (`fedssl.data.sources.image_folder.read_image`,
`fedssl.data.transforms.to_tensor`), and what `ExportedModel.predict` does.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import re
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from fedssl.data.transforms import to_tensor
from fedssl.errors import UserError
from fedssl.io import atomic_write

__all__ = ["DEFAULT_FORMAT", "FORMATS", "ExportedModel", "Prediction", "export_model", "load_exported", "model_metadata", "model_path"]

FORMATS = {"pt2": "model.pt2", "torchscript": "model.pt", "onnx": "model.onnx"}
DEFAULT_FORMAT = "pt2"
METADATA = "fedssl.json"
FORMAT_NAME = "fedssl-model"
FORMAT_VERSION = 2  # 2: the input's per-channel mean and std (1: always [-1, 1])
READABLE_VERSIONS = (1, 2)
_ONNX_PACKAGES = ("onnx", "onnxscript")


def model_metadata(class_names: Sequence[str], image_size: int, channels: int, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, **extra: Any) -> dict[str, Any]:
    """The metadata stored with an exported model (see the module docstring); `mean` and
    `std` per channel (None: 0.5 and 0.5, fedssl's [-1, 1])."""
    mean = [float(m) for m in mean] if mean is not None else [0.5] * channels
    std = [float(s) for s in std] if std is not None else [0.5] * channels
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
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
        **extra,
    }


def model_path(out_dir: str | Path, export_format: str) -> Path:
    """Where `export_format` writes in `out_dir`.

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
                f"pip install 'fedssl[onnx]' (or export pt2, the default)"
            )
    return Path(out_dir) / FORMATS[export_format]


def export_model(model: nn.Module, path: str | Path, metadata: dict[str, Any], export_format: str = DEFAULT_FORMAT) -> Path:
    """Write `model` (evaluated in eval mode) with `metadata` to `path`, atomically.

    The exported network is checked against `model` on a random batch before it is
    written, so a file that exists computes what `model` computes.
    """
    path = Path(path)
    model_path(path.parent, export_format)  # the format's own checks
    size, channels = metadata["input"]["image_size"], metadata["input"]["channels"]
    was_training = model.training
    model.eval()
    try:
        probe = torch.rand(3, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with torch.no_grad():
            expected = model(probe)
        text = json.dumps(metadata, indent=2)
        if export_format == "pt2":
            data = _pt2_bytes(model, probe, text)
        elif export_format == "torchscript":
            data = _torchscript_bytes(model, probe, text)
        else:
            data = _onnx_bytes(model, probe, text)
        exported = _load_bytes(data, export_format, str(path))
        torch.testing.assert_close(exported.run(probe), expected, rtol=1e-4, atol=1e-4)
        atomic_write(path, lambda file: file.write(data))
    finally:
        model.train(was_training)
    return path


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
        # kept as the default because libtorch (C++) and older torch still load it.
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


def load_exported(path: str | Path) -> ExportedModel:
    """Read a model written by `export_model`.

    Raises:
        UserError: a missing file, a file that is not a fedssl export, or an ONNX
            export without onnxruntime installed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} {'is a folder' if path.is_dir() else 'does not exist'} (expected a model file "
                        f"written by fedssl personalize)")
    suffix = path.suffix.lower()
    export_format = "onnx" if suffix == ".onnx" else "pt2" if suffix == ".pt2" else "torchscript"
    return _load_bytes(path.read_bytes(), export_format, str(path))


def _load_bytes(data: bytes, export_format: str, name: str) -> ExportedModel:
    not_ours = f"{name}: not a model exported by fedssl personalize"
    if export_format == "onnx":
        return _load_onnx(data, name, not_ours)
    if export_format == "pt2":
        return _load_pt2(data, name, not_ours)
    extra = {METADATA: ""}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    except Exception:  # torch raises RuntimeError, ValueError, ... on a file that is not TorchScript
        raise UserError(f"{not_ours} (not a TorchScript file)") from None
    metadata = _parse_metadata(extra[METADATA], name)
    module.eval()
    return ExportedModel(metadata=metadata, run=module)


# What torch.export.save writes, all of it tensors or JSON (torch 2.6-2.14); torch.export.load
# unpickles weights or constants flagged `use_pickle`, custom objects and sample inputs that
# are not plain tensors, so an archive is read only once these have been checked.
_PT2_DATA = re.compile(r"[^/]+/(data/weights/weight_\d+|data/constants/tensor_\d+|"
                       r"data/(weights|constants)/model_(weights|constants)_config\.json|models/model\.json|"
                       r"data/sample_inputs/model\.pt|extra/[^/]+|archive_format|archive_version|"
                       r"\.data/version|\.data/serialization_id|byteorder|version)")


def _check_pt2(data: bytes, name: str, not_ours: str) -> None:
    """Refuse a .pt2 archive that holds anything torch.export.load would unpickle."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, ValueError):
        raise UserError(f"{not_ours} (not a .pt2 archive)") from None
    unexpected = [n for n in names if not n.endswith("/") and not _PT2_DATA.fullmatch(n)]
    if unexpected or not any(n.endswith("/archive_format") for n in names):
        raise UserError(f"{not_ours} (the .pt2 archive holds {unexpected[0] if unexpected else 'no archive_format'}, "
                        "which fedssl does not load)")
    for entry in names:
        if entry.endswith("_config.json"):
            try:
                config = json.loads(archive.read(entry))["config"]
                pickled = [key for key, payload in config.items()
                           if payload.get("use_pickle") or not str(payload.get("path_name", "")).startswith(
                               ("weight_", "tensor_"))]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise UserError(f"{not_ours} ({entry} is not torch.export's)") from None
            if pickled:
                raise UserError(f"{name}: {pickled[0]!r} is a pickled object, which fedssl does not load; "
                                "export the model again with fedssl personalize")
        elif entry.endswith("sample_inputs/model.pt"):
            try:
                torch.load(io.BytesIO(archive.read(entry)), weights_only=True)
            except Exception:  # anything but tensors and plain containers
                raise UserError(f"{name}: its sample inputs are not plain tensors; fedssl does not load it") from None


def _load_pt2(data: bytes, name: str, not_ours: str) -> ExportedModel:
    _check_pt2(data, name, not_ours)
    extra = {METADATA: ""}
    try:
        program = torch.export.load(io.BytesIO(data), extra_files=extra)
    except Exception:  # torch raises many types on a file that is not a program it wrote
        raise UserError(f"{not_ours} (not a torch.export program)") from None
    metadata = _parse_metadata(extra[METADATA], name)
    return ExportedModel(metadata=metadata, run=program.module())


def _load_onnx(data: bytes, name: str, not_ours: str) -> ExportedModel:
    if importlib.util.find_spec("onnxruntime") is None:
        raise UserError(f"{name}: predicting with an ONNX model needs onnxruntime: pip install 'fedssl[onnx]'")
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own exception types on a file that is not ONNX
        raise UserError(f"{not_ours} (not an ONNX file)") from None
    metadata = _parse_metadata(session.get_modelmeta().custom_metadata_map.get(METADATA, ""), name)
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])

    return ExportedModel(metadata=metadata, run=run)


def _parse_metadata(text: str | bytes, name: str) -> dict[str, Any]:
    not_ours = f"{name}: not a model exported by fedssl personalize"
    if not text:
        raise UserError(f"{not_ours} (it has no {METADATA} with its labels and input spec)")
    try:
        metadata = json.loads(text)
    except ValueError:
        raise UserError(f"{not_ours} (its {METADATA} is not JSON)") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise UserError(f"{not_ours} (its {METADATA} is not fedssl's)")
    if metadata.get("version") not in READABLE_VERSIONS:
        raise UserError(f"{name}: fedssl model format {metadata.get('version')!r}; this fedssl reads "
                        f"formats {', '.join(map(str, READABLE_VERSIONS))}")
    spec = metadata.get("input")
    channels = spec.get("channels") if isinstance(spec, dict) else None
    for key in ("mean", "std"):
        values = spec.get(key) if isinstance(spec, dict) else None
        if metadata["version"] >= 2 and not (isinstance(values, list) and len(values) == channels and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise UserError(f"{name}: its {METADATA} input.{key} is not one number per channel")
    return metadata
