"""The ClientApp: one client's round on a SuperNode.

It answers three messages: `query`, which partitions this node holds and what
they hold (the server maps fedssl's client ids to Flower node ids with it; the node
builds its data then, so that a node whose data does not fit the recipe stops the
run at once); `train`, one local fit from the payload, through the same
`InProcessClients.train` as the in-process run; and `evaluate`, the global model
it is sent and each client's personalized model (built from the global weights
and the client's own state) on each of its clients' local test splits, through the
in-process `InProcessClients.score_rows`. Clients' data and personal state never leave
the node. The server checks every reply (it trusts no node).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedssl.backends.flower.codec import decode_evaluate, decode_payload, encode_rows, encode_update
from fedssl.backends.flower.node import (DATA_PATH_KEY, clients_for, commit_state, hold_state, load_state,
                                        node_partitions)
from fedssl.inprocess.clients import InProcessClients

RUN = "run"  # the ConfigRecord that carries the resolved recipe and the server's class names
# The ConfigRecord naming a train message's draw (a round is redrawn after too few
# usable updates) and, per client, the draw of its last update the server accepted
DRAW = "draw"

app = ClientApp()


@app.query()
def partitions(message: Message, context: Context) -> Message:
    """The partitions this node holds, their kind (labeled, unlabeled or mixed),
    and, for the server to bound this node's replies with, how many training
    examples and local test samples each holds (`own_data`: read from the node's
    data-path; otherwise the recipe's partition, which the server knows itself)."""
    clients, held = run_clients_for(message.content, context), node_partitions(context)
    holdings = clients.holdings
    answer = {"partitions": held, "kinds": [holdings[c].kind for c in held],
              "examples": [holdings[c].examples for c in held], "test_samples": [holdings[c].test_samples for c in held],
              "own_data": context.node_config.get(DATA_PATH_KEY) is not None}
    return Message(RecordDict({RUN: ConfigRecord(answer)}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    return Message(train_client(message.content, context), reply_to=message)


def train_client(content: RecordDict, context: Context) -> RecordDict:
    """The update of the client a train message names, from the payload it carries."""
    payload, client_id = decode_payload(content)
    check_held(context, [client_id])
    clients, draw = run_clients_for(content, context), content.config_records[DRAW]
    commit_state(context, client_id, str(draw["accepted"]))
    clients.store.put(client_id, load_state(context, client_id))
    update, kept = clients.train(client_id, payload)
    if isinstance(update, Exception):
        raise update  # Flower replies with an error message; the server drops the client
    hold_state(context, client_id, kept, str(draw["draw"]))
    return encode_update(update)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    weights, client_ids = decode_evaluate(message.content)
    check_held(context, client_ids)
    clients = run_clients_for(message.content, context)
    for client_id, accepted in zip(client_ids, message.content.config_records[DRAW]["accepted"], strict=True):
        commit_state(context, client_id, str(accepted))
        clients.store.put(client_id, load_state(context, client_id))
    return Message(encode_rows(clients.score_rows(weights, client_ids)), reply_to=message)


def check_held(context: Context, client_ids: list[int]) -> None:
    held = node_partitions(context)
    if not set(client_ids) <= set(held):
        raise ValueError(f"this node holds partitions {held}, not clients {sorted(set(client_ids) - set(held))}")


def run_clients_for(content: RecordDict, context: Context) -> InProcessClients:
    run = content.config_records[RUN]
    return clients_for(str(run["recipe"]), context, [str(c) for c in run["classes"]])
