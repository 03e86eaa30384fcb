"""The round seam: capabilities checked in one place, and an algorithm's own round
(FedBuff's) sends every update through the same stages as a synchronous round."""

import math

import pytest

from fedssl.algorithms.base import ALGORITHMS, Algorithm
from fedssl.algorithms.capabilities import Capabilities, check_compatible
from fedssl.config.load import load_recipe
from fedssl.engine.run import run_federation
from fedssl.engine.stages import READS_EACH_UPDATE
from fedssl.errors import UserError
from fedssl.tracking.run_logger import read_metrics

FEDBUFF = ["algorithm.name=fedbuff", "algorithm.fedbuff.buffer_size=2", "algorithm.fedbuff.concurrency=3",
           "federation.rounds=2"]
LOSSY = ["federation.uplink.channel.loss=0.5", "federation.uplink.channel.packet_bytes=256"]


@pytest.mark.parametrize("overrides, line", [
    (["algorithm.name=fedmatch", "federation.robust.aggregator=median"], "federation.robust.aggregator: median is not available"),
    (["algorithm.name=fednova", "privacy.mechanism=central"], "privacy.mechanism: central is not available"),
    (["algorithm.name=fedmatch", "federation.uplink.codecs=[{name: quantize}]"], "federation.uplink.codecs: "),
    (["algorithm.name=fedma", *LOSSY], "federation.uplink.channel: algorithm.name=fedma does not average"),
    ([*FEDBUFF, *LOSSY, "federation.uplink.channel.strategy=mean"], "federation.uplink.channel.strategy: "),
    ([*FEDBUFF, "federation.backend=flower"], "federation.backend: fedbuff runs on the inprocess backend only"),
    ([*FEDBUFF, "federation.system.profile=uniform", "federation.system.policy=deadline",
      "federation.system.deadline=5"], "federation.system.policy: fedbuff has no synchronous rounds"),
    ([*FEDBUFF, "algorithm.server_momentum=0.9"], "algorithm.server_momentum: fedbuff applies its server step"),
])
def test_every_refusal_is_one_line_naming_the_key(tiny_recipe, overrides, line):
    cfg = load_recipe(tiny_recipe, overrides)
    algorithm = ALGORITHMS.get(cfg.algorithm.name)(cfg)
    with pytest.raises(UserError) as refused:
        check_compatible(cfg, algorithm.capabilities)
    message = str(refused.value)
    assert message.startswith(line) and "\n" not in message, message


def test_a_flower_resume_is_refused_where_clients_keep_state_on_their_nodes(tiny_recipe):
    cfg = load_recipe(tiny_recipe, ["algorithm.name=fedper"])
    check_compatible(cfg, ALGORITHMS.get("fedper")(cfg).capabilities)  # a fresh run is fine
    with pytest.raises(UserError, match="cannot resume: with algorithm.name=fedper"):
        check_compatible(cfg, ALGORITHMS.get("fedper")(cfg).capabilities, resume_on_nodes=True)


def test_what_needs_each_update_is_declared():
    """Secure aggregation (the server sees only a sum) must refuse these or move them to the client."""
    assert set(READS_EACH_UPDATE) == {"check", "bound", "receive", "fold"}
    for name in ALGORITHMS.names():
        can = ALGORITHMS.get(name).capabilities
        if isinstance(can, Capabilities):  # a property where the recipe decides: FixMatch, FedAffect
            assert bool(can.reads_each_update) == (not can.averages_updates), name
    assert Algorithm.capabilities.reads_each_update  # an algorithm that declares nothing is assumed to need them


def test_fedbuffs_updates_take_the_codecs(tiny_recipe, tmp_path):
    plain = run_federation(load_recipe(tiny_recipe, FEDBUFF), tmp_path / "plain")
    coded = run_federation(load_recipe(tiny_recipe, [*FEDBUFF, "federation.uplink.codecs=[{name: quantize, bits: 8}]"]),
                           tmp_path / "coded")
    assert coded["bytes_up"] < plain["bytes_up"] / 3  # 8-bit codes for 32-bit floats, plus scales
    assert coded["bytes_down"] == plain["bytes_down"]
    assert math.isfinite(coded["global_loss"]) and coded["dropped_clients"] == 0


def test_fedbuffs_updates_cross_the_lossy_link(tiny_recipe, tmp_path):
    """Strategy fill: each arrival's lost coordinates take the weights its client was sent (no change there)."""
    summary = run_federation(load_recipe(tiny_recipe, [*FEDBUFF, *LOSSY, "federation.uplink.channel.strategy=fill"]),
                             tmp_path / "run")
    rounds = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(m["packets_lost"] > 0 and m["coordinate_participation_mean"] < 0.75 for m in rounds)
    assert summary["dropped_clients"] == 0 and math.isfinite(summary["global_loss"])


def test_fedbuffs_partly_delivered_updates_are_dropped_under_strategy_drop(tiny_recipe, tmp_path, caplog):
    cfg = load_recipe(tiny_recipe, [*FEDBUFF, *LOSSY])
    with pytest.raises(UserError, match="algorithm.fedbuff: round 1 has no client in flight after 0 of buffer_size=2"):
        run_federation(cfg, tmp_path / "run")
    # every client was started once, and none of its update was used
    assert caplog.text.count("packets were lost (federation.uplink.channel.strategy=drop)") == cfg.federation.clients
