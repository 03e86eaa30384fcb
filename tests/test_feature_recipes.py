"""Each feature has a shipped recipe a researcher launches (codecs, a lossy link,
device profiles with a deadline, FedNova, FedBuff, unseen people, central DP): each resolves to
what it says and runs one shrunk round, on the synthetic faces where it is written
for Fashion-MNIST (the Debian package may be absent)."""

import pytest

from fedssl.config.load import load_recipe
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.engine.run import run_federation
from fedssl.tracking.run_logger import read_metrics

FEATURES = {
    "fedavg_compressed_fashion_mnist": ("bytes_up", lambda cfg: [c.name for c in cfg.federation.uplink.codecs]
                                        == ["hadamard", "subsample", "quantize"]),
    "fedavg_lossy_link_fashion_mnist": ("packets_sent", lambda cfg: cfg.federation.uplink.channel.loss == 0.1
                                        and not cfg.federation.uplink.codecs),
    "fedavg_deadline_fashion_mnist": ("sim_time", lambda cfg: cfg.federation.system.policy == "deadline"),
    "fednova_partial_fashion_mnist": ("sim_time", lambda cfg: cfg.algorithm.name == "fednova"
                                      and cfg.federation.system.policy == "partial"),
    "fedbuff_fashion_mnist": ("sim_time", lambda cfg: cfg.algorithm.name == "fedbuff"),
    "fedavg_unseen_faces": ("unseen_acc", lambda cfg: cfg.federation.evaluation.holdout_clients == 2),
    "personal_fedper_dp_faces": ("epsilon", lambda cfg: cfg.privacy.mechanism == "central"
                                 and cfg.privacy.target_epsilon == 8.0),
}
ON_FACES = ["data.source=synthetic_faces", "data.num_identities=20", "data.image_size=24",
            "data.channels=1", "data.partition.scheme=natural"]


@pytest.mark.parametrize("recipe", FEATURES)
def test_a_feature_recipe_says_what_it_is_named_for(recipe):
    assert FEATURES[recipe][1](load_recipe(recipe))


@pytest.mark.parametrize("recipe", FEATURES)
def test_a_feature_recipe_runs_one_shrunk_round(recipe, tmp_path):
    data = [] if recipe.endswith("_faces") else ON_FACES
    cfg = load_recipe(recipe, [*data, "data.num_samples=1000", "federation.rounds=1", "federation.evaluation.eval_every=1",
                               "train.local_steps=2", f"output_dir={tmp_path}", "logging.progress=false",
                               "logging.wandb.mode=disabled"])
    summary = run_federation(cfg, tmp_path / "run")
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert summary["rounds"] == 1 and FEATURES[recipe][0] in summary | first, sorted(summary | first)


def test_the_compressed_recipe_sends_a_sixteenth_of_the_dense_bytes_or_less(tmp_path):
    cfg = load_recipe("fedavg_compressed_fashion_mnist", [*ON_FACES, "data.num_samples=1000", "federation.rounds=1",
                                                          f"output_dir={tmp_path}", "train.local_steps=2",
                                                          "logging.progress=false", "logging.wandb.mode=disabled"])
    summary = run_federation(cfg, tmp_path / "run")
    params = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["server_state"]["params"]
    dense = 4 * sum(p.numel() for p in params.values() if p.is_floating_point()) * cfg.federation.clients_per_round
    assert summary["bytes_up"] <= dense / 16, (summary["bytes_up"], dense)
