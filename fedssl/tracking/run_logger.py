"""Everything a run records: metrics.jsonl, summary.json and the W&B run.

The files in the run directory are always written, whatever W&B's mode; W&B runs
offline by default (no account or network; `wandb sync` uploads later). In W&B a
run also keeps the best value of each accuracy and F1 in its summary, a confusion
matrix of the final global model (W&B's chart and an image), and its files as
artifacts: the resolved recipe, the partition and the final checkpoint (see
`RunLogger.finish`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fedssl.config.schema import RecipeConfig
from fedssl.io import atomic_write_text
from fedssl.run_dir import BEST_CHECKPOINT, CHECKPOINT, CONFIG, CONFUSION_PNG, PARTITION
from fedssl.tracking import wandb_run

log = logging.getLogger(__name__)

# Per-round values that are no scalar: kept in metrics.jsonl and summary.json, not in W&B's history.
NOT_SCALAR = ("global_confusion", "class_names")


def jsonable(value: Any) -> Any:
    """Floats that JSON can hold (NaN -> None), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in NOT_SCALAR}


class RunLogger:
    """Writes per-round metrics and the final summary to the run directory and W&B."""

    def __init__(self, cfg: RecipeConfig, run_dir: Path, config_dict: dict[str, Any], resume_after: int = 0, wandb_id: str | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        # On resume, rounds after the checkpoint were lost with the crash: forget them.
        kept = [m for m in read_metrics(self.metrics_path) if m["round"] <= resume_after]
        atomic_write_text(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept))
        wcfg = cfg.logging.wandb
        self.wandb = wandb_run.start(wcfg, name=cfg.name, group=wcfg.group or cfg.name, job_type=wcfg.job_type,
                                     directory=run_dir, config=config_dict, run_id=wandb_id)
        if self.wandb:
            wandb_run.define_best_metrics(self.wandb)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb else None

    def log_round(self, round_index: int, metrics: dict[str, Any]) -> None:
        record = jsonable({"round": round_index, **metrics})
        with self.metrics_path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(scalars(metrics), step=round_index)

    def finish(self, summary: dict[str, Any], client_rows: list[dict[str, Any]], last_round: int) -> None:
        """Write summary.json, and the confusion matrix as a PNG beside it (where
        matplotlib is installed). In W&B, at the last round's step: the summary (the
        metrics of `wandb_run.BEST_IS_MAX` keep their max and last value), a
        per-client table, a histogram of per-client accuracy, the confusion matrix
        (chart and image), and the artifacts (`log_artifacts`)."""
        atomic_write_text(self.run_dir / "summary.json", json.dumps(jsonable(summary), indent=2) + "\n")
        confusion, class_names = summary.get("global_confusion"), summary.get("class_names")
        image = self.plot_confusion(confusion, class_names, summary) if confusion else None
        if not self.wandb:
            return
        import wandb

        self.wandb.summary.update({k: v for k, v in scalars(summary).items() if not wandb_run.keeps_best(k)})
        logged: dict[str, Any] = {}
        if client_rows:
            columns = list(client_rows[0])
            logged["clients"] = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in client_rows])
            logged["client_acc_histogram"] = wandb.Histogram([row["acc"] for row in client_rows if row["test_samples"]])
        if confusion:
            logged["confusion_matrix"] = wandb_run.confusion_chart(confusion, class_names, self.cfg.name)
        if image:
            logged["confusion_matrix_image"] = wandb.Image(str(image))
        if logged:
            self.wandb.log(logged, step=last_round)
        self.log_artifacts(summary)
        self.wandb.finish()

    def plot_confusion(self, confusion: list[list[int]], class_names: list[str], summary: dict[str, Any]) -> Path | None:
        try:
            from fedssl.tracking.plots import plot_confusion_matrix
            path = self.run_dir / CONFUSION_PNG
            title = (f"{self.cfg.name}, round {summary['rounds']}: accuracy {summary['global_acc']:.3f}, "
                     f"macro-F1 {summary['global_f1_macro']:.3f}")
            plot_confusion_matrix(confusion, class_names, path, title)
            return path
        except ImportError as error:
            log.info("no confusion matrix image (%s)", error)
            return None

    def log_artifacts(self, summary: dict[str, Any]) -> None:
        """The resolved recipe (`config`), the partition (`partition`) and the final
        checkpoint (`model`, aliases latest and, if its round scored the best
        global_acc, best). When an earlier round scored best, its checkpoint
        (best.pt) is logged first as the version aliased best. Each artifact
        holds its file under the run directory's name for it, so `fedssl
        personalize` reads a downloaded model artifact as it reads a run."""
        run_id, files = self.wandb.id, self.run_dir
        wandb_run.log_files(self.wandb, f"config-{run_id}", "config", {CONFIG: files / CONFIG})
        wandb_run.log_files(self.wandb, f"partition-{run_id}", "partition", {PARTITION: files / PARTITION})
        final_is_best = summary.get("global_acc_best_round") == summary["rounds"]
        about = {"name": summary["name"], "algorithm": summary["algorithm"]}
        model = wandb_run.model_artifact_name(run_id)
        if not final_is_best and (files / BEST_CHECKPOINT).is_file():
            best = {"round": summary["global_acc_best_round"], "global_acc": summary["global_acc_best"]}
            wandb_run.log_files(self.wandb, model, "model", {CHECKPOINT: files / BEST_CHECKPOINT}, ["best"],
                                about | best)
        final = {"round": summary["rounds"], "global_acc": summary["global_acc"],
                 "global_f1_macro": summary["global_f1_macro"]}
        wandb_run.log_files(self.wandb, model, "model", {CHECKPOINT: files / CHECKPOINT},
                            ["latest", "best"] if final_is_best else ["latest"], about | final)

    def abort(self) -> None:
        if self.wandb:
            self.wandb.finish(exit_code=1)
