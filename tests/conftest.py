import os
from pathlib import Path

import pytest
import torch

# Tests never touch the network and keep to the CI machine's two cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)

TINY_RECIPE = """\
# a tiny federation for tests
name: tiny
seed: 0
output_dir: {output_dir}
data:
  source: synthetic_faces
  num_samples: 600
  num_identities: 12
  image_size: 28
  partition:
    scheme: natural
model:
  name: fedavg_cnn
train:
  lr: 0.05
  momentum: 0.9
  batch_size: 16
federation:
  rounds: 3
  clients: 6
  clients_per_round: 3
logging:
  progress: false
  wandb:
    mode: disabled
"""


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    """A recipe that trains in about a second, writing its runs under tmp_path/runs."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(output_dir=tmp_path / "runs"))
    return path


@pytest.fixture
def over_flower_wire():
    """Records through Flower's protobuf form and back, as between SuperLink and SuperNode."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    return lambda records: recorddict_from_proto(ProtoRecordDict.FromString(recorddict_to_proto(records).SerializeToString()))
