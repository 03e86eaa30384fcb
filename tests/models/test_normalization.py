"""Input normalization: fedssl's [-1, 1] by default, a pretrained checkpoint's own mean and
std (timm's data config), or the recipe's model.mean / model.std."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data import resolve_model_data_config

from fedssl.config.schema import ModelConfig
from fedssl.data.transforms import to_tensor
from fedssl.errors import UserError
from fedssl.models.factory import build_model, input_normalization

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    """resnet18's weights in a local file, as a user would bring them (no download)."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(build_model(ModelConfig(name="resnet18"), 7, 3, 32).state_dict(), path)
    return path


def test_a_pretrained_model_is_fed_its_checkpoints_mean_and_std(resnet_weights):
    cfg = ModelConfig(name="resnet18", pretrained=True, checkpoint=str(resnet_weights))
    model = build_model(cfg, 7, 3, 32)
    timm_config = resolve_model_data_config(model)
    mean, std = input_normalization(cfg, 3)
    assert (mean, std) == (tuple(timm_config["mean"]), tuple(timm_config["std"])) == IMAGENET
    # Gray (1 channel): the first convolution is summed over RGB, so the means of the three
    assert input_normalization(cfg, 1) == ((pytest.approx(0.449),), (pytest.approx(0.226),))

    image = np.zeros((1, 2, 2, 3), np.uint8)
    image[0, 0, 0] = (255, 0, 51)
    x = to_tensor(image, mean, std)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]))
    torch.testing.assert_close(x[0, :, 1, 1], torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))


def test_without_pretrained_weights_inputs_stay_in_minus_one_one():
    assert input_normalization(ModelConfig(name="resnet18"), 3) == ((0.5,) * 3, (0.5,) * 3)
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 1), dtype=np.uint8)
    assert torch.equal(to_tensor(images, (0.5,), (0.5,)), to_tensor(images))  # the same numbers, bit for bit
    assert float(to_tensor(np.full((1, 1, 1, 1), 255, np.uint8))) == 1.0


def test_the_recipes_mean_and_std_win(resnet_weights):
    cfg = ModelConfig(name="resnet18", pretrained=True, checkpoint=str(resnet_weights), mean=[0.1, 0.2, 0.3], std=[0.4])
    assert input_normalization(cfg, 3) == ((0.1, 0.2, 0.3), (0.4, 0.4, 0.4))


@pytest.mark.parametrize("mean, std, message", [
    ([0.1, 0.2], [0.5], r"model.mean: one value or one per channel \(data.channels=3\)"),
    ([0.1], [], r"model.std: give model.mean and model.std together"),
    ([0.1], [0.0], r"model.std: every value must be > 0"),
])
def test_a_bad_mean_or_std_names_the_key(mean, std, message):
    with pytest.raises(UserError, match=message):
        input_normalization(ModelConfig(mean=mean, std=std), 3)
