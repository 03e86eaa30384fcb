"""W&B offline, read back from the runs' own .wandb files: groups, best-value
summaries, artifacts, the personalize run's lineage and `fedssl data`'s images;
and the class-balanced metrics in metrics.jsonl and summary.json."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedssl.cli import main
from fedssl.evaluation.class_metrics import f1_macro
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.launch import launch
from fedssl.personalize import FineTuneOptions, personalize

pytestmark = pytest.mark.slow  # two runs, a fine-tuning and a data report, each with its W&B run: about 30 s

OFFLINE = ["logging.wandb.mode=offline", "federation.rounds=2"]


@pytest.fixture(scope="module")
def runs(module_tiny_recipe, tmp_path_factory):
    """Seeds 0 and 1 of the tiny recipe launched with --name-from seed, and a head
    fine-tuning of seed 0's model on synthetic faces, all logging to W&B offline."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_DATA_DIR", str(tmp_path_factory.mktemp("wandb-data")))  # artifacts' staging copies
        run_dirs = [launch(str(module_tiny_recipe), [*OFFLINE, f"seed={seed}"], name_from=["seed"])[1] for seed in (0, 1)]
        faces = tmp_path_factory.mktemp("faces")
        write_faces(faces)
        _, exported = personalize(run_dirs[0], faces, FineTuneOptions(epochs=1, progress=False), echo=lambda line: None)
    return run_dirs, exported


def write_faces(root: Path) -> None:
    from PIL import Image

    from fedssl.data.sources.synthetic_faces import generate_synthetic_faces

    faces = generate_synthetic_faces(30, 3, seed=5, image_size=28, channels=3)
    for i, (image, label) in enumerate(zip(faces.images, faces.labels)):
        (root / faces.class_names[label]).mkdir(exist_ok=True)
        Image.fromarray(image).save(root / faces.class_names[label] / f"{i}.png")


def test_seeds_launched_with_name_from_share_the_recipes_group(runs, wandb_records):
    run_dirs, _ = runs
    assert [d.name for d in run_dirs] == ["tiny-seed=0", "tiny-seed=1"]
    for run_dir in run_dirs:
        run = wandb_records(run_dir)["run"][0]
        assert run.run_group == "tiny" and run.display_name == run_dir.name and run.job_type == "train"


def test_accuracy_and_f1_keep_their_max_in_the_summary(runs, wandb_records):
    records = wandb_records(runs[0][0])
    defined = {m.name or m.glob_name: m.summary for m in records["metric"]}
    for name in ("global_acc", "global_f1_macro", "global_recall/*", "personal_acc", "personal_acc_pooled",
                 "client_acc_pooled", "personal_f1_macro"):
        assert defined[name].max and defined[name].last, name
    summaries = [json.loads(u.value_json) for s in records["summary"] for u in s.update if list(u.nested_key) == ["global_acc"]]
    history = [json.loads(line)["global_acc"] for line in (runs[0][0] / "metrics.jsonl").read_text().splitlines()]
    assert summaries[-1] == {"max": max(history), "last": history[-1]}


def artifacts(records) -> dict:
    found = {}
    for artifact in records["artifact"]:
        found.setdefault(artifact.name, []).append(artifact)
    return found


def test_a_run_logs_its_config_partition_and_checkpoint_as_artifacts(runs, wandb_records):
    run_dir = runs[0][0]
    records = wandb_records(run_dir)
    run_id = records["run"][0].run_id
    logged = artifacts(records)
    assert logged[f"config-{run_id}"][0].type == "config"
    assert [c.path for c in logged[f"config-{run_id}"][0].manifest.contents] == ["config.yaml"]
    assert [c.path for c in logged[f"partition-{run_id}"][0].manifest.contents] == ["partition.npz"]
    models = logged[f"model-{run_id}"]
    assert all(m.type == "model" and [c.path for c in m.manifest.contents] == ["checkpoint.pt"] for m in models)
    assert "latest" in models[-1].aliases and any("best" in m.aliases for m in models)
    summary = json.loads((run_dir / "summary.json").read_text())
    best = next(m for m in models if "best" in m.aliases)
    best_file = run_dir / ("checkpoint.pt" if summary["global_acc_best_round"] == summary["rounds"] else "best.pt")
    assert load_checkpoint(best_file)["round"] == summary["global_acc_best_round"] == json.loads(best.metadata)["round"]
    assert best.manifest.contents[0].size == best_file.stat().st_size


def test_the_personalize_run_uses_the_training_runs_model_artifact(runs, wandb_records):
    (run_dir, _), exported = runs
    training = wandb_records(run_dir)
    final_model = artifacts(training)[f"model-{training['run'][0].run_id}"][-1]
    records = wandb_records(exported.parent)
    run = records["run"][0]
    assert run.job_type == "personalize" and run.run_group == "tiny"
    used = [a for a in records["artifact"] if a.use_after_commit]
    assert [(a.name, a.type, a.digest) for a in used] == [(final_model.name, "model", final_model.digest)]
    outputs = [a for a in records["artifact"] if not a.use_after_commit]
    assert [(a.type, sorted(c.path for c in a.manifest.contents)) for a in outputs] == [
        ("model", sorted([exported.name, "model.json", "personalize.json"]))]  # the weights and their description


def test_summary_and_metrics_hold_the_class_balanced_metrics(runs, wandb_records):
    run_dir = runs[0][0]
    summary = json.loads((run_dir / "summary.json").read_text())
    confusion = np.array(summary["global_confusion"])
    assert confusion.shape == (7, 7) and len(summary["class_names"]) == 7
    assert np.trace(confusion) / confusion.sum() == pytest.approx(summary["global_acc"])
    assert summary["global_f1_macro"] == pytest.approx(f1_macro(confusion))
    for i, name in enumerate(summary["class_names"]):
        assert summary[f"global_recall/{name}"] == pytest.approx(confusion[i, i] / confusion[i].sum())
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["global_confusion"] == summary["global_confusion"] and 0 <= last["personal_f1_macro"] <= 1
    assert (run_dir / "confusion_matrix.png").stat().st_size < 60_000
    logged = {u.key or "/".join(u.nested_key) for h in wandb_records(run_dir)["history"] for u in h.item}
    assert {"confusion_matrix_image/_type", "confusion_matrix_table/_type", "global_recall/angry"} <= logged


def test_fedssl_data_logs_its_pictures_as_images(module_tiny_recipe, tmp_path, wandb_records):
    out = tmp_path / "report"
    assert main(["data", str(module_tiny_recipe), "logging.wandb.mode=offline", "--out", str(out)]) == 0
    records = wandb_records(out)
    assert records["run"][0].job_type == "data" and records["run"][0].run_group == "tiny"
    images = {"/".join(u.nested_key)[: -len("/_type")]: json.loads(u.value_json)
              for h in records["history"] for u in h.item if list(u.nested_key)[-1:] == ["_type"]}
    assert images == {"partition": "image-file", "samples": "image-file"}
