"""Faulty clients: unusable updates are dropped, named and counted; too few stop the run."""

import logging

import pytest
import torch

from fedssl.cli import main
from fedssl.config.load import load_recipe
from fedssl.errors import UserError
from fedssl.federation.algorithm import ALGORITHMS
from fedssl.federation.faults import check_update
from fedssl.federation.fedavg import FedAvg
from fedssl.federation.loop import Federation, run_federation
from fedssl.federation.messages import Update
from fedssl.learners.supervised import SupervisedLearner
from fedssl.tracking.run_logger import read_metrics

REFERENCE = {"w": torch.zeros(2, 3), "b": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(0)}


def update(**arrays):
    return Update(7, {**{k: v.clone() for k, v in REFERENCE.items()}, **arrays}, num_examples=5)


def test_check_update_accepts_a_dense_update_and_names_each_fault():
    assert check_update(update(), REFERENCE) is None
    assert "non-finite values in 'w'" in check_update(update(w=torch.full((2, 3), float("nan"))), REFERENCE)
    assert "non-finite values in 'b'" in check_update(update(b=torch.tensor([0.0, float("inf"), 0.0])), REFERENCE)
    assert "array 'w' has shape (3, 2), expected (2, 3)" in check_update(update(w=torch.zeros(3, 2)), REFERENCE)
    assert "unexpected array 'x'" in check_update(update(x=torch.zeros(1)), REFERENCE)
    missing = Update(7, {"w": torch.zeros(2, 3)}, 5)
    assert "missing array 'b' and 1 more" in check_update(missing, REFERENCE)
    assert "num_examples" in check_update(Update(7, dict(REFERENCE), -1), REFERENCE)


def test_sparse_deltas_are_accepted_only_from_algorithms_that_send_them():
    sparse = Update(7, {"w/index": torch.tensor([0, 5], dtype=torch.int32), "w/value": torch.tensor([0.1, 0.2])}, 5)
    assert check_update(sparse, REFERENCE, dense=False) is None  # FedMatch: arrays left out are unchanged
    assert "unexpected array 'w/index'" in check_update(sparse, REFERENCE, dense=True)
    out_of_range = Update(7, {"w/index": torch.tensor([6]), "w/value": torch.tensor([0.1])}, 5)
    assert "index out of range" in check_update(out_of_range, REFERENCE, dense=False)
    half = Update(7, {"w/index": torch.tensor([1])}, 5)
    assert "lacks its /value part" in check_update(half, REFERENCE, dense=False)
    nan = Update(7, {"w/index": torch.tensor([1]), "w/value": torch.tensor([float("nan")])}, 5)
    assert "non-finite values in 'w/value'" in check_update(nan, REFERENCE, dense=False)


# -- a FedAvg whose chosen clients misbehave -----------------------------------------------------

class FaultyLearner(SupervisedLearner):
    """A real FedAvg client; on the clients in `faulty_ids` it fails as `fault` says."""

    fault = "raise"
    faulty_ids = frozenset({5})

    def start_round(self, payload, context):
        super().start_round(payload, context)
        self.client_id = context.client_id

    def faulty(self) -> bool:
        return getattr(self, "client_id", None) in self.faulty_ids

    def training_step(self, batch, step):
        if self.fault == "raise" and self.faulty():
            raise ValueError("disk on fire")
        return super().training_step(batch, step)

    def arrays(self, names):
        out = super().arrays(names)
        if not self.faulty():
            return out
        if self.fault == "nan":
            out["fc.bias"] = torch.full_like(out["fc.bias"], float("nan"))
        elif self.fault == "shape":
            out["fc.bias"] = out["fc.bias"][:-1]
        elif self.fault == "name":
            out["fc.bias_v2"] = out.pop("fc.bias")
        return out


def faulty_fedavg(fault: str, clients=(5,)) -> type[FedAvg]:
    learner = type(f"{fault}Learner", (FaultyLearner,), {"fault": fault, "faulty_ids": frozenset(clients)})

    class Faulty(FedAvg):
        def make_learner(self, model):
            return learner(model, self.cfg.train)

    return Faulty


@pytest.fixture
def register(monkeypatch):
    """Register a test algorithm for the duration of one test."""
    return lambda name, cls: monkeypatch.setitem(ALGORITHMS._entries, name, cls)


