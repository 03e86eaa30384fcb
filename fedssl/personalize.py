"""`fedssl personalize`: fine-tune a federation's global model on your own labeled images.

A practitioner holds a few labeled images of their own users. The federated model
is read from its run (`fedssl.trained`), their images are put in its class order
and split into a fine-tuning part and a held-out part (`fedssl.data.labeled_subset`),
and one of three modes adapts it with a standard Lightning Trainer (on
`--accelerator`: auto takes a CUDA GPU where there is one), reading your images as
the batch dicts every fedssl learner takes (`FineTuneData`):

- ``head``: only the classifier head learns; the body is frozen, its BatchNorm
  statistics included (FedPer/FedRep's view: the body is the shared representation,
  the head is personal). The cheapest, and the safest with very few images.
- ``full``: every parameter learns.
- ``maml``: MAML's test-time adaptation (Finn et al., "Model-Agnostic Meta-Learning
  for Fast Adaptation of Deep Networks", ICML 2017; Per-FedAvg, Fallah et al.,
  NeurIPS 2020): `steps` plain SGD steps on the whole model with the inner learning
  rate, the adaptation a meta-learned model is trained to benefit from. It takes a
  fixed number of steps, so it needs no early stopping.

``head`` and ``full`` validate on the held-out split after every epoch, stop early
when its loss stops falling, and keep the weights of the epoch with the lowest
held-out loss, the federated weights themselves included: fine-tuning never hands
back a model that does worse on the held-out loss than the one it started from.
The held-out split both chooses these weights and measures them, so the accuracy
after fine-tuning is somewhat optimistic; hold out a separate test set for an
unbiased figure.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, EarlyStopping
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedssl.config.schema import TrainConfig
from fedssl.data.dataset import ImageDataset
from fedssl.data.labeled_subset import holdout_split, load_labeled, match_classes
from fedssl.data.transforms import augment_batch, build_transform, check_augmentation, to_tensor
from fedssl.errors import UserError
from fedssl.evaluation.score import Score, score
from fedssl.io import atomic_write_text
from fedssl.learners.base import Batch
from fedssl.learners.supervised import build_optimizer
from fedssl.models.factory import input_normalization
from fedssl.models.split import head_parameter_names

__all__ = ["MODES", "FineTuneData", "FineTuneOptions", "FineTuned", "FineTuner", "finetune", "personalize"]

MODES = ("head", "full", "maml")
ACCELERATORS = ("auto", "cpu", "cuda")  # Lightning's names; auto: a CUDA GPU where there is one
REPORT = "personalize.json"
Normalization = tuple[Optional[Sequence[float]], Optional[Sequence[float]]]  # (mean, std); (None, None): [-1, 1]


@dataclass(frozen=True)
class FineTuneOptions:
    """How to fine-tune; None means "as the federation's recipe says"."""

    mode: str = "head"  # head | full | maml (see the module docstring)
    epochs: int = 20  # head/full: at most this many epochs (early stopping usually ends sooner)
    patience: int = 3  # head/full: epochs without a lower held-out loss before stopping
    steps: int = 5  # maml: adaptation steps
    lr: float | None = None  # learning rate (maml: the inner lr); default: the recipe's train.lr
    batch_size: int | None = None  # default: the recipe's train.batch_size
    holdout: float = 0.2  # share of the images held out, when the data has no test split of its own
    augment: str | None = None  # none | weak | strong; default: the recipe's data.augment
    seed: int | None = None  # split, batch order and augmentation; default: the recipe's seed
    skip_bad: bool = False  # skip unreadable images and malformed rows instead of stopping
    progress: bool = True  # Lightning's progress bar
    accelerator: str = "auto"  # auto | cpu | cuda: where Lightning trains (the exported model is on the CPU)

    def check(self) -> None:
        """Raise a `UserError` naming the flag of the first bad value."""
        if self.mode not in MODES:
            raise UserError(f"--mode: unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.accelerator not in ACCELERATORS:
            raise UserError(f"--accelerator: unknown accelerator {self.accelerator!r}; choose one of {', '.join(ACCELERATORS)}")
        if self.accelerator == "cuda" and not torch.cuda.is_available():
            raise UserError("--accelerator: cuda was asked for but no CUDA device is available; use cpu or auto")
        if self.augment is not None:
            check_augmentation(self.augment, key="--augment")
        for flag, value in (("--epochs", self.epochs), ("--steps", self.steps), ("--batch-size", self.batch_size)):
            if value is not None and value < 1:
                raise UserError(f"{flag}: must be at least 1, got {value}")
        if self.patience < 0:
            raise UserError(f"--patience: must be >= 0, got {self.patience}")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"--lr: must be > 0, got {self.lr}")
        if not 0 < self.holdout < 1:
            raise UserError(f"--holdout: must be a fraction between 0 and 1 (exclusive), got {self.holdout}")


@dataclass
class FineTuned:
    """What `finetune` made: the model and how it fares on the held-out split."""

    model: nn.Module  # the fine-tuned model, in eval mode
    mode: str
    before: Score  # the federated model on the held-out split
    after: Score  # the fine-tuned model on the held-out split
    train_count: int
    epochs: int  # epochs run (maml: the epochs its steps spanned)
    steps: int  # optimizer steps taken
    best_epoch: int  # the epoch whose weights were kept; 0: the federated weights
    details: dict = field(default_factory=dict)  # for the report: class names, input spec, ...


class FineTuner(pl.LightningModule):
    """Cross-entropy fine-tuning of `model`, training only the `trainable` parameters.

    With `freeze_body`, every module outside the classifier stays in eval mode while
    training, so a frozen body's BatchNorm statistics and dropout do not change.
    """

    def __init__(self, model: nn.Module, trainable: list[str], make_optimizer: Callable, freeze_body: bool = False):
        super().__init__()
        self.model = model
        self.make_optimizer = make_optimizer
        chosen = set(trainable)
        for name, param in model.named_parameters():
            param.requires_grad_(name in chosen)
        self.head_modules = _modules_of(model, trainable) if freeze_body else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train(self, mode: bool = True) -> FineTuner:
        super().train(mode)
        if mode and self.head_modules is not None:
            self.model.eval()
            for module in self.head_modules:
                module.train()
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning keeps whatever train/eval mode each module had when fit started
        # (and restores it after validation) rather than calling train(): set it here,
        # or a model handed over in eval mode would fine-tune with BatchNorm frozen.
        self.train()

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, y = batch["x"], batch["y"]
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        x, y = batch["x"], batch["y"]
        logits = self(x)
        # Weighted by batch size, these epoch means equal `score` over the whole split.
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, batch_size=len(y))
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean(), prog_bar=True, batch_size=len(y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer([p for p in self.model.parameters() if p.requires_grad])


class KeepBest(Callback):
    """Keeps a copy of the weights with the lowest held-out loss seen after an epoch.

    The starting weights are the candidate of epoch 0, with their loss measured
    before training.
    """

    def __init__(self, model: nn.Module, initial_loss: float):
        self.model = model
        self.best_loss = initial_loss
        self.best_epoch = 0
        self.best_state = copy.deepcopy(model.state_dict())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val_loss")
        if trainer.sanity_checking or loss is None or not float(loss) < self.best_loss:
            return
        self.best_loss = float(loss)
        self.best_epoch = trainer.current_epoch + 1
        self.best_state = copy.deepcopy(self.model.state_dict())


class _Images(Dataset):
    """Labeled images as the learners' batch dicts ("x", "y"; `fedssl.learners.base.Batch`),
    normalized as in training (`normalization`: the model's (mean, std)); with `kind`, uint8
    images augmented one at a time first."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, kind: str = "none", seed: int = 0,
                 normalization: Normalization = (None, None)):
        self.raw, self.labels, self.normalization = images, torch.from_numpy(labels), normalization
        self.images = to_tensor(images, *normalization) if kind == "none" else None
        self.transform = None if kind == "none" else build_transform(kind, images.shape[1], seed=seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Batch:
        if self.transform is None:
            return {"x": self.images[i], "y": self.labels[i]}
        return {"x": to_tensor(augment_batch(self.transform, self.raw[i : i + 1]), *self.normalization)[0],
                "y": self.labels[i]}


class FineTuneData(pl.LightningDataModule):
    """Your images as Lightning data: shuffled fine-tuning batches and the held-out
    split, both as batch dicts, the form every fedssl learner takes."""

    def __init__(self, train: Dataset, heldout: Dataset, batch_size: int, seed: int, drop_last: bool):
        super().__init__()
        self.train, self.heldout = train, heldout
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=generator,
                          drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.heldout, batch_size=256)


