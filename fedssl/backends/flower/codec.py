"""fedssl's Payload/Update <-> Flower's RecordDict.

Exactly the fields of `fedssl.federation.messages` cross the wire: arrays by name
(ArrayRecord), scalars (ConfigRecord) and metrics (MetricRecord). Anything else
is refused here, so that a learner cannot leak images or per-sample values by
putting them in a message.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedssl.federation.messages import Arrays, Payload, Scalar, Update

ARRAYS, EXTRAS, CONFIG, META, METRICS = "arrays", "extras", "config", "meta", "metrics"


class CodecError(TypeError):
    """A message field that is not an array or a scalar (a bug in an algorithm)."""


def encode_arrays(arrays: Arrays, what: str) -> ArrayRecord:
    record = ArrayRecord()
    for name, value in arrays.items():
        if not isinstance(value, torch.Tensor):
            raise CodecError(f"{what}[{name!r}] is a {type(value).__name__}, not a tensor")
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; refuse rather than silently widen
            raise CodecError(f"{what}[{name!r}] is bfloat16, which does not travel exactly")
        # detach/cpu/contiguous: the bytes on the wire are the tensor's values, nothing else
        record[name] = Array.from_numpy_ndarray(value.detach().cpu().contiguous().numpy())
    return record


def decode_arrays(record: ArrayRecord) -> Arrays:
    # copy: numpy views of received bytes are read-only, torch wants writable memory
    return {name: torch.from_numpy(np.array(array.numpy(), copy=True)) for name, array in record.items()}


def check_scalars(values: dict[str, Any], what: str, allowed: tuple[type, ...]) -> dict[str, Any]:
    for key, value in values.items():
        if not isinstance(key, str) or not isinstance(value, allowed):
            raise CodecError(f"{what}[{key!r}] is a {type(value).__name__}, not one of "
                             f"{', '.join(t.__name__ for t in allowed)}")
    return dict(values)


def encode_payload(payload: Payload, client_id: int) -> RecordDict:
    """The records client `client_id` receives for one round."""
    config = check_scalars(payload.config, "payload.config", (bool, int, float, str))
    return RecordDict({
        ARRAYS: encode_arrays(payload.arrays, "payload.arrays"),
        EXTRAS: encode_arrays(payload.extras, "payload.extras"),
        CONFIG: ConfigRecord(config),
        META: ConfigRecord({"round": int(payload.round), "client_id": int(client_id)}),
    })


def decode_payload(content: RecordDict) -> tuple[Payload, int]:
    """The payload and the client id it is addressed to."""
    meta = content.config_records[META]
    config: dict[str, Scalar] = dict(content.config_records[CONFIG])
    payload = Payload(round=int(meta["round"]), arrays=decode_arrays(content.array_records[ARRAYS]),
                      config=config, extras=decode_arrays(content.array_records[EXTRAS]))
    return payload, int(meta["client_id"])


def encode_update(update: Update) -> RecordDict:
    metrics = check_scalars(update.metrics, "update.metrics", (int, float))
    if any(isinstance(v, bool) for v in metrics.values()):
        raise CodecError("update.metrics holds a bool; metrics are numbers")
    return RecordDict({
        ARRAYS: encode_arrays(update.arrays, "update.arrays"),
        METRICS: MetricRecord(metrics),
        META: ConfigRecord({"client_id": int(update.client_id), "num_examples": int(update.num_examples)}),
    })


def decode_update(content: RecordDict) -> Update:
    meta = content.config_records[META]
    return Update(client_id=int(meta["client_id"]), arrays=decode_arrays(content.array_records[ARRAYS]),
                  num_examples=int(meta["num_examples"]), metrics=dict(content.metric_records[METRICS]))


def encode_evaluate(params: Arrays, client_ids: list[int]) -> RecordDict:
    """What a node needs to score its clients: the global model's shared arrays
    (the server state's `params`) and which of its clients to score."""
    return RecordDict({
        ARRAYS: encode_arrays(params, "server_state.params"),
        META: ConfigRecord({"clients": [int(c) for c in client_ids]}),
    })


def decode_evaluate(content: RecordDict) -> tuple[Arrays, list[int]]:
    return decode_arrays(content.array_records[ARRAYS]), [int(c) for c in content.config_records[META]["clients"]]


def encode_rows(rows: list[dict[str, Any]]) -> RecordDict:
    """A node's evaluation rows (one per client: its kind, test size and scores)."""
    return RecordDict({f"client{row['client']}": ConfigRecord(check_scalars(row, "evaluation row", (int, float, str)))
                       for row in rows})


def decode_rows(content: RecordDict) -> list[dict[str, Any]]:
    return [dict(record) for record in content.config_records.values()]
