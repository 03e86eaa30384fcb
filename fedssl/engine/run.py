"""A whole run: build the federation, resume it if asked, run its rounds, log,
checkpoint after every round and write the summary. The round itself is the
engine's (`fedssl.engine.federation`); where clients run is the clients'."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fedssl.algorithms.aggregate import ServerState
from fedssl.config.load import BEHAVIOUR_BEFORE_THE_KEY, saved_config, saved_defaults, to_dict, to_yaml
from fedssl.config.schema import RecipeConfig
from fedssl.errors import UserError
from fedssl.engine.checkpoint import load_checkpoint, restore_rng_states, save_checkpoint
from fedssl.engine.federation import ClientsFactory, Federation
from fedssl.evaluation.personal import personal_summary
from fedssl.inprocess.state import MANIFEST
from fedssl.io import atomic_write_text
from fedssl.privacy.mechanism import CentralDP
from fedssl.run_dir import BEST_CHECKPOINT, CHECKPOINT, CLIENT_STATES, CONFIG, PARTITION
from fedssl.tracking.run_logger import RunLogger, read_metrics

# What a round sent, received and dropped, training and evaluation together; summed over the run.
TRAFFIC = ("bytes_up", "bytes_down", "dropped_clients")
CLIPPED = "clipped_clients"  # updates a round clipped to its norm bound (fedssl.engine.update_bound); summed too
# Keys that may differ between a killed run and its resumption.
# At their current paths: a saved config is read with its keys moved (`saved_config`).
RESUMABLE_CHANGES = ("federation.rounds", "federation.evaluation.eval_every", "logging.", "output_dir",
                     "federation.execution.states_in_memory", "federation.execution.state_dir")


def check_resumable(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None,
                    prefix: str = "") -> None:
    """Refuse to resume a run under a recipe that would change its results.

    A key the killed run's config lacks was added to fedssl since it started; the
    run behaved as its default (`defaults`, the schema's values) or, for a key
    whose default differs from what fedssl did before (`saved_defaults`), as
    that, so only another value is a change. A key the killed run saved at an
    older path (`fedssl.config.moved`) is compared at its current one. Privacy
    settings other than the mechanism change nothing while it is `none`."""
    if defaults is None:
        saved, current = without_inert_privacy(saved_config(saved)), without_inert_privacy(current)
        defaults = saved_defaults()
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        old, new = saved.get(key, defaults.get(key)), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            nested = defaults.get(key)
            check_resumable(old, new, nested if isinstance(nested, dict) else {}, f"{dotted}.")
        elif old != new and not dotted.startswith(RESUMABLE_CHANGES):
            before = (f" (it started before fedssl had {dotted}, and trained as {old!r}: resume it with "
                      f"{dotted}={str(old).lower()})" if key not in saved and dotted in BEHAVIOUR_BEFORE_THE_KEY else "")
            raise UserError(f"cannot resume: {dotted} was {old!r} in the killed run and is {new!r} now{before}")


def without_inert_privacy(config: dict[str, Any]) -> dict[str, Any]:
    """`config` without the privacy keys that have no effect: all but the mechanism when it is `none`."""
    privacy = config.get("privacy", {})
    return {**config, "privacy": {"mechanism": "none"}} if privacy.get("mechanism", "none") == "none" else config


def check_privacy_resumable(saved: dict[str, Any], cfg: RecipeConfig) -> None:
    """A target epsilon is spread over the rounds the run started with: refuse more."""
    saved_rounds = saved["federation"]["rounds"]
    if cfg.privacy.mechanism != "none" and cfg.privacy.target_epsilon is not None and saved_rounds != cfg.federation.rounds:
        raise UserError(f"cannot resume: federation.rounds was {saved_rounds}, over which privacy.target_epsilon="
                        f"{cfg.privacy.target_epsilon} is spent; it cannot change to {cfg.federation.rounds}")


def privacy_summary(privacy: CentralDP | None, rounds: int) -> dict[str, Any]:
    """The (epsilon, delta) the released global model satisfies, for summary.json."""
    if privacy is None:
        return {}
    return {"epsilon": privacy.epsilon(rounds), "delta": privacy.cfg.delta, "noise_multiplier": privacy.noise_multiplier}


def best_round(history: list[dict[str, Any]], metric: str = "global_acc") -> tuple[float, int] | None:
    """The best finite value of `metric` over the evaluated rounds, and its round
    (the first where rounds tie); None before any."""
    scored = [(m[metric], -m["round"]) for m in history
              if isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])]
    if not scored:
        return None
    value, round_index = max(scored)
    return value, -round_index


def add_evaluation(metrics: dict[str, Any], evaluated: dict[str, Any]) -> dict[str, Any]:
    """A round's metrics with its evaluation's: the traffic and drops add up."""
    return metrics | evaluated | {key: metrics[key] + evaluated[key] for key in TRAFFIC}


@dataclass
class Progress:
    """What a run carries from one round to the next, and from a killed run to its resumption."""

    state: ServerState
    start: int = 1  # the next round
    elapsed: float = 0.0  # seconds spent in rounds so far
    wandb_id: str | None = None
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys((*TRAFFIC, CLIPPED), 0))
    best: tuple[float, int] | None = None  # the best global_acc so far and its round (best.pt)


def run_federation(cfg: RecipeConfig, run_dir: Path, resume: bool = False,
                   clients: ClientsFactory | None = None) -> dict[str, Any]:
    """Run (or resume) a federation; returns the summary also written to summary.json.
    `clients` makes its clients (a backend passes one whose clients train elsewhere).

    The resolved recipe is written to config.yaml only once a resume is known to be
    allowed: a refused resume leaves the run directory as it was."""
    config_dict = to_dict(cfg)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT) if resume else None
    if checkpoint:
        check_resumable(checkpoint["config"], config_dict)
        check_privacy_resumable(checkpoint["config"], cfg)
    atomic_write_text(run_dir / CONFIG, to_yaml(cfg))
    federation = Federation.build(cfg, clients=clients)
    federation.data.save(run_dir / PARTITION)
    progress = resumed(federation, checkpoint, run_dir) if checkpoint else Progress(federation.initial_state())
    fed = cfg.federation
    logger = RunLogger(cfg, run_dir, config_dict, resume_after=progress.start - 1, wandb_id=progress.wandb_id)
    bar = tqdm(range(progress.start, fed.rounds + 1), desc=cfg.name, unit="round", disable=not cfg.logging.progress,
               initial=progress.start - 1, total=fed.rounds)
    metrics, rows = {}, []
    progress.best = best_round(read_metrics(logger.metrics_path))  # of the rounds kept on resume, as best.pt holds
    try:
        for round_index in bar:
            metrics, rows = run_round(federation, progress, round_index, bar)
            logger.log_round(round_index, metrics)
            save_round(federation, progress, round_index, metrics, config_dict, logger.wandb_id, run_dir)
    except BaseException:
        logger.abort()
        federation.close()
        raise
    federation.close()  # the worker processes, if any: only evaluation is left
    if not rows:  # resumed after the last round: nothing trained, evaluate what is there
        evaluated, rows = federation.evaluate(progress.state, fed.rounds)  # outside any round: in no round's total
        metrics |= evaluated
    summary = run_summary(federation, progress, metrics, read_metrics(logger.metrics_path))
    logger.finish(summary, rows, last_round=fed.rounds)
    return summary


def resumed(federation: Federation, checkpoint: dict[str, Any], run_dir: Path) -> Progress:
    """Where the killed run stopped: its server, clients', privacy and norm bound's
    state restored from its checkpoint (untrusted: a malformed part is a `UserError`)."""
    try:
        federation.clients.load_state_dict(checkpoint["client_states"], run_dir / CLIENT_STATES)
    except ValueError as error:
        raise UserError(f"{run_dir / CHECKPOINT}: cannot resume: client_states: {error}") from None
    restore_rng_states(checkpoint["rng"])
    if federation.privacy is not None:
        federation.privacy.load_state_dict(checkpoint["privacy"])
    if checkpoint.get("update_clip") is not None:  # a checkpoint written before the bound existed clipped nothing
        try:
            federation.bound.load_state_dict(checkpoint["update_clip"])
        except ValueError as error:
            raise UserError(f"{run_dir / CHECKPOINT}: cannot resume: {error}") from None
    return Progress(ServerState(**checkpoint["server_state"]), checkpoint["round"] + 1, checkpoint["seconds"],
                    checkpoint["wandb_id"], {"dropped_clients": 0, CLIPPED: 0, **checkpoint["totals"]})


def run_round(federation: Federation, progress: Progress, round_index: int, bar: tqdm
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train round `round_index`, evaluate it when due, and add it to the run's totals:
    its metrics and (evaluated) the clients' rows."""
    fed, rows = federation.cfg.federation, []
    began = time.perf_counter()
    progress.state, metrics = federation.fit_round(round_index, progress.state)
    if round_index % fed.evaluation.eval_every == 0 or round_index == fed.rounds:
        evaluated, rows = federation.evaluate(progress.state, round_index)
        metrics = add_evaluation(metrics, evaluated)
        bar.set_postfix(acc=f"{evaluated['global_acc']:.3f}")
    totals = progress.totals
    for key in (*TRAFFIC, CLIPPED):
        totals[key] += metrics[key]
    if "sim_seconds" in metrics:  # simulated time (federation.system), summed as the run goes
        totals["sim_time"] = metrics["sim_time"] = totals.get("sim_time", 0.0) + metrics["sim_seconds"]
    progress.elapsed += time.perf_counter() - began
    metrics["seconds"] = progress.elapsed
    return metrics, rows


def save_round(federation: Federation, progress: Progress, round_index: int, metrics: dict[str, Any],
               config_dict: dict[str, Any], wandb_id: str | None, run_dir: Path) -> None:
    """Checkpoint the round (and best.pt when it is the best so far)."""
    saved = {
        "round": round_index,
        "config": config_dict,
        "class_names": list(federation.data.class_names),
        "server_state": {"params": progress.state.params, "momentum": progress.state.momentum,
                         "extras": progress.state.extras},
        "client_states": federation.clients.state_dict(run_dir / CLIENT_STATES, round_index),
        "seconds": progress.elapsed,
        "totals": progress.totals,
        "wandb_id": wandb_id,
        "privacy": federation.privacy.state_dict() if federation.privacy else None,
        "update_clip": federation.bound.state_dict(),
    }
    # best.pt before checkpoint.pt: killed between the two, the round is run again, identically.
    best = progress.best
    if math.isfinite(metrics.get("global_acc", math.nan)) and (best is None or metrics["global_acc"] > best[0]):
        # clients' states held in snapshot files are checkpoint.pt's: later rounds replace those files
        spilled = MANIFEST in saved["client_states"]
        save_checkpoint(run_dir / BEST_CHECKPOINT, saved | {"client_states": {}} if spilled else saved)
        progress.best = metrics["global_acc"], round_index
    save_checkpoint(run_dir / CHECKPOINT, saved)


def run_summary(federation: Federation, progress: Progress, metrics: dict[str, Any],
                history: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json: the last round's metrics, the best round, the run's totals and privacy spent."""
    cfg, best = federation.cfg, progress.best
    return {
        "name": cfg.name,
        "algorithm": cfg.algorithm.name,
        "rounds": cfg.federation.rounds,
        "global_acc": metrics["global_acc"],
        "global_loss": metrics["global_loss"],
        **{k: v for k, v in metrics.items() if k.startswith(("global_f1_macro", "global_recall/"))},
        **({"global_acc_best": best[0], "global_acc_best_round": best[1]} if best else {}),
        "client_acc_mean": metrics["client_acc_mean"],
        **{k: v for k, v in metrics.items()
           if k.startswith(("client_acc_pooled", "client_acc_mean/", "pl_", "unseen_", "linear_acc"))},
        **personal_summary(metrics, history),
        **progress.totals,
        **privacy_summary(federation.privacy, cfg.federation.rounds),
        "seconds": progress.elapsed,
        "class_names": list(federation.data.class_names),
        "global_confusion": metrics["global_confusion"],
    }
