"""Faulty and rogue clients: unusable updates and evaluation rows are dropped, named
and counted; too few updates stop the run."""

import logging

import pytest
import torch

from fedssl.cli import main
from fedssl.config.load import load_recipe
from fedssl.engine.stages import draw
from fedssl.errors import UserError
from fedssl.algorithms.base import ALGORITHMS
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.clients import Holding
from fedssl.engine.checks import accept_rows, check_row, check_update
from fedssl.algorithms.fedavg import FedAvg
from fedssl.engine.federation import Federation
from fedssl.engine.run import run_federation
from fedssl.messages import Update
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


def test_an_array_of_another_dtype_is_refused_even_where_it_holds_the_same_values():
    assert "array 'w' is float64, expected float32" in check_update(update(w=torch.zeros(2, 3, dtype=torch.float64)),
                                                                   REFERENCE)
    counter = update(**{"bn.num_batches_tracked": torch.tensor(0.0)})
    assert "array 'bn.num_batches_tracked' is float32, expected int64" in check_update(counter, REFERENCE)


def test_a_client_cannot_claim_more_examples_than_it_holds():
    claims = lambda n: check_update(Update(7, dict(REFERENCE), n), REFERENCE, max_examples=40)
    assert claims(40) is None and claims(0) is None  # a client that did not train reports 0
    assert claims(10**9) == "num_examples 1000000000 exceeds the 40 examples the client holds"
    assert "num_examples must be a count" in claims(True)


@pytest.mark.parametrize("metrics, problem", [
    ({"train_loss": float("inf")}, "metric 'train_loss' must be a finite number, got inf"),
    ({"train_loss": [1.0]}, "metric 'train_loss' must be a finite number"),
    ({"pl_seen": 4, "pl_masked": 5, "pl_correct": 1}, "pl_correct <= pl_masked <= pl_seen"),
    ({"pl_seen": 4, "pl_masked": 2, "pl_correct": -1}, "pl_correct <= pl_masked <= pl_seen"),
])
def test_metrics_must_be_finite_and_pseudo_label_counts_consistent(metrics, problem):
    assert problem in check_update(Update(7, dict(REFERENCE), 5, metrics), REFERENCE)
    fine = {"train_loss": 0.5, "pl_seen": 4, "pl_masked": 2, "pl_correct": 1}
    assert check_update(Update(7, dict(REFERENCE), 5, fine), REFERENCE) is None


def test_an_update_too_far_from_what_it_was_sent_is_refused():
    sent = {"w": torch.full((2, 3), 0.5), "b": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(3)}
    # ||sent|| = sqrt(6 x 0.25) ~ 1.22 over the floating arrays; a move of d in every entry of w is sqrt(6) d away
    moved = lambda d: Update(7, {"w": sent["w"] + d, "b": sent["b"], "bn.num_batches_tracked": torch.tensor(9)}, 5)
    assert check_update(moved(0.49), sent, max_ratio=1.0) is None  # 1.20 <= 1 x 1.22
    assert "it moved the weights by 1.47, more than federation.robust.max_update_ratio=1 x 1.22" in check_update(
        moved(0.6), sent, max_ratio=1.0)
    huge = Update(7, {"w": sent["w"] * 1e30, "b": sent["b"], "bn.num_batches_tracked": torch.tensor(3)}, 5)
    assert check_update(huge, sent) is None  # no bound unless one is given (the loop gives federation.robust.max_update_ratio)
    assert "it moved the weights by 1.22e+30, more than federation.robust.max_update_ratio=1000" in check_update(
        huge, sent, max_ratio=1000.0)
    # below a weight norm of 1 the bound is the ratio itself: a model sent as zeros may still learn
    zero = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    assert check_update(Update(7, {"w": torch.full((2, 3), 0.4), "b": zero["b"]}, 5), zero, max_ratio=1.0) is None
    assert "by 1.22, more than" in check_update(Update(7, {"w": torch.full((2, 3), 0.5), "b": zero["b"]}, 5), zero,
                                                max_ratio=1.0)