ALL_SAMPLED = ["algorithm.name=faulty", "federation.clients_per_round=6"]
EXPECTED = {"raise": "it raised ValueError: disk on fire", "nan": "non-finite values in 'fc.bias'",
            "shape": "array 'fc.bias' has shape (6,), expected (7,)", "name": "unexpected array 'fc.bias_v2' (not among the 8 arrays sent)"}


@pytest.mark.parametrize("fault", ["raise", "nan", "shape", "name"])
def test_a_faulty_update_is_dropped_named_and_counted(tiny_recipe, tmp_path, register, caplog, fault):
    register("faulty", faulty_fedavg(fault))
    cfg = load_recipe(tiny_recipe, [*ALL_SAMPLED, "federation.rounds=2"])
    with caplog.at_level(logging.WARNING, logger="fedssl.federation.loop"):
        summary = run_federation(cfg, tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"round 1: dropped the update of client 5: {EXPECTED[fault]}" in warnings
    rounds = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["dropped_clients"] for m in rounds] == [1, 1] and [m["clients"] for m in rounds] == [5, 5]
    assert summary["dropped_clients"] == 2
    params = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["server_state"]["params"]
    assert set(params) == set(Federation.build(load_recipe(tiny_recipe)).initial_state().params)
    assert all(bool(torch.isfinite(v).all()) for v in params.values() if v.is_floating_point())


def test_the_global_model_is_the_average_of_the_good_updates_only(tiny_recipe, register):
    register("faulty", faulty_fedavg("nan"))
    federation = Federation.build(load_recipe(tiny_recipe, ALL_SAMPLED))
    state, _ = federation.fit_round(1, federation.initial_state())
    register("faulty", faulty_fedavg("nan", clients=()))  # the same round, all honest, client 5 left out by hand
    honest = Federation.build(load_recipe(tiny_recipe, ALL_SAMPLED))
    sampled = honest.sample(1, attempt=0, failed=set())
    good = [update for _, _, (update, _, _) in honest.fit_clients(1, honest.initial_state(), sampled)]
    expected = honest.algorithm.aggregate([u for u in good if u.client_id != 5], honest.initial_state())
    assert all(torch.allclose(state.params[n], expected.params[n]) for n in state.params)


def test_too_few_usable_updates_stop_the_run_with_the_reasons(tiny_recipe, register):
    register("faulty", faulty_fedavg("raise", clients=(3, 4, 5)))
    federation = Federation.build(load_recipe(tiny_recipe, [*ALL_SAMPLED, "federation.min_clients=4"]))
    with pytest.raises(UserError, match=r"federation.min_clients: round 1 got 3 usable updates of 6 sampled "
                                        r"clients, fewer than the 4 it needs \(client 3: it raised ValueError"):
        federation.fit_round(1, federation.initial_state())


def test_a_round_with_too_few_updates_is_redrawn_from_clients_that_did_not_fail(tiny_recipe, register, caplog):
    register("faulty", faulty_fedavg("raise", clients=(0, 1, 2, 3, 4)))  # only client 5 is healthy
    cfg = load_recipe(tiny_recipe, ["algorithm.name=faulty", "federation.clients_per_round=1",
                                    "federation.round_retries=5"])
    federation = Federation.build(cfg)
    with caplog.at_level(logging.WARNING, logger="fedssl.federation.loop"):
        _, metrics = federation.fit_round(1, federation.initial_state())
    # each retry draws from the clients that have not failed, so 5 retries always reach client 5
    assert metrics["clients"] == 1 and metrics["dropped_clients"] >= 1
    assert any("drawing the round again (retry 1 of 5)" in r.getMessage() for r in caplog.records)


def test_below_min_clients_the_cli_exits_2_with_one_clear_line(tiny_recipe, register, capsys):
    register("faulty", faulty_fedavg("nan"))
    code = main(["run", str(tiny_recipe), *ALL_SAMPLED, "federation.min_clients=6"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedssl: error: federation.min_clients: round 1 got 5 usable updates of 6")
    assert "client 5: non-finite values in 'fc.bias'" in err[-1]
    assert not any("Traceback" in line for line in err)
