"""Sweeps run locally and compared: the table's numbers come from the runs' summaries."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from cli_support import assert_user_error, run_cli

from fedssl.errors import UserError
from fedssl.sweep import Param, grid, parse_param, run_name, wandb_sweep_config
from fedssl.cli import main
from fedssl.tracking.compare import comparison_table, group_variants, mean_std, rank_variants
from fedssl.tracking.runs import RunRecord


def fedssl(*args):
    return subprocess.run([sys.executable, "-m", "fedssl.cli", *args], capture_output=True, text=True, timeout=600)


def start(*args):
    """`fedssl args` in a process of its own, beside the test; `.communicate()` it."""
    return subprocess.Popen([sys.executable, "-m", "fedssl.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_local_sweep_then_compare(tiny_recipe, tmp_path):
    runs = tmp_path / "runs"
    sweep = fedssl("sweep", str(tiny_recipe), "federation.rounds=2", "--param", "train.lr=0.01,0.1", "--seeds", "2", "--local")
    assert sweep.returncode == 0, sweep.stderr
    run_dirs = sorted(p.parent for p in runs.glob("*/summary.json"))
    assert [d.name for d in run_dirs] == ["tiny-lr=0.01-seed=0", "tiny-lr=0.01-seed=1", "tiny-lr=0.1-seed=0", "tiny-lr=0.1-seed=1"]
    sweep_config = yaml.safe_load((runs / "tiny-sweep.sweep.yaml").read_text())
    assert sweep_config["parameters"] == {"train.lr": {"values": [0.01, 0.1]}, "seed": {"values": [0, 1]}}

    # the same sweep again (it keeps the finished runs) beside the comparison, which only reads them
    again = start("sweep", str(tiny_recipe), "federation.rounds=2", "--param", "train.lr=0.01,0.1", "--seeds", "2",
                  "--local")
    out = tmp_path / "comparison"
    compare = fedssl("compare", "--group", "tiny-sweep", "--runs-root", str(runs), "--out", str(out))
    again_out, again_err = again.communicate(timeout=600)
    assert again.returncode == 0, again_err
    assert again_out.count("finished before, kept") == 4
    assert compare.returncode == 0, compare.stderr
    table = (out / "comparison.md").read_text()
    for lr in ("0.01", "0.1"):
        summaries = [json.loads((runs / f"tiny-lr={lr}-seed={s}" / "summary.json").read_text()) for s in (0, 1)]
        row = next(line for line in table.splitlines() if line.startswith(f"| fedavg lr={lr} |"))
        mean, std = mean_std([s["global_acc"] for s in summaries])
        assert f"{mean:.4f} ± {std:.4f}" in row
        assert np.isclose(std, np.std([s["global_acc"] for s in summaries], ddof=1))
        assert "| 2 |" in row
    # ranked by macro-F1: the best variant's row first, the PNG named after the metric
    assert main(["compare", *map(str, run_dirs), "--out", str(out), "--metric", "global_f1_macro"]) == 0
    ranked = (out / "comparison.md").read_text().splitlines()
    assert ranked[0].startswith("| variant | seeds | global_f1_macro | global_acc |")
    f1 = {lr: np.mean([json.loads((runs / f"tiny-lr={lr}-seed={s}" / "summary.json").read_text())["global_f1_macro"]
                       for s in (0, 1)]) for lr in ("0.01", "0.1")}
    assert ranked[2].startswith(f"| fedavg lr={max(f1, key=f1.get)} |")
    assert (out / "global_f1_macro.png").is_file()
    with Image.open(out / "global_acc.png") as image:
        image.verify()
        assert image.format == "PNG"


def record(seed, lr, acc, **summary):
    config = {"name": f"r{seed}", "seed": seed, "algorithm": {"name": "fedavg"}, "train": {"lr": lr},
              "logging": {"wandb": {"group": "g"}}, "output_dir": "runs"}
    history = [{"round": 1, "global_acc": acc / 2}, {"round": 2, "global_acc": acc}]
    return RunRecord(source=f"r{seed}", config=config, summary={"global_acc": acc, **summary}, history=history)


def test_variants_differ_only_in_what_is_not_seed():
    variants = group_variants([record(0, 0.1, 0.5), record(1, 0.1, 0.7), record(0, 0.2, 0.9)])
    assert list(variants) == ["fedavg lr=0.1", "fedavg lr=0.2"]
    assert [len(v) for v in variants.values()] == [2, 1]


def test_table_shows_only_metrics_some_run_has():
    table = comparison_table(group_variants([record(0, 0.1, 0.5, epsilon=3.0), record(1, 0.1, 0.7, epsilon=5.0)]))
    header = table.splitlines()[0]
    assert "epsilon" in header and "bytes_up" not in header and "personal_acc" not in header
    assert "0.6000 ± 0.1414" in table and "4.0000 ± 1.4142" in table


def test_a_single_seed_shows_its_mean_without_a_spread():
    records = [record(0, 0.1, 0.5, bytes_up=2e6, seconds=10.0), record(1, 0.1, 0.7, bytes_up=4e6, seconds=12.0),
               record(0, 0.2, 0.9, bytes_up=3e6, seconds=11.0)]
    rows = {line.split(" | ")[0]: line for line in comparison_table(group_variants(records)).splitlines()[2:]}
    assert rows["| fedavg lr=0.2"] == "| fedavg lr=0.2 | 1 | 0.9000 | 3.00 MB | 11.0 |"
    assert rows["| fedavg lr=0.1"] == "| fedavg lr=0.1 | 2 | 0.6000 ± 0.1414 | 3.00 ± 1.41 MB | 11.0 ± 1.4 |"


def write_run_dir(root: Path, run: RunRecord) -> Path:
    """`run` as the run directory compare reads."""
    run_dir = root / run.source
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(run.config))
    (run_dir / "summary.json").write_text(json.dumps(run.summary))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in run.history))
    return run_dir


def test_compare_refuses_sim_time_for_runs_that_never_recorded_it(tmp_path, capsys):
    timed = record(0, 0.1, 0.5)
    timed = RunRecord("timed", timed.config, timed.summary, [row | {"sim_time": 10.0 * row["round"]} for row in timed.history])
    untimed = [write_run_dir(tmp_path, run) for run in (record(1, 0.1, 0.7), record(0, 0.2, 0.9))]
    out = tmp_path / "comparison"
    code, err = run_cli(capsys, "compare", write_run_dir(tmp_path, timed), *untimed, "--x", "sim_time", "--out", out)
    assert_user_error(code, err, "--x sim_time", "2 of 3 runs", "device profiles")
    assert not out.exists()  # refused before anything was written
    code, err = run_cli(capsys, "compare", tmp_path / "timed", "--x", "sim_time", "--out", out)
    assert code == 0, err
    assert (out / "global_acc.png").is_file()


def test_variants_rank_by_any_metric_best_first():
    records = [record(0, 0.1, 0.5, global_f1_macro=0.2, global_loss=1.0), record(0, 0.2, 0.4, global_f1_macro=0.3, global_loss=0.8),
               record(0, 0.3, 0.9)]
    variants = group_variants(records)
    assert list(rank_variants(variants, "global_acc")) == ["fedavg lr=0.3", "fedavg lr=0.1", "fedavg lr=0.2"]
    assert list(rank_variants(variants, "global_f1_macro")) == ["fedavg lr=0.2", "fedavg lr=0.1", "fedavg lr=0.3"]  # without it: last
    assert list(rank_variants(variants, "global_loss"))[:2] == ["fedavg lr=0.2", "fedavg lr=0.1"]  # lower is better
    table = comparison_table(rank_variants(variants, "global_loss"), "global_loss")
    assert table.splitlines()[0].startswith("| variant | seeds | global_loss | global_acc | global_f1_macro |")
    with pytest.raises(UserError, match="no run has 'global_recall/disgust'.*global_acc"):
        rank_variants(variants, "global_recall/disgust")
    variants["fedavg lr=0.3"][0].history[0]["train_loss"] = 1.5  # only the rounds record it: plotted, not ranked
    assert list(rank_variants(variants, "train_loss")) == list(variants)


def test_pooled_and_mean_personal_accuracy_are_columns_of_their_own_and_may_rank_apart():
    # lr 0.1 wins on the mean over clients, lr 0.2 on the test samples pooled (PFLlib's figure)
    records = [record(0, 0.1, 0.5, personal_acc=0.9, personal_acc_pooled=0.6),
               record(0, 0.2, 0.5, personal_acc=0.8, personal_acc_pooled=0.7)]
    variants = group_variants(records)
    assert list(rank_variants(variants, "personal_acc")) == ["fedavg lr=0.1", "fedavg lr=0.2"]
    assert list(rank_variants(variants, "personal_acc_pooled")) == ["fedavg lr=0.2", "fedavg lr=0.1"]
    header = comparison_table(variants).splitlines()[0]
    assert "| personal_acc | personal_acc_pooled |" in header


def test_random_and_bayes_sweeps_draw_from_values_and_ranges():
    params = [parse_param("train.lr=log:0.001..0.1"), parse_param("train.local_epochs=1..4"),
              parse_param("train.momentum=0.0..0.9"), parse_param("algorithm.name=fedavg,fedprox")]
    config = wandb_sweep_config("quickstart", "qs", params, [0, 1], method="bayes", run_cap=20)
    assert config["method"] == "bayes" and config["run_cap"] == 20
    assert config["metric"] == {"name": "global_acc", "goal": "maximize"}
    assert config["parameters"] == {
        "train.lr": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.1},
        "train.local_epochs": {"distribution": "int_uniform", "min": 1, "max": 4},
        "train.momentum": {"distribution": "uniform", "min": 0.0, "max": 0.9},
        "algorithm.name": {"values": ["fedavg", "fedprox"]}, "seed": {"values": [0, 1]}}
    assert wandb_sweep_config("quickstart", "qs", params[3:], [0], method="random")["method"] == "random"
    with pytest.raises(UserError, match="--method random or bayes"):
        wandb_sweep_config("quickstart", "qs", params, [0])  # a grid cannot hold a range
    with pytest.raises(UserError, match="MIN < MAX"):
        parse_param("train.lr=0.1..0.01")
    with pytest.raises(UserError, match="MIN > 0"):
        parse_param("train.lr=log:0..0.1")


def test_sweep_cli_writes_a_bayes_sweep_and_refuses_to_run_it_locally(tiny_recipe, tmp_path, capsys):
    assert main(["sweep", str(tiny_recipe), "--param", "train.lr=log:0.001..0.1", "--method", "bayes", "--runs", "8"]) == 0
    config = yaml.safe_load((tmp_path / "runs" / "tiny-sweep.sweep.yaml").read_text())
    assert config["method"] == "bayes" and config["run_cap"] == 8
    assert main(["sweep", str(tiny_recipe), "--param", "train.lr=0.01,0.1", "--method", "random", "--local"]) == 2
    assert main(["sweep", str(tiny_recipe), "--param", "train.lr=0.001..0.1", "--local"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert "--local runs a grid" in errors[0] and "use --method random or bayes" in errors[1]


def test_grid_and_names():
    params = [Param("train.lr", (0.01, 0.1)), Param("algorithm.name", ("fedavg",))]
    combos = grid(params, [0, 1])
    assert combos[0] == ["train.lr=0.01", "algorithm.name=fedavg", "seed=0"] and len(combos) == 4
    assert run_name("q", ["train.lr=0.01", "seed=1"]) == "q-lr=0.01-seed=1"


def test_param_parsing_and_errors():
    assert parse_param("train.lr=0.01,0.1") == Param("train.lr", (0.01, 0.1))
    with pytest.raises(UserError, match="train.lr"):
        parse_param("train.lrr=0.1")
    with pytest.raises(UserError, match="--seeds"):
        parse_param("seed=1,2")


def test_wandb_sweep_launches_fedssl_run_with_plain_overrides():
    config = wandb_sweep_config("quickstart", "qs", [Param("train.lr", (0.01,))], [0, 1])
    assert config["method"] == "grid"
    assert config["command"][:3] == ["fedssl", "run", "quickstart"]
    assert config["command"][-1] == "${args_no_hyphens}"
    assert "logging.wandb.group=qs" in config["command"]