def test_a_sparse_delta_is_bounded_by_the_norm_of_its_values():
    sent = {"w": torch.ones(2, 3), "b": torch.zeros(3)}  # ||sent|| = sqrt(6) ~ 2.45
    delta = lambda values: Update(7, {"w/index": torch.tensor([0, 4], dtype=torch.int32),
                                      "w/value": torch.tensor(values)}, 5)
    assert check_update(delta([1.5, 1.5]), sent, dense=False, max_ratio=1.0) is None  # 2.12 <= 2.45
    assert "moved the weights by 3.54" in check_update(delta([2.5, 2.5]), sent, dense=False, max_ratio=1.0)
    assert "moved the weights by 1e+30" in check_update(delta([1e30, 0.0]), sent, dense=False, max_ratio=1000.0)


def test_a_sparse_delta_holds_increasing_integer_positions_and_values_of_the_arrays_dtype():
    sparse = lambda index, value: check_update(Update(7, {"w/index": index, "w/value": value}, 5), REFERENCE, dense=False)
    assert "value is float64, expected float32" in sparse(torch.tensor([0]), torch.tensor([0.1], dtype=torch.float64))
    assert "index must be integer, got bool" in sparse(torch.tensor([True]), torch.tensor([0.1]))
    assert "index must be strictly increasing" in sparse(torch.tensor([2, 2]), torch.tensor([0.1, 0.1]))
    assert "index must be strictly increasing" in sparse(torch.tensor([3, 1]), torch.tensor([0.1, 0.1]))


HOLDINGS = {0: Holding(examples=40, test_samples=10, kind="labeled"), 1: Holding(30, 0, "unlabeled"),
            2: Holding(50, 12, "mixed")}


def row(client=0, **values):
    return {"client": client, "kind": HOLDINGS[client].kind, "test_samples": HOLDINGS[client].test_samples,
            "acc": 0.5, "loss": 1.2, "personal_acc": 0.6, "personal_loss": 1.1,
            "personal_f1": 0.55} | values


@pytest.mark.parametrize("bad, problem", [
    (row(2), "a row about client 2, which it was not asked to score"),
    (row() | {"client": "0"}, "a row about client '0', which it was not asked to score"),
    ({k: v for k, v in row().items() if k != "loss"}, "the row of client 0 lacks loss"),
    (row(pixels=0.1), "the row of client 0 has unexpected keys pixels"),
    (row(kind="mixed"), "the row of client 0 says kind 'mixed', the client is labeled"),
    (row(test_samples=11), "the row of client 0 says test_samples 11, the client holds 10"),
    (row(acc=1.5), "the row of client 0: acc must be in [0, 1], got 1.5"),
    (row(personal_acc=float("nan")), "personal_acc must be in [0, 1], got nan"),
    (row(personal_f1=1.01), "personal_f1 must be in [0, 1], got 1.01"),
    ({k: v for k, v in row().items() if k != "personal_f1"}, "the row of client 0 lacks personal_f1"),
    (row(loss=-0.1), "loss must be finite and >= 0, got -0.1"),
    (row(personal_loss=float("inf")), "personal_loss must be finite and >= 0, got inf"),
    (row(acc="1.0"), "acc must be a number, got '1.0'"),
    (row(acc=True), "acc must be a number, got True"),
])
def test_an_evaluation_row_is_refused_unless_complete_in_range_and_about_a_client_asked(bad, problem):
    assert check_row(row(), [0, 1], HOLDINGS) is None
    assert problem in check_row(bad, [0, 1], HOLDINGS)


def test_a_client_without_a_test_split_reports_nan_scores():
    assert check_row(row(1, acc=float("nan"), loss=float("nan"), personal_acc=float("nan"), personal_loss=float("nan"),
                         personal_f1=float("nan")),
                     [1], HOLDINGS) is None


