"""Every personalization recipe runs end to end, shrunk, and reports personalized metrics."""

import json
import math

import pytest

from fedssl.config.load import load_recipe, shipped_recipes
from fedssl.engine.federation import Federation
from fedssl.engine.run import run_federation
from fedssl.tracking.run_logger import read_metrics

PERSONAL_ALGORITHMS = {"fedper", "fedrep", "fedbn", "ditto", "perfedavg", "reptile", "mocha"}


def personal_recipes(dataset: str):
    return [pytest.param(p, id=p.stem) for p in shipped_recipes()
            if p.stem.startswith("personal_") and p.stem.endswith(f"_{dataset}")]


@pytest.mark.slow
def test_every_personalization_algorithm_has_a_recipe_per_dataset():
    for dataset in ("faces", "fashion_mnist"):
        algorithms = {load_recipe(p.values[0]).algorithm.name for p in personal_recipes(dataset)}
        assert PERSONAL_ALGORITHMS | {"fedavg"} <= algorithms, dataset


@pytest.mark.parametrize("recipe", personal_recipes("fashion_mnist"))
def test_fashion_mnist_recipes_keep_pflib_setting(recipe):
    cfg = load_recipe(recipe)
    assert (cfg.federation.clients, cfg.data.partition.scheme, cfg.data.partition.alpha) == (20, "dirichlet", 0.1)
    assert cfg.model.name in ("fedavg_cnn", "fedavg_cnn_bn") and cfg.train.local_epochs == 1
    parts = 3 if cfg.algorithm.meta.variant == "hf" and cfg.algorithm.name == "perfedavg" else 2 if cfg.algorithm.name == "perfedavg" else 1
    assert cfg.train.batch_size == 10 * parts  # Per-FedAvg cuts its batch into batches of 10


@pytest.mark.slow
@pytest.mark.parametrize("recipe", personal_recipes("faces"))
def test_a_faces_recipe_runs_shrunk_with_one_client_per_person(recipe, tmp_path):
    cfg = load_recipe(recipe)
    assert cfg.data.partition.scheme == "natural" and cfg.data.num_identities == cfg.federation.clients
    shrink = [f"output_dir={tmp_path}", "data.num_samples=600", "data.num_identities=6", "federation.clients=6",
              "federation.clients_per_round=3", "federation.rounds=2", "train.local_steps=2",
              "logging.progress=false", "logging.wandb.mode=disabled"]
    summary = run_federation(load_recipe(recipe, shrink), tmp_path / "run")
    assert summary["rounds"] == 2 and 0.0 <= summary["personal_acc"] <= 1.0
    assert summary["personal_acc_p10"] <= summary["personal_acc"]
    assert summary["personal_acc_best_round"] in (1, 2)
    history = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all("personal_acc" in m and "personal_acc_p10" in m and "personal_acc_pooled" in m for m in history)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("personal_acc", "personal_acc_pooled", "client_acc_pooled"):
        assert written[key] == pytest.approx(summary[key]) and written[key] == pytest.approx(history[-1][key]), key


@pytest.mark.slow
def test_fedper_with_fixmatch_personalizes_labeled_and_unlabeled_clients_together(tiny_recipe, tmp_path):
    cfg = load_recipe(tiny_recipe, ["algorithm.name=fedper", "algorithm.personal.ssl=true",
                                    "algorithm.ssl.unlabeled_ratio=2", "algorithm.ssl.tau=0.000001",
                                    "data.labels.mode=mixed", "data.labels.labeled_clients=0.5",
                                    "federation.clients_per_round=6", "federation.rounds=2"])
    summary = run_federation(cfg, tmp_path / "run")
    # unlabeled clients pseudo-label (tau keeps every pseudo-label) and are scored
    assert summary["pl_mask_rate/unlabeled"] == 1.0 and 0.0 <= summary["pl_acc/unlabeled"] <= 1.0
    assert math.isfinite(summary["personal_acc"])


def test_an_unlabeled_fedper_client_trains_its_own_head_from_pseudo_labels(tiny_recipe):
    cfg = load_recipe(tiny_recipe, ["algorithm.name=fedper", "algorithm.personal.ssl=true",
                                    "algorithm.ssl.unlabeled_ratio=2", "algorithm.ssl.tau=0.000001",
                                    "data.labels.mode=mixed", "data.labels.labeled_clients=0.5",
                                    "train.local_steps=2"])
    federation = Federation.build(cfg)
    unlabeled = next(c for c in federation.data.clients if not len(c.labeled))
    payload = federation.algorithm.payload(1, federation.initial_state(), unlabeled.client_id)
    update, kept = federation.trainer.fit(unlabeled.client_id, unlabeled.labeled, unlabeled.unlabeled, payload)
    assert update.metrics["pl_seen"] > 0 and "fc.weight" not in update.arrays
    assert not kept["personal/fc.weight"].equal(federation.algorithm.initial["fc.weight"])


MIXED = ["algorithm.ssl.unlabeled_ratio=2", "data.labels.mode=mixed", "data.labels.labeled_clients=0.5",
         "federation.rounds=1", "train.local_steps=2"]


@pytest.mark.parametrize("algorithm, overrides", [
    ("fedrep", ["algorithm.personal.ssl=true", *MIXED]),
    ("fedbn", ["algorithm.personal.ssl=true", "model.name=fedavg_cnn_bn", *MIXED]),
    ("ditto", ["algorithm.personal.ssl=true", "algorithm.ssl.threshold=flexmatch", *MIXED, "federation.rounds=3"]),
    ("perfedavg", ["algorithm.meta.variant=hf", "model.name=fedavg_cnn_bn", "train.local_steps=2", "federation.rounds=1"]),
], ids=["fedrep-ssl", "fedbn-ssl", "ditto-ssl-flexmatch", "perfedavg-hf-batchnorm"])
@pytest.mark.slow
def test_other_combinations_run(tiny_recipe, tmp_path, algorithm, overrides):
    cfg = load_recipe(tiny_recipe, [f"algorithm.name={algorithm}", *overrides])
    summary = run_federation(cfg, tmp_path / "run")
    assert 0.0 <= summary["personal_acc"] <= 1.0 and math.isfinite(summary["global_loss"])
