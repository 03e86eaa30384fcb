"""Semi-supervised learning in the federation: what the learners see, what they learn
from, and what the loop measures and reports."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedssl.config.load import load_recipe
from fedssl.algorithms.base import ALGORITHMS
from fedssl.engine.federation import Federation
from fedssl.engine.run import run_federation
from fedssl.messages import Update
from fedssl.evaluation.metrics import round_metrics
from fedssl.tracking.run_logger import read_metrics

SMALL = ["algorithm.ssl.unlabeled_ratio=2"]
# Every client holds only unlabeled data; the server holds 3 labels per class.
UNLABELED_ONLY = ["data.labels.mode=server", "data.labels.server_per_class=3"]
# Every client holds 2 labels per class and the rest of its data unlabeled.
MIXED_CLIENTS = ["data.labels.mode=client", "data.labels.per_class=2"]
# tau is validated to (0, 1]; any tau <= 1/num_classes keeps every pseudo-label,
# since the largest of num_classes probabilities is at least 1/num_classes.
TAU_KEEP_ALL = "algorithm.ssl.tau=0.000001"


def build(recipe, *overrides: str) -> Federation:
    return Federation.build(load_recipe(recipe, [*SMALL, *overrides]))


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    return any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def record_steps(learner) -> list[tuple[dict, object]]:
    """Wrap the learner's training_step to record (batch, output) of every step."""
    calls = []
    inner = learner.training_step

    def step(batch, batch_idx):
        out = inner(batch, batch_idx)
        calls.append((batch, out))
        return out

    learner.training_step = step
    return calls


def first_unlabeled_client(federation: Federation):
    client = federation.data.clients[0]
    assert len(client.labeled) == 0 and len(client.unlabeled) > 0
    return client


def sharpened(federation: Federation, factor: float = 100.0):
    """The initial server state with the classifier scaled up: the fresh model's
    predictions are nearly uniform (confidence ~1/7 everywhere), this spreads their
    confidences (about 0.3 to 0.8 on the tiny recipe) so a threshold of 0.5 keeps some
    pseudo-labels and drops others."""
    state = federation.initial_state()
    return type(state)(params={n: v * factor if n.startswith("fc.") else v for n, v in state.params.items()})


def fit_first_round(federation: Federation, client, state=None):
    state = state or federation.initial_state()
    payload = federation.algorithm.payload(1, state, client.client_id)
    update, kept = federation.trainer.fit(client.client_id, client.labeled, client.unlabeled, payload)
    return payload, update, kept


# -- what a FixMatch client learns from ------------------------------------------------------


def test_fixmatch_learns_from_unlabeled_data_alone_with_no_supervised_loss(tiny_recipe):
    lambda_u, tau = 2.0, 0.5
    federation = build(tiny_recipe, "algorithm.name=fixmatch", *UNLABELED_ONLY,
                       f"algorithm.ssl.tau={tau}", f"algorithm.ssl.lambda_u={lambda_u}")
    learner = federation.trainer.learner
    client = first_unlabeled_client(federation)
    inner, losses = learner.training_step, []

    def step(batch, batch_idx):
        # Recompute FixMatch's unlabeled loss by hand from the same weights: it must be
        # the whole loss (fedavg_cnn has no BatchNorm or dropout, so separate forward
        # passes equal the learner's single one).
        with torch.no_grad():
            confidence, labels = learner.model(batch["u_weak"]).softmax(dim=1).max(dim=1)
            strong = learner.model(batch["u_strong"])
            expected = lambda_u * (F.cross_entropy(strong, labels, reduction="none") * (confidence >= tau)).mean()
        out = inner(batch, batch_idx)
        losses.append((out["loss"].item(), expected.item()))
        return out

    learner.training_step = step
    state = sharpened(federation)
    before = {n: v.clone() for n, v in state.params.items() if n in dict(learner.model.named_parameters())}
    _, update, _ = fit_first_round(federation, client, state)
    assert losses and all(got == pytest.approx(want, rel=1e-4, abs=1e-7) for got, want in losses)
    assert 0 < update.metrics["pl_masked"] < update.metrics["pl_seen"]
    assert changed(before, learner.model)
    assert update.num_examples == len(client.unlabeled)


