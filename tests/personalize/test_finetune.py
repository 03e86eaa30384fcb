"""The fine-tuning modes on a tiny model, against what each promises."""

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import fedssl.models.cnn  # noqa: F401  (registers the FL CNNs with timm)
from fedssl.config.schema import TrainConfig
from fedssl.data.dataset import ImageDataset
from fedssl.data.transforms import to_tensor
from fedssl.personalize import FineTuneOptions, finetune

SIZE = 28


def images(n: int, seed: int) -> ImageDataset:
    rng = np.random.default_rng(seed)
    return ImageDataset(images=rng.integers(0, 256, (n, SIZE, SIZE, 1), dtype=np.uint8),
                        labels=rng.integers(0, 3, n).astype(np.int64), class_names=("a", "b", "c"))


def bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("fedavg_cnn_bn", num_classes=3, in_chans=1, img_size=SIZE)


def options(**kwargs) -> FineTuneOptions:
    resolved = dict(lr=0.05, batch_size=8, augment="none", seed=0, progress=False)
    return FineTuneOptions(**(resolved | kwargs))


def test_head_mode_leaves_the_body_and_its_batchnorm_statistics_alone():
    model = bn_model()
    start = copy.deepcopy(model.state_dict())
    result = finetune(model, images(24, 1), images(8, 2), options(mode="head", epochs=3, patience=3), TrainConfig())
    assert result.steps == 9  # 3 epochs of 24 // 8 batches: it did train
    for name, value in model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(value, start[name]), f"{name} changed in head mode"
    assert result.best_epoch == 0 or not torch.equal(model.fc.weight, start["fc.weight"])


@pytest.mark.parametrize("mode", ["full", "maml"])
def test_full_and_maml_train_batchnorm_even_from_a_model_in_eval_mode(mode):
    """A run's model is handed over in eval mode; fine-tuning every layer must still
    update BatchNorm's statistics (Lightning keeps the modes it finds)."""
    model = bn_model().eval()
    start = copy.deepcopy(model.state_dict())
    result = finetune(model, images(24, 1), images(8, 2), options(mode=mode, epochs=2, patience=2, steps=2),
                      TrainConfig())
    if result.best_epoch == 0 and mode == "full":  # no epoch beat the start: the start is kept, untouched
        assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    else:
        assert not torch.equal(model.state_dict()["bn1.running_mean"], start["bn1.running_mean"])
    assert not model.training  # handed back ready for inference


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_takes_exactly_k_plain_sgd_steps(steps):
    """With the whole fine-tuning set in one batch, k steps are k gradient steps
    w <- w - lr * grad CE(w) on it, computed here by hand."""
    torch.manual_seed(0)
    model = timm.create_model("fedavg_cnn", num_classes=3, in_chans=1, img_size=SIZE)  # no dropout, no BatchNorm
    train = images(6, 1)
    expected = copy.deepcopy(model)
    x, y = to_tensor(train.images), torch.from_numpy(train.labels)
    for _ in range(steps):
        expected.zero_grad()
        F.cross_entropy(expected(x), y).backward()
        with torch.no_grad():
            for param in expected.parameters():
                param -= 0.1 * param.grad

    result = finetune(model, train, images(4, 2), options(mode="maml", steps=steps, lr=0.1, batch_size=64),
                      TrainConfig(momentum=0.9, weight_decay=0.1))  # the recipe's optimizer is not used
    assert result.steps == steps
    for (name, got), want in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
