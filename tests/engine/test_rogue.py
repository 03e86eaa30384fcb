"""One rogue client among five sampled never wins (issue 29): by default its update,
at any scale or sign-flipped, is clipped to a multiple of the recent median norm
(`fedssl.engine.update_bound`) or, beyond `federation.robust.max_update_ratio`,
dropped, and either way counted. These tests use only what a run writes, so that
they say the same of a fedssl without the bound (where they fail)."""

import math

import pytest
import torch

from fedssl.algorithms.base import ALGORITHMS
from fedssl.algorithms.fedavg import FedAvg
from fedssl.algorithms.fedbuff import FedBuff
from fedssl.config.load import load_recipe
from fedssl.errors import UserError
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.engine.run import run_federation
from fedssl.learners.supervised import SupervisedLearner
from fedssl.tracking.run_logger import read_metrics

ROGUE = 4  # of the 5 clients, all sampled every round


class RogueLearner(SupervisedLearner):
    """A real FedAvg client; client ROGUE sends received + scale x (trained - received):
    a boosted update (model replacement, Bagdasaryan et al. 2020) or, with a negative
    scale, a sign-flipped one."""

    scale = 990.0

    def start_round(self, payload, context):
        super().start_round(payload, context)
        self.client_id, self.received = context.client_id, payload.arrays

    def arrays(self, names):
        out = super().arrays(names)
        if getattr(self, "client_id", None) != ROGUE:  # the server's learner scores, it does not send
            return out
        return {n: self.received[n] + self.scale * (v - self.received[n]) if v.is_floating_point() else v
                for n, v in out.items()}


def rogue_fedavg(scale: float, base: type[FedAvg] = FedAvg) -> type[FedAvg]:
    learner = type("Rogue", (RogueLearner,), {"scale": scale})

    class Rogue(base):
        def make_learner(self, model):
            return learner(model, self.cfg.train)

    return Rogue


@pytest.fixture
def register(monkeypatch):
    """Register the rogue FedAvg (or `base`) at `scale` for the duration of one test."""
    return lambda scale, base=FedAvg: monkeypatch.setitem(ALGORITHMS._entries, "rogue", rogue_fedavg(scale, base))


FIVE = ["algorithm.name=rogue", "federation.clients=5", "federation.clients_per_round=5", "federation.rounds=3"]


def finite(params) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in params.values() if v.is_floating_point())


@pytest.mark.parametrize("scale", [100.0, 990.0, -10.0, -990.0])
def test_one_rogue_is_clipped_counted_and_the_model_stays_sane(tiny_recipe, tmp_path, register, scale):
    register(scale)
    summary = run_federation(load_recipe(tiny_recipe, FIVE), tmp_path / "run")
    # Unbounded, its step is the mean's: the loss runs into the thousands, or NaN stops the run.
    assert summary["global_loss"] < 2.5, summary["global_loss"]  # chance on 7 classes is ln 7 = 1.95
    assert finite(load_checkpoint(tmp_path / "run" / "checkpoint.pt")["server_state"]["params"])
    rounds = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # the rogue each round, and at the default multiple (1.5) now and then an honest long step
    assert all(m["clipped_clients"] >= 1 for m in rounds) and summary["clipped_clients"] == sum(
        m["clipped_clients"] for m in rounds)
    assert [m["dropped_clients"] for m in rounds] == [0, 0, 0]


def test_an_absurd_rogue_is_still_dropped_and_counted(tiny_recipe, tmp_path, register):
    register(1e30)
    summary = run_federation(load_recipe(tiny_recipe, FIVE), tmp_path / "run")
    rounds = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["dropped_clients"] for m in rounds] == [1, 1, 1] and summary["dropped_clients"] == 3
    assert math.isfinite(summary["global_loss"]) and summary["global_loss"] < 2.5


def test_without_the_bound_the_rogue_wins(tiny_recipe, tmp_path, register):
    register(990.0)  # it passes max_update_ratio, and the model it moved diverges: every update NaN or absurd
    with pytest.raises(UserError, match="round 3 got 0 usable updates"):
        run_federation(load_recipe(tiny_recipe, [*FIVE, "federation.robust.update_clip.multiple=0"]), tmp_path / "run")


@pytest.mark.slow
def test_a_resumed_run_bounds_its_rounds_as_the_uninterrupted_one(tiny_recipe, tmp_path, register):
    register(990.0)
    window = "federation.robust.update_clip.window=1"  # round 3's bound is round 2's alone: the state must come back
    whole = run_federation(load_recipe(tiny_recipe, [*FIVE, window]), tmp_path / "whole")
    run_federation(load_recipe(tiny_recipe, [*FIVE, window, "federation.rounds=2"]), tmp_path / "killed")
    resumed = run_federation(load_recipe(tiny_recipe, [*FIVE, window]), tmp_path / "killed", resume=True)
    assert resumed["clipped_clients"] == whole["clipped_clients"] >= 3
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("whole", "killed"))
    assert all(torch.equal(a["server_state"]["params"][n], b["server_state"]["params"][n]) for n in a["server_state"]["params"])
    assert torch.equal(a["update_clip"]["norms"], b["update_clip"]["norms"]) and b["update_clip"]["counts"].tolist() == [5]


def test_fedbuffs_own_round_clips_the_rogue_too(tiny_recipe, tmp_path, register):
    register(990.0, FedBuff)  # every client in flight at once: each flush holds the rogue's change
    summary = run_federation(load_recipe(tiny_recipe, [*FIVE, "algorithm.fedbuff.buffer_size=5",
                                                       "algorithm.fedbuff.concurrency=5"]), tmp_path / "run")
    assert summary["global_loss"] < 2.5, summary["global_loss"]
    assert all(m["clipped_clients"] >= 1 for m in read_metrics(tmp_path / "run" / "metrics.jsonl"))
