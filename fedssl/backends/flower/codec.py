"""fedssl's Payload/Update <-> Flower's RecordDict.

Exactly the fields of `fedssl.messages` cross the wire: arrays by name
(ArrayRecord), scalars (ConfigRecord) and metrics (MetricRecord). Anything else
is refused here, so that a learner cannot leak images or per-sample values by
putting them in a message. What a node sends back is untrusted: decoding a reply
that lacks a record or holds a value of the wrong type raises `MalformedMessage`,
which the server turns into a dropped reply (`faults` checks the decoded values).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedssl.messages import Arrays, Payload, Scalar, Update

ARRAYS, EXTRAS, CONFIG, META, METRICS = "arrays", "extras", "config", "meta", "metrics"


class CodecError(TypeError):
    """A message field that is not an array or a scalar (a bug in an algorithm)."""


class MalformedMessage(ValueError):
    """A received message that does not hold what its kind must (a faulty or rogue sender)."""


def record(records: Any, key: str) -> Any:
    """`records[key]` (one kind of record of a RecordDict), or MalformedMessage."""
    try:
        return records[key]
    except KeyError:
        raise MalformedMessage(f"it lacks the {key!r} record") from None


def integer(values: Any, key: str) -> int:
    value = values.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedMessage(f"{key} must be an integer, got {value!r}")
    return value


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
    arrays = {}
    for name, array in record.items():
        try:  # numpy bytes from the wire: np.load without pickles, then a dtype torch must know
            # copy: numpy views of received bytes are read-only, torch wants writable memory
            arrays[name] = torch.from_numpy(np.array(array.numpy(), copy=True))
        except Exception as error:
            raise MalformedMessage(f"array {name!r} cannot be read: {type(error).__name__}: {error}") from None
    return arrays


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
    """A node's update, as it sent it (MalformedMessage if it lacks a field or a
    field has the wrong type; `faults.check_update` judges the values)."""
    meta = record(content.config_records, META)
    return Update(client_id=integer(meta, "client_id"), arrays=decode_arrays(record(content.array_records, ARRAYS)),
                  num_examples=integer(meta, "num_examples"), metrics=dict(record(content.metric_records, METRICS)))


def encode_evaluate(weights: Arrays, client_ids: list[int]) -> RecordDict:
    """What a node needs to score its clients: the global model's weights (the
    algorithm's `global_weights`, never the server's state) and which of its
    clients to score."""
    return RecordDict({
        ARRAYS: encode_arrays(weights, "global_weights"),
        META: ConfigRecord({"clients": [int(c) for c in client_ids]}),
    })


def decode_evaluate(content: RecordDict) -> tuple[Arrays, list[int]]:
    return decode_arrays(content.array_records[ARRAYS]), [int(c) for c in content.config_records[META]["clients"]]


def encode_rows(rows: list[dict[str, Any]]) -> RecordDict:
    """A node's evaluation rows (one per client: its kind, test size and scores)."""
    return RecordDict({f"client{row['client']}": ConfigRecord(check_scalars(row, "evaluation row", (int, float, str)))
                       for row in rows})


def decode_rows(content: RecordDict) -> list[dict[str, Any]]:
    """A node's evaluation rows, as it sent them (`faults.check_row` judges them)."""
    if content.array_records or content.metric_records:
        raise MalformedMessage("an evaluation reply holds rows of scalars only, and it holds arrays or metrics")
    return [dict(row) for row in content.config_records.values()]
