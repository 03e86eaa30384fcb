"""A finished (or interrupted) federation's global model, read back from its files.

`fedssl run` leaves `RUN_DIR/checkpoint.pt`, which holds the resolved recipe, the
class names and the server state of the last complete round. The model is rebuilt from the recipe and
given the weights the run's algorithm evaluates and exports
(`Algorithm.global_weights`: the plain parameters for FedAvg and its family,
sigma + psi for FedMatch), so whatever the algorithm, this is the model whose
`global_acc` the run reported.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from fedssl.config.load import merge_config
from fedssl.config.schema import RecipeConfig
from fedssl.config.validate import MAX_CLASSES, validate_model_input
from fedssl.errors import UserError
from fedssl.algorithms.aggregate import ServerState
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.run_dir import CHECKPOINT
from fedssl.models.factory import build_model

__all__ = ["TrainedModel", "checkpoint_path", "load_trained"]


@dataclass
class TrainedModel:
    """The global model of a run, ready to evaluate or fine-tune.

    Attributes:
        cfg: the run's resolved recipe.
        model: the model with the global weights, in eval mode.
        class_names: the run's class names in label order, as its checkpoint records them.
        missing: parameters the checkpoint does not hold (personal layers that never
            left the clients); they keep their random initialization.
        path: the checkpoint file read.
        wandb_id: the id of the run's W&B run, where it logged to W&B (its model
            artifact is `model-<wandb_id>`).
    """

    cfg: RecipeConfig
    model: nn.Module
    class_names: tuple[str, ...]
    missing: list[str]
    path: Path
    wandb_id: str | None = None

    @property
    def image_size(self) -> int:
        return self.cfg.data.image_size

    @property
    def channels(self) -> int:
        return self.cfg.data.channels


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint file for `path`: the file itself, or `path/checkpoint.pt` for a run directory.

    Raises:
        UserError: the path does not exist, or is a folder without a checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist (expected a fedssl run directory or its {CHECKPOINT})")
    if path.is_dir():
        if not (path / CHECKPOINT).is_file():
            raise UserError(f"{path} holds no {CHECKPOINT}: not a fedssl run directory, or its first round never finished")
        return path / CHECKPOINT
    return path


def load_trained(path: str | Path) -> TrainedModel:
    """Rebuild the global model of the run at `path` (a run directory or a checkpoint file).

    Raises:
        UserError: a missing path, a file that is not a fedssl checkpoint (or holds
            more than data), or weights that do not fit the model the recipe
            describes (the message says which tensor and which shapes).
    """
    from fedssl.algorithms.base import build_algorithm

    file = checkpoint_path(path)
    checkpoint = load_checkpoint(file)
    names = checkpoint.get("class_names")
    if not isinstance(checkpoint.get("config"), dict) or not isinstance(checkpoint.get("server_state"), dict):
        raise UserError(f"{file}: not a fedssl run checkpoint (it holds no recipe or server state)")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{file}: not a fedssl run checkpoint (it holds no class names)")
    cfg = merge_config([checkpoint["config"]], source=str(file))
    try:  # before a network is built for it: a checkpoint is someone else's file
        validate_model_input(cfg)
    except UserError as error:
        raise UserError(f"{file}: its recipe's {error}; not a checkpoint fedssl wrote") from None
    if len(names) > MAX_CLASSES:
        raise UserError(f"{file}: holds {len(names)} class names, more than fedssl builds a model for ({MAX_CLASSES})")
    state = ServerState(**checkpoint["server_state"])
    # The weights come from the checkpoint: a local pretrained file the recipe named
    # once is not needed, and may not exist on this machine.
    model_cfg = replace(cfg.model, pretrained=False, checkpoint="")

    def build() -> nn.Module:
        return build_model(model_cfg, len(names), cfg.data.channels, cfg.data.image_size)

    algorithm = build_algorithm(cfg)
    # As in the loop: the algorithm sees its learner before it is asked for weights, on a
    # model initialized from the run seed, so that layers it reports at their initial
    # values (FedPer's head, which never leaves the clients) are the run's. The probe
    # model is the learner's to change; the returned model is a fresh one.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        algorithm.make_learner(build())
    weights = algorithm.global_weights(state)
    model = build()
    algorithm.shape_model(model, weights)
    missing = load_weights(model, weights, file)
    wandb_id = checkpoint.get("wandb_id")
    return TrainedModel(cfg=cfg, model=model.eval(), class_names=tuple(names), missing=missing, path=file,
                        wandb_id=wandb_id if isinstance(wandb_id, str) else None)


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> list[str]:
    """Copy `weights` into `model`; returns the names of the model's tensors left out.

    Raises:
        UserError: a tensor the model lacks, or one of another shape (naming it).
    """
    state = model.state_dict()
    for name, value in weights.items():
        if name not in state:
            raise UserError(f"{source}: holds {name!r}, which the model {type(model).__name__} does not have")
        if tuple(value.shape) != tuple(state[name].shape):
            raise UserError(
                f"{source}: {name!r} has shape {tuple(value.shape)}, the model expects {tuple(state[name].shape)}"
            )
    with torch.no_grad():
        for name, value in weights.items():
            state[name].copy_(value)
    return [name for name in state if name not in weights]
