"""What a node keeps of its clients' rounds: only what they learned with updates the
server used, as the in-process loop keeps only accepted clients' state."""

import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedssl.backends.flower.client import DRAW, RUN, train_client
from fedssl.backends.flower.codec import decode_update, encode_payload
from fedssl.backends.flower.node import commit_state, load_state, pending_key
from fedssl.config.load import load_recipe, to_yaml
from fedssl.algorithms.base import ALGORITHMS
from fedssl.engine.checks import check_update
from fedssl.engine.federation import Federation
from fedssl.algorithms.personal import FedPer
from fedssl.learners.personal import PersonalLayersLearner

FAULTY = 1


class NonFiniteLearner(PersonalLayersLearner):
    """A real FedPer learner whose shared arrays come back non-finite on client FAULTY."""

    def start_round(self, payload, context):
        super().start_round(payload, context)
        self.client_id = context.client_id

    def arrays(self, names):
        out = super().arrays(names)
        if getattr(self, "client_id", None) != FAULTY:
            return out
        return {name: torch.full_like(value, float("nan")) if value.is_floating_point() else value
                for name, value in out.items()}


class NonFiniteFedPer(FedPer):
    def wrap(self, inner, personal):
        return NonFiniteLearner(inner, personal)


def node_trains(server, context, client_id, draw, accepted=""):
    """Client `client_id`'s train message of `draw` through the node's handler; its
    update and the arrays it was sent."""
    payload = server.algorithm.payload(1, server.initial_state(), client_id)
    content = encode_payload(payload, client_id)
    content[RUN] = ConfigRecord({"recipe": to_yaml(server.cfg), "classes": list(server.data.class_names)})
    content[DRAW] = ConfigRecord({"draw": draw, "accepted": accepted})
    return decode_update(train_client(content, context)), payload.arrays


def finite(arrays):
    return all(bool(torch.isfinite(v).all()) for v in arrays.values() if v.is_floating_point())


def test_a_node_keeps_what_a_client_learned_only_from_updates_the_server_used(tiny_recipe, monkeypatch):
    monkeypatch.setitem(ALGORITHMS._entries, "nonfinite_fedper", NonFiniteFedPer)
    server = Federation.build(load_recipe(tiny_recipe, ["algorithm.name=nonfinite_fedper"]))
    context = Context(run_id=1, node_id=1, node_config={"partition-id": "0,1"}, state=RecordDict(), run_config={})

    good, bad = (node_trains(server, context, c, draw="1") for c in (0, FAULTY))
    assert check_update(*good) is None and "non-finite values" in check_update(*bad)  # the server drops FAULTY's
    assert load_state(context, 0) == {}  # held until the server says which updates it used

    commit_state(context, 0, accepted="1")  # the next message to the node says: client 0's draw-1 update was used
    commit_state(context, FAULTY, accepted="")  # ... and none of FAULTY's
    kept = load_state(context, 0)
    assert kept and finite(kept)
    assert load_state(context, FAULTY) == {} and pending_key(FAULTY) not in context.state

    node_trains(server, context, 0, draw="2", accepted="1")  # a round later redrawn: draw 2 is never accepted
    commit_state(context, 0, accepted="1")
    after = load_state(context, 0)
    assert set(after) == set(kept) and all(torch.equal(kept[name], after[name]) for name in kept)
    assert pending_key(0) not in context.state
