"""The lossy uplink: its draws are the seeded ones, a perfect link changes nothing,
and the server's strategies give the hand-computed results."""

import json

import numpy as np
import pytest
import torch

from fedssl.config.load import load_recipe
from fedssl.config.schema import ChannelConfig
from fedssl.simulation.channel import (Delivery, MaskedAverage, Tally, arrived, channel_rng, draw_losses, fill,
                                       packets_of, transmit)
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.engine.run import run_federation
from fedssl.sampling import sample_clients


def test_packets_hold_whole_elements_and_never_span_two_arrays():
    arrays = {"a": torch.zeros(10), "b": torch.zeros(3, dtype=torch.uint8), "c": torch.zeros(1, dtype=torch.float64)}
    assert packets_of(arrays, 16) == [("a", 0, 4), ("a", 4, 8), ("a", 8, 10), ("b", 0, 3), ("c", 0, 1)]
    assert packets_of(arrays, 2) == [("a", i, i + 1) for i in range(10)] + [("b", 0, 2), ("b", 2, 3), ("c", 0, 1)]


def test_lost_packets_are_the_seeded_draws_and_the_rate_is_p_to_the_attempts():
    cfg = ChannelConfig(loss=0.3, retransmissions=1, packet_bytes=4)
    arrays = {"w": torch.zeros(20000)}
    delivery = transmit(arrays, cfg, seed=5, round_index=2, client_id=7)
    gone, attempts = draw_losses(20000, cfg, channel_rng(5, 2, 7))
    assert delivery.lost_packets == int(gone.sum()) and torch.equal(delivery.lost["w"], torch.from_numpy(gone))
    assert delivery.packets == 20000 and delivery.retransmitted == int(attempts.sum()) - 20000
    assert delivery.retransmitted_bytes == 4 * delivery.retransmitted
    # a packet is lost for good with probability p^(r + 1) = 0.09, and resent with probability p
    assert abs(delivery.lost_packets / 20000 - 0.09) < 4 * np.sqrt(0.09 * 0.91 / 20000)
    assert abs(delivery.retransmitted / 20000 - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 20000)
    # another client, another draw; the same client, the same draw
    assert not torch.equal(transmit(arrays, cfg, 5, 2, 8).lost["w"], delivery.lost["w"])
    assert torch.equal(transmit(arrays, cfg, 5, 2, 7).lost["w"], delivery.lost["w"])


def test_gilbert_elliott_losses_come_in_bursts_at_the_stationary_rate():
    cfg = ChannelConfig(model="gilbert_elliott", p_good_bad=0.02, p_bad_good=0.2, loss_good=0.0, loss_bad=1.0)
    gone, _ = draw_losses(50000, cfg, np.random.default_rng(0))
    bad_share = 0.02 / 0.22
    assert abs(gone.mean() - bad_share) < 0.02
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, gone.astype(int), 0])))[::2]  # lengths of runs of losses
    assert runs.mean() == pytest.approx(1 / 0.2, rel=0.15)  # a bad spell lasts 1 / p_bad_good packets


def test_a_lost_packet_of_an_encoded_array_loses_the_whole_array():
    reference = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    lost = {"w/0.index": torch.tensor([False, True]), "w/values": torch.tensor([False, False]),
            "b/values": torch.tensor([False, False])}
    masks = arrived(Delivery(lost), reference, elementwise=False)
    assert not masks["w"].any() and masks["b"].all()
    plain = arrived(Delivery({"w/values": torch.tensor([0, 1, 0, 0, 0, 1], dtype=torch.bool),
                              "b/values": torch.tensor([False, False])}), reference, elementwise=True)
    assert plain["w"].tolist() == [[True, False, True], [True, True, False]]