def test_without_unlabeled_weight_an_unlabeled_client_learns_nothing(tiny_recipe):
    federation = build(tiny_recipe, "algorithm.name=fixmatch", *UNLABELED_ONLY, TAU_KEEP_ALL, "algorithm.ssl.lambda_u=0")
    learner = federation.trainer.learner
    calls = record_steps(learner)
    before = params(learner.model)
    _, update, _ = fit_first_round(federation, first_unlabeled_client(federation))
    assert calls and all(out["loss"].item() == 0.0 for _, out in calls)  # no supervised term hides in the loss
    assert update.metrics["pl_masked"] == update.metrics["pl_seen"]  # pseudo-labels were there, unweighted
    assert not changed(before, learner.model)


def test_tau_one_masks_every_pseudo_label_out(tiny_recipe):
    federation = build(tiny_recipe, "algorithm.name=fixmatch", *UNLABELED_ONLY, "algorithm.ssl.tau=1.0")
    learner = federation.trainer.learner
    client = first_unlabeled_client(federation)
    calls = record_steps(learner)
    before = params(learner.model)
    _, update, _ = fit_first_round(federation, client)
    assert calls and all(not out["mask"].any() and out["loss"].item() == 0.0 for _, out in calls)
    assert update.metrics["pl_masked"] == 0 and update.metrics["pl_correct"] == 0
    unlabeled_batch = 16 * 2  # batch_size x unlabeled_ratio; one epoch of full batches (train.drop_last)
    assert update.metrics["pl_seen"] == len(client.unlabeled) // unlabeled_batch * unlabeled_batch > 0
    assert not changed(before, learner.model)  # no labels and no pseudo-labels: nothing to learn
    metrics = round_metrics([update], federation.kinds)
    assert metrics["pl_mask_rate"] == 0.0 and metrics["pl_mask_rate/unlabeled"] == 0.0
    assert math.isnan(metrics["pl_acc"])


def test_tau_near_zero_uses_every_pseudo_label(tiny_recipe):
    federation = build(tiny_recipe, "algorithm.name=fixmatch", *UNLABELED_ONLY, TAU_KEEP_ALL)
    learner = federation.trainer.learner
    calls = record_steps(learner)
    before = params(learner.model)
    _, update, _ = fit_first_round(federation, first_unlabeled_client(federation))
    assert calls and all(out["mask"].all() for _, out in calls)
    assert update.metrics["pl_masked"] == update.metrics["pl_seen"] > 0
    assert round_metrics([update], federation.kinds)["pl_mask_rate"] == 1.0
    assert changed(before, learner.model)


def test_flexmatch_client_starts_with_zero_thresholds_and_keeps_its_selections(tiny_recipe):
    federation = build(tiny_recipe, "algorithm.name=fixmatch", *UNLABELED_ONLY, "algorithm.ssl.threshold=flexmatch",
                       "algorithm.ssl.tau=0.5", "train.local_steps=1")
    client = first_unlabeled_client(federation)
    _, update, kept = fit_first_round(federation, client, sharpened(federation))
    # FlexMatch's warm-up with nothing yet selected: every class threshold is 0
    assert update.metrics["pl_masked"] == update.metrics["pl_seen"]
    selected = kept["flexmatch_selected"]
    assert len(selected) == len(client.unlabeled)
    # ... and it records the confident ones (above tau) only
    assert 0 < int((selected >= 0).sum()) < update.metrics["pl_seen"]
    assert int(selected.max()) < federation.data.num_classes


# -- what the learner sees ---------------------------------------------------------------------


