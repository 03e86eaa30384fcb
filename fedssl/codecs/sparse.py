"""Codecs that send some coordinates: a random mask, random subsampling, top-k.

- `mask` (Konečný et al. 2016, structured updates, "random mask"): the update is
  restricted to a random set of positions drawn from the shared seed, so only the
  values travel. Konečný et al. train the update under that constraint; here the
  trained delta is projected onto the mask (the other coordinates are zeroed), so
  it is biased: the unsent coordinates simply do not move this round.
- `subsample` (their sketched updates, "random subsampling"): the same positions,
  but the kept values are scaled by n / k, so the estimate is unbiased, with
  variance x_i^2 (n / k - 1) per coordinate.
- `topk`: the k largest coordinates in magnitude, their positions sent as int32
  indices. Biased; with error feedback (Stich, Cordonnier and Jaggi, "Sparsified
  SGD with Memory", NeurIPS 2018; Karimireddy et al., "Error Feedback Fixes
  SignSGD", ICML 2019) the client adds what it did not send to its next update
  (the pipeline keeps that residual in the client state store).
"""

from __future__ import annotations

import math

import torch

from fedssl.choices import CODECS
from fedssl.codecs.base import Codec, Layout, generator, numel


def kept_count(fraction: float, n: int) -> int:
    """How many of n coordinates a fraction keeps: at least one."""
    return min(n, max(1, math.ceil(fraction * n)))


def check_fraction(params: dict) -> str | None:
    fraction = params.get("fraction")
    if fraction is not None and not 0 < fraction <= 1:
        return f"fraction: must be in (0, 1], got {fraction}"
    return None


def random_positions(n: int, k: int, seed: int) -> torch.Tensor:
    """k distinct positions of n, increasing, drawn from the shared seed (both ends draw them)."""
    return torch.randperm(n, generator=generator(seed))[:k].sort().values


def scatter(n: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float32).index_put_((index.long(),), values.to(torch.float32))


@CODECS.register("identity")
class Identity(Codec):
    """Sends the delta as it is (float32): today's dense update, as a delta."""

    name = "identity"
    unbiased = True

    def layout(self, shape: tuple[int, ...]) -> tuple[int | None, Layout]:
        return numel(shape), {}

    def encode(self, x, shape, seed):
        return x, {}

    def decode(self, carry, parts, shape, seed):
        return carry


@CODECS.register("mask")
class RandomMask(Codec):
    """The delta on a random set of `fraction` of the positions; only values travel."""

    name = "mask"
    params = {"fraction": 0.1}
    scale = False  # subsample scales the kept values by n / k
    check_params = staticmethod(check_fraction)

    def layout(self, shape):
        return kept_count(self.fraction, numel(shape)), {}

    def encode(self, x, shape, seed):
        n = x.numel()
        k = kept_count(self.fraction, n)
        kept = x[random_positions(n, k, seed)]
        return (kept * (n / k) if self.scale else kept), {}

    def decode(self, carry, parts, shape, seed):
        n = numel(shape)
        return scatter(n, random_positions(n, len(carry), seed), carry)


@CODECS.register("subsample")
class Subsample(RandomMask):
    """Random subsampling: the masked values scaled by n / k (unbiased)."""

    name = "subsample"
    unbiased = True
    scale = True


@CODECS.register("topk")
class TopK(Codec):
    """The `fraction` largest coordinates in magnitude and their int32 positions."""

    name = "topk"
    params = {"fraction": 0.01, "error_feedback": True}
    check_params = staticmethod(check_fraction)

    @property
    def stateless(self) -> bool:  # type: ignore[override]
        return not self.error_feedback

    def layout(self, shape):
        k = kept_count(self.fraction, numel(shape))
        return k, {"index": ((k,), torch.int32)}

    def encode(self, x, shape, seed):
        k = kept_count(self.fraction, x.numel())
        index = x.abs().topk(k, sorted=False).indices.sort().values
        return x[index], {"index": index.to(torch.int32)}

    def decode(self, carry, parts, shape, seed):
        return scatter(numel(shape), parts["index"], carry)

    def check(self, parts, shape):
        index, n = parts["index"], numel(shape)
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= n):
            return f"index out of range for {n} entries"
        if len(index) > 1 and not bool((index[1:] > index[:-1]).all()):
            return "index must be strictly increasing (distinct positions, in order)"
        return None
