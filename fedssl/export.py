"""Exported models: one file holding the network, its label names and its input spec.

`fedssl personalize` writes one, `fedssl predict` reads one. Two formats:

- ``torchscript`` (default, ``model.pt``): `torch.jit.trace` of the model in eval
  mode, loadable without fedssl or timm, from Python (`torch.jit.load`) or C++
  (libtorch). The metadata is the TorchScript extra file ``fedssl.json``::

      extra = {"fedssl.json": ""}
      model = torch.jit.load("model.pt", _extra_files=extra)
      meta = json.loads(extra["fedssl.json"])

- ``onnx`` (``model.onnx``), when the optional ``onnx`` and ``onnxscript`` packages
  are installed; the batch dimension is dynamic. The metadata is the ONNX metadata
  property ``fedssl.json`` (onnxruntime: `session.get_modelmeta().custom_metadata_map`).
  Predicting from it needs ``onnxruntime``.

The metadata says how to feed the model: ``labels`` (one per output, in order) and
``input``: decode the image, convert it to grayscale (``channels`` 1) or RGB (3),
stretch it to ``image_size`` x ``image_size`` (bilinear), scale uint8 values to
[-1, 1] by x / 127.5 - 1, and lay it out as float32 NCHW; the outputs are logits.
This is what training did (`fedssl.data.sources.image_folder.read_image`,
`fedssl.data.transforms.to_tensor`), and what `ExportedModel.predict` does.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import warnings
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

__all__ = ["FORMATS", "ExportedModel", "Prediction", "export_model", "load_exported", "model_metadata", "model_path"]

FORMATS = {"torchscript": "model.pt", "onnx": "model.onnx"}
METADATA = "fedssl.json"
FORMAT_NAME = "fedssl-model"
FORMAT_VERSION = 1
_ONNX_PACKAGES = ("onnx", "onnxscript")


def model_metadata(class_names: Sequence[str], image_size: int, channels: int, **extra: Any) -> dict[str, Any]:
    """The metadata stored with an exported model (see the module docstring)."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "labels": list(class_names),
        "input": {
            "image_size": image_size,
            "channels": channels,
            "color": "grayscale" if channels == 1 else "rgb",
            "resize": "stretch to image_size x image_size, bilinear",
            "scale": 1 / 127.5,
            "offset": -1.0,
            "normalize": "x / 127.5 - 1: uint8 0..255 to [-1, 1]",
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
                f"pip install 'fedssl[onnx]'"
            )
    return Path(out_dir) / FORMATS[export_format]


def export_model(model: nn.Module, path: str | Path, metadata: dict[str, Any], export_format: str = "torchscript") -> Path:
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
        if export_format == "torchscript":
            data = _torchscript_bytes(model, probe, text)
        else:
            data = _onnx_bytes(model, probe, text)
        exported = _load_bytes(data, export_format, str(path))
        torch.testing.assert_close(exported.run(probe), expected, rtol=1e-4, atol=1e-4)
        atomic_write(path, lambda file: file.write(data))
    finally:
        model.train(was_training)
    return path


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
            probabilities = self.run(to_tensor(images[start : start + batch_size])).softmax(dim=1)
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
    export_format = "onnx" if path.suffix.lower() == ".onnx" else "torchscript"
    return _load_bytes(path.read_bytes(), export_format, str(path))


def _load_bytes(data: bytes, export_format: str, name: str) -> ExportedModel:
    not_ours = f"{name}: not a model exported by fedssl personalize"
    if export_format == "onnx":
        return _load_onnx(data, name, not_ours)
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
    if metadata.get("version") != FORMAT_VERSION:
        raise UserError(f"{name}: fedssl model format {metadata.get('version')!r}; this fedssl reads "
                        f"format {FORMAT_VERSION}")
    return metadata
