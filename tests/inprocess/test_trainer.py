"""Client training through Lightning: the loop's Fabric path against a Lightning
Trainer fitting one client's `ClientDataModule`, precision, `self.log` and LR schedulers."""

import math
import subprocess
import sys
import warnings

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.precision import MixedPrecision

from fedssl.config.load import load_recipe
from fedssl.errors import UserError
from fedssl.inprocess import trainer as client_module
from fedssl.inprocess.trainer import ClientTrainer, RoundFabric
from fedssl.engine.federation import Federation
from fedssl.engine.run import run_federation
from fedssl.learners.supervised import SupervisedLearner, build_optimizer
from fedssl.tracking.run_logger import read_metrics

MIXED_CLIENTS = ["data.labels.mode=client", "data.labels.per_class=2", "algorithm.ssl.unlabeled_ratio=2"]


def build(recipe, *overrides: str) -> Federation:
    return Federation.build(load_recipe(recipe, list(overrides)))


def quiet_trainer(steps: int) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)


def fit_with_a_trainer(federation: Federation, client_id: int, payload, learner=None, trainer: ClientTrainer = None):
    """One client's round fitted by a Lightning Trainer on its ClientDataModule."""
    trainer = trainer or federation.trainer
    learner = learner or trainer.learner
    client = federation.data.clients[client_id]
    data = trainer.client_data(client_id, client.labeled, client.unlabeled, payload)
    steps = data.begin(learner)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        quiet_trainer(steps).fit(learner, datamodule=data)
    assert learner.trainer.global_step == steps
    return data.finish(learner, shared_names=trainer.shared_names), data


def fit_with_the_loop(federation: Federation, client_id: int, payload, trainer: ClientTrainer = None):
    trainer = trainer or federation.trainer
    client = federation.data.clients[client_id]
    return trainer.fit(client_id, client.labeled, client.unlabeled, payload)


def first_payload(federation: Federation, client_id: int):
    """Round 1's payload (call it before training: the initial state is the live model's weights)."""
    return federation.algorithm.payload(1, federation.initial_state(), client_id)


@pytest.mark.parametrize("overrides", [
    ["train.local_epochs=2"],
    ["train.local_epochs=2", "data.augment=weak"],
    ["algorithm.name=fixmatch", *MIXED_CLIENTS, "data.augment=weak", "train.local_epochs=2"],
    ["algorithm.name=fedrep", "train.local_epochs=2"],  # a head epoch, then two body epochs
    ["algorithm.name=ditto", "train.local_epochs=2"],  # two learners, both logging
], ids=["fedavg", "fedavg-augmented", "fixmatch", "fedrep", "ditto"])
def test_a_trainer_fitting_a_client_datamodule_ends_where_the_loop_ends(tiny_recipe, overrides):
    """Exactly: the same batches (augmentation draws included) and the same SGD
    arithmetic, Lightning's closure-driven step or the loop's Fabric step."""
    federation = build(tiny_recipe, *overrides)
    payload = first_payload(federation, 1)
    by_loop, kept_by_loop = fit_with_the_loop(federation, 1, payload)
    (by_trainer, kept_by_trainer), data = fit_with_a_trainer(federation, 1, payload)
    assert data.epochs > 1
    assert by_trainer.num_examples == by_loop.num_examples > 0
    assert by_trainer.arrays.keys() == by_loop.arrays.keys()
    for name, value in by_loop.arrays.items():
        assert torch.equal(by_trainer.arrays[name], value), name
    assert kept_by_trainer.keys() == kept_by_loop.keys()
    for name, value in kept_by_loop.items():  # personal layers, Ditto's personal model
        assert torch.equal(kept_by_trainer[name], value), name
    assert any(not torch.equal(value, payload.arrays[name]) for name, value in by_loop.arrays.items())  # it trained


