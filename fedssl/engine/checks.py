"""Faulty and rogue clients: which replies the server must not use.

A client may crash, diverge (NaN/inf weights), send arrays that do not fit the
model (a wrong name, shape or dtype, from a stale or tampered client), claim more
examples than it holds (which the example-weighted mean trusts), send an update
that moves the weights absurdly far (one finite x1e30 update turns the mean into
inf/NaN), or report evaluation rows that are incomplete, out of range, or about
clients it does not serve. The server drops such a reply with a warning naming the
client and why, and counts it in the round's `dropped_clients`; it never reaches the
model or the metrics. A round left with too few usable updates is retried or stops
(see `Federation.collect`).
"""

from __future__ import annotations

import math
from typing import Any, Collection, Mapping

import torch

from fedssl.clients import Holding
from fedssl.messages import Arrays, Update

SPARSE = ("/index", "/value")  # an array sent as a sparse delta: NAME/index + NAME/value (FedMatch)
# Every key of an evaluation row, and nothing else: per-client scores, never per-sample values.
ROW_KEYS = ("client", "kind", "test_samples", "acc", "loss", "personal_acc", "personal_loss", "personal_f1")
SCORE_KEYS = ("acc", "personal_acc", "personal_f1")  # in [0, 1] (personal_f1: the personal model's macro-F1)
LOSS_KEYS = ("loss", "personal_loss")  # finite, >= 0
PSEUDO_LABEL_COUNTS = ("pl_correct", "pl_masked", "pl_seen")  # each at most the next


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_finite(value: int | float) -> bool:
    """Whether a number is finite as a float: a node may send an int past float's
    range (10**400), which math.isfinite cannot convert and which no mean survives."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _sparse_problem(name: str, reference: torch.Tensor, index: torch.Tensor | None, value: torch.Tensor | None) -> str | None:
    if index is None or value is None:
        return f"sparse array {name!r} lacks its {'/index' if index is None else '/value'} part"
    if index.dim() != 1 or value.dim() != 1 or len(index) != len(value):
        return f"sparse array {name!r}: index and value must be 1-D of one length, got {tuple(index.shape)} and {tuple(value.shape)}"
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        return f"sparse array {name!r}: index must be integer, got {dtype_name(index.dtype)}"
    if value.dtype != reference.dtype:
        return f"sparse array {name!r}: value is {dtype_name(value.dtype)}, expected {dtype_name(reference.dtype)}"
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= reference.numel()):
        return f"sparse array {name!r}: index out of range for {reference.numel()} entries"
    if len(index) > 1 and not bool((index[1:] > index[:-1]).all()):  # a repeated position would add up past the norm check
        return f"sparse array {name!r}: index must be strictly increasing (distinct positions, in order)"
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        return f"non-finite values in {name + '/value'!r}"
    return None


def _metrics_problem(metrics: Mapping[str, Any]) -> str | None:
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not is_finite(value):
            return f"metric {key!r} must be a finite number, got {value!r}"
    counts = [metrics.get(key, 0) for key in PSEUDO_LABEL_COUNTS]
    if not all(is_count(c) for c in counts) or not counts[0] <= counts[1] <= counts[2]:
        return "pseudo-label counts must be counts with pl_correct <= pl_masked <= pl_seen"
    return None


def weights_norm(arrays: Arrays) -> float:
    """The L2 norm over the floating arrays, in float64 (float32 squares overflow at 1e19)."""
    return math.sqrt(sum(float(a.double().square().sum()) for a in arrays.values() if a.is_floating_point()))


def update_distance(update: Update, reference: Arrays) -> float:
    """||w_client - w_sent|| over the floating arrays, in float64; a sparse delta's
    values are its differences, and an array left out did not move."""
    total = 0.0
    for name, value in update.arrays.items():
        if name in reference:
            if value.is_floating_point():
                total += float((value.double() - reference[name].double()).square().sum())
        elif name.endswith("/value"):
            total += float(value.double().square().sum())
    return math.sqrt(total)


def _arrays_problem(arrays: Arrays, reference: Arrays, dense: bool) -> str | None:
    """Why an update's arrays do not fit the `reference` arrays it was sent (see `check_update`)."""
    sparse: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in arrays.items():
        if not isinstance(value, torch.Tensor):
            return f"array {name!r} is a {type(value).__name__}, not a tensor"
        base, suffix = name.rsplit("/", 1) if "/" in name else (name, "")
        if not dense and name not in reference and f"/{suffix}" in SPARSE and base in reference:
            sparse.setdefault(base, {})[suffix] = value
            continue
        if name not in reference:
            return f"unexpected array {name!r} (not among the {len(reference)} arrays sent)"
        if value.shape != reference[name].shape:
            return f"array {name!r} has shape {tuple(value.shape)}, expected {tuple(reference[name].shape)}"
        if value.dtype != reference[name].dtype:
            return f"array {name!r} is {dtype_name(value.dtype)}, expected {dtype_name(reference[name].dtype)}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"non-finite values in {name!r}"
    for base, parts in sparse.items():
        if base in arrays:
            return f"array {base!r} sent both dense and sparse"
        problem = _sparse_problem(base, reference[base], parts.get("index"), parts.get("value"))
        if problem:
            return problem
    if dense:
        missing = [name for name in reference if name not in arrays]
        if missing:
            return f"missing array {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    return None


