"""Federated self-supervised pretraining and few-shot learning (fedaffect): the losses,
BYOL's target, FedEMA's rate, the stages' inputs, the linear probe, resuming, Flower,
and `fedssl personalize` on a self-supervised run."""

import math
import sys

import pytest
import torch

from fedssl.algorithms.fedaffect import stage
from fedssl.config.load import load_recipe
from fedssl.errors import UserError
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.engine.federation import Federation
from fedssl.engine.run import run_federation
from fedssl.learners.selfsup import FEDEMA, FEDEMA_LAMBDA, TARGET, SelfSupervisedLearner, lightly_modules
from fedssl.run_dir import CHECKPOINT
from fedssl.ssl.probe import linear_probe
from fedssl.ssl.selfsup import autoscaled_lambda, divergence, ema_blend, fedema_rate
from fedssl.tracking.run_logger import read_metrics

# Two labeled images per class at each client, the rest unlabeled; one unlabeled image per labeled one.
FEW_SHOT = ["algorithm.name=fedaffect", "data.labels.mode=client", "data.labels.per_class=2",
            "algorithm.ssl.unlabeled_ratio=1", "algorithm.selfsup.pretrain_rounds=1", "train.local_steps=3"]


def build(recipe, *overrides: str) -> Federation:
    return Federation.build(load_recipe(recipe, [*FEW_SHOT, *overrides]))


def record_batches(learner) -> list[dict]:
    calls, inner = [], learner.training_step

    def step(batch, batch_idx):
        calls.append(batch)
        return inner(batch, batch_idx)

    learner.training_step = step
    return calls


def fit(federation: Federation, client_id: int, round_index: int, state=None, kept=None):
    client = federation.data.clients[client_id]
    payload = federation.algorithm.payload(round_index, state or federation.initial_state(), client_id)
    return payload, *federation.trainer.fit(client_id, client.labeled, client.unlabeled, payload, kept)


# -- the losses ---------------------------------------------------------------------------------


def test_nt_xent_equals_the_hand_computed_value():
    """Two pairs of 2-d projections; NT-Xent (SimCLR, Chen et al. 2020, eq. 1) at t=0.5:
    each of the 4 anchors against its positive among the 3 others, cosine similarities."""
    z0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z1 = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    loss = lightly_modules()["NTXentLoss"](temperature=0.5)(z0, z1)
    s = 1 / math.sqrt(2)  # cos(45 degrees)
    # cosine similarities: a=(1,0) b=(0,1) a'=(1,1)/|.| b'=(0,1)
    sims = {("a", "b"): 0.0, ("a", "a'"): s, ("a", "b'"): 0.0, ("b", "a'"): s, ("b", "b'"): 1.0, ("a'", "b'"): s}
    sim = lambda i, j: sims.get((i, j), sims.get((j, i)))
    positives = {"a": "a'", "a'": "a", "b": "b'", "b'": "b"}
    terms = []
    for anchor, positive in positives.items():
        others = [k for k in positives if k != anchor]
        terms.append(-sim(anchor, positive) / 0.5 + math.log(sum(math.exp(sim(anchor, k) / 0.5) for k in others)))
    assert float(loss) == pytest.approx(sum(terms) / 4, abs=1e-6)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # stepped by hand, outside the loop's Fabric
def test_byol_target_never_gets_gradients_and_moves_by_exactly_the_ema_rule(tiny_recipe):
    federation = build(tiny_recipe, "algorithm.selfsup.method=byol", "algorithm.selfsup.target_momentum=0.9")
    learner = federation.trainer.learner
    client = federation.data.clients[0]
    payload = federation.algorithm.payload(1, federation.initial_state(), 0)
    data = federation.trainer.client_data(0, client.labeled, client.unlabeled, payload)
    steps = data.begin(learner)
    assert steps == 3
    optimizer = learner.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    targets = list(learner.target_model.parameters()) + list(learner.target_projector.parameters())
    assert targets and not any(p.requires_grad or id(p) in optimized for p in targets)

    rates = []
    for batch_idx, batch in enumerate(data.train_dataloader()):
        target_before = [p.detach().clone() for p in targets]
        online = [p.detach().clone() for p in list(learner.model.parameters()) + list(learner.projector.parameters())]
        m = learner.momentum()
        optimizer.zero_grad()
        loss = learner.training_step(batch, batch_idx)
        loss.backward()
        optimizer.step()
        # the target moved by target <- m target + (1 - m) online, and by nothing else
        for before, now, source in zip(target_before, targets, online):
            assert torch.equal(now, torch.add(before * m, source, alpha=1 - m))
            assert now.grad is None
        rates.append(m)
    # BYOL's schedule: from the base rate up to 1 over the round (cosine)
    assert rates == [pytest.approx(0.9), pytest.approx(0.95), 1.0]


