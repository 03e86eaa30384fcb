"""What a codec is: one stage of the pipeline an array's update goes through.

Konečný, McMahan, Yu, Richtárik, Suresh and Bacon, "Federated Learning: Strategies
for Improving Communication Efficiency" (NIPS Workshop on Private Multi-Party
Machine Learning, 2016) compress what a client sends in stages: a structured or
sketched update, optionally rotated, then quantized. Here each stage is a codec: it
takes a float vector (the first stage: the array's delta, with the array's shape)
and returns

- its *carry*, the float vector the next stage encodes (None for a terminal stage
  such as quantization, whose output is no longer a float vector), and
- its *parts*, the arrays it sends itself (indices, packed bits, a range).

The last stage's carry travels as the `values` part. Randomness that both ends need
(a mask's positions, a rotation's signs, a projection) is drawn from a seed both
know, a function of (run seed, round, client, array), so none of it travels;
randomness only the sender needs (stochastic rounding) comes from another stream of
the same seed. Parts are plain tensors, so they cross any wire as arrays and their
bytes are counted like any other array's.

A codec is a class registered in `fedssl.choices.CODECS` by name; its `params`
are the recipe keys it takes (with defaults), which config validation checks.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]  # part name -> (shape, dtype)

SHARED, PRIVATE = 0, 1  # generator streams: drawn on both ends / on the sender only


def generator(seed: int, stream: int = SHARED) -> torch.Generator:
    """A CPU generator for one stage of one array: `seed` from `array_seed`."""
    state = np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class Codec:
    """One stage; subclasses set the class attributes and the four methods.

    Attributes:
        params: the recipe keys it takes, with their defaults.
        unbiased: whether E[decode(encode(x))] = x over the random draws.
        terminal: whether its output cannot be encoded further (no carry).
        first_only: whether it needs the array's own shape (it must come first).
    """

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}
    unbiased: ClassVar[bool] = False
    terminal: ClassVar[bool] = False
    first_only: ClassVar[bool] = False
    stateless: ClassVar[bool] = True  # False: it keeps state on the sender (error feedback)

    def __init__(self, **params: Any):
        unknown = set(params) - set(self.params)
        if unknown:
            raise TypeError(f"{self.name} takes no parameter {sorted(unknown)[0]!r}")
        for key, default in self.params.items():
            setattr(self, key, params.get(key, default) if params.get(key) is not None else default)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> str | None:
        """Why these parameter values are unusable (the key first), or None."""
        return None

    def layout(self, shape: tuple[int, ...]) -> tuple[int | None, Layout]:
        """For an input of `shape`: the carry's length (None: terminal) and the parts sent."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """`x` (flat float32, of `shape`'s size) -> (carry, parts)."""
        raise NotImplementedError

    def decode(self, carry: torch.Tensor | None, parts: dict[str, torch.Tensor], shape: tuple[int, ...],
               seed: int) -> torch.Tensor:
        """The flat float32 estimate of the input from what `encode` returned."""
        raise NotImplementedError

    def check(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> str | None:
        """Why received parts (of the right names, shapes and dtypes) cannot be
        decoded: an index out of range, a non-finite range. None if they can."""
        return None


def numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1
