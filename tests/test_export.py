"""Exported models: every format computes what the in-process model computes, carries its
labels and input spec, and a .pt2 archive that would unpickle code is refused unread."""

from __future__ import annotations

import importlib.util
import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from fedssl.config.schema import ModelConfig
from fedssl.errors import UserError
from fedssl.export import DEFAULT_FORMAT, FORMATS, export_model, load_exported, model_metadata
from fedssl.models.factory import build_model

LABELS = ["a", "b", "c"]


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="fedavg_cnn_bn"), len(LABELS), 1, 28)
    with torch.no_grad():  # BatchNorm statistics other than the identity, as after training
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return net.train()


@pytest.mark.parametrize("export_format", list(FORMATS))
def test_each_format_computes_what_the_model_computes(export_format, tmp_path):
    if export_format == "onnx" and any(importlib.util.find_spec(p) is None for p in ("onnx", "onnxscript", "onnxruntime")):
        pytest.skip("the onnx extra is not installed")
    net = model()
    path = export_model(net, tmp_path / FORMATS[export_format], model_metadata(LABELS, 28, 1), export_format)
    assert net.training  # its mode is given back
    exported = load_exported(path)
    assert exported.labels == LABELS and (exported.image_size, exported.channels) == (28, 1)
    x = torch.rand(5, 1, 28, 28) * 2 - 1  # a batch size the export never saw
    with torch.no_grad():
        torch.testing.assert_close(exported.run(x), net.eval()(x), rtol=1e-5, atol=1e-5)


def test_pt2_is_the_default():
    assert DEFAULT_FORMAT == "pt2" and FORMATS["pt2"] == "model.pt2"


class Touch:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_pt2_archive_that_would_unpickle_code_is_refused(tmp_path):
    path = export_model(model(), tmp_path / "model.pt2", model_metadata(LABELS, 28, 1))
    marker = tmp_path / "ran"
    rogue = tmp_path / "rogue.pt2"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(rogue, "w") as target:
        for entry in source.namelist():
            data = source.read(entry)
            if entry.endswith("sample_inputs/model.pt"):
                buffer = io.BytesIO()
                torch.save({"inputs": Touch(marker)}, buffer)
                data = buffer.getvalue()
            target.writestr(entry, data)
    with pytest.raises(UserError, match="sample inputs are not plain tensors"):
        load_exported(rogue)
    assert not marker.exists()

    pickled = tmp_path / "pickled.pt2"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(pickled, "w") as target:
        for entry in source.namelist():
            data = source.read(entry)
            if entry.endswith("model_weights_config.json"):
                data = data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
            target.writestr(entry, data)
    with pytest.raises(UserError, match="pickled object"):
        load_exported(pickled)


def test_a_file_that_is_not_a_pt2_archive(tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(UserError, match="not a .pt2 archive"):
        load_exported(junk)


def test_a_pt2_program_with_constants_and_buffers_reads_back(tmp_path):
    """Non-persistent buffers and tensors made in forward are stored as constants (tensor_N)."""
    class Shifted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 3, 3)
            self.register_buffer("scale", torch.tensor([1.0, 2.0, 3.0]), persistent=False)

        def forward(self, x):
            return self.conv(x).mean((2, 3)) * self.scale + torch.tensor([1.0, 2.0, 3.0])

    net = Shifted()
    exported = load_exported(export_model(net, tmp_path / "model.pt2", model_metadata(LABELS, 8, 1)))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(exported.run(x), net(x))
