"""Structured updates (Konečný et al. 2016): a low-rank update.

`low_rank` sends a rank-k factor of an array's delta H (reshaped to a matrix: the
first dimension by the rest). Konečný et al. fix a random factor A, regenerated
from a seed, and train only B in H = A B. Here the client trains as usual and
projects its delta afterwards: A = Q, the orthonormal basis of a seeded Gaussian
matrix on the longer side, and B = Q^T H, the least-squares factor, so only B
(k x the shorter side) travels and the receiver rebuilds Q B from the seed. A
truncated SVD would capture more of H at rank k but must send both factors (and
its left factor is no seed): with the shorter side s and longer side l, k (l + s)
values instead of k s. The projection is biased (it keeps H's part in a random
k-dimensional subspace); a 1-D array (a bias) is sent as it is.
"""

from __future__ import annotations

import torch

from fedssl.choices import CODECS
from fedssl.codecs.base import Codec, generator, numel


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[0], numel(shape[1:])) if len(shape) >= 2 else (numel(shape), 1)


@CODECS.register("low_rank")
class LowRank(Codec):
    """Projection of the delta onto a seeded random rank-k subspace of its longer side."""

    name = "low_rank"
    params = {"rank": 4}
    first_only = True

    @classmethod
    def check_params(cls, params):
        rank = params.get("rank")
        if rank is not None and rank < 1:
            return f"rank: must be >= 1, got {rank}"
        return None

    def compresses(self, shape: tuple[int, ...]) -> bool:
        rows, cols = matrix_shape(shape)
        return len(shape) >= 2 and self.rank < max(rows, cols)  # k x short values instead of long x short

    def layout(self, shape):
        if not self.compresses(shape):
            return numel(shape), {}
        rows, cols = matrix_shape(shape)
        return self.rank * min(rows, cols), {}

    def basis(self, length: int, seed: int) -> torch.Tensor:
        gaussian = torch.randn(length, self.rank, generator=generator(seed), dtype=torch.float64)
        return torch.linalg.qr(gaussian).Q.to(torch.float32)

    def encode(self, x, shape, seed):
        if not self.compresses(shape):
            return x, {}
        rows, cols = matrix_shape(shape)
        h = x.reshape(rows, cols) if rows >= cols else x.reshape(rows, cols).T
        return (self.basis(h.shape[0], seed).T @ h).reshape(-1), {}

    def decode(self, carry, parts, shape, seed):
        if not self.compresses(shape):
            return carry
        rows, cols = matrix_shape(shape)
        long, short = max(rows, cols), min(rows, cols)
        h = self.basis(long, seed) @ carry.reshape(self.rank, short)
        return (h if rows >= cols else h.T).reshape(-1)
