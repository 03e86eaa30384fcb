"""Exported models: every format computes what the in-process model computes and carries
its labels and input spec; the default format is data that fedssl rebuilds the network
from. Hostile files are in test_export_attacks.py."""

from __future__ import annotations

import importlib.util
import json

import pytest
import safetensors.torch
import torch

from fedssl.config.schema import ModelConfig
from fedssl.errors import UserError
from fedssl.export import CODE_FORMATS, DEFAULT_FORMAT, FORMATS, export_model, load_exported, model_metadata
from fedssl.models.factory import build_model

LABELS = ["a", "b", "c"]
ARCHITECTURE = {"name": "fedavg_cnn_bn", "kwargs": {}}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="fedavg_cnn_bn"), len(LABELS), 1, 28)
    with torch.no_grad():  # BatchNorm statistics other than the identity, as after training
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return net.train()


def metadata(**changes) -> dict:
    return model_metadata(LABELS, 28, 1, model=ARCHITECTURE, **changes)


@pytest.mark.parametrize("export_format", list(FORMATS))
def test_each_format_computes_what_the_model_computes(export_format, tmp_path):
    if export_format == "onnx" and any(importlib.util.find_spec(p) is None for p in ("onnx", "onnxscript", "onnxruntime")):
        pytest.skip("the onnx extra is not installed")
    net = model()
    path = export_model(net, tmp_path / FORMATS[export_format], metadata(), export_format)
    assert net.training  # its mode is given back
    exported = load_exported(path, trust_code=export_format in CODE_FORMATS)
    assert exported.labels == LABELS and (exported.image_size, exported.channels) == (28, 1)
    x = torch.rand(5, 1, 28, 28) * 2 - 1  # a batch size the export never saw
    with torch.no_grad():
        torch.testing.assert_close(exported.run(x), net.eval()(x), rtol=1e-5, atol=1e-5)


def test_safetensors_is_the_default_and_loads_from_either_file_or_the_folder(tmp_path):
    assert DEFAULT_FORMAT == "safetensors" and FORMATS["safetensors"] == "model.safetensors"
    path = export_model(model(), tmp_path / "model.safetensors", metadata())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]  # no temporary left
    for given in (tmp_path, tmp_path / "model.json", path):
        assert load_exported(given).labels == LABELS


def test_the_export_loads_in_plain_python_as_the_docs_show(tmp_path):
    """docs/personalization.md: the JSON, safetensors.torch.load_file, and timm for the architecture."""
    import timm

    torch.manual_seed(0)
    net = build_model(ModelConfig(name="resnet10t", kwargs={"drop_rate": 0.1}), len(LABELS), 1, 32).eval()
    export_model(net, tmp_path / "model.safetensors",
                 model_metadata(LABELS, 32, 1, model={"name": "resnet10t", "kwargs": {"drop_rate": 0.1}}))
    meta = json.load(open(tmp_path / "model.json"))
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    rebuilt = timm.create_model(meta["model"]["name"], num_classes=len(meta["labels"]),
                                in_chans=meta["input"]["channels"], **meta["model"]["kwargs"])
    rebuilt.load_state_dict(weights)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), net(x))
    assert meta["fedssl_version"] and len(meta["weights"]["sha256"]) == 64


def test_a_network_the_registry_cannot_rebuild_is_not_exported_as_safetensors(tmp_path):
    net = model()
    net.fc = torch.nn.Linear(net.fc.in_features, len(LABELS), bias=False)  # not what fedavg_cnn_bn builds
    with pytest.raises(UserError, match="'fc.bias'"):
        export_model(net, tmp_path / "model.safetensors", metadata())
    assert not any(tmp_path.iterdir())


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
    path = export_model(net, tmp_path / "model.pt2", model_metadata(LABELS, 8, 1), "pt2")
    exported = load_exported(path, trust_code=True)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(exported.run(x), net(x))