# -- FedEMA -------------------------------------------------------------------------------------


def test_fedema_rate_follows_the_papers_formula_on_a_hand_made_divergence():
    w_global = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0]])}
    w_local = {"a": torch.tensor([0.0, 4.0]), "b": torch.tensor([[0.0]])}
    gap = divergence(w_global, w_local, ["a", "b"])
    assert gap == 5.0  # sqrt(3^2 + 4^2)
    assert fedema_rate(gap, 0.1) == pytest.approx(0.5)  # min(0.1 * 5, 1)
    assert fedema_rate(gap, 1.0) == 1.0  # capped at 1: the client keeps its own model
    assert autoscaled_lambda(0.7, gap) == pytest.approx(0.14) and fedema_rate(gap, 0.14) == pytest.approx(0.7)
    assert autoscaled_lambda(0.7, 0.0) is None
    assert torch.equal(ema_blend(w_local["a"], w_global["a"], 0.5), torch.tensor([1.5, 2.0]))


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_a_returning_fedema_client_blends_its_last_online_network_with_the_global_one(tiny_recipe, lam):
    """Round 1 trains from the global model; on its return the client starts from
    mu * its own + (1 - mu) * the global, mu = min(lambda ||W_g - W_k||, 1), lambda
    fixed or the autoscaler's tau / ||W_g - W_k|| (then mu = tau)."""
    federation = build(tiny_recipe, "algorithm.selfsup.update=fedema", "algorithm.selfsup.method=simclr",
                       f"algorithm.selfsup.ema_lambda={lam}", "algorithm.selfsup.pretrain_rounds=5")
    learner = federation.trainer.learner
    global_state = federation.initial_state()  # the "global" the client comes back to
    _, update, kept = fit(federation, 0, 1, global_state)
    own = {n[len(FEDEMA):]: v for n, v in kept.items() if n.startswith(FEDEMA)}
    assert own and all(torch.equal(own[n], update.arrays[n]) for n in own)
    seen = {}
    inner = learner.training_step

    def first_step(batch, batch_idx):
        if not seen:
            seen.update(learner.arrays(list(own)))
        return inner(batch, batch_idx)

    learner.training_step = first_step
    _, _, kept2 = fit(federation, 0, 2, global_state, kept)
    gap = divergence(global_state.params, own, learner.encoder_names())
    expected_lam = lam if lam > 0 else 0.7 / gap
    mu = min(expected_lam * gap, 1.0)
    assert learner.mu == pytest.approx(mu) and (lam > 0 or mu == pytest.approx(0.7))
    for name in own:
        assert torch.allclose(seen[name], mu * own[name] + (1 - mu) * global_state.params[name], atol=1e-6), name
    assert float(kept2[FEDEMA_LAMBDA]) == pytest.approx(expected_lam)


# -- the stages: what the learner is handed ---------------------------------------------------


def test_schedule_of_stages():
    from fedssl.algorithms.fedaffect import SelfSupConfig

    sequential, interleaved = SelfSupConfig(pretrain_rounds=2), SelfSupConfig(pretrain_rounds=2, schedule="interleaved")
    assert [stage(r, sequential) for r in (1, 2, 3, 4)] == ["ssl", "ssl", "fewshot", "fewshot"]
    assert [stage(r, interleaved) for r in (1, 2, 3)] == ["ssl", "ssl", "both"]


