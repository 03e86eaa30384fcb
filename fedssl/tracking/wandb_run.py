"""W&B runs, artifacts and lineage, offline first.

Every fedssl command that records something opens its W&B run here, from the
recipe's `logging.wandb` section: training runs (`job_type` from the recipe),
`fedssl personalize` (`personalize`) and `fedssl data` (`data`). Offline (the
default) a run is written under its directory and `wandb sync` uploads it later,
artifacts and lineage included.

Lineage: a training run logs its final checkpoint as the artifact
`model-<run id>` (type `model`); `fedssl personalize` declares the same artifact
as its input (`use_files`) and logs the model it exports as its output, so W&B's
lineage graph links the federated run, the personalize run and the exported model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from fedssl.config.schema import WandbConfig

# Metrics whose best value is worth keeping: W&B's summary holds their max and their last value.
BEST_IS_MAX = ("global_acc", "global_f1_macro", "global_recall/*", "client_acc_mean", "client_acc_pooled",
               "personal_acc", "personal_acc_pooled", "personal_acc_p10", "personal_f1_macro")


def start(wcfg: WandbConfig, *, name: str, group: str, job_type: str, directory: Path,
          config: Mapping[str, Any], run_id: str | None = None):
    """A W&B run as `wcfg` says (None when its mode is disabled); `run_id` resumes that run."""
    if wcfg.mode == "disabled":
        return None
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=wcfg.project, entity=wcfg.entity, group=group, job_type=job_type, tags=list(wcfg.tags), name=name,
        config=dict(config), dir=str(directory), mode=wcfg.mode, id=run_id, resume="allow" if run_id else None,
        settings=wandb.Settings(console="off", silent=True, disable_git=True, x_disable_stats=True),
    )


def keeps_best(name: str) -> bool:
    """Whether W&B's summary keeps `name`'s max and last value itself (`define_best_metrics`)."""
    return any(name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern for pattern in BEST_IS_MAX)


def define_best_metrics(run) -> None:
    """Keep the max beside the last value of each accuracy and F1 in the run's summary."""
    for name in BEST_IS_MAX:
        run.define_metric(name, summary="max,last")


def model_artifact_name(run_id: str) -> str:
    return f"model-{run_id}"


def files_artifact(name: str, kind: str, files: Mapping[str, Path], metadata: Mapping[str, Any] | None = None):
    """An artifact holding `files` ({name in the artifact: local path})."""
    import wandb

    artifact = wandb.Artifact(name, type=kind, metadata=dict(metadata or {}))
    for file_name, path in files.items():
        artifact.add_file(str(path), name=file_name)
    return artifact


def log_files(run, name: str, kind: str, files: Mapping[str, Path], aliases: Sequence[str] = (),
              metadata: Mapping[str, Any] | None = None) -> None:
    """Log `files` as an output artifact of `run`."""
    run.log_artifact(files_artifact(name, kind, files, metadata), aliases=list(aliases))


def use_files(run, name: str, kind: str, files: Mapping[str, Path]) -> None:
    """Declare `files`, already logged by another run as the artifact `name`, an input
    of `run`: same name and same contents, hence the same version once synced.

    Online this is `run.use_artifact`. Offline, W&B refuses `use_artifact`; what it
    does online for an artifact built locally (log it with `use_after_commit`, so
    that the server records the use when it commits the version) is what `wandb
    sync` replays, so offline runs get the same lineage once synced. Sync the run
    that logged the artifact first.
    """
    artifact = files_artifact(name, kind, files)
    if run.offline:
        run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(artifact)


def confusion_chart(confusion: Sequence[Sequence[int]], class_names: Sequence[str], title: str):
    """W&B's own confusion-matrix chart (`wandb.plot.confusion_matrix`'s table and
    Vega spec), built from the counts: the predictions are not kept."""
    import wandb

    data = [[class_names[i], class_names[j], int(confusion[i][j])]
            for i in range(len(class_names)) for j in range(len(class_names))]
    table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=data)
    return wandb.plot.plot_table("wandb/confusion_matrix/v1", table,
                                 {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                                 {"title": title})


def log_personalize(trained, report: Mapping[str, Any], report_path: Path, exported: Path) -> None:
    """`fedssl personalize` as a W&B run (`job_type` personalize, in the training run's
    group, W&B mode and project): its input is the training run's model artifact (the
    checkpoint it read), its output the exported model with its report, its summary
    the held-out scores before and after fine-tuning. Nothing when the training run
    did not log to W&B or its recipe disables W&B."""
    from fedssl.run_dir import CHECKPOINT

    cfg, mode = trained.cfg, report["options"]["mode"]
    wcfg = cfg.logging.wandb
    config = {"personalize": report["options"], "checkpoint": report["checkpoint"], "data": report["data"],
              "recipe": cfg.name}
    run = start(wcfg, name=f"{cfg.name}-personalize-{mode}", group=wcfg.group or cfg.name, job_type="personalize",
                directory=report_path.parent, config=config)
    if run is None:
        return
    if trained.wandb_id:
        use_files(run, model_artifact_name(trained.wandb_id), "model", {CHECKPOINT: trained.path})
    run.summary.update({k: v for k, v in report.items()
                        if k.startswith(("heldout_", "train_images", "epochs", "steps"))})
    described = [exported.with_suffix(".json")] if exported.suffix == ".safetensors" else []  # its description
    files = {path.name: path for path in (exported, *described, report_path)}
    log_files(run, f"personalized-{run.id}", "model", files,
              ["latest"], {"mode": mode, "from": report["checkpoint"], "labels": list(report["labels"])})
    run.finish()


def log_data_images(cfg, directory: Path, images: Mapping[str, Path]) -> bool:
    """`fedssl data`'s pictures as images of a W&B run (`job_type` data, named
    `data-NAME`, in the recipe's group) whose config is the resolved recipe; whether
    W&B is on."""
    import wandb

    from fedssl.config.load import to_dict

    wcfg = cfg.logging.wandb
    run = start(wcfg, name=f"data-{cfg.name}", group=wcfg.group or cfg.name, job_type="data", directory=directory,
                config=to_dict(cfg))
    if run is None:
        return False
    run.log({key: wandb.Image(str(path)) for key, path in images.items()})
    run.finish()
    return True