@pytest.mark.parametrize("algorithm, extra", [
    ("fixmatch", []),
    ("semifl", ["algorithm.ssl.server_steps=2"]),
    ("fedaffect", ["algorithm.ssl.server_steps=2"]),  # a self-supervised round
])
def test_an_unlabeled_client_never_hands_labels_to_the_learner(tiny_recipe, algorithm, extra):
    federation = build(tiny_recipe, f"algorithm.name={algorithm}", *UNLABELED_ONLY, *extra)
    calls = record_steps(federation.trainer.learner)
    fit_first_round(federation, first_unlabeled_client(federation))
    assert calls
    for batch, _ in calls:
        assert set(batch) == {"u_weak", "u_strong", "u_index"}


def test_a_mixed_client_hands_over_only_its_labeled_samples_labels(tiny_recipe):
    federation = build(tiny_recipe, "algorithm.name=fixmatch", *MIXED_CLIENTS, "train.local_steps=1",
                       "train.batch_size=64")
    client = federation.data.clients[0]
    assert 0 < len(client.labeled) <= 64 and len(client.unlabeled) > 0
    calls = record_steps(federation.trainer.learner)
    fit_first_round(federation, client)
    (batch, _), = calls
    assert len(batch["y"]) == len(batch["x"]) == len(client.labeled)  # one batch holds all labeled samples
    assert Counter(batch["y"].tolist()) == Counter(federation.data.pool.labels[client.labeled].tolist())
    assert len(batch["u_weak"]) == len(batch["u_strong"]) == len(batch["u_index"])


# -- SemiFL's teacher ------------------------------------------------------------------------------


def teacher_watch(federation: Federation, payload_arrays: dict[str, torch.Tensor]) -> list[dict]:
    """Wrap training_step to record, at each step, whether the teacher still holds the
    received weights (buffers too), its predictions on a fixed probe, and whether it
    ran in training mode when the learner called it."""
    learner = federation.trainer.learner
    probe = federation.pool.images[:32]
    inner, seen, modes, hooked = learner.training_step, [], [], []

    def step(batch, batch_idx):
        teacher = learner.teacher  # made by start_round, so it exists by the first step
        if not hooked:
            hooked.append(teacher.register_forward_pre_hook(lambda module, args: modes.append(module.training)))
        state = teacher.state_dict()
        record = {"same_weights": all(torch.equal(state[n], v) for n, v in payload_arrays.items())}
        was = teacher.training
        with torch.no_grad():
            teacher.eval()
            record["probe"] = teacher(probe).clone()
            record["teacher_labels"] = teacher(batch["u_weak"]).argmax(dim=1)
            teacher.train(was)
        modes.clear()
        out = inner(batch, batch_idx)
        record["training"] = any(modes)
        record["pseudo_labels"] = out["pseudo_labels"]
        seen.append(record)
        return out

    learner.training_step = step
    return seen


def run_teacher_round(tiny_recipe, *extra: str):
    federation = build(tiny_recipe, "algorithm.name=semifl", *UNLABELED_ONLY, "algorithm.ssl.server_steps=3",
                       TAU_KEEP_ALL, "train.local_steps=4", *extra)
    state = federation.algorithm.server_round(1, federation.initial_state(), federation.train_on_server)
    client = first_unlabeled_client(federation)
    payload = federation.algorithm.payload(1, state, client.client_id)
    seen = teacher_watch(federation, payload.arrays)
    before = params(federation.trainer.learner.model)
    federation.trainer.fit(client.client_id, client.labeled, client.unlabeled, payload)
    after = federation.trainer.learner.teacher.state_dict()
    seen.append({"same_weights": all(torch.equal(after[n], v) for n, v in payload.arrays.items())})
    return federation, seen, before


def test_semifl_teacher_is_the_received_model_and_stays_fixed(tiny_recipe):
    federation, seen, before = run_teacher_round(tiny_recipe)
    *steps, end = seen
    assert len(steps) == 4
    assert all(r["same_weights"] for r in seen)  # at every step and after the round
    assert all(torch.equal(r["probe"], steps[0]["probe"]) for r in steps)
    # the pseudo-labels are the teacher's, not the student's
    assert all(torch.equal(r["pseudo_labels"], r["teacher_labels"]) for r in steps)
    assert changed(before, federation.trainer.learner.model)  # while the student did learn


