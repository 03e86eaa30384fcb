"""Build the model a recipe names: any timm model, or one of fedssl's FL CNNs.

fedssl never downloads weights. `pretrained: true` loads the local file named by
`model.checkpoint` through timm's own pretrained-loading path (`pretrained=True`
with `pretrained_cfg_overlay=dict(file=...)`): a weights file given as `file` takes
priority over every remote source in timm's resolution order, so neither the
Hugging Face Hub nor a URL is consulted. That path also adapts the first
convolution to `in_chans` (summing or repeating channels), applies the model's
checkpoint filter (e.g. ViT position-embedding resampling for another image size),
and drops a classifier whose class count differs from `num_classes`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from timm.models import get_pretrained_cfg, load_state_dict

import fedssl.models.cnn as _cnn  # registers fedssl's CNNs with timm
import fedssl.models.vgg  # noqa: F401 - registers vgg9_cnn (FedMA's VGG-9) with timm
from fedssl.config.schema import ModelConfig
from fedssl.errors import UserError
from fedssl.registry import did_you_mean
from fedssl.tracking.quiet import quiet_logger

__all__ = ["build_model", "model_names"]

# create_model arguments fedssl sets itself; a recipe may not pass them in model.kwargs.
_RESERVED_KWARGS = {
    "num_classes": "it comes from the data",
    "in_chans": "it comes from data.channels",
    "img_size": "it comes from data.image_size",
    "pretrained": "use model.pretrained",
    "pretrained_cfg": "use model.checkpoint",
    "pretrained_cfg_overlay": "use model.checkpoint",
    "checkpoint_path": "use model.checkpoint",
    "cache_dir": "fedssl never downloads weights",
}


def model_names() -> list[str]:
    """fedssl's own models (the FL CNNs registered with timm), sorted."""
    return sorted(_cnn.MODEL_NAMES)


def build_model(cfg: ModelConfig, num_classes: int, in_chans: int, image_size: int) -> torch.nn.Module:
    """A timm model for `num_classes` classes and `in_chans` x `image_size` x `image_size` inputs.

    - `cfg.name`: any timm model name (`timm.list_models()`) or one of `model_names()`.
    - `img_size=image_size` is passed to models whose architecture depends on the input
      size, i.e. whose timm pretrained cfg has `fixed_input_size` (fedssl's CNNs, ViTs,
      Swin, ...); convolutional nets with global pooling get no `img_size`.
    - `cfg.kwargs` go to `timm.create_model` unchanged (e.g. `drop_rate`); the
      arguments fedssl sets itself (num_classes, in_chans, img_size, pretrained*, ...)
      are refused there.
    - Weights: `pretrained: true` loads `cfg.checkpoint`, a local state dict (.pth/.pt/
      .bin via `torch.load(weights_only=True)`, or .safetensors; a dict holding it under
      'state_dict'/'model' works too) of the same architecture. The first convolution
      is adapted when the checkpoint has another channel count, and a classifier for a
      different number of classes is dropped (the new one stays randomly initialized);
      every other tensor must be present with the model's shape.
      `pretrained: true` without a checkpoint is an error (fedssl never downloads
      weights), and so is a checkpoint with `pretrained: false`: rather than silently
      ignoring weights the recipe names, fedssl asks for the two to agree.

    Raises:
        UserError: unknown model name, reserved or unknown kwargs, a missing,
            unreadable or non-fitting checkpoint.
    """
    name = cfg.name
    if not isinstance(name, str) or not name or not timm.is_model(name):
        raise UserError(f"model.name: unknown model {name!r}{did_you_mean(str(name), timm.list_models())}")
    kwargs = _plain_kwargs(cfg.kwargs)
    for key, why in _RESERVED_KWARGS.items():
        if key in kwargs:
            raise UserError(f"model.kwargs.{key}: fedssl sets this argument itself ({why})")
    kwargs.update(num_classes=num_classes, in_chans=in_chans)
    if _fixed_input_size(name):
        kwargs["img_size"] = image_size

    checkpoint = str(cfg.checkpoint or "").strip()
    if not cfg.pretrained:
        if checkpoint:
            raise UserError(
                f"model.checkpoint is set ({checkpoint!r}) but model.pretrained is false; "
                "set pretrained: true to load it, or clear checkpoint to start from random weights"
            )
        return _create(name, kwargs)
    if not checkpoint:
        raise UserError("model.checkpoint: pretrained: true needs a local model.checkpoint; fedssl never downloads weights")
    return _create_from_checkpoint(name, kwargs, Path(checkpoint).expanduser())


def _plain_kwargs(kwargs: Any) -> dict[str, Any]:
    if kwargs is None:
        return {}
    try:  # an OmegaConf node when the recipe was not converted to dataclasses
        from omegaconf import DictConfig, OmegaConf

        if isinstance(kwargs, DictConfig):
            return dict(OmegaConf.to_container(kwargs, resolve=True))
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(kwargs, Mapping):
        raise UserError(f"model.kwargs: expected a mapping of keyword arguments, got {type(kwargs).__name__}")
    return dict(kwargs)


