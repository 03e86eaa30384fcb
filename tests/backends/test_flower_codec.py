"""The codec: fedssl's messages survive Flower's wire format exactly, and nothing
but arrays and scalars is let through."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedssl.backends.flower.codec import (CodecError, MalformedMessage, decode_evaluate, decode_payload, decode_rows,
                                          decode_update, encode_evaluate, encode_payload, encode_rows, encode_update)
from fedssl.messages import Payload, Update


def arrays():
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),  # 0-d int64
        "helper/index": torch.tensor([3, 1, 2], dtype=torch.int32),
        "fc.bias": torch.randn(5, generator=g, dtype=torch.float64),
        "empty": torch.zeros(0, 2),
    }


def assert_same(got, want):
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name


def test_payload_round_trip_is_exact(over_flower_wire):
    payload = Payload(round=3, arrays=arrays(), config={"lr": 0.05, "steps": 4, "teacher": "global", "warm": True},
                      extras={"helpers": torch.arange(6, dtype=torch.int64).reshape(2, 3)})
    got, client_id = decode_payload(over_flower_wire(encode_payload(payload, client_id=5)))
    assert client_id == 5 and got.round == 3
    assert_same(got.arrays, payload.arrays)
    assert_same(got.extras, payload.extras)
    assert got.config == payload.config
    assert [type(v) for v in got.config.values()] == [float, int, str, bool]


def test_update_round_trip_is_exact(over_flower_wire):
    update = Update(client_id=2, arrays=arrays(), num_examples=123, metrics={"train_loss": 0.25, "pl_seen": 40})
    got = decode_update(over_flower_wire(encode_update(update)))
    assert (got.client_id, got.num_examples, got.metrics) == (2, 123, update.metrics)
    assert_same(got.arrays, update.arrays)


def test_received_tensors_are_writable(over_flower_wire):
    got, _ = decode_payload(over_flower_wire(encode_payload(Payload(round=1, arrays=arrays()), 0)))
    got.arrays["conv.weight"].add_(1.0)  # a learner loads and trains these in place


@pytest.mark.parametrize("bad", [
    lambda: Payload(round=1, arrays={"w": [1.0, 2.0]}),
    lambda: Payload(round=1, arrays={}, extras={"images": "not a tensor"}),
    lambda: Payload(round=1, arrays={}, config={"labels": [0, 1, 2]}),
    lambda: Payload(round=1, arrays={}, config={"nested": {"a": 1}}),
    lambda: Payload(round=1, arrays={"w": torch.ones(2, dtype=torch.bfloat16)}),
])
def test_payload_refuses_anything_but_arrays_and_scalars(bad):
    with pytest.raises(CodecError):
        encode_payload(bad(), 0)


@pytest.mark.parametrize("metrics", [{"per_sample": [0.1, 0.2]}, {"note": "text"}, {"flag": True}])
def test_update_refuses_non_numeric_metrics(metrics):
    with pytest.raises(CodecError):
        encode_update(Update(client_id=0, arrays={}, num_examples=1, metrics=metrics))


def test_evaluation_round_trip_is_exact(over_flower_wire):
    params, client_ids = decode_evaluate(over_flower_wire(encode_evaluate(arrays(), [3, 0])))
    assert_same(params, arrays())
    assert client_ids == [3, 0]
    rows = [{"client": 3, "kind": "unlabeled", "test_samples": 12, "acc": 0.5, "loss": 1.25, "personal_acc": 0.75},
            {"client": 0, "kind": "labeled", "test_samples": 0, "acc": float("nan"), "loss": 2.0, "personal_acc": 1.0}]
    got = decode_rows(over_flower_wire(encode_rows(rows)))
    assert got[0] == rows[0] and got[1]["client"] == 0 and got[1]["acc"] != got[1]["acc"]  # NaN survives


def test_evaluation_rows_refuse_anything_but_scalars():
    with pytest.raises(CodecError):
        encode_rows([{"client": 0, "per_sample": [0.1, 0.2]}])


def tampered(update_records, **changes):
    """An encoded update with records replaced (None: removed), as a rogue node might send it."""
    records = dict(update_records)
    for key, value in changes.items():
        if value is None:
            del records[key]
        else:
            records[key] = value
    return RecordDict(records)


@pytest.mark.parametrize("change, why", [
    ({"meta": None}, "it lacks the 'meta' record"),
    ({"arrays": None}, "it lacks the 'arrays' record"),
    ({"metrics": None}, "it lacks the 'metrics' record"),
    ({"meta": ConfigRecord({"client_id": 2})}, "num_examples must be an integer, got None"),
    ({"meta": ConfigRecord({"client_id": 2, "num_examples": 1e9})}, "num_examples must be an integer, got 1000000000.0"),
    ({"meta": ConfigRecord({"client_id": "2", "num_examples": 5})}, "client_id must be an integer, got '2'"),
    ({"arrays": ConfigRecord({"w": 1.0})}, "it lacks the 'arrays' record"),
    ({"arrays": ArrayRecord({"w": Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"junk")})},
     "array 'w' cannot be read"),
    ({"arrays": ArrayRecord({"w": Array.from_numpy_ndarray(np.array(["a", "b"]))})}, "array 'w' cannot be read"),
])
def test_a_malformed_update_is_a_malformed_message_not_a_crash(change, why):
    good = encode_update(Update(client_id=2, arrays={"w": torch.ones(2)}, num_examples=5, metrics={"train_loss": 0.5}))
    assert decode_update(good).num_examples == 5
    with pytest.raises(MalformedMessage, match=why):
        decode_update(tampered(good, **change))


def test_evaluation_replies_hold_rows_of_scalars_only():
    reply = encode_rows([{"client": 0, "acc": 0.5}])
    reply["arrays"] = ArrayRecord({"w": Array.from_numpy_ndarray(np.zeros(2))})
    with pytest.raises(MalformedMessage, match="holds rows of scalars only"):
        decode_rows(reply)
    metrics = encode_rows([{"client": 0, "acc": 0.5}])
    metrics["m"] = MetricRecord({"acc": 1.0})
    with pytest.raises(MalformedMessage):
        decode_rows(metrics)
