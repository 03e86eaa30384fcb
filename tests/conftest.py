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


@pytest.fixture
def write_faces():
    """A function writing synthetic faces as PNG class folders under a root."""
    from PIL import Image

    from fedssl.data.sources.synthetic_faces import generate_synthetic_faces

    def write(root: Path, count: int = 70, seed: int = 123, size: int = 40, channels: int = 3) -> list[Path]:
        """Synthetic faces as PNG files in FER-named class folders (any size and mode: the
        model's own size and channels are applied on reading)."""
        faces = generate_synthetic_faces(count, 3, seed=seed, image_size=size, channels=channels)
        paths = []
        for i, (image, label) in enumerate(zip(faces.images, faces.labels)):
            folder = root / faces.class_names[label]
            folder.mkdir(parents=True, exist_ok=True)
            paths.append(folder / f"face{i:03d}.png")
            Image.fromarray(image[..., 0] if channels == 1 else image).save(paths[-1])
        return paths

    return write