def finetune(
    model: nn.Module,
    train: ImageDataset,
    heldout: ImageDataset,
    options: FineTuneOptions,
    train_cfg: TrainConfig,
    log_dir: Path | None = None,
    before: Score | None = None,
    normalization: Normalization = (None, None),
) -> FineTuned:
    """Fine-tune `model` (in place) on `train`, measuring it on `heldout` before and after.

    Args:
        model: the federated model; its labels must be those of `train` and `heldout`.
        train, heldout: the fine-tuning and held-out images.
        options: the mode and budgets; every None in it must already be resolved.
        train_cfg: the federation's client optimizer (`optimizer`, `momentum`,
            `weight_decay`), used by head and full with `options.lr`.
        log_dir: where Lightning's CSV logger writes `logs/`; None: no logger.
        before: `model`'s score on `heldout`, if the caller has it already.
        normalization: the (mean, std) the model's inputs are normalized with
            (`fedssl.models.factory.input_normalization`; default: [-1, 1]).
    """
    options.check()
    unresolved = [name for name in ("lr", "batch_size", "augment", "seed") if getattr(options, name) is None]
    if unresolved:
        raise ValueError(f"finetune needs resolved options; {', '.join(unresolved)} is None")
    x_held, y_held = to_tensor(heldout.images, *normalization), torch.from_numpy(heldout.labels)
    if before is None:
        before = score(model, x_held, y_held)

    batch_size = min(options.batch_size, len(train))
    # Each epoch's short last batch is dropped as the federation drops it
    # (train.drop_last), and always where it would be one image, which BatchNorm
    # cannot train on; with more images than a batch, the shuffle lets every image
    # take part over the epochs.
    drop_last = len(train) > batch_size and (train_cfg.drop_last or len(train) % batch_size == 1)
    data = FineTuneData(_Images(train.images, train.labels, options.augment, options.seed, normalization),
                        _Images(heldout.images, heldout.labels, normalization=normalization), batch_size, options.seed,
                        drop_last=drop_last)

    if options.mode == "head":
        trainable = head_parameter_names(model)
        if not trainable:
            raise UserError(f"--mode head: {type(model).__name__} has no classifier parameters to fine-tune")
    else:
        trainable = [name for name, _ in model.named_parameters()]
    if options.mode == "maml":
        # MAML's inner loop is plain SGD: no momentum, no weight decay.
        make_optimizer = lambda params: torch.optim.SGD(params, lr=options.lr)  # noqa: E731
    else:
        optimizer_cfg = replace(train_cfg, lr=options.lr)
        make_optimizer = lambda params: build_optimizer(params, optimizer_cfg)  # noqa: E731
    learner = FineTuner(model, trainable, make_optimizer, freeze_body=options.mode == "head")

    keep_best = None
    common = dict(
        accelerator=options.accelerator, devices=1, logger=CSVLogger(log_dir, name="logs") if log_dir else False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=options.progress,
        log_every_n_steps=1, num_sanity_val_steps=0,
    )
    if options.mode == "maml":
        trainer = pl.Trainer(max_steps=options.steps, max_epochs=-1, limit_val_batches=0, **common)
    else:
        keep_best = KeepBest(model, before.loss)
        early = EarlyStopping(monitor="val_loss", mode="min", patience=options.patience)
        trainer = pl.Trainer(max_epochs=options.epochs, callbacks=[early, keep_best], **common)
    torch.manual_seed(options.seed)  # dropout, and any layer that draws while training
    with warnings.catch_warnings():
        # Images are tensors in memory already: loader worker processes would only add start-up time.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        # head mode keeps the frozen body in eval mode on purpose (see FineTuner).
        warnings.filterwarnings("ignore", r".*module\(s\) in eval mode at the start of training.*")
        # Lightning 2.6 asking torch 2.14 about pytree leaves: nothing a user can act on.
        warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        # maml takes its steps without validating; the held-out split is scored after.
        warnings.filterwarnings("ignore", r".*`validation_step` but have no `val_dataloader`.*")
        trainer.fit(learner, datamodule=data)

    model.cpu()  # after a GPU: scored, and exported, on the CPU
    if keep_best is not None:
        model.load_state_dict(keep_best.best_state)
    for param in model.parameters():
        param.requires_grad_(True)
    model.eval()
    return FineTuned(
        model=model, mode=options.mode, before=before, after=score(model, x_held, y_held),
        train_count=len(train), epochs=trainer.current_epoch, steps=trainer.global_step,
        best_epoch=keep_best.best_epoch if keep_best else trainer.current_epoch,
    )


