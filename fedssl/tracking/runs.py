"""Finished runs read back for comparison: from run directories, or from W&B."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedssl.config.moved import move_keys
from fedssl.errors import UserError
from fedssl.tracking.run_logger import read_metrics


@dataclass(frozen=True)
class RunRecord:
    """One run's resolved config, final summary and per-round metrics."""

    source: str  # the run directory, or the W&B run path
    config: dict[str, Any]
    summary: dict[str, Any]
    history: list[dict[str, Any]]  # one dict per evaluated round, with "round"

    @property
    def group(self) -> str:
        return self.config["logging"]["wandb"].get("group") or self.config["name"]


def read_run_dir(run_dir: Path) -> RunRecord:
    """A finished run directory; a `UserError` names what is missing."""
    files = {name: run_dir / name for name in ("config.yaml", "summary.json", "metrics.jsonl")}
    for name, path in files.items():
        if not path.is_file():
            what = "not a run directory" if name == "config.yaml" else "the run has not finished"
            raise UserError(f"{run_dir}: {what} (no {name})")
    try:
        return RunRecord(
            source=str(run_dir),
            config=move_keys(yaml.safe_load(files["config.yaml"].read_text())),  # older runs: old key paths
            summary=json.loads(files["summary.json"].read_text()),
            history=read_metrics(files["metrics.jsonl"]),
        )
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise UserError(f"{run_dir}: unreadable run files ({error})") from None


def find_group(root: Path, group: str) -> list[Path]:
    """Finished run directories under `root` whose W&B group is `group`."""
    found = []
    for summary in sorted(root.glob("*/summary.json")):
        config = yaml.safe_load((summary.parent / "config.yaml").read_text())
        if (config["logging"]["wandb"].get("group") or config["name"]) == group:
            found.append(summary.parent)
    if not found:
        raise UserError(f"--group: no finished run of group {group!r} under {root}")
    return found


def last_value(value: Any) -> Any:
    """A summary value as the run ended: W&B keeps {"max": ..., "last": ...} for the
    metrics fedssl asks it to keep the best of (`wandb_run.define_best_metrics`)."""
    return value["last"] if isinstance(value, dict) and "last" in value else value


def read_wandb_group(project: str, group: str) -> list[RunRecord]:
    """The finished runs of `group` in the W&B project `ENTITY/PROJECT` (needs network and login)."""
    import wandb

    runs = wandb.Api().runs(project, filters={"group": group, "state": "finished"})
    records = [
        RunRecord(
            source=f"{project}/{run.id}",
            config=move_keys(dict(run.config)),
            summary={k: last_value(v) for k, v in run.summary_metrics.items() if not k.startswith("_")},
            history=[{"round": row["_step"], **row} for row in run.scan_history()],
        )
        for run in runs
    ]
    if not records:
        raise UserError(f"--group: no finished run of group {group!r} in W&B project {project}")
    return records
