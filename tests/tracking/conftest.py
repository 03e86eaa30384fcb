"""Reading an offline W&B run back from its .wandb file, as the tracking tests do."""

import struct
import time
from pathlib import Path

import pytest

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc32, length, type) chunks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file, as `wandb sync` reads them."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, payload, position = [], b"", 7  # header: ':W&B', magic (2 bytes), version (1 byte)
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        payload += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def offline_run_records(directory: Path, timeout: float = 30.0) -> dict[str, list]:
    """The records of the one finished offline run under `directory`, by record type.
    W&B's service writes the file after `finish` returns: wait for its exit record."""
    files = list(directory.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    deadline = time.monotonic() + timeout
    records = read_wandb_records(files[0])
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, f"{files[0]} holds no exit record after {timeout} s"
        time.sleep(0.2)
        records = read_wandb_records(files[0])
    by_type: dict[str, list] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        by_type.setdefault(kind, []).append(getattr(record, kind))
    return by_type


@pytest.fixture
def wandb_records():
    return offline_run_records