def check_update(update: Update, reference: Arrays, dense: bool = True, max_examples: int | None = None,
                 max_ratio: float = math.inf) -> str | None:
    """Why `update` cannot be aggregated against the `reference` arrays the client
    received (its payload), or None if it can.

    With `dense` (the FedAvg family), an update holds exactly the reference arrays,
    by name, shape and dtype. Otherwise (FedMatch) it may send an array as a sparse
    delta, NAME/index (integer flat positions, strictly increasing) + NAME/value (the array's
    dtype), and leave arrays out (they are unchanged). Every floating value must be
    finite, metrics finite numbers, the example count a count of at most
    `max_examples` (what the server knows the client holds), and the update's
    distance from the reference at most `max_ratio` x max(||reference||, 1): a bound
    each update is checked against alone, as it arrives, so that a round can average
    updates as they come (a median of the round would need them all first).
    """
    n = update.num_examples
    if not is_count(n):
        return f"num_examples must be a count, got {n!r}"
    if max_examples is not None and n > max_examples:
        return f"num_examples {n} exceeds the {max_examples} examples the client holds"
    problem = _metrics_problem(update.metrics) or _arrays_problem(update.arrays, reference, dense)
    if problem:
        return problem
    if math.isfinite(max_ratio):
        distance, scale = update_distance(update, reference), max(weights_norm(reference), 1.0)
        if not distance <= max_ratio * scale:  # `not <=`: an infinite distance fails too
            return (f"it moved the weights by {distance:.3g}, more than federation.robust.max_update_ratio={max_ratio:g} "
                    f"x {scale:.3g} (the norm of the weights it was sent)")
    return None


def accept_rows(rows: list[Mapping[str, Any]], asked: Collection[int], holdings: Mapping[int, Holding]
                ) -> tuple[list[dict[str, Any]], list[str]]:
    """The usable rows of one node's evaluation reply, and why each of the others
    was dropped (`check_row`; a second row about a client; a client it was asked
    about and sent no row for)."""
    good, problems, answered = [], [], set()
    for row in rows:
        problem = check_row(row, asked, holdings)
        if problem is None and row["client"] in answered:
            problem = f"a second row about client {row['client']}"
        if problem is None:
            good.append(dict(row))
        else:
            problems.append(problem)
        if is_count(row.get("client")) and row["client"] in asked:
            answered.add(row["client"])
    problems += [f"no row about client {c}, which it was asked to score" for c in asked if c not in answered]
    return good, problems


def check_row(row: Mapping[str, Any], asked: Collection[int], holdings: Mapping[int, Holding]) -> str | None:
    """Why an evaluation row a node sent cannot be used, or None if it can: it must
    be about one of the clients the node was `asked` to score, hold exactly
    `ROW_KEYS`, the client's kind and test size as the server knows them
    (`holdings`), accuracies and F1 in [0, 1] and losses finite and >= 0 (NaN where the
    client has no local test split, as an honest node reports)."""
    client = row.get("client")
    if not is_count(client) or client not in asked:
        return f"a row about client {client!r}, which it was not asked to score"
    missing = [key for key in ROW_KEYS if key not in row]
    if missing:
        return f"the row of client {client} lacks {', '.join(missing)}"
    extra = sorted(map(str, set(row) - set(ROW_KEYS)))  # str: a key from the wire may be of any type
    if extra:
        return f"the row of client {client} has unexpected keys {', '.join(extra)}"
    known = holdings[client]
    if row["kind"] != known.kind:
        return f"the row of client {client} says kind {row['kind']!r}, the client is {known.kind}"
    if row["test_samples"] != known.test_samples or not is_count(row["test_samples"]):
        return f"the row of client {client} says test_samples {row['test_samples']!r}, the client holds {known.test_samples}"
    for key in SCORE_KEYS + LOSS_KEYS:
        value = row[key]
        high = 1.0 if key in SCORE_KEYS else math.inf
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"the row of client {client}: {key} must be a number, got {value!r}"
        if not (0.0 <= value <= high and is_finite(value)) and not (value != value and known.test_samples == 0):  # NaN
            bounds = "in [0, 1]" if key in SCORE_KEYS else "finite and >= 0"
            return f"the row of client {client}: {key} must be {bounds}, got {value!r}"
    return None