def test_a_trainer_begins_the_round_itself_and_one_epoch_is_one_local_epoch(tiny_recipe):
    federation = build(tiny_recipe, "train.local_epochs=3")
    learner, client = federation.trainer.learner, federation.data.clients[0]
    payload = first_payload(federation, 0)
    learner.load_arrays({name: torch.zeros_like(value) for name, value in payload.arrays.items()})
    data = federation.trainer.client_data(0, client.labeled, client.unlabeled, payload)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(learner, datamodule=data)  # setup("fit") loaded the payload's weights and started the round
    assert trainer.global_step == data.loader.epoch_steps == len(client.labeled) // 16  # train.drop_last
    assert data.steps == 3 * data.loader.epoch_steps and data.loader.left == data.steps - trainer.global_step
    assert all(torch.isfinite(p).all() and p.abs().sum() > 0 for p in learner.model.parameters())


class ScheduledLearner(SupervisedLearner):
    """Records the learning rate of every step; its LR schedule is Lightning's dict."""

    def __init__(self, model, train_cfg, interval: str, frequency: int):
        super().__init__(model, train_cfg)
        self.interval, self.frequency = interval, frequency
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        self.optimizer = build_optimizer(self.model.parameters(), self.train_cfg)
        if self.interval == "plateau":  # ReduceLROnPlateau on the latest logged train_loss, after every step
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, factor=0.5, patience=0)
            return {"optimizer": self.optimizer,
                    "lr_scheduler": {"scheduler": scheduler, "interval": "step", "monitor": "train_loss"}}
        scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.5)
        return {"optimizer": self.optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.interval, "frequency": self.frequency}}


