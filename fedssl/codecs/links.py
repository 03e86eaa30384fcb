"""What travels on each link, compressed: the recipe's codec pipelines on payloads
and updates (`federation.downlink.codecs`, `federation.uplink.codecs`).

Uplink: a client encodes its delta (the weights it trained minus the weights it
was sent), plus, with error feedback, what it left out before (its residual, kept
in the client state store under `RESIDUAL`); the server checks the encoded form,
decodes it and adds it back to what the client was sent, so that the usual update
checks (`faults.check_update`) and the aggregation see plain weights.
Downlink: the server encodes the weights themselves (a client holds no earlier
model to take a delta from) and keeps what the client will decode, which is what
its update is a delta from. Every random draw comes from (seed, round, client,
array), on both ends (`codecs.pipeline.array_seed`).

Codecs need an update that holds every shared array densely and is averaged (the
FedAvg family, the personalized ones included) or applied as a change (FedBuff);
FedMatch sends sparse deltas of its own decomposition and is refused
(`fedssl.algorithms.capabilities.check_compatible`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fedssl.codecs.pipeline import Pipeline, array_seed, decode_arrays, encode_arrays
from fedssl.config.schema import RecipeConfig
from fedssl.config.validate import codec_stages
from fedssl.messages import Arrays, Payload, Update

UP, DOWN = 1, 2  # the directions' seed streams
RESIDUAL = "codec.residual/"  # client state: the uplink's error-feedback residual, per array


@dataclass
class Links:
    """The run's codec pipelines, used by the server and by the clients alike."""

    seed: int
    up: Pipeline
    down: Pipeline

    @classmethod
    def build(cls, cfg: RecipeConfig) -> Links:
        up = Pipeline(codec_stages(cfg.federation.uplink.codecs, "federation.uplink.codecs"))
        down = Pipeline(codec_stages(cfg.federation.downlink.codecs, "federation.downlink.codecs"))
        return cls(cfg.seed, up, down)

    def seeds(self, round_index: int, client_id: int, direction: int, pipeline: Pipeline):
        return lambda name: [array_seed(self.seed, round_index, client_id, direction, name, stage)
                             for stage in range(len(pipeline.codecs))]

    # The server's side of the downlink, and the client's.

    def send_payload(self, payload: Payload, client_id: int) -> tuple[Payload, Arrays]:
        """The payload as it travels to `client_id`, and the weights the client will decode."""
        if not self.down:
            return payload, payload.arrays
        seeds = self.seeds(payload.round, client_id, DOWN, self.down)
        encoded = replace(payload, arrays=encode_arrays(payload.arrays, self.down, seeds))
        received, problem = decode_arrays(encoded.arrays, payload.arrays, self.down, seeds)
        if problem:
            raise AssertionError(f"the downlink could not decode its own payload: {problem}")
        return encoded, cast_like(received, payload.arrays)

    def open_payload(self, payload: Payload, client_id: int, shapes: Arrays) -> Payload:
        """The weights a client decodes from its payload (`shapes`: its model's shared
        arrays, which say what each encoded array is)."""
        if not self.down:
            return payload
        decoded, problem = decode_arrays(payload.arrays, shapes, self.down,
                                         self.seeds(payload.round, client_id, DOWN, self.down))
        if problem:
            raise ValueError(f"the payload of round {payload.round} cannot be decoded: {problem}")
        return replace(payload, arrays=cast_like(decoded, shapes))

    # The client's side of the uplink, and the server's.

    def send_update(self, update: Update, received: Arrays, round_index: int, kept: dict[str, torch.Tensor]
                    ) -> tuple[Update, dict[str, torch.Tensor]]:
        """The update as it travels (its delta from `received`, encoded), and the
        residuals to keep (`kept`: the client's state, which holds the earlier ones)."""
        if not self.up:
            return update, {}
        delta = {name: value.to(torch.float32) - received[name].to(torch.float32) if value.is_floating_point() else value
                 for name, value in update.arrays.items()}
        if self.up.error_feedback:
            delta = {name: value + kept[RESIDUAL + name] if RESIDUAL + name in kept else value
                     for name, value in delta.items()}
        seeds = self.seeds(round_index, update.client_id, UP, self.up)
        encoded = encode_arrays(delta, self.up, seeds)
        residuals = {}
        if self.up.error_feedback:  # what was meant minus what the server will decode
            sent, _ = decode_arrays(encoded, delta, self.up, seeds)
            residuals = {RESIDUAL + name: delta[name] - sent[name] for name in delta if delta[name].is_floating_point()}
        return replace(update, arrays=encoded), residuals

    def open_update(self, update: Update, received: Arrays, round_index: int, client_id: int) -> tuple[Update | None, str | None]:
        """The client's weights from its encoded update (`received`: what it was sent),
        or None and why the encoded form is unusable (untrusted: checked before decoding)."""
        if not self.up:
            return update, None
        decoded, problem = decode_arrays(update.arrays, received, self.up, self.seeds(round_index, client_id, UP, self.up))
        if problem:
            return None, f"its encoded update is malformed: {problem}"
        weights = {name: (received[name].to(torch.float32) + value).to(received[name].dtype)
                   if received[name].is_floating_point() else value for name, value in decoded.items()}
        return replace(update, arrays=weights), None


def cast_like(arrays: Arrays, like: Arrays) -> Arrays:
    return {name: value.to(like[name].dtype) for name, value in arrays.items()}


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A client's state as (its learner's, the uplink's residuals)."""
    own = {k: v for k, v in state.items() if not k.startswith(RESIDUAL)}
    return own, {k: v for k, v in state.items() if k.startswith(RESIDUAL)}