def _fixed_input_size(name: str) -> bool:
    """Whether the architecture is built for one input size (and takes `img_size`)."""
    try:
        pretrained_cfg = get_pretrained_cfg(name)
    except RuntimeError as e:  # an invalid pretrained tag, e.g. 'resnet18.nope'
        raise UserError(f"model.name: {e}") from e
    return bool(pretrained_cfg is not None and pretrained_cfg.fixed_input_size)


def _create(name: str, kwargs: dict[str, Any], **timm_args: Any) -> torch.nn.Module:
    try:
        return timm.create_model(name, **timm_args, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise UserError(f"model.kwargs: {name} does not accept an argument: {e}") from e
        raise


def _create_from_checkpoint(name: str, kwargs: dict[str, Any], path: Path) -> torch.nn.Module:
    if not path.exists():
        raise UserError(f"model.checkpoint: file not found: {path}")
    if not path.is_file():
        raise UserError(f"model.checkpoint: {path} is not a file")
    try:
        state_dict = load_state_dict(str(path), weights_only=True)
    except Exception as e:  # unreadable, truncated, a pickle with arbitrary objects, ...
        raise UserError(f"model.checkpoint: cannot read weights from {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"model.checkpoint: {path} does not hold a state dict (a mapping of names to tensors)")

    default_cfg = get_pretrained_cfg(name)
    classifiers = _as_tuple(default_cfg.classifier if default_cfg else None)
    first_convs = _as_tuple(default_cfg.first_conv if default_cfg else None)
    base_size = tuple(default_cfg.input_size) if default_cfg else (3, 224, 224)

    # Describe the *checkpoint* to timm so it adapts it to the requested model:
    # its class count (a different one drops the classifier) and input channels
    # (a different one adapts the first conv).
    ckpt_classes = 0
    if classifiers and f"{classifiers[0]}.weight" in state_dict:
        ckpt_classes = int(state_dict[f"{classifiers[0]}.weight"].shape[0])
    ckpt_chans = base_size[0]
    first_weight = state_dict.get(f"{first_convs[0]}.weight") if first_convs else None
    if first_weight is not None and first_weight.ndim == 4:
        ckpt_chans = int(first_weight.shape[1])
    overlay = dict(
        file=str(path),
        # the local file is then the only weight source timm can resolve
        url=None, hf_hub_id=None, hf_hub_filename=None, state_dict=None, source=None,
        num_classes=ckpt_classes,
        input_size=(ckpt_chans, *base_size[1:]),
    )
    head_dropped = ckpt_classes != kwargs["num_classes"]
    skipped = {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")} if head_dropped else set()

    try:
        # timm logs missing/unexpected keys; they are checked here, strictly.
        with quiet_logger("timm.models._builder"):
            model = _create(name, kwargs, pretrained=True, pretrained_cfg_overlay=overlay)
    except (RuntimeError, ValueError, KeyError, AssertionError) as e:
        reference = _create(name, kwargs)  # if the model itself cannot be built, that error is the one to see
        problem = _first_mismatch(reference.state_dict(), state_dict, skipped, first_convs)
        detail = problem or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"model.checkpoint: {path} does not fit {name}: {detail}") from e

    # timm loads non-strictly once it drops the classifier, which would silently
    # skip every tensor of a checkpoint for another architecture: check the keys.
    problem = _first_mismatch(model.state_dict(), state_dict, skipped, first_convs, shapes=False)
    if problem:
        raise UserError(f"model.checkpoint: {path} does not fit {name}: {problem}")
    return model


def _as_tuple(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _first_mismatch(
    model_sd: Mapping[str, torch.Tensor],
    ckpt_sd: Mapping[str, torch.Tensor],
    skipped: set[str],
    first_convs: tuple[str, ...],
    shapes: bool = True,
) -> str | None:
    """The first key the checkpoint lacks, has with another shape, or has in excess."""
    adapted = {f"{c}.weight" for c in first_convs}
    for key, tensor in model_sd.items():
        if key in skipped:
            continue
        if key not in ckpt_sd:
            return f"missing key {key!r} (the model expects shape {tuple(tensor.shape)})"
        if not shapes:
            continue
        want, have = tuple(tensor.shape), tuple(ckpt_sd[key].shape)
        if key in adapted and len(want) == len(have) == 4:  # input channels are adapted
            want, have = want[:1] + want[2:], have[:1] + have[2:]
        if want != have:
            return f"key {key!r} has shape {tuple(ckpt_sd[key].shape)} in the checkpoint, the model expects {tuple(tensor.shape)}"
    for key in ckpt_sd:
        if key not in model_sd and key not in skipped:
            return f"unexpected key {key!r} (shape {tuple(ckpt_sd[key].shape)}) that the model does not have"
    return None
