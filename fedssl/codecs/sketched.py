"""Sketched updates (Konečný et al. 2016): a random rotation, then quantization.

- `hadamard`: a structured random rotation, x -> H D x / sqrt(B) in blocks of B
  (a power of two, at most `BLOCK`), D a diagonal of random signs from the shared
  seed, H the Walsh-Hadamard matrix. It is orthonormal and exactly inverted by the
  receiver, so it changes nothing alone (up to float rounding) and costs the
  padding to whole blocks; before quantization it spreads a vector's energy over
  its coordinates, which narrows the range that the levels must span (Konečný et
  al.'s "structured random rotations"; Suresh et al., "Distributed Mean Estimation
  with Limited Communication", ICML 2017).
- `quantize`: probabilistic quantization to b bits. With lo, hi the vector's min
  and max and s = 2^b - 1 levels apart by d = (hi - lo) / s, a value between levels
  l and l + 1 is rounded up with probability (x - lo) / d - l, so E[decoded] = x,
  with variance d^2 f (1 - f), f that fractional part. The levels are bit-packed,
  8 / b per uint8 byte, and lo, hi travel as two float32 values.
"""

from __future__ import annotations

import math

import torch

from fedssl.choices import CODECS
from fedssl.codecs.base import PRIVATE, Codec, generator, numel

BITS = (1, 2, 4, 8)  # widths that pack whole values into a byte
BLOCK = 4096  # the rotation's largest block: bounds the padding to under one block per array


def block_size(n: int) -> int:
    return min(BLOCK, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal Walsh-Hadamard transform of each row of x (rows of length 2^m);
    it is its own inverse."""
    rows, size = x.shape
    h = 1
    while h < size:
        pairs = x.reshape(rows, size // (2 * h), 2, h)
        x = torch.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), dim=2).reshape(rows, size)
        h *= 2
    return x / math.sqrt(size)


@CODECS.register("hadamard")
class Hadamard(Codec):
    """Randomized Hadamard rotation in blocks; exactly invertible (unbiased)."""

    name = "hadamard"
    unbiased = True

    def layout(self, shape):
        n = numel(shape)
        block = block_size(n)
        return math.ceil(n / block) * block, {}

    def signs(self, length: int, seed: int) -> torch.Tensor:
        return torch.randint(0, 2, (length,), generator=generator(seed)).to(torch.float32) * 2 - 1

    def encode(self, x, shape, seed):
        n, (length, _) = x.numel(), self.layout(shape)
        padded = torch.zeros(length, dtype=torch.float32)
        padded[:n] = x
        block = block_size(n)
        return walsh_hadamard((padded * self.signs(length, seed)).reshape(-1, block)).reshape(-1), {}

    def decode(self, carry, parts, shape, seed):
        n = numel(shape)
        block = block_size(n)
        return (walsh_hadamard(carry.reshape(-1, block)).reshape(-1) * self.signs(len(carry), seed))[:n]


def pack(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """Levels in [0, 2^bits) as bytes, 8 / bits per byte, the first in the low bits."""
    per = 8 // bits
    padded = torch.zeros(math.ceil(len(levels) / per) * per, dtype=torch.int32)
    padded[: len(levels)] = levels
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (padded.reshape(-1, per) << shifts).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return ((packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n]


@CODECS.register("quantize")
class Quantize(Codec):
    """Unbiased stochastic quantization to `bits` bits, bit-packed."""

    name = "quantize"
    params = {"bits": 2}
    unbiased = True
    terminal = True

    @classmethod
    def check_params(cls, params):
        bits = params.get("bits")
        if bits is not None and bits not in BITS:
            return f"bits: must be one of {', '.join(map(str, BITS))} (whole values per byte), got {bits}"
        return None

    def layout(self, shape):
        per = 8 // self.bits
        return None, {"levels": ((math.ceil(numel(shape) / per),), torch.uint8), "range": ((2,), torch.float32)}

    def encode(self, x, shape, seed):
        lo, hi = x.min(), x.max()
        steps = (1 << self.bits) - 1
        scaled = (x - lo) / (hi - lo) * steps if hi > lo else torch.zeros_like(x)
        floor = scaled.floor()
        up = torch.rand(x.shape, generator=generator(seed, PRIVATE)) < (scaled - floor)
        levels = (floor + up.to(torch.float32)).clamp(0, steps).to(torch.int32)
        return None, {"levels": pack(levels, self.bits), "range": torch.stack((lo, hi)).to(torch.float32)}

    def decode(self, carry, parts, shape, seed):
        lo, hi = parts["range"][0], parts["range"][1]
        steps = (1 << self.bits) - 1
        return lo + unpack(parts["levels"], self.bits, numel(shape)).to(torch.float32) * ((hi - lo) / steps)

    def check(self, parts, shape):
        lo, hi = parts["range"].tolist()
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            return f"range must be two finite values lo <= hi, got {lo}, {hi}"
        return None
