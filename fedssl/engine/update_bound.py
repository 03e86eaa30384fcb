"""The default defence against a rogue client: each update's norm bounded by the
norms of the updates the server has seen lately.

Sun, Kairouz, Suresh and McMahan, "Can You Really Backdoor Federated Learning?"
(2019), show that norm clipping stops model replacement, where one client scales
its update so that it outweighs the others in the mean (Bagdasaryan et al.,
"How To Backdoor Federated Learning", 2020). The bound here is set from the
evidence rather than by hand: `federation.robust.update_clip.multiple` x the median L2
norm of the updates accepted in the last `federation.robust.update_clip.window` rounds
(before any round was accepted, the median of the round's own updates, held until
they have all arrived). An update longer than the bound is scaled down to it
(clipped, not dropped: an honest client with a large step still helps), and
counted in the round's `clipped_clients`. With one rogue among five sampled the
median is honest, so the rogue moves the mean by at most its example share (1/5
with equal counts) of 1.5 honest step lengths (the default multiple), whatever its
scale or sign.

`faults.check_update` still drops what no bound makes usable (non-finite values,
an update past `federation.robust.max_update_ratio`). The norm is `faults.update_distance`,
the distance an update moved the floating arrays it was sent (a sparse delta's
values, FedMatch); integer buffers (BatchNorm's `num_batches_tracked`) are counters
and left as they are. What this does not stop: a sign-flipped update within the
bound (it still subtracts its share of the round's step: tools/bench_rogue.py
measures the cost), a coordinated minority sending updates just within it, a slow
drift, a backdoor or flipped labels within it. Honest updates are too close to
orthogonal for a direction test to tell a flipped one apart (their cosine with the
median of the others spans about -0.2 to +0.6 on the quickstart), and the robust
`federation.robust.aggregator`s lose as much to a sign flip (BENCHMARKS.md).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import replace
from typing import Any, Sequence

import torch

from fedssl.engine.checks import update_distance
from fedssl.messages import Arrays, Update


def clip_update(update: Update, reference: Arrays, bound: float) -> tuple[Update, float]:
    """`update` with its move from the `reference` arrays (what the client was sent)
    scaled down to L2 norm `bound` if it is longer (Sun et al. 2019); returns it and
    its norm before clipping."""
    norm = update_distance(update, reference)
    if norm <= bound:
        return update, norm
    scale = bound / norm
    arrays = {}
    for name, value in update.arrays.items():
        if name in reference and value.is_floating_point():
            arrays[name] = reference[name] + (value - reference[name]) * scale
        elif name.endswith("/value"):  # a sparse delta's values are its move
            arrays[name] = value * scale
        else:  # integer counters, a sparse delta's positions
            arrays[name] = value
    return replace(update, arrays=arrays), norm


def median_bound(norms: Sequence[float], multiple: float) -> float:
    """`multiple` x the median of `norms` (the mean of the middle two for an even count)."""
    return multiple * statistics.median(norms)


class RoundClip:
    """One round's updates through the bound, in the order they arrive: clipped at
    once where the bound is known (`bound`, inf: no clipping), else (None) held until
    `finish`, when the round's own updates set it. Each update travels with `extra`,
    what its round needs beside it (the lossy link's masks).

    Attributes:
        norms: the norms before clipping of the updates let through that trained
            (a client that reported no examples is no evidence of a step's length).
        clipped: how many of them were clipped.
    """

    def __init__(self, bound: float | None, multiple: float):
        self.bound, self.multiple = bound, multiple
        self.held: list[tuple[Update, Arrays, Any]] = []
        self.norms: list[float] = []
        self.clipped = 0

    def admit(self, update: Update, reference: Arrays, extra: Any = None) -> list[tuple[Update, Any]]:
        """The updates ready to aggregate now, with their `extra`: `update` clipped, or
        none while the round holds them."""
        if self.bound is None:
            self.held.append((update, reference, extra))
            return []
        return [(self._clip(update, reference), extra)]

    def finish(self) -> list[tuple[Update, Any]]:
        """The held updates, clipped to `multiple` x the median of their own norms."""
        if self.bound is not None:
            return []
        evidence = [update_distance(u, reference) for u, reference, _ in self.held if u.num_examples > 0]
        self.bound = median_bound(evidence, self.multiple) if evidence else math.inf
        held, self.held = self.held, []
        return [(self._clip(update, reference), extra) for update, reference, extra in held]

    def _clip(self, update: Update, reference: Arrays) -> Update:
        if not math.isfinite(self.bound):
            return update
        update, norm = clip_update(update, reference, self.bound)
        self.clipped += norm > self.bound
        if update.num_examples > 0:
            self.norms.append(norm)
        return update


class UpdateBound:
    """The norms of the updates accepted in the last `window` rounds, and the bound
    they set: the server-side state of the clip, checkpointed with the run so that a
    resumed run bounds its next round as the killed one would have.

    Args:
        multiple: `federation.robust.update_clip.multiple` (0: no clipping).
        window: `federation.robust.update_clip.window`, the rounds whose norms are kept.
    """

    def __init__(self, multiple: float, window: int):
        self.multiple = multiple
        self.rounds: deque[list[float]] = deque(maxlen=window)

    @property
    def enabled(self) -> bool:
        return self.multiple > 0

    def start_round(self) -> RoundClip:
        """A round's pass through the bound: `multiple` x the median norm of the recent
        rounds' updates, or before any, of the round's own; no clipping if disabled."""
        if not self.enabled:
            return RoundClip(math.inf, self.multiple)
        recent = [norm for norms in self.rounds for norm in norms]
        return RoundClip(median_bound(recent, self.multiple) if recent else None, self.multiple)

    def record(self, norms: Sequence[float]) -> None:
        """Remember an accepted round's norms, before clipping (the median is robust to
        a minority of outliers, and an honest growth of the norms is followed at once);
        a round without usable updates adds no evidence."""
        if norms:
            self.rounds.append([float(n) for n in norms])

    def state_dict(self) -> dict[str, Any]:
        return {"norms": torch.tensor([n for norms in self.rounds for n in norms], dtype=torch.float64),
                "counts": torch.tensor([len(norms) for norms in self.rounds], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`'s window; a `ValueError` if it is malformed (a checkpoint is untrusted)."""
        norms, counts = (state.get("norms"), state.get("counts")) if isinstance(state, dict) else (None, None)
        if not (isinstance(norms, torch.Tensor) and norms.dtype == torch.float64 and norms.ndim == 1
                and isinstance(counts, torch.Tensor) and counts.dtype == torch.int64 and counts.ndim == 1
                and bool((counts > 0).all()) and int(counts.sum()) == len(norms)
                and bool((torch.isfinite(norms) & (norms >= 0)).all())):
            raise ValueError("update_clip: norms must be a vector of finite float64 norms >= 0, split by counts, "
                             "an int64 vector of positive counts")
        self.rounds.clear()
        for part in norms.split(counts.tolist()):
            self.rounds.append(part.tolist())