@pytest.mark.parametrize("interval, frequency", [("step", 1), ("step", 3), ("epoch", 1), ("plateau", 1)])
def test_an_lr_scheduler_steps_where_a_trainer_steps_it(tiny_recipe, interval, frequency):
    federation = build(tiny_recipe, "train.local_epochs=3", "train.momentum=0")
    learner = ScheduledLearner(federation.model, federation.cfg.train, interval, frequency)
    trainer = ClientTrainer(learner, federation.pool, federation.cfg.train, federation.cfg.algorithm.ssl,
                            federation.trainer.shared_names, federation.cfg.seed, federation.trainer.augmentations)
    payload = first_payload(federation, 0)
    by_loop, _ = fit_with_the_loop(federation, 0, payload, trainer)
    loop_lrs, learner.lrs = learner.lrs, []
    (by_trainer, _), data = fit_with_a_trainer(federation, 0, payload, learner, trainer)

    per_epoch = data.loader.epoch_steps
    assert len(loop_lrs) == 3 * per_epoch and per_epoch % 3, per_epoch  # frequency 3 restarts at every epoch
    if interval == "plateau":  # it depends on the losses: some steps lower it, others do not
        assert 0 < sum(b < a for a, b in zip(loop_lrs, loop_lrs[1:])) < len(loop_lrs) - 1
    elif interval == "epoch":
        expected = [0.05 * 0.5 ** (t // per_epoch) for t in range(3 * per_epoch)]
        assert loop_lrs == pytest.approx(expected, rel=1e-12)
    else:  # as Lightning counts: the batch index within the epoch
        expected = [0.05 * 0.5 ** ((t // per_epoch) * (per_epoch // frequency) + (t % per_epoch) // frequency)
                    for t in range(3 * per_epoch)]
        assert loop_lrs == pytest.approx(expected, rel=1e-12)
    assert learner.lrs == loop_lrs
    torch.testing.assert_close(by_trainer.arrays, by_loop.arrays, rtol=0, atol=0)


def test_self_log_reaches_the_update_and_the_round_metrics(tiny_recipe, recwarn):
    federation = build(tiny_recipe, "federation.clients_per_round=3")
    learner = federation.trainer.learner
    inner = learner.training_step

    def step(batch, batch_idx):
        learner.log("probe", float(len(batch["y"])))  # each client's mean batch size
        learner.log("probe_tensor", torch.tensor(2.0, requires_grad=True) * 1)
        learner.log("undefined", float("nan"))  # not sent: the server would drop the whole update
        return inner(batch, batch_idx)

    learner.training_step = step
    state = federation.initial_state()
    update, _ = fit_with_the_loop(federation, 0, first_payload(federation, 0))
    labeled = len(federation.data.clients[0].labeled)
    steps = -(-labeled // 16)
    assert update.metrics["probe"] == pytest.approx(labeled / steps)
    assert update.metrics["probe_tensor"] == 2.0
    assert set(update.metrics) == {"train_loss", "probe", "probe_tensor"}  # the loop's train_loss is not replaced
    _, metrics = federation.fit_round(1, state)
    assert metrics["probe_tensor"] == 2.0 and 1 <= metrics["probe"] <= 16
    assert not [w for w in recwarn if "self.log" in str(w.message)]  # no "not attached to a Trainer" warning
    assert learner.fabric is None  # detached after each client: a Trainer would log through itself


def test_a_metric_must_be_one_number(tiny_recipe):
    federation = build(tiny_recipe)
    learner = federation.trainer.learner
    inner = learner.training_step
    learner.training_step = lambda batch, i: (learner.log("wide", torch.ones(3)), inner(batch, i))[1]
    with pytest.raises(ValueError, match="'wide'.*shape \\(3,\\)"):
        fit_with_the_loop(federation, 0, first_payload(federation, 0))


def autocast_seen(federation: Federation) -> list[tuple[bool, torch.dtype]]:
    """Records, at every training_step, whether CPU autocast is on and its dtype."""
    learner, seen = federation.trainer.learner, []
    inner = learner.training_step

    def step(batch, batch_idx):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return inner(batch, batch_idx)

    learner.training_step = step
    return seen


def test_precision_32_trains_without_autocast_and_bf16_mixed_under_it(tiny_recipe):
    full = build(tiny_recipe)
    seen = autocast_seen(full)
    by_full, _ = fit_with_the_loop(full, 0, first_payload(full, 0))
    assert seen and not any(enabled for enabled, _ in seen)
    assert full.trainer.fabric.strategy.precision.precision == "32-true"

    mixed = build(tiny_recipe, "train.precision=bf16-mixed")
    seen = autocast_seen(mixed)
    by_mixed, _ = fit_with_the_loop(mixed, 0, first_payload(mixed, 0))
    assert seen and all(enabled and dtype == torch.bfloat16 for enabled, dtype in seen)
    assert not torch.is_autocast_enabled("cpu")  # only around training_step
    # bf16 rounding: close to full precision, not equal; the weights themselves stay float32
    assert all(value.dtype == by_full.arrays[name].dtype for name, value in by_mixed.arrays.items())
    assert not torch.equal(by_mixed.arrays["fc.weight"], by_full.arrays["fc.weight"])
    torch.testing.assert_close(by_mixed.arrays, by_full.arrays, rtol=0.05, atol=0.02)


def test_float16_loss_scaling_starts_afresh_for_every_client(tiny_recipe, monkeypatch):
    """16-mixed is CUDA-only in fedssl; on the CPU (which autocasts float16 too) the
    same Fabric plugin checks that a client's loss scale never depends on who ran before."""
    monkeypatch.setattr(client_module, "client_fabric",
                        lambda device, precision: RoundFabric(accelerator="cpu", devices=1,
                                                              plugins=[MixedPrecision("16-mixed", "cpu")]))
    federation = build(tiny_recipe, "train.precision=16-mixed", "federation.execution.device=auto")
    scaler = federation.trainer.fabric.strategy.precision.scaler
    learner, trackers = federation.trainer.learner, []
    inner = learner.training_step

    def step(batch, batch_idx):
        trackers.append((batch_idx, scaler.get_scale(), scaler._get_growth_tracker()))
        assert torch.get_autocast_dtype("cpu") == torch.float16
        return inner(batch, batch_idx)

    learner.training_step = step
    payloads = {c: first_payload(federation, c) for c in (0, 1)}
    alone, _ = fit_with_the_loop(federation, 1, payloads[1])
    first_of_alone = trackers[0]
    trackers.clear()
    fit_with_the_loop(federation, 0, payloads[0])
    assert trackers[-1][2] > 0 or trackers[-1][1] < 65536.0  # client 0 moved the scaler
    trackers.clear()
    after, _ = fit_with_the_loop(federation, 1, payloads[1])
    assert trackers[0] == first_of_alone == (0, 65536.0, 0)
    for name, value in alone.arrays.items():
        assert torch.equal(after.arrays[name], value), name
        assert torch.isfinite(value).all()


def test_float16_on_a_cpu_is_a_user_error(tiny_recipe):
    with pytest.raises(UserError, match="train.precision: 16-mixed .* needs a CUDA device, and federation.execution.device is cpu"):
        load_recipe(tiny_recipe, ["train.precision=16-mixed"])
    if not torch.cuda.is_available():  # auto resolves to the CPU: caught where the device is known
        with pytest.raises(UserError, match="train.precision: 16-mixed .* needs a CUDA device"):
            build(tiny_recipe, "train.precision=16-mixed", "federation.execution.device=auto")


def test_an_unknown_precision_names_the_choices(tiny_recipe):
    with pytest.raises(UserError, match="train.precision: unknown value '16'.*32, bf16-mixed, 16-mixed"):
        load_recipe(tiny_recipe, ["train.precision=16"])


def layouts_seen(federation: Federation) -> list[bool]:
    """Whether the learner's weights were channels-last at each training step (its
    convolutions with more than one input channel, where the two layouts differ)."""
    learner, seen = federation.trainer.learner, []
    inner = learner.training_step
    weights = [p for p in learner.model.parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert weights

    def step(batch, batch_idx):
        seen.append(all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in weights))
        return inner(batch, batch_idx)

    learner.training_step = step
    return seen


@pytest.mark.parametrize("overrides", [[], ["algorithm.name=ditto"]], ids=["fedavg", "ditto"])
def test_steps_train_channels_last_on_a_cpu_and_what_leaves_training_is_contiguous(tiny_recipe, overrides):
    federation = build(tiny_recipe, *overrides)
    seen = layouts_seen(federation)
    update, kept = fit_with_the_loop(federation, 0, first_payload(federation, 0))
    assert seen and all(seen)  # train.memory_format: auto, on the CPU
    for name, value in {**update.arrays, **kept}.items():
        assert value.is_contiguous(), name
    assert all(p.is_contiguous() for p in federation.trainer.learner.parameters())  # evaluation's layout
    (by_trainer, _), _ = fit_with_a_trainer(federation, 0, first_payload(federation, 0))
    assert all(value.is_contiguous() for value in by_trainer.arrays.values())


def test_both_layouts_train_the_same_model_up_to_rounding(tiny_recipe):
    fast, plain = build(tiny_recipe), build(tiny_recipe, "train.memory_format=contiguous")
    seen = layouts_seen(plain)
    by_fast, _ = fit_with_the_loop(fast, 0, first_payload(fast, 0))
    by_plain, _ = fit_with_the_loop(plain, 0, first_payload(plain, 0))
    assert seen and not any(seen)
    torch.testing.assert_close(by_fast.arrays, by_plain.arrays, rtol=1e-4, atol=1e-5)


def test_an_unknown_memory_format_names_the_choices(tiny_recipe):
    with pytest.raises(UserError, match="train.memory_format: unknown value 'nhwc'.*auto, channels_last, contiguous"):
        load_recipe(tiny_recipe, ["train.memory_format=nhwc"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_every_precision_trains_on_cuda(tiny_recipe, precision):
    federation = build(tiny_recipe, "federation.execution.device=cuda", f"train.precision={precision}",
                       "federation.execution.concurrency=sequential")
    update, _ = fit_with_the_loop(federation, 0, first_payload(federation, 0))
    assert all(torch.isfinite(value).all() and value.is_cuda for value in update.arrays.values())
    assert update.metrics["train_loss"] > 0


def test_a_bf16_mixed_run_runs_end_to_end_on_the_cpu(tiny_recipe, tmp_path):
    summary = run_federation(load_recipe(tiny_recipe, ["train.precision=bf16-mixed", "federation.rounds=2"]),
                             tmp_path / "run")
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["train_loss"]) for m in metrics) and 0 <= summary["global_acc"] <= 1


@pytest.mark.slow
def test_the_command_line_refuses_float16_on_a_cpu_with_one_line(tiny_recipe, tmp_path):
    result = subprocess.run([sys.executable, "-m", "fedssl.cli", "run", str(tiny_recipe), "train.precision=16-mixed"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "fedssl: error: train.precision: 16-mixed (float16 autocast with loss scaling) needs a CUDA device, and "
        "federation.execution.device is cpu; use bf16-mixed or 32 there"]
    assert not (tmp_path / "runs" / "tiny").exists()  # refused before anything was written
