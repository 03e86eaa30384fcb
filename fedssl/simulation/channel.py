"""A simulated lossy uplink, and what the server does with what arrives.

Su, Li, Hu and Liu ("On Model Transmission Strategies in Federated Learning with
Lossy Communications", IEEE TPDS 2023) send model updates over links that lose
packets and compare what the server can do with the parts that arrive. Here each
array an update sends (as encoded: `federation.uplink.codecs`) is cut into packets
of `packet_bytes` (whole elements; a packet never spans two arrays), and each
packet is lost independently with probability `loss`, or by a Gilbert-Elliott
chain (a good and a bad state with their own loss rates, so losses come in
bursts); a lost packet is sent again up to `retransmissions` times and is lost
only if every attempt is. Every draw comes from (seed, round, client), so a run
and its resumption lose the same packets, on either backend (the loss is
simulated where the server receives the update).

The server's strategies (`strategy`):

- `drop`: an update that lost any packet is dropped (and counted as dropped);
- `mean`: each coordinate is averaged over the clients whose packet holding it
  arrived (weighted by their example counts); a coordinate no client delivered
  keeps the global value;
- `fill`: a missing coordinate takes the global value the client was sent (its
  delta there is zero), and the update is averaged as a whole.

A coordinate is located in its packet where the update is sent as plain values
(no codec, or `identity`); through any other codec an array is usable only whole,
so a lost packet loses its whole array (a lost packet of indices or packed bits
cannot be placed). Retransmitted packets are counted in `bytes_up`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedssl.config.schema import ChannelConfig
from fedssl.config.validate import lossy
from fedssl.messages import Arrays

CHANNEL_STREAM = 0xC4A  # the channel's random stream, apart from sampling, training and codecs


@dataclass(frozen=True)
class Delivery:
    """What became of one update's packets.

    Attributes:
        lost: per array sent, per element: whether its packet was lost for good.
        packets: packets sent once each (first transmissions).
        lost_packets: packets lost after every retransmission.
        retransmitted: retransmissions sent.
        retransmitted_bytes: their bytes (the update's own bytes are counted apart).
    """

    lost: dict[str, torch.Tensor]
    packets: int = 0
    lost_packets: int = 0
    retransmitted: int = 0
    retransmitted_bytes: int = 0


def packets_of(arrays: Arrays, packet_bytes: int) -> list[tuple[str, int, int]]:
    """Each packet as (array name, first element, end element), in the arrays' order."""
    packets = []
    for name, value in arrays.items():
        per = max(1, packet_bytes // value.element_size())
        packets += [(name, start, min(start + per, value.numel())) for start in range(0, value.numel(), per)]
    return packets


def channel_rng(seed: int, round_index: int, client_id: int) -> np.random.Generator:
    return np.random.default_rng([seed, round_index, client_id + 1, CHANNEL_STREAM])


def draw_losses(count: int, cfg: ChannelConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """For `count` packets: whether each is lost for good, and how many times each was
    sent. Attempts are made in passes (all packets, then the lost ones again, up to
    `retransmissions` more passes), one after another on the link: the
    Gilbert-Elliott chain runs on across them, starting from its stationary state."""
    attempts = np.zeros(count, dtype=np.int64)
    pending = np.arange(count)
    bad = None
    if cfg.model == "gilbert_elliott":
        stationary_bad = cfg.p_good_bad / (cfg.p_good_bad + cfg.p_bad_good)
        bad = rng.random() < stationary_bad
    for _ in range(cfg.retransmissions + 1):
        if not len(pending):
            break
        attempts[pending] += 1
        draws = rng.random(len(pending))
        if bad is None:
            lost = draws < cfg.loss
        else:
            moves = rng.random(len(pending))
            lost = np.empty(len(pending), dtype=bool)
            for i in range(len(pending)):
                lost[i] = draws[i] < (cfg.loss_bad if bad else cfg.loss_good)
                bad = moves[i] >= cfg.p_bad_good if bad else moves[i] < cfg.p_good_bad
        pending = pending[lost]
    gone = np.zeros(count, dtype=bool)
    gone[pending] = True
    return gone, attempts


def transmit(arrays: Arrays, cfg: ChannelConfig, seed: int, round_index: int, client_id: int) -> Delivery:
    """Send `arrays` (an update as it travels) over the channel; what arrived."""
    lost = {name: torch.zeros(value.numel(), dtype=torch.bool) for name, value in arrays.items()}
    if not lossy(cfg):
        return Delivery(lost)  # a perfect link draws nothing, so p = 0 is exactly no channel
    packets = packets_of(arrays, cfg.packet_bytes)
    gone, attempts = draw_losses(len(packets), cfg, channel_rng(seed, round_index, client_id))
    resent_bytes = 0
    for (name, start, end), is_gone, sent in zip(packets, gone, attempts):
        if is_gone:
            lost[name][start:end] = True
        resent_bytes += int(sent - 1) * (end - start) * arrays[name].element_size()
    return Delivery(lost, len(packets), int(gone.sum()), int(attempts.sum()) - len(packets), resent_bytes)


def arrived(delivery: Delivery, reference: Arrays, elementwise: bool) -> dict[str, torch.Tensor]:
    """Per array of the update (shaped as `reference`), which coordinates arrived.
    `elementwise`: floating arrays were sent as plain values (`NAME/values`, or
    under their own name), one element per coordinate; otherwise an array arrived
    only if every part of it did."""
    masks = {}
    for name, ref in reference.items():
        if name in delivery.lost:  # sent as it is
            masks[name] = ~delivery.lost[name].reshape(ref.shape)
        elif elementwise and f"{name}/values" in delivery.lost:
            masks[name] = ~delivery.lost[f"{name}/values"].reshape(ref.shape)
        else:
            whole = not any(bool(lost.any()) for key, lost in delivery.lost.items() if key.rpartition("/")[0] == name)
            masks[name] = torch.full(ref.shape, whole, dtype=torch.bool)
    return masks


def fill(weights: Arrays, masks: dict[str, torch.Tensor], reference: Arrays) -> Arrays:
    """`weights` where they arrived, `reference` (what the client was sent) elsewhere."""
    return {name: torch.where(masks[name], value, reference[name]) for name, value in weights.items()}


@dataclass
class MaskedAverage:
    """The example-weighted average of each coordinate over the updates that delivered
    it, folded in one update at a time (`strategy: mean`)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    total: int = 0

    def add(self, weights: Arrays, masks: dict[str, torch.Tensor], examples: int) -> None:
        if examples <= 0:
            return
        for name, value in weights.items():
            if name not in self.sums:
                self.sums[name] = torch.zeros(value.shape, dtype=torch.float64)
                self.weights[name] = torch.zeros(value.shape, dtype=torch.float64)
            delivered = masks[name].to(torch.float64) * examples
            self.sums[name] += delivered * value.to(torch.float64)
            self.weights[name] += delivered
        self.total += examples

    def average(self, fallback: Arrays) -> Arrays:
        """The average; a coordinate no update delivered keeps `fallback`'s value."""
        out = {}
        for name, total in self.sums.items():
            reached = self.weights[name] > 0
            mean = total / self.weights[name].clamp(min=1e-300)
            value = torch.where(reached, mean, fallback[name].to(torch.float64))
            dtype = fallback[name].dtype
            out[name] = value.to(dtype) if dtype.is_floating_point else value.round().to(dtype)
        return out


@dataclass
class Tally:
    """A round's uplink: its packets, and per coordinate how many of the updates that
    reached the server it was used from (`coordinate_participation_*`)."""

    packets: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("packets_sent", "packets_lost", "packets_retransmitted"), 0))
    used: dict[str, torch.Tensor] = field(default_factory=dict)
    updates: int = 0

    def add(self, delivery: Delivery, masks: dict[str, torch.Tensor] | None) -> None:
        """One update's delivery, and the coordinates used from it (None: it was unusable
        for another reason than the channel, and is not counted as reaching the server)."""
        self.packets["packets_sent"] += delivery.packets
        self.packets["packets_lost"] += delivery.lost_packets
        self.packets["packets_retransmitted"] += delivery.retransmitted
        if masks is None:
            return
        self.updates += 1
        for name, mask in masks.items():
            self.used.setdefault(name, torch.zeros(mask.shape, dtype=torch.int64)).add_(mask.to(torch.int64))

    def metrics(self) -> dict[str, float]:
        share = {"coordinate_participation_mean": 0.0, "coordinate_participation_min": 0.0}
        if self.updates and self.used:
            used = torch.cat([c.reshape(-1) for c in self.used.values()]).to(torch.float64) / self.updates
            share = {"coordinate_participation_mean": float(used.mean()), "coordinate_participation_min": float(used.min())}
        return self.packets | share