def test_the_strategies_on_a_hand_computed_example():
    # two clients with 1 and 3 examples; client A's coordinates 3 and 4 were lost, B's 2 and 4
    a, b = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}, {"w": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    mask_a = {"w": torch.tensor([True, True, False, False])}
    mask_b = {"w": torch.tensor([True, False, True, False])}
    sent = {"w": torch.tensor([10.0, 10.0, 10.0, 10.0])}
    # mean: each coordinate over the clients it reached; the 4th reached none and keeps the global value
    average = MaskedAverage()
    average.add(a, mask_a, 1)
    average.add(b, mask_b, 3)
    assert average.average(sent)["w"].tolist() == [(1 + 3 * 5) / 4, 2.0, 7.0, 10.0]
    # fill: the missing coordinates take what the client was sent, then the usual weighted mean
    filled_a, filled_b = fill(a, mask_a, sent), fill(b, mask_b, sent)
    assert filled_a["w"].tolist() == [1.0, 2.0, 10.0, 10.0] and filled_b["w"].tolist() == [5.0, 10.0, 7.0, 10.0]
    from fedssl.algorithms.aggregate import weighted_average
    from fedssl.messages import Update

    mean = weighted_average([Update(0, filled_a, 1), Update(1, filled_b, 3)])
    assert mean["w"].tolist() == [4.0, 8.0, 7.75, 10.0]
    # the share of the updates that reached the server each coordinate was used from
    tally = Tally()
    tally.add(Delivery({}, packets=4, lost_packets=2, retransmitted=1), mask_a)
    tally.add(Delivery({}, packets=4, lost_packets=2), mask_b)
    tally.add(Delivery({}, packets=4, lost_packets=1), {"w": torch.zeros(4, dtype=torch.bool)})  # dropped: none used
    tally.add(Delivery({}, packets=4), None)  # unusable for another reason: its packets count, nothing else
    assert tally.metrics() == {"packets_sent": 16, "packets_lost": 5, "packets_retransmitted": 1,
                               "coordinate_participation_mean": pytest.approx(4 / 12),
                               "coordinate_participation_min": 0.0}


def run(tiny_recipe, tmp_path, name, overrides):
    cfg = load_recipe(tiny_recipe, ["federation.rounds=2", "train.local_steps=2", *overrides])
    run_federation(cfg, tmp_path / name)
    metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return load_checkpoint(tmp_path / name / "checkpoint.pt")["server_state"]["params"], metrics


@pytest.mark.slow
def test_a_perfect_link_is_exactly_no_channel(tiny_recipe, tmp_path):
    plain, plain_metrics = run(tiny_recipe, tmp_path, "plain", [])
    perfect = [["federation.uplink.channel.loss=0", "federation.uplink.channel.strategy=mean"],
               ["federation.uplink.channel.model=gilbert_elliott", "federation.uplink.channel.p_good_bad=0"]]
    for i, overrides in enumerate(perfect):
        linked, metrics = run(tiny_recipe, tmp_path, f"perfect{i}", overrides)
        assert all(torch.equal(plain[n], linked[n]) for n in plain), overrides
        assert metrics == [m | {"seconds": n["seconds"]} for m, n in zip(plain_metrics, metrics)]


@pytest.mark.parametrize("strategy", ["drop", "mean", "fill"])
def test_a_lossy_run_loses_the_seeded_packets(tiny_recipe, tmp_path, strategy):
    # p and the packet size make every round's draw lose packets of some clients but not of all
    channel = ["federation.uplink.channel.loss=0.02", "federation.uplink.channel.retransmissions=0",
               f"federation.uplink.channel.strategy={strategy}", "federation.uplink.channel.packet_bytes=65536"]
    params, metrics = run(tiny_recipe, tmp_path, "lossy", channel)
    cfg = load_recipe(tiny_recipe, channel)
    packets = len(packets_of(params, 65536))
    for m in metrics:  # the packets every sampled client lost, drawn again from (seed, round, client)
        clients = sample_clients(6, 3, 0, m["round"])
        draws = [draw_losses(packets, cfg.federation.uplink.channel, channel_rng(0, m["round"], c)) for c in clients]
        assert m["packets_sent"] == 3 * packets
        assert m["packets_lost"] == sum(int(gone.sum()) for gone, _ in draws)
        assert m["packets_retransmitted"] == 0
        training = m["bytes_up"] - sum(v.numel() * v.element_size() for v in params.values()) * 3
        assert training == 0  # no retransmissions: the bytes of the three updates
    assert sum(m["packets_lost"] for m in metrics) > 0
    dropped = sum(m["dropped_clients"] for m in metrics)
    assert dropped > 0 if strategy == "drop" else dropped == 0
    assert all(0 <= m["coordinate_participation_min"] <= m["coordinate_participation_mean"] + 1e-12 <= 1 + 1e-12
               for m in metrics)
    if strategy == "drop":  # each round used every coordinate of the one update that arrived whole, of 3
        assert [m["coordinate_participation_min"] for m in metrics] == pytest.approx([1 / 3, 1 / 3])
    else:  # a lost packet's coordinates were not used from that client
        assert all(m["coordinate_participation_min"] < 1 for m in metrics if m["packets_lost"])