def test_a_self_supervised_round_hands_images_and_never_labels(tiny_recipe):
    federation = build(tiny_recipe, "train.local_steps=0", "train.batch_size=8")
    calls = record_batches(federation.trainer.learner)
    client = federation.data.clients[0]
    assert len(client.labeled) > 0 and len(client.unlabeled) > 0
    _, update, _ = fit(federation, 0, 1)
    assert calls and all(set(batch) == {"u_weak", "u_strong", "u_index"} for batch in calls)
    # the labeled images are learned from as images: one epoch sees every training image once
    assert sum(len(b["u_index"]) for b in calls) == len(client.labeled) + len(client.unlabeled)
    assert update.num_examples == len(client.labeled) + len(client.unlabeled)


def test_a_few_shot_round_trains_only_the_classifier_on_the_labeled_images(tiny_recipe):
    federation = build(tiny_recipe, "algorithm.selfsup.fewshot_steps=4")
    calls = record_batches(federation.trainer.learner)
    state = federation.initial_state()
    _, update, _ = fit(federation, 0, 2, state)  # round 2: after the one pretraining round
    assert len(calls) == 4 and all(set(batch) == {"x", "y"} for batch in calls)
    assert update.num_examples == len(federation.data.clients[0].labeled)
    changed = {n for n, v in update.arrays.items() if not torch.equal(v, state.params[n])}
    assert changed == {"fc.weight", "fc.bias"}  # the encoder is frozen (finetune_encoder: false)


def test_interleaved_rounds_train_both_losses(tiny_recipe):
    federation = build(tiny_recipe, "algorithm.selfsup.schedule=interleaved")
    calls = record_batches(federation.trainer.learner)
    fit(federation, 0, 2)
    assert calls and all({"x", "y", "u_weak", "u_strong"} <= set(batch) for batch in calls)


# -- the linear probe -----------------------------------------------------------------------------


def test_the_linear_probe_on_perfectly_separable_features_reaches_100_percent():
    generator = torch.Generator().manual_seed(0)
    centers = torch.eye(4, 16) * 5
    labels = torch.arange(4).repeat(30)
    features = centers[labels] + 0.5 * torch.randn(len(labels), 16, generator=generator)
    test_labels = torch.arange(4).repeat(10)
    test = centers[test_labels] + 0.5 * torch.randn(len(test_labels), 16, generator=generator)
    assert linear_probe(features, labels, test, test_labels, num_classes=4) == 1.0
    # and a probe of features that carry nothing scores about chance
    noise = torch.randn(len(labels), 16, generator=generator)
    assert linear_probe(noise, labels, torch.randn(400, 16, generator=generator), torch.arange(4).repeat(100), 4) < 0.4


# -- whole runs -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_logs_linear_acc_and_resumes_bit_identically(tiny_recipe, tmp_path):
    """BYOL with FedEMA keeps a target network and a last online network per client:
    a run killed after round 2 and resumed ends exactly where an uninterrupted one does."""
    common = [*FEW_SHOT, "algorithm.selfsup.update=fedema", "algorithm.selfsup.method=byol",
              "algorithm.selfsup.pretrain_rounds=2", "federation.evaluation.linear_probe=true", "train.local_steps=1",
              "federation.clients_per_round=2", "federation.evaluation.eval_every=3"]
    whole = run_federation(load_recipe(tiny_recipe, [*common, "federation.rounds=3"]), tmp_path / "whole")
    run_federation(load_recipe(tiny_recipe, [*common, "federation.rounds=2"]), tmp_path / "resumed")
    resumed = run_federation(load_recipe(tiny_recipe, [*common, "federation.rounds=3"]), tmp_path / "resumed",
                             resume=True)
    a, b = load_checkpoint(tmp_path / "whole" / CHECKPOINT), load_checkpoint(tmp_path / "resumed" / CHECKPOINT)
    assert list(a["server_state"]["params"]) == list(b["server_state"]["params"])
    assert any(n.startswith("ssl_predictor.") for n in a["server_state"]["params"])  # the heads travel
    for name, value in a["server_state"]["params"].items():
        assert torch.equal(value, b["server_state"]["params"][name]), name
    kept = [k for state in a["client_states"].values() for k in state]
    assert any(k.startswith(TARGET) for k in kept) and any(k.startswith(FEDEMA) for k in kept)
    for client, state in a["client_states"].items():
        assert all(torch.equal(v, b["client_states"][client][k]) for k, v in state.items())
    for key in ("global_acc", "linear_acc", "personal_acc"):
        assert whole[key] == resumed[key], key
    rounds = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert [r["round"] for r in rounds if "linear_acc" in r] == [3] and 0.0 <= rounds[-1]["linear_acc"] <= 1.0
    assert any("fedema_mu" in r for r in rounds)  # a client that came back reported its rate