def personalize(
    run: str | Path,
    data: str | Path,
    options: FineTuneOptions = FineTuneOptions(),
    out_dir: str | Path | None = None,
    export_format: str = "safetensors",
    echo: Callable[[str], None] = print,
) -> tuple[FineTuned, Path]:
    """Fine-tune the global model of `run` on the labeled images at `data` and export it.

    Args:
        run: a run directory, or its checkpoint.pt.
        data: a folder of class subfolders, or a FER2013-style CSV.
        options: mode and budgets (see `FineTuneOptions`).
        out_dir: where the exported model, `personalize.json` and Lightning's CSV
            logs go; default: `personalized-MODE` beside the checkpoint.
        export_format: safetensors (default: weights and a JSON description, data only), onnx
            (needs the onnx extra), pt2 (torch.export) or torchscript.
        echo: receives the lines a user reads (the CLI prints them).

    Returns:
        The fine-tuning result and the exported model's path.

    Raises:
        UserError: see `fedssl.trained.load_trained`, `fedssl.data.labeled_subset`,
            `FineTuneOptions.check` and `fedssl.export.export_model`.
    """
    from fedssl.export import (CODE_FORMATS, DEFAULT_FORMAT, TRUST_FLAG, check_rebuildable, export_model, model_metadata,
                               model_path)
    from fedssl.tracking.wandb_run import log_personalize
    from fedssl.trained import load_trained

    options.check()
    trained = load_trained(run)
    cfg = trained.cfg
    options = replace(
        options,
        lr=options.lr if options.lr is not None else cfg.train.lr,
        batch_size=options.batch_size or cfg.train.batch_size,
        augment=options.augment or cfg.data.augment,
        seed=options.seed if options.seed is not None else cfg.seed,
    )
    out_dir = Path(out_dir) if out_dir else trained.path.parent / f"personalized-{options.mode}"
    target = model_path(out_dir, export_format)  # an unknown format fails before the training, not after

    source = load_labeled(data, trained.image_size, trained.channels, options.skip_bad)
    num_outputs = len(trained.class_names)
    source = match_classes(source, trained.class_names)
    class_names = source.train.class_names
    if source.test is not None:
        train, heldout = source.train, source.test
        held_from = "its own test split"
    else:
        train, heldout = holdout_split(source.train, options.holdout, options.seed)
        held_from = f"{options.holdout:.0%} held out"

    echo(f"{trained.path}: {cfg.algorithm.name} global model ({cfg.model.name}, {num_outputs} classes, "
         f"{trained.channels}x{trained.image_size}x{trained.image_size} input)")
    if trained.missing:
        echo(f"note: the checkpoint holds no {', '.join(trained.missing)} (personal layers stay with the clients); "
             "they start from random weights")
    absent = sorted(set(range(num_outputs)) - set(np.unique(source.train.labels).tolist()))
    if absent:
        echo(f"note: --data has no images of {', '.join(class_names[i] for i in absent)}; "
             "the model still predicts these classes")
    echo(f"{data}: {len(train)} images to fine-tune on, {len(heldout)} to evaluate ({held_from})")
    normalization = input_normalization(cfg.model, trained.channels)  # as the run trained
    architecture = {"name": cfg.model.name, "kwargs": cfg.model.kwargs}
    if export_format == DEFAULT_FORMAT:  # before the training, not after
        check_rebuildable(trained.model, model_metadata(class_names, trained.image_size, trained.channels,
                                                        *normalization, model=architecture), str(target))
    before = score(trained.model, to_tensor(heldout.images, *normalization), torch.from_numpy(heldout.labels))
    echo(f"held-out accuracy before: {_acc(before)}")
    result = finetune(trained.model, train, heldout, options, cfg.train, log_dir=out_dir, before=before,
                      normalization=normalization)
    how = (f"{result.steps} SGD steps" if result.mode == "maml"
           else f"best epoch {result.best_epoch} of {result.epochs}" + (
               ", the federated weights were not improved on" if result.best_epoch == 0 else ""))
    echo(f"held-out accuracy after:  {_acc(result.after)}  ({result.mode} fine-tuning, {how})")

    metadata = model_metadata(
        class_names, trained.image_size, trained.channels, *normalization,
        model=architecture,
        personalized={"from": str(trained.path), "algorithm": cfg.algorithm.name, "model": cfg.model.name,
                      "mode": result.mode, "heldout_acc_before": result.before.accuracy,
                      "heldout_acc_after": result.after.accuracy},
    )
    export_model(result.model, target, metadata, export_format)
    report = {
        "checkpoint": str(trained.path), "data": str(data), "model": str(target), "options": asdict(options),
        "train_images": result.train_count, "heldout_images": result.after.count,
        "heldout_acc_before": result.before.accuracy, "heldout_loss_before": result.before.loss,
        "heldout_acc_after": result.after.accuracy, "heldout_loss_after": result.after.loss,
        "heldout_f1_macro_before": result.before.f1_macro, "heldout_f1_macro_after": result.after.f1_macro,
        "epochs": result.epochs, "steps": result.steps, "best_epoch": result.best_epoch, "labels": list(class_names),
    }
    atomic_write_text(out_dir / REPORT, json.dumps(report, indent=2) + "\n")
    result.details = report
    log_personalize(trained, report, out_dir / REPORT, target)
    if export_format == DEFAULT_FORMAT:
        echo(f"exported {target} and {target.with_suffix('.json').name}; try: fedssl predict {out_dir} IMAGE...")
    else:
        trust = f" {TRUST_FLAG}" if export_format in CODE_FORMATS else ""
        echo(f"exported {target}; try: fedssl predict{trust} {target} IMAGE...")
    return result, target


def _acc(s: Score) -> str:
    return f"{s.accuracy:.4f} ({s.correct}/{s.count})"


def _modules_of(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The modules that own the parameters `names`."""
    owners = {name.rpartition(".")[0] for name in names}
    return [model.get_submodule(owner) for owner in sorted(owners)]
