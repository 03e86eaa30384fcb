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


def write_tiny_recipe(directory: Path) -> Path:
    path = directory / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(output_dir=directory / "runs"))
    return path


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    """A recipe that trains in about a second, writing its runs under tmp_path/runs."""
    return write_tiny_recipe(tmp_path)


@pytest.fixture(scope="module")
def module_tiny_recipe(tmp_path_factory) -> Path:
    """`tiny_recipe` for a module whose tests share one (slow) run."""
    return write_tiny_recipe(tmp_path_factory.mktemp("tiny"))


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


@pytest.fixture
def loopback_grid(over_flower_wire, monkeypatch):
    """`LoopbackGrid(client_app, {node_id: node_config})`: Flower's Grid carrying each
    message through Flower's wire format to the real ClientApp of its node in this
    process, and the reply back the same way; a ClientApp that raises answers with an
    error reply, as on the simulation engine. Each node keeps its own Context, and
    `delivered` holds every (node, message, reply) in order. This stands in for
    Flower's transport alone: the ServerApp's and ClientApp's code run as deployed."""
    from uuid import uuid4

    from flwr.app import Context, Error, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
    from flwr.serverapp import Grid
    from flwr.supercore.task_identity import TaskIdentity

    # Who sends: the ServerApp's identity, which Flower's runtime sets before the app runs.
    for key, value in {"_task_id": 1, "_run_id": 1, "_node_id": SUPERLINK_NODE_ID}.items():
        monkeypatch.setattr(TaskIdentity, key, value)

    class LoopbackGrid(Grid):
        def __init__(self, client_app, node_configs: dict[int, dict]):
            self.client_app = client_app
            self.contexts = {node: Context(run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config={})
                             for node, config in node_configs.items()}
            self.delivered: list[tuple[int, Message, Message]] = []

        def get_node_ids(self):
            return list(self.contexts)

        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for message in messages:
                message.metadata.__dict__["_message_id"] = uuid4().hex  # as the SuperLink does
                message.content = over_flower_wire(message.content)
                node = message.metadata.dst_node_id
                try:
                    reply = self.client_app(message, self.contexts[node])
                    reply.content = over_flower_wire(reply.content)
                except Exception as error:
                    reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(error).__name__}: {error}"),
                                    reply_to=message)
                self.delivered.append((node, message, reply))
                replies.append(reply)
            return replies

        # The rest of Grid's interface: the server side of fedssl does not use it.
        def set_run(self, run):
            raise NotImplementedError

        @property
        def run(self):
            raise NotImplementedError

        def create_message(self, *args, **kwargs):
            raise NotImplementedError

        def get_nodes(self):
            raise NotImplementedError

        def push_messages(self, messages):
            raise NotImplementedError

        def pull_messages(self, message_ids):
            raise NotImplementedError

    return LoopbackGrid