def test_without_lightly_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightly", None)
    with pytest.raises(UserError, match=r"fedssl\[ssl\]"):
        lightly_modules()


def test_bad_settings_name_their_key(tiny_recipe):
    with pytest.raises(UserError, match="algorithm.selfsup.method"):
        load_recipe(tiny_recipe, ["algorithm.name=fedaffect", "algorithm.selfsup.method=moco"])
    with pytest.raises(UserError, match="algorithm.selfsup.personal"):
        build(tiny_recipe, "algorithm.selfsup.personal=[nothing.*]")


def test_personal_heads_stay_on_the_client(tiny_recipe):
    federation = build(tiny_recipe, "algorithm.selfsup.method=byol", "algorithm.selfsup.personal=[ssl_predictor.*]")
    shared = federation.trainer.shared_names
    assert shared and not any(n.startswith("ssl_predictor.") for n in shared)
    _, update, kept = fit(federation, 0, 1)
    assert not any(n.startswith("ssl_predictor.") for n in update.arrays)
    assert any(k.startswith("personal/ssl_predictor.") for k in kept)
    assert isinstance(federation.trainer.learner, SelfSupervisedLearner)


@pytest.mark.slow
def test_flower_simulation_runs_fedaffect_as_the_inprocess_loop(tiny_recipe):
    """BYOL's target and FedEMA's last online network stay on the nodes; a held-out
    client is adapted and scored on its node; both backends end at the same scores."""
    from fedssl.launch import launch

    overrides = [*FEW_SHOT, "algorithm.selfsup.update=fedema", "federation.rounds=2", "federation.evaluation.holdout_clients=1"]
    _, _, flower = launch(str(tiny_recipe), [*overrides, "name=flower", "federation.backend=flower"])
    _, _, local = launch(str(tiny_recipe), [*overrides, "name=local"])
    for key in ("global_acc", "client_acc_mean", "personal_acc", "unseen_acc", "unseen_global_acc"):
        assert flower[key] == pytest.approx(local[key], abs=1e-6), key


@pytest.mark.slow
def test_personalize_head_fine_tunes_a_self_supervised_runs_encoder(tiny_recipe, tmp_path, write_faces):
    """`fedssl personalize --mode head` reads the run's classifier on its learned
    encoder (the heads are left behind) and trains the head alone."""
    from fedssl.cli import main
    from fedssl.launch import launch
    from fedssl.trained import load_trained

    _, run_dir, _ = launch(str(tiny_recipe), [*FEW_SHOT, "federation.rounds=2", "name=ssl"])
    trained = load_trained(run_dir)
    assert trained.missing == [] and set(trained.model.state_dict()) == set(Federation.build(
        load_recipe(tiny_recipe)).model.state_dict())
    write_faces(tmp_path / "mine")
    assert main(["personalize", str(run_dir), "--data", str(tmp_path / "mine"), "--out", str(tmp_path / "out"),
                 "--mode", "head", "--epochs", "2", "--no-progress", "--format", "torchscript"]) == 0
    from fedssl.export import load_exported

    tuned = load_exported(tmp_path / "out" / "model.pt", trust_code=True).run.state_dict()  # TorchScript keeps the module's names
    body = [n for n in tuned if not n.startswith("fc.")]
    assert all(torch.equal(tuned[n], trained.model.state_dict()[n]) for n in body)
    assert not torch.equal(tuned["fc.weight"], trained.model.state_dict()["fc.weight"])
