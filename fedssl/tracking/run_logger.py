"""Everything a run records: metrics.jsonl, summary.json and the W&B run.

The files in the run directory are always written, whatever W&B's mode; W&B runs
offline by default (no account or network; `wandb sync` uploads later).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedssl.config.schema import RecipeConfig
from fedssl.io import atomic_write_text


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


class RunLogger:
    """Writes per-round metrics and the final summary to the run directory and W&B."""

    def __init__(self, cfg: RecipeConfig, run_dir: Path, config_dict: dict[str, Any], resume_after: int = 0, wandb_id: str | None = None):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        # On resume, rounds after the checkpoint were lost with the crash: forget them.
        kept = [m for m in read_metrics(self.metrics_path) if m["round"] <= resume_after]
        atomic_write_text(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept))
        self.wandb = self._start_wandb(cfg, config_dict, wandb_id)

    def _start_wandb(self, cfg: RecipeConfig, config_dict: dict[str, Any], wandb_id: str | None):
        wcfg = cfg.logging.wandb
        if wcfg.mode == "disabled":
            return None
        import wandb

        return wandb.init(
            project=wcfg.project,
            entity=wcfg.entity,
            group=wcfg.group or cfg.name,
            job_type=wcfg.job_type,
            tags=list(wcfg.tags),
            name=cfg.name,
            config=config_dict,
            dir=str(self.run_dir),
            mode=wcfg.mode,
            id=wandb_id,
            resume="allow" if wandb_id else None,
            settings=wandb.Settings(console="off", silent=True, disable_git=True, x_disable_stats=True),
        )

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb else None

    def log_round(self, round_index: int, metrics: dict[str, Any]) -> None:
        record = jsonable({"round": round_index, **metrics})
        with self.metrics_path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(metrics, step=round_index)

    def finish(self, summary: dict[str, Any], client_rows: list[dict[str, Any]], last_round: int) -> None:
        """Write summary.json; in W&B, the summary, a per-client table and a histogram
        of per-client accuracy at the last round's step."""
        atomic_write_text(self.run_dir / "summary.json", json.dumps(jsonable(summary), indent=2) + "\n")
        if self.wandb:
            import wandb

            self.wandb.summary.update(summary)
            if client_rows:
                columns = list(client_rows[0])
                table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in client_rows])
                accuracies = [row["acc"] for row in client_rows if row["test_samples"]]
                self.wandb.log({"clients": table, "client_acc_histogram": wandb.Histogram(accuracies)}, step=last_round)
            self.wandb.finish()

    def abort(self) -> None:
        if self.wandb:
            self.wandb.finish(exit_code=1)