def test_semifl_teacher_stays_fixed_with_batch_norm(tiny_recipe):
    # ClientTrainer.fit calls learner.train() after start_round: that must not put the
    # teacher (a registered submodule) back in training mode, where its BatchNorm
    # statistics would drift during the round and its pseudo-labels use batch statistics
    _, seen, _ = run_teacher_round(tiny_recipe, "model.name=fedavg_cnn_bn")
    *steps, end = seen
    assert all(r["same_weights"] for r in seen)  # BatchNorm running statistics included
    assert all(torch.equal(r["probe"], steps[0]["probe"]) for r in steps)
    assert not any(r["training"] for r in steps)  # pseudo-labels from running, not batch, statistics


def test_semifl_clients_are_taught_by_the_server_fine_tuned_model(tiny_recipe):
    federation = build(tiny_recipe, "algorithm.name=semifl", *UNLABELED_ONLY, "algorithm.ssl.server_steps=3",
                       "train.local_steps=1")
    initial = federation.initial_state()
    fine_tuned = federation.algorithm.server_round(1, initial, federation.train_on_server).params
    assert any(not torch.equal(fine_tuned[n], initial.params[n]) for n in fine_tuned)
    learner, teachers = federation.trainer.learner, []
    inner = learner.training_step

    def step(batch, batch_idx):
        if "u_weak" in batch:  # a client step, not the server's
            teachers.append({n: v.clone() for n, v in learner.teacher.state_dict().items()})
        return inner(batch, batch_idx)

    learner.training_step = step
    federation.fit_round(1, initial)
    assert len(teachers) == federation.cfg.federation.clients_per_round
    for teacher in teachers:
        assert all(torch.allclose(teacher[n], fine_tuned[n]) for n in fine_tuned)


# -- what the loop measures --------------------------------------------------------------------------


def test_round_metrics_pool_pseudo_label_counts_per_kind():
    update = pl_update
    updates = [
        update(0, pl_seen=10, pl_masked=4, pl_correct=3),
        update(1, pl_seen=20, pl_masked=16, pl_correct=8),
        update(2, pl_seen=5, pl_masked=0, pl_correct=0),
    ]
    metrics = round_metrics(updates, {0: "unlabeled", 1: "mixed", 2: "unlabeled"})
    assert metrics["pl_mask_rate"] == pytest.approx(20 / 35)
    assert metrics["pl_acc"] == pytest.approx(11 / 20)  # pooled over samples, not a mean of client rates
    assert metrics["pl_acc/unlabeled"] == pytest.approx(3 / 4)
    assert metrics["pl_acc/mixed"] == pytest.approx(8 / 16)
    assert metrics["pl_mask_rate/unlabeled"] == pytest.approx(4 / 15)
    assert metrics["clients"] == 3
    assert metrics["train_loss"] == 1.0


def pl_update(client_id, **metrics):
    return Update(client_id, {"w": torch.zeros(10)}, num_examples=1, metrics={"train_loss": 1.0, **metrics})


def test_round_metrics_without_pseudo_labels_in_a_round_of_labeled_clients():
    metrics = round_metrics([pl_update(0), pl_update(1)], {0: "labeled", 1: "labeled"})
    assert not any(key.startswith("pl_") for key in metrics)


def test_round_metrics_with_a_labeled_client_beside_pseudo_labeling_ones():
    # a client without unlabeled data reports no pl_* metrics at all (this once raised
    # KeyError 'pl_correct' as soon as a pseudo-label in the round passed the threshold)
    updates = [pl_update(0, pl_seen=10, pl_masked=4, pl_correct=3), pl_update(1)]
    metrics = round_metrics(updates, {0: "unlabeled", 1: "labeled"})
    assert metrics["pl_acc"] == pytest.approx(3 / 4)
    assert metrics["pl_acc/unlabeled"] == pytest.approx(3 / 4)
    assert "pl_acc/labeled" not in metrics and "pl_mask_rate/labeled" not in metrics


