"""User-level DP in real runs of the in-process loop: what is logged, what is bounded."""

import json

import pytest
import torch

from fedssl.config.load import load_recipe
from fedssl.engine.stages import draw
from fedssl.errors import UserError
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.engine.federation import Federation
from fedssl.engine.run import run_federation
from fedssl.privacy.accountant import epsilon
from fedssl.privacy.clipping import global_norm, update_delta
from fedssl.tracking.run_logger import read_metrics

# The tiny federation has 6 clients: delta < 1/6. A small clip keeps the noise (z * clip / m
# per weight) small enough for its 3 clients a round to keep training.
DP = ["privacy.mechanism=central", "privacy.delta=0.01", "privacy.clip=0.01"]


def dp_run(recipe, run_dir, *overrides):
    cfg = load_recipe(recipe, [*DP, *overrides])
    summary = run_federation(cfg, run_dir)
    return summary, read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.slow
def test_logged_epsilon_is_the_accountants_grows_over_rounds_and_shrinks_with_more_noise(tiny_recipe, tmp_path):
    summary, rounds = dp_run(tiny_recipe, tmp_path / "z1", "privacy.noise_multiplier=1.0")
    eps = [m["epsilon"] for m in rounds]
    assert all(a < b for a, b in zip(eps, eps[1:])), eps
    # 3 of 6 clients per round: each takes part with q = 0.5
    assert eps == pytest.approx([epsilon(1.0, 0.5, t, 0.01) for t in (1, 2, 3)])
    written = json.loads((tmp_path / "z1" / "summary.json").read_text())
    assert written["epsilon"] == pytest.approx(eps[-1]) and written["delta"] == 0.01
    assert written["noise_multiplier"] == 1.0
    _, noisier = dp_run(tiny_recipe, tmp_path / "z2", "privacy.noise_multiplier=2.0")
    assert all(b < a for a, b in zip(eps, [m["epsilon"] for m in noisier]))


@pytest.mark.slow
def test_target_epsilon_sets_the_noise_so_the_run_ends_just_within_it(tiny_recipe, tmp_path):
    summary, rounds = dp_run(tiny_recipe, tmp_path / "run", "privacy.target_epsilon=2.0")
    assert summary["epsilon"] <= 2.0 and summary["epsilon"] == pytest.approx(2.0, rel=0.01)
    assert rounds[-1]["epsilon"] == pytest.approx(summary["epsilon"])
    assert rounds[0]["dp_noise_std"] == pytest.approx(summary["noise_multiplier"] * 0.01 / 3)  # z * clip / m


def test_clipping_bounds_how_far_one_round_moves_the_global_model(tiny_recipe):
    # No noise (z = 0): the global model moves by the sum of clipped deltas / m, so by
    # at most (clients sampled / m) * clip, although local training moves far more.
    cfg = load_recipe(tiny_recipe, [*DP, "privacy.noise_multiplier=0", "privacy.clip=0.05", "train.lr=0.2"])
    federation = Federation.build(cfg)
    state = federation.initial_state()
    new_state, metrics = federation.fit_round(1, state)
    moved = global_norm(update_delta(new_state.params, state.params))
    assert 0 < moved <= metrics["clients"] / 3 * 0.05 + 1e-6
    unclipped = load_recipe(tiny_recipe, ["train.lr=0.2"])
    free = Federation.build(unclipped)
    free_state, _ = free.fit_round(1, free.initial_state())
    assert global_norm(update_delta(free_state.params, state.params)) > 10 * moved


def test_dp_rounds_are_poisson_sampled_at_the_accounted_rate(tiny_recipe):
    federation = Federation.build(load_recipe(tiny_recipe, DP))
    sizes = [len(draw(federation, r, 0, set())) for r in range(1, 401)]
    assert sum(sizes) / len(sizes) == pytest.approx(3, rel=0.05)  # q * clients = 0.5 * 6
    assert len(set(sizes)) > 3  # the cohort size varies, as Poisson sampling does