def test_a_nodes_reply_keeps_its_good_rows_and_counts_every_other():
    rows = [row(0), row(0, acc=0.9), row(2, acc=1.0), row(1, acc=2.0)]
    good, problems = accept_rows(rows, [0, 1, 3], {**HOLDINGS, 3: Holding(5, 5, "labeled")})
    assert good == [row(0)]
    assert problems == ["a second row about client 0", "a row about client 2, which it was not asked to score",
                        "the row of client 1: acc must be in [0, 1], got 2.0",
                        "no row about client 3, which it was asked to score"]


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
        elif self.fault == "huge":  # finite, but the mean of it and any honest update is ~1e29
            out = {name: value * 1e30 for name, value in out.items()}
        elif self.fault == "float64":
            out["fc.bias"] = out["fc.bias"].double()
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
            "shape": "array 'fc.bias' has shape (6,), expected (7,)", "name": "unexpected array 'fc.bias_v2' (not among the 8 arrays sent)",
            "huge": "it moved the weights by 1.", "float64": "array 'fc.bias' is float64, expected float32"}


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["raise", "nan", "shape", "name", "huge", "float64"])
def test_a_faulty_update_is_dropped_named_and_counted(tiny_recipe, tmp_path, register, caplog, fault):
    register("faulty", faulty_fedavg(fault))
    cfg = load_recipe(tiny_recipe, [*ALL_SAMPLED, "federation.rounds=2"])
    with caplog.at_level(logging.WARNING, logger="fedssl.engine.federation"):
        summary = run_federation(cfg, tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith(f"round 1: dropped the update of client 5: {EXPECTED[fault]}") for w in warnings), warnings
    rounds = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["dropped_clients"] for m in rounds] == [1, 1] and [m["clients"] for m in rounds] == [5, 5]
    assert summary["dropped_clients"] == 2
    params = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["server_state"]["params"]
    assert set(params) == set(Federation.build(load_recipe(tiny_recipe)).initial_state().params)
    assert all(bool(torch.isfinite(v).all()) for v in params.values() if v.is_floating_point())


def test_the_global_model_is_the_average_of_the_good_updates_only(tiny_recipe, register):
    register("faulty", faulty_fedavg("nan"))
    federation = Federation.build(load_recipe(tiny_recipe, ALL_SAMPLED))
    state, _ = federation.fit_round(1, federation.initial_state())
    register("faulty", faulty_fedavg("nan", clients=()))  # the same round, all honest, client 5 left out by hand
    honest = Federation.build(load_recipe(tiny_recipe, ALL_SAMPLED))
    sampled = draw(honest, 1, attempt=0, failed=set())
    payloads = {c: honest.algorithm.payload(1, honest.initial_state(), c) for c in sampled}
    good = [update for _, update, _ in honest.clients.fit(1, payloads)]
    expected = honest.algorithm.aggregate([u for u in good if u.client_id != 5], honest.initial_state())
    assert all(torch.allclose(state.params[n], expected.params[n]) for n in state.params)


def test_too_few_usable_updates_stop_the_run_with_the_reasons(tiny_recipe, register):
    register("faulty", faulty_fedavg("raise", clients=(3, 4, 5)))
    federation = Federation.build(load_recipe(tiny_recipe, [*ALL_SAMPLED, "federation.robust.min_clients=4"]))
    with pytest.raises(UserError, match=r"federation.robust.min_clients: round 1 got 3 usable updates of 6 sampled "
                                        r"clients, fewer than the 4 it needs \(client 3: it raised ValueError"):
        federation.fit_round(1, federation.initial_state())


def test_a_round_with_too_few_updates_is_redrawn_from_clients_that_did_not_fail(tiny_recipe, register, caplog):
    register("faulty", faulty_fedavg("raise", clients=(0, 1, 2, 3, 4)))  # only client 5 is healthy
    cfg = load_recipe(tiny_recipe, ["algorithm.name=faulty", "federation.clients_per_round=1",
                                    "federation.robust.round_retries=5"])
    federation = Federation.build(cfg)
    with caplog.at_level(logging.WARNING, logger="fedssl.engine.federation"):
        _, metrics = federation.fit_round(1, federation.initial_state())
    # each retry draws from the clients that have not failed, so 5 retries always reach client 5
    assert metrics["clients"] == 1 and metrics["dropped_clients"] >= 1
    assert any("drawing the round again (retry 1 of 5)" in r.getMessage() for r in caplog.records)


def test_below_min_clients_the_cli_exits_2_with_one_clear_line(tiny_recipe, register, capsys):
    register("faulty", faulty_fedavg("nan"))
    code = main(["run", str(tiny_recipe), *ALL_SAMPLED, "federation.robust.min_clients=6"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedssl: error: federation.robust.min_clients: round 1 got 5 usable updates of 6")
    assert "client 5: non-finite values in 'fc.bias'" in err[-1]
    assert not any("Traceback" in line for line in err)