def test_pseudo_label_accuracy_equals_a_hand_count(tiny_recipe):
    federation = build(tiny_recipe, "algorithm.name=fixmatch", *MIXED_CLIENTS, "algorithm.ssl.tau=0.15")
    truth = federation.data.pool.labels  # the dataset's labels, not the loop's tensors
    fit, current, rows = federation.trainer.fit, {}, []

    def fit_recording(client_id, labeled, unlabeled, *args, **kwargs):
        current["unlabeled"] = unlabeled
        return fit(client_id, labeled, unlabeled, *args, **kwargs)

    federation.trainer.fit = fit_recording
    calls = record_steps(federation.trainer.learner)
    inner = federation.trainer.learner.training_step

    def step(batch, batch_idx):
        out = inner(batch, batch_idx)
        pool_index = current["unlabeled"][batch["u_index"].numpy()]
        rows.append((pool_index, out["pseudo_labels"].numpy(), out["mask"].numpy()))
        return out

    federation.trainer.learner.training_step = step
    _, metrics = federation.fit_round(1, federation.initial_state())
    assert calls
    index = np.concatenate([r[0] for r in rows])
    labels = np.concatenate([r[1] for r in rows])
    mask = np.concatenate([r[2] for r in rows])
    seen, masked, correct = len(mask), int(mask.sum()), int((labels[mask] == truth[index[mask]]).sum())
    assert 0 < masked < seen  # a threshold that keeps some and drops some
    assert metrics["pl_mask_rate"] == pytest.approx(masked / seen)
    assert metrics["pl_acc"] == pytest.approx(correct / masked)
    assert metrics["pl_acc/mixed"] == metrics["pl_acc"]
    assert 0.0 <= metrics["pl_acc"] <= 1.0


@pytest.mark.parametrize("drop_last", [False, True])
def test_one_local_epoch_pseudo_labels_every_unlabeled_sample_once(tiny_recipe, drop_last):
    federation = build(tiny_recipe, "algorithm.name=fixmatch", *MIXED_CLIENTS, f"train.drop_last={drop_last}")
    client = federation.data.clients[0]
    calls = record_steps(federation.trainer.learner)
    _, update, _ = fit_first_round(federation, client)
    drawn = np.concatenate([batch["u_index"].numpy() for batch, _ in calls])
    assert update.metrics["pl_seen"] == len(drawn) == len(set(drawn.tolist()))  # none twice
    if drop_last:  # the full unlabeled batches of 16 x 2; the rest wait for the next epoch's shuffle
        assert len(drawn) == len(client.unlabeled) // 32 * 32 and len(client.unlabeled) % 32
    else:
        assert sorted(drawn.tolist()) == list(range(len(client.unlabeled)))
    assert 0 <= update.metrics["pl_correct"] <= update.metrics["pl_masked"] <= update.metrics["pl_seen"]


@pytest.mark.parametrize("algorithm, extra", [
    ("fedavg", []),
    ("fixmatch", MIXED_CLIENTS),
    ("semifl", [*UNLABELED_ONLY, "algorithm.ssl.server_steps=2"]),
])
def test_bytes_per_round_are_messages_times_the_shared_weights(tiny_recipe, tmp_path, algorithm, extra):
    cfg = load_recipe(tiny_recipe, [*SMALL, f"algorithm.name={algorithm}", *extra, "federation.rounds=2"])
    federation = Federation.build(cfg)
    weights = federation.model.state_dict()
    per_client = sum(v.numel() * v.element_size() for v in weights.values())
    # fedavg_cnn at 28x28, 7 classes: conv 32x1x5x5+32, conv 64x32x5x5+64, fc 512x1024+512, fc 7x512+7
    assert per_client == 4 * (832 + 51_264 + 524_800 + 3_591)
    clients = cfg.federation.clients_per_round
    _, metrics = federation.fit_round(1, federation.initial_state())
    assert metrics["bytes_down"] == metrics["bytes_up"] == clients * per_client
    summary = run_federation(cfg, tmp_path / "run")
    # every round trains `clients` and evaluates all of them, each as on a node of its own:
    # one more message down per client, the global weights; its reply holds scalars only
    evaluated = cfg.federation.clients
    assert summary["bytes_up"] == 2 * clients * per_client
    assert summary["bytes_down"] == 2 * (clients + evaluated) * per_client


