"""What a node keeps of its clients' rounds: only what the server will accept, as
the in-process loop keeps only accepted clients' state."""

import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedssl.backends.flower.client import RUN, train_client
from fedssl.backends.flower.codec import decode_update, encode_payload
from fedssl.backends.flower.node import load_state, state_key
from fedssl.config.load import load_recipe, to_yaml
from fedssl.federation.algorithm import ALGORITHMS
from fedssl.federation.faults import check_update
from fedssl.federation.loop import Federation
from fedssl.federation.personal_layers import FedPer
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


def test_a_node_keeps_nothing_from_an_update_the_server_drops(tiny_recipe, monkeypatch):
    monkeypatch.setitem(ALGORITHMS._entries, "nonfinite_fedper", NonFiniteFedPer)
    cfg = load_recipe(tiny_recipe, ["algorithm.name=nonfinite_fedper"])
    server = Federation.build(cfg)
    state = server.initial_state()
    context = Context(run_id=1, node_id=1, node_config={"partition-id": "0,1"}, state=RecordDict(), run_config={})

    updates = {}
    for client_id in (0, FAULTY):
        payload = server.algorithm.payload(1, state, client_id)
        content = encode_payload(payload, client_id)
        content[RUN] = ConfigRecord({"recipe": to_yaml(cfg), "classes": list(server.data.class_names)})
        updates[client_id] = (decode_update(train_client(content, context)), payload.arrays)

    assert check_update(*updates[0]) is None
    assert "non-finite values" in check_update(*updates[FAULTY])  # the server drops it ...
    assert state_key(FAULTY) not in context.state  # ... and the node forgot the head it trained with it
    kept = load_state(context, 0)
    assert kept and all(bool(torch.isfinite(v).all()) for v in kept.values() if v.is_floating_point())
