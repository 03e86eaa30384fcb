"""Faulty clients: which updates the server must not aggregate.

A client may crash, diverge (NaN/inf weights) or send arrays that do not fit the
model (a wrong name or shape, from a stale or tampered client). The loop drops such
an update from its round with a warning naming the client, counts it in the round's
`dropped_clients`, and stops (or retries) a round left with too few usable updates,
rather than letting one client corrupt the global model.
"""

from __future__ import annotations

import torch

from fedssl.federation.messages import Arrays, Update

SPARSE = ("/index", "/value")  # an array sent as a sparse delta: NAME/index + NAME/value (FedMatch)


def _sparse_problem(name: str, reference: torch.Tensor, index: torch.Tensor | None, value: torch.Tensor | None) -> str | None:
    if index is None or value is None:
        return f"sparse array {name!r} lacks its {'/index' if index is None else '/value'} part"
    if index.dim() != 1 or value.dim() != 1 or len(index) != len(value):
        return f"sparse array {name!r}: index and value must be 1-D of one length, got {tuple(index.shape)} and {tuple(value.shape)}"
    if index.is_floating_point() or index.is_complex():
        return f"sparse array {name!r}: index must be integer, got {index.dtype}"
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= reference.numel()):
        return f"sparse array {name!r}: index out of range for {reference.numel()} entries"
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        return f"non-finite values in {name + '/value'!r}"
    return None


def check_update(update: Update, reference: Arrays, dense: bool = True) -> str | None:
    """Why `update` cannot be aggregated against the `reference` arrays the client
    received (its payload), or None if it can.

    With `dense` (the FedAvg family), an update holds exactly the reference arrays,
    by name and shape. Otherwise (FedMatch) it may send an array as a sparse delta,
    NAME/index (integer flat positions) + NAME/value, and leave arrays out (they are
    unchanged). Every floating value must be finite, and the example count a count.
    """
    if isinstance(update.num_examples, bool) or not isinstance(update.num_examples, int) or update.num_examples < 0:
        return f"num_examples must be a count, got {update.num_examples!r}"
    sparse: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in update.arrays.items():
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
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"non-finite values in {name!r}"
    for base, parts in sparse.items():
        if base in update.arrays:
            return f"array {base!r} sent both dense and sparse"
        problem = _sparse_problem(base, reference[base], parts.get("index"), parts.get("value"))
        if problem:
            return problem
    if dense:
        missing = [name for name in reference if name not in update.arrays]
        if missing:
            return f"missing array {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    return None
