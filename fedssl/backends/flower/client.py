"""The ClientApp: one client's round on a SuperNode.

It answers two messages: `query`, which partitions this node holds (the server
maps fedssl's client ids to Flower node ids with it), and `train`, one local fit
from the payload, through the same `Federation.fit_client` as the in-process loop.
The server checks the update (it trusts no client); the node only trains.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedssl.backends.flower.codec import decode_payload, encode_update
from fedssl.backends.flower.node import federation_for, load_state, node_partitions, save_state

RUN = "run"  # the ConfigRecord that carries the resolved recipe

app = ClientApp()


@app.query()
def partitions(message: Message, context: Context) -> Message:
    return Message(RecordDict({RUN: ConfigRecord({"partitions": node_partitions(context)})}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    payload, client_id = decode_payload(message.content)
    held = node_partitions(context)
    if client_id not in held:
        raise ValueError(f"this node holds partitions {held}, not client {client_id}")
    federation = federation_for(str(message.content.config_records[RUN]["recipe"]))
    federation.store.put(client_id, load_state(context, client_id))
    update, kept, _ = federation.fit_client(client_id, payload)
    if isinstance(update, Exception):
        raise update  # Flower replies with an error message; the server drops the client
    save_state(context, client_id, kept)
    return Message(encode_update(update), reply_to=message)
