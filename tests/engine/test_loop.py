"""The in-process loop, driven from Python."""

import pytest
import pytorch_lightning as pl
import torch

from fedssl.config.load import load_recipe
from fedssl.engine.stages import Traffic, draw
from fedssl.engine.synchronous import Draws, train_cohort
from fedssl.errors import UserError
from fedssl.algorithms.aggregate import weighted_average
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.engine.federation import Federation
from fedssl.engine.run import run_federation
from fedssl.messages import Payload
from fedssl.learners.base import ClientContext


@pytest.mark.slow
def test_federated_training_beats_chance(tiny_recipe, tmp_path):
    # Short batches kept: the tiny clients' 61 to 67 images then take 4 or 5 steps an
    # epoch (3 or 4 with train.drop_last), the budget this margin over chance was set for.
    cfg = load_recipe(tiny_recipe, ["federation.rounds=12", "federation.clients_per_round=6", "train.drop_last=false"])
    summary = run_federation(cfg, tmp_path / "run")
    assert summary["rounds"] == 12
    assert summary["global_acc"] > 1 / 7 + 0.05, summary


def test_a_failing_client_is_named_and_dropped(tiny_recipe, monkeypatch, caplog):
    # (tests/engine/test_checks.py covers each kind of fault, min_clients and retries)
    federation = Federation.build(load_recipe(tiny_recipe, ["federation.clients_per_round=6"]))
    fit = federation.trainer.fit

    def fit_or_fail(client_id, *args, **kwargs):
        if client_id == federation.data.clients[-1].client_id:
            raise ValueError("disk on fire")
        return fit(client_id, *args, **kwargs)

    monkeypatch.setattr(federation.trainer, "fit", fit_or_fail)
    _, metrics = federation.fit_round(1, federation.initial_state())
    assert metrics["dropped_clients"] == 1 and metrics["clients"] == 5
    assert "round 1: dropped the update of client 5: it raised ValueError: disk on fire" in caplog.text


def test_proximal_term_pulls_toward_the_global_weights(tiny_recipe):
    cfg = load_recipe(tiny_recipe, ["algorithm.name=fedprox", "algorithm.proximal_mu=0.5"])
    federation = Federation.build(cfg)
    learner = federation.trainer.learner
    global_arrays = {n: torch.zeros_like(p) for n, p in learner.model.named_parameters()}
    learner.start_round(Payload(round=1, arrays=global_arrays), ClientContext(0, 10, 0))
    expected = 0.25 * sum(float(p.detach().pow(2).sum()) for p in learner.model.parameters())
    assert float(learner.proximal_term().detach()) == pytest.approx(expected, rel=1e-5)


def test_fedprox_without_mu_is_refused(tiny_recipe):
    with pytest.raises(UserError, match="algorithm.proximal_mu"):
        Federation.build(load_recipe(tiny_recipe, ["algorithm.name=fedprox"]))


def test_the_learner_also_fits_under_a_lightning_trainer(tiny_recipe):
    federation = Federation.build(load_recipe(tiny_recipe))
    learner, pool = federation.trainer.learner, federation.pool
    dataset = [{"x": x, "y": y} for x, y in zip(pool.images[:64], pool.labels[:64])]
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(learner, torch.utils.data.DataLoader(dataset, batch_size=16))
    assert any(not torch.equal(before[n], p) for n, p in learner.model.named_parameters())


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="checkpoint.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize("aggregator", ["mean", "median"])
def test_a_round_averages_updates_as_they_come_only_where_its_aggregate_is_the_mean(tiny_recipe, aggregator):
    federation = Federation.build(load_recipe(tiny_recipe, [f"federation.robust.aggregator={aggregator}"]))
    state = federation.initial_state()
    sampled = draw(federation, 1, attempt=0, failed=set())
    payloads = {c: federation.algorithm.payload(1, state, c) for c in sampled}
    each = [update for _, update, _ in federation.clients.fit(1, payloads)]
    traffic = Traffic()
    _, fold, _ = train_cohort(federation, 1, 0, state, traffic, Draws())
    updates = fold.updates(state.params)

    assert [r.client_id for r in fold.receipts] == sampled
    assert [r.metrics for r in fold.receipts] == [u.metrics for u in each]
    assert traffic.bytes_up == sum(u.num_bytes for u in each) > 0
    if aggregator == "mean":  # one running average, weighted by every client's examples
        assert federation.averages_as_they_come and all(not r.arrays for r in fold.receipts)
        [average] = updates
        assert average.num_examples == sum(u.num_examples for u in each)
        want = weighted_average(each)
        assert all(torch.allclose(average.arrays[n], want[n], atol=1e-7) for n in want)
    else:  # the median needs every update
        assert not federation.averages_as_they_come
        assert [u.client_id for u in updates] == sampled
        assert all(torch.equal(got.arrays[n], u.arrays[n]) for got, u in zip(updates, each) for n in u.arrays)