@pytest.mark.slow
def test_adaptive_clipping_moves_the_bound_and_a_resumed_run_matches(tiny_recipe, tmp_path):
    adaptive = ["privacy.adaptive_clip=true", "privacy.clip=0.05", "privacy.noise_multiplier=0.5", "federation.rounds=3"]
    _, rounds = dp_run(tiny_recipe, tmp_path / "full", *adaptive)
    clips = [m["dp_clip"] for m in rounds]
    assert clips[0] == 0.05 and clips[1] != clips[0] and clips[2] != clips[1]
    # the same run killed after round 2 and resumed to round 3
    cfg = load_recipe(tiny_recipe, [*DP, *adaptive, "federation.rounds=2"])
    run_federation(cfg, tmp_path / "resumed")
    resumed = run_federation(load_recipe(tiny_recipe, [*DP, *adaptive]), tmp_path / "resumed", resume=True)
    assert [m["dp_clip"] for m in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == clips
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["server_state"]["params"]
    again = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["server_state"]["params"]
    assert all(torch.equal(full[n], again[n]) for n in full)
    assert resumed["epsilon"] == pytest.approx(rounds[-1]["epsilon"])


@pytest.mark.slow
def test_a_target_epsilon_run_cannot_be_extended(tiny_recipe, tmp_path):
    run_federation(load_recipe(tiny_recipe, [*DP, "privacy.target_epsilon=5", "federation.rounds=1"]), tmp_path / "run")
    with pytest.raises(UserError, match="privacy.target_epsilon"):
        run_federation(load_recipe(tiny_recipe, [*DP, "privacy.target_epsilon=5", "federation.rounds=2"]),
                       tmp_path / "run", resume=True)


def test_dp_is_refused_where_the_algorithm_does_not_average_full_weights(tiny_recipe):
    cfg = load_recipe(tiny_recipe, [*DP, "algorithm.name=fedmatch", "data.labels.mode=client", "data.labels.per_class=2"])
    with pytest.raises(UserError, match=r"privacy.mechanism: central .*algorithm.name=fedmatch"):
        Federation.build(cfg)


@pytest.mark.parametrize("overrides, key", [
    (["privacy.mechanism=central", "privacy.delta=0.2"], "privacy.delta"),  # >= 1/6 clients
    (["privacy.mechanism=central", "privacy.delta=0.01", "federation.robust.aggregator=median"], "privacy.mechanism"),
    (["privacy.mechanism=local"], "privacy.mechanism"),
    (["privacy.mechanism=central", "privacy.delta=0.01", "federation.robust.round_retries=1"], "federation.robust.round_retries"),
    (["privacy.accountant=moments"], "privacy.accountant"),
    (["privacy.clip=0"], "privacy.clip"),
    (["privacy.target_epsilon=-1"], "privacy.target_epsilon"),
])
def test_bad_privacy_settings_name_their_key(tiny_recipe, overrides, key):
    with pytest.raises(UserError, match=key):
        load_recipe(tiny_recipe, overrides)


@pytest.mark.slow
def test_the_quickstart_with_only_central_dp_added_finishes_with_finite_weights(tmp_path):
    """The default privacy settings on the shipped quickstart (5 of 10 clients a round):
    with clip 1 this stopped in round 2 on non-finite updates. Fewer rounds and images
    keep the test short; no privacy key but the mechanism is given."""
    from fedssl.privacy.mechanism import DEFAULT_WEIGHT_NOISE

    cfg = load_recipe("quickstart", ["privacy.mechanism=central", "federation.rounds=3", "data.num_samples=1000",
                                     "logging.wandb.mode=disabled", "logging.progress=false",
                                     f"output_dir={tmp_path}"])
    summary = run_federation(cfg, tmp_path / "run")
    rounds = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["round"] for m in rounds] == [1, 2, 3] and all(m["dropped_clients"] == 0 for m in rounds)
    assert rounds[0]["dp_noise_std"] == pytest.approx(DEFAULT_WEIGHT_NOISE)  # z * clip / m with the default clip
    assert 0 < summary["epsilon"] < float("inf") and summary["epsilon"] == pytest.approx(rounds[-1]["epsilon"])
    weights = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["server_state"]["params"]
    assert all(bool(torch.isfinite(w).all()) for w in weights.values() if w.is_floating_point())


def test_a_clip_known_to_diverge_is_warned_about_with_the_settings_to_use(tiny_recipe, caplog):
    from fedssl.privacy.mechanism import CentralDP

    cfg = load_recipe("quickstart", ["privacy.mechanism=central", "privacy.clip=1.0"])
    with caplog.at_level("WARNING", logger="fedssl.privacy.mechanism"):
        dp = CentralDP.build(cfg)
    assert dp.clip == 1.0
    assert "noise on each weight is 0.2 a round" in caplog.text and "privacy.clip <= 0.1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedssl.privacy.mechanism"):
        dp = CentralDP.build(load_recipe("quickstart", ["privacy.mechanism=central"]))
    assert dp.clip == pytest.approx(0.02) and caplog.text == ""  # 0.004 * 5 clients / z 1