MIXED_POPULATION = [*SMALL, "algorithm.name=fixmatch", "data.labels.mode=mixed", "data.labels.labeled_clients=0.5",
                    "federation.clients_per_round=6", "federation.rounds=1"]


def test_a_mixed_population_reports_metrics_per_kind_of_client(tiny_recipe, tmp_path):
    # tau=1: nothing is masked in, so pl_acc/unlabeled is NaN (written as null)
    cfg = load_recipe(tiny_recipe, [*MIXED_POPULATION, "algorithm.ssl.tau=1.0"])
    kinds = Counter(Federation.build(cfg).kinds.values())
    assert kinds == {"labeled": 3, "unlabeled": 3}
    summary = run_federation(cfg, tmp_path / "run")
    for key in ("client_acc_mean/labeled", "client_acc_mean/unlabeled", "pl_acc/unlabeled", "pl_acc",
                "pl_mask_rate/unlabeled", "bytes_up", "bytes_down"):
        assert key in summary, key
    assert 0.0 <= summary["client_acc_mean/labeled"] <= 1.0 and 0.0 <= summary["client_acc_mean/unlabeled"] <= 1.0
    assert summary["pl_mask_rate/unlabeled"] == 0.0 and math.isnan(summary["pl_acc/unlabeled"])
    assert "pl_acc/labeled" not in summary  # fully labeled clients have nothing to pseudo-label
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["bytes_up"] == summary["bytes_up"] > 0
    assert written["bytes_down"] == summary["bytes_down"] > 0
    assert written["pl_acc/unlabeled"] is None  # NaN is written as null
    assert written["client_acc_mean/labeled"] == pytest.approx(summary["client_acc_mean/labeled"])
    assert written["client_acc_mean/unlabeled"] == pytest.approx(summary["client_acc_mean/unlabeled"])
    (round_one,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert "pl_mask_rate/unlabeled" in round_one and "client_acc_mean/unlabeled" in round_one


def test_a_mixed_population_scores_the_pseudo_labels_of_its_unlabeled_clients(tiny_recipe, tmp_path):
    cfg = load_recipe(tiny_recipe, [*MIXED_POPULATION, TAU_KEEP_ALL])
    summary = run_federation(cfg, tmp_path / "run")
    assert summary["pl_mask_rate/unlabeled"] == 1.0
    assert 0.0 <= summary["pl_acc/unlabeled"] <= 1.0
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["pl_acc/unlabeled"] == pytest.approx(summary["pl_acc/unlabeled"])


# -- every registered algorithm runs ------------------------------------------------------------


def registered_algorithms() -> list[str]:
    """Every algorithm name, read from the registry (which imports every algorithm
    module: a newly added algorithm is covered as soon as its module exists)."""
    return ALGORITHMS.names()


# Further settings worth a run, for algorithms that are registered (each algorithm's own
# settings, beyond the tiny recipe, are its `Algorithm.smoke`).
EXTRA_CASES = [
    ("fixmatch", "fedprox-fixmatch", [*MIXED_CLIENTS, "algorithm.proximal_mu=0.01"]),
    ("fixmatch", "labels-at-server", [*UNLABELED_ONLY, "algorithm.ssl.server_steps=3"]),
    ("fixmatch", "flexmatch-da", [*MIXED_CLIENTS, "algorithm.ssl.threshold=flexmatch",
                                  "algorithm.ssl.distribution_alignment=true"]),
    ("fedmatch", "labels-at-server", [*UNLABELED_ONLY, "algorithm.ssl.server_steps=3",
                                      "algorithm.fedmatch.lambda_l1=1e-5"]),
    # the supervised-only lower bound with labels at the server: the server trains alone
    ("fedavg", "labels-at-server", [*UNLABELED_ONLY, "algorithm.ssl.server_steps=3"]),
    ("fedaffect", "simclr-fedema-interleaved", [*MIXED_CLIENTS, "algorithm.selfsup.method=simclr",
                                                "algorithm.selfsup.update=fedema", "algorithm.selfsup.pretrain_rounds=0",
                                                "algorithm.selfsup.schedule=interleaved"]),
    # MOCHA's coupling on the classifier alone, over a body shared and averaged by all
    ("mocha", "coupled-head", ["algorithm.mocha.patterns=[fc.*]"]),
]


def smoke_cases():
    names = registered_algorithms()
    cases = [pytest.param(name, list(ALGORITHMS.get(name).smoke), id=name) for name in names]
    cases += [pytest.param(name, overrides, id=f"{name}-{label}")
              for name, label, overrides in EXTRA_CASES if name in names]
    return cases


def test_the_smoke_cases_cover_every_registered_algorithm():
    assert {c.values[0] for c in smoke_cases()} == set(registered_algorithms())
    assert {"fedavg", "fedprox", "fixmatch", "semifl"} <= set(registered_algorithms())


@pytest.mark.parametrize("algorithm, overrides", smoke_cases())
def test_every_algorithm_runs_two_rounds(tiny_recipe, tmp_path, algorithm, overrides):
    # one client held out: it never trains and is scored as an unseen person (unseen_acc)
    cfg = load_recipe(tiny_recipe, [*SMALL, f"algorithm.name={algorithm}", *overrides, "federation.rounds=2",
                                    "federation.evaluation.holdout_clients=1"])
    summary = run_federation(cfg, tmp_path / "run")
    assert summary["algorithm"] == algorithm and summary["rounds"] == 2
    assert 0.0 <= summary["global_acc"] <= 1.0 and math.isfinite(summary["global_loss"])
    assert 0.0 <= summary["unseen_acc"] <= 1.0
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    assert [m["round"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


# -- the shipped synthetic-faces SSL recipes run, shrunk ------------------------------------------


def faces_ssl_recipes():
    from fedssl.config.load import shipped_recipes

    names = registered_algorithms()
    cases = []
    for path in shipped_recipes():
        if path.stem.startswith("ssl_") and path.stem.endswith("_faces"):
            algorithm = load_recipe(path).algorithm.name
            if algorithm in names:  # recipes of an algorithm still being written run once it registers
                cases.append(pytest.param(path, id=path.stem))
    return cases


def test_there_are_faces_ssl_recipes_for_every_scenario():
    from fedssl.config.load import shipped_recipes

    stems = {p.stem for p in shipped_recipes()}
    for kind in ("supervised_only", "fixmatch", "fedprox_fixmatch", "fedmatch_client", "fedmatch_server", "semifl"):
        for dataset in ("faces", "fer2013", "fashion_mnist"):
            assert f"ssl_{kind}_{dataset}" in stems


@pytest.mark.slow
@pytest.mark.parametrize("recipe", faces_ssl_recipes())
def test_a_shipped_faces_ssl_recipe_runs_one_shrunk_round(recipe, tmp_path):
    cfg = load_recipe(recipe)
    shrink = [f"output_dir={tmp_path}", "data.num_samples=1400", "data.num_identities=20", "federation.rounds=1",
              "federation.clients_per_round=2", "train.local_steps=2", "logging.progress=false",
              "logging.wandb.mode=disabled"]
    if cfg.algorithm.ssl.server_steps > 0:
        shrink.append("algorithm.ssl.server_steps=2")
    cfg = load_recipe(recipe, shrink)
    summary = run_federation(cfg, tmp_path / "run")
    assert summary["rounds"] == 1 and 0.0 <= summary["global_acc"] <= 1.0
