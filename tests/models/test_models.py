"""fedssl's FL CNNs, the model factory (names, kwargs, local checkpoints) and the body/head split."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from fedssl.config.schema import ModelConfig
from fedssl.errors import UserError
from fedssl.models.factory import build_model, model_names
from fedssl.models.split import head_parameter_names, select_parameters, split_body_head

NUM_CLASSES = 7
TIMM_MODELS = ["resnet18", "mobilenetv3_small_050"]


class NetworkAccess(BaseException):
    """Not an Exception, so no error handling on the way can turn it into a UserError."""


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the network: every timm download entry point raises."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import timm.models._builder as builder
    import timm.models._hub as hub

    def no_network(*args, **kwargs):
        raise NetworkAccess("tried to download weights")

    for module in (builder, hub):
        for fn in ("download_cached_file", "load_state_dict_from_url", "load_state_dict_from_hf", "load_custom_from_hf"):
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, no_network)


def build(name="fedavg_cnn", num_classes=NUM_CLASSES, in_chans=1, image_size=28, **cfg) -> torch.nn.Module:
    return build_model(ModelConfig(name=name, **cfg), num_classes, in_chans, image_size)


def same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip))


# ----------------------------------------------------------------------------- the CNNs


def test_model_names_are_registered_timm_models():
    assert model_names() == ["fedavg_cnn", "fedavg_cnn_bn"]
    for name in model_names():
        assert timm.is_model(name)
        model = timm.create_model(name)  # timm's own defaults: MNIST-sized 1-channel input, 10 classes
        assert (model.in_chans, model.num_classes, model.img_size) == (1, 10, (28, 28))
        assert model.pretrained_cfg["classifier"] == "fc"
        assert model.default_cfg is model.pretrained_cfg
        assert model.get_classifier() is model.fc


def test_cnn_has_no_remote_weights():
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("fedavg_cnn", pretrained=True)


def test_the_offline_guard_works():
    with pytest.raises(NetworkAccess):
        timm.create_model("resnet18", pretrained=True)


@pytest.mark.parametrize("image_size, flat", [(28, 1024), (32, 1600), (48, 5184)])
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", model_names())
def test_cnn_shapes(name, in_chans, image_size, flat):
    model = build(name, in_chans=in_chans, image_size=image_size).eval()
    assert model.flat_features == flat
    assert model.fc1.in_features == flat
    assert (model.num_classes, model.num_features) == (NUM_CLASSES, 512)
    x = torch.randn(2, in_chans, image_size, image_size)
    features = model.forward_features(x)
    assert features.shape == (2, 512)
    assert torch.equal(model.forward_head(features, pre_logits=True), features)
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.allclose(logits, model.fc(features))
    assert (model.bn1.__class__.__name__ == "BatchNorm2d") == name.endswith("_bn")


def test_cnn_reset_classifier():
    model = build()
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(torch.zeros(1, 1, 28, 28)).shape == (1, 3)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 512)


def test_cnn_rejects_too_small_input():
    with pytest.raises(ValueError, match="too small"):
        build(image_size=12)


# ----------------------------------------------------------------------------- any model


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_build_at_small_inputs(name, in_chans):
    model = build(name, in_chans=in_chans, image_size=32).eval()
    x = torch.randn(2, in_chans, 32, 32)
    assert model(x).shape == (2, NUM_CLASSES)
    pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
    # timm: num_features is forward_features' width; head_hidden_size what the classifier sees
    assert pre_logits.shape == (2, model.head_hidden_size)


def test_fixed_input_size_models_get_img_size():
    model = build("vit_tiny_patch16_224", image_size=32).eval()
    assert model.patch_embed.img_size == (32, 32)
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, NUM_CLASSES)


def test_unknown_model_name_suggests():
    with pytest.raises(UserError, match=r"model\.name: unknown model 'resnet81' \(did you mean 'resnet18'\?\)"):
        build("resnet81")
    with pytest.raises(UserError, match="did you mean 'fedavg_cnn'"):
        build("fedavg_cnnn")
    with pytest.raises(UserError, match="unknown model"):
        build("hf-hub:timm/resnet18.a1_in1k")  # never a hub download


def test_kwargs_pass_through_and_are_checked():
    assert build(kwargs={"drop_rate": 0.25}).drop_rate == 0.25
    with pytest.raises(UserError, match=r"model\.kwargs\.num_classes"):
        build(kwargs={"num_classes": 3})
    with pytest.raises(UserError, match=r"model\.kwargs: .*drop_rat"):
        build(kwargs={"drop_rat": 0.1})


# ----------------------------------------------------------------------------- checkpoints


def test_pretrained_needs_a_local_checkpoint():
    with pytest.raises(UserError, match=r"model\.checkpoint.*never downloads"):
        build(pretrained=True)
    with pytest.raises(UserError, match=r"model\.checkpoint.*model\.pretrained is false"):
        build(checkpoint="weights.pth")


def test_missing_checkpoint_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(UserError, match=f"file not found: {path}"):
        build(pretrained=True, checkpoint=str(path))


def test_unreadable_checkpoint(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=f"cannot read weights from {path}"):
        build(pretrained=True, checkpoint=str(path))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_round_trip(tmp_path, suffix):
    source = build("fedavg_cnn_bn")
    source.bn1.running_mean.normal_()  # buffers travel too
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    loaded = build("fedavg_cnn_bn", pretrained=True, checkpoint=str(path))
    assert same_weights(loaded, source)
    assert not same_weights(build("fedavg_cnn_bn"), source)


def test_checkpoint_with_other_classes_keeps_body_and_reinits_head(tmp_path):
    source = build(num_classes=10)
    path = tmp_path / "ten.pth"
    torch.save({"state_dict": source.state_dict()}, path)  # wrapped dicts are fine too
    loaded = build(num_classes=NUM_CLASSES, pretrained=True, checkpoint=str(path))
    assert loaded.fc.weight.shape == (NUM_CLASSES, 512)
    body, head = split_body_head(loaded)
    assert head == ["fc.weight", "fc.bias"]
    assert all(torch.equal(loaded.get_parameter(n), source.get_parameter(n)) for n in body)


def test_checkpoint_first_conv_adapts_to_channels(tmp_path):
    source = build(in_chans=1)
    path = tmp_path / "gray.pth"
    torch.save(source.state_dict(), path)
    rgb = build(in_chans=3, pretrained=True, checkpoint=str(path))
    assert rgb.conv1.weight.shape == (32, 3, 5, 5)
    assert torch.allclose(rgb.conv1.weight.sum(dim=1, keepdim=True), source.conv1.weight)
    assert torch.equal(rgb.fc1.weight, source.fc1.weight)


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(timm.create_model("mobilenetv3_small_050", num_classes=NUM_CLASSES).state_dict(), path)
    with pytest.raises(UserError, match=f"{path} does not fit fedavg_cnn: missing key 'conv1.weight'"):
        build(pretrained=True, checkpoint=str(path))


def test_checkpoint_of_another_input_size(tmp_path):
    path = tmp_path / "cnn28.pth"
    torch.save(build(image_size=28).state_dict(), path)
    with pytest.raises(UserError, match=rf"{path} does not fit fedavg_cnn: key 'fc1\.weight' has shape \(512, 1024\)"):
        build(image_size=32, pretrained=True, checkpoint=str(path))
    with pytest.raises(UserError, match=f"{path} does not fit fedavg_cnn_bn: missing key 'bn1.weight'"):
        build("fedavg_cnn_bn", pretrained=True, checkpoint=str(path))


# ----------------------------------------------------------------------------- body / head


@pytest.mark.parametrize("name", model_names() + TIMM_MODELS + ["vit_tiny_patch16_224"])
def test_split_body_head(name):
    model = build(name, image_size=32)
    names = [n for n, _ in model.named_parameters()]
    body, head = split_body_head(model)
    assert not set(body) & set(head)
    assert sorted(body + head) == sorted(names)
    classifier = {id(p) for p in model.get_classifier().parameters()}
    assert head == [n for n, p in model.named_parameters() if id(p) in classifier] == head_parameter_names(model)
    assert len(head) == 2
    model.reset_classifier(0)
    assert head_parameter_names(model) == []
    assert split_body_head(model)[0] == [n for n, _ in model.named_parameters()]


def test_split_falls_back_to_pretrained_cfg():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 4)
            self.out = torch.nn.Linear(4, 2)
            self.pretrained_cfg = {"classifier": "out"}

    assert split_body_head(Plain()) == (["body.weight", "body.bias"], ["out.weight", "out.bias"])
    with pytest.raises(UserError, match="by pattern"):
        head_parameter_names(torch.nn.Linear(2, 2))


def test_select_parameters():
    model = build("fedavg_cnn_bn")
    assert select_parameters(model, ["bn*"]) == ["bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"]
    assert select_parameters(model, ["fc.*", "conv1.*"]) == ["conv1.weight", "fc.weight", "fc.bias"]
    assert select_parameters(model, []) == []
    with pytest.raises(UserError, match="'norm\\*' matches no parameter"):
        select_parameters(model, ["bn*", "norm*"])
