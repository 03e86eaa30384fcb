"""The ServerApp: the in-process loop's rounds, with clients on Flower nodes.

`FlowerFederation` is the loop's `Federation` with two methods replaced: a round's
sampled clients are trained by sending each its payload as a Flower message and
receiving its update (`fit_clients`), and clients are scored on their own local
test splits by the nodes that hold them (`score_clients`). Every message also tells
the node which of its clients' updates the server used (`collect` notes them), so
that nodes keep only what their clients learned with those. Sampling, the fault
checks, retries, aggregation, central DP, evaluation, checkpoints and logging
(metrics.jsonl, summary.json, W&B) are the loop's own `run_federation`, run on the
server.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedssl.backends.flower.client import DRAW, RUN
from fedssl.backends.flower.codec import decode_rows, decode_update, encode_evaluate, encode_payload
from fedssl.config.load import load_recipe, to_yaml
from fedssl.config.schema import RecipeConfig
from fedssl.errors import UserError
from fedssl.federation.aggregate import ServerState
from fedssl.federation.algorithm import build_algorithm
from fedssl.federation.faults import check_update
from fedssl.federation.loop import Collected, Federation, run_federation
from fedssl.federation.messages import Payload, Update

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # between checks for connecting nodes
SERVER_ERROR = "server_error.txt"  # why a deployed ServerApp stopped, for whoever submitted the run


@dataclass
class FlowerFederation(Federation):
    """A federation whose clients are Flower nodes reached through `grid`."""

    grid: Grid | None = None
    nodes: dict[int, int] = field(default_factory=dict)  # fedssl client id -> Flower node id
    node_kinds: dict[int, str] = field(default_factory=dict)  # client id -> kind, as its node's data says
    recipe_yaml: str = ""
    draws: int = 0  # rounds drawn so far, retries included: the current draw's number
    accepted: dict[int, str] = field(default_factory=dict)  # client id -> draw of its last accepted update

    @classmethod
    def on_grid(cls, cfg: RecipeConfig, grid: Grid) -> FlowerFederation:
        federation = cls.build(cfg)
        federation.grid, federation.recipe_yaml = grid, to_yaml(cfg)
        federation.nodes, federation.node_kinds = discover_nodes(grid, cfg, federation.run_record())
        return federation

    @property
    def kinds(self) -> dict[int, str]:
        return self.node_kinds

    def run_record(self) -> ConfigRecord:
        """What every node needs to build its part of the run."""
        return ConfigRecord({"recipe": self.recipe_yaml, "classes": list(self.data.class_names)})

    def fit_clients(self, round_index: int, state: ServerState, sampled: list[int]
                    ) -> Iterator[tuple[int, Payload, tuple[Update | Exception, dict[str, torch.Tensor], str | None]]]:
        """Send every sampled client its payload at once and wait (bounded) for the
        updates; a client that errs or stays silent past round_timeout is dropped."""
        self.draws += 1
        payloads = {c: self.algorithm.payload(round_index, state, c) for c in sampled}
        messages = {}
        for client_id, payload in payloads.items():
            content = encode_payload(payload, client_id)
            content[RUN] = self.run_record()
            content[DRAW] = ConfigRecord({"draw": str(self.draws), "accepted": self.accepted.get(client_id, "")})
            messages[client_id] = Message(content, dst_node_id=self.nodes[client_id], message_type=MessageType.TRAIN,
                                          group_id=str(round_index))
        for client_id, reply in self.exchange(messages).items():
            yield client_id, payloads[client_id], self.result(client_id, payloads[client_id], reply)

    def collect(self, round_index: int, state: ServerState) -> Collected:
        """The loop's own collect; the clients whose updates it used are then
        remembered, for their nodes to keep what they learned in this draw."""
        collected = super().collect(round_index, state)
        self.accepted |= {update.client_id: str(self.draws) for update in collected.receipts}
        return collected

    def exchange(self, messages: dict[int, Message]) -> dict[int, Message | None]:
        """Send all `messages` at once; the reply to each, or None where none came
        within federation.flower.round_timeout."""
        assert self.grid is not None
        sent = self.grid.send_and_receive(list(messages.values()), timeout=self.cfg.federation.flower.round_timeout)
        replies = {reply.metadata.reply_to_message_id: reply for reply in sent}
        return {key: replies.get(message.metadata.message_id) for key, message in messages.items()}

    def result(self, client_id: int, payload: Payload, reply: Message | None
               ) -> tuple[Update | Exception, dict[str, torch.Tensor], str | None]:
        """`fit_client`'s triple for a reply. Nothing is kept here: personal state
        stays on the node."""
        timeout = self.cfg.federation.flower.round_timeout
        if reply is None:
            error = TimeoutError(f"no reply from node {self.nodes[client_id]} within {timeout:g}s")
            return error, {}, f"it did not answer within federation.flower.round_timeout={timeout:g}s"
        if reply.has_error():
            return RuntimeError(error_line(reply)), {}, f"its node replied with an error: {error_line(reply)}"
        update = decode_update(reply.content)
        if update.client_id != client_id:
            return update, {}, f"its node answered for client {update.client_id}"
        return update, {}, check_update(update, payload.arrays, dense=self.algorithm.dense_updates)

    def score_clients(self, state: ServerState, client_ids: list[int]) -> list[dict[str, Any]]:
        """Ask each node to score its clients (global and personalized model, on
        their local test splits: data and personal state stay on the node). A node
        that errs or stays silent past round_timeout is left out of this evaluation,
        with a warning naming its clients."""
        by_node: dict[int, list[int]] = {}
        for client_id in client_ids:
            by_node.setdefault(self.nodes[client_id], []).append(client_id)
        messages = {}
        for node, held in by_node.items():
            content = encode_evaluate(state.params, held)
            content[RUN] = self.run_record()
            content[DRAW] = ConfigRecord({"accepted": [self.accepted.get(c, "") for c in held]})
            messages[node] = Message(content, dst_node_id=node, message_type=MessageType.EVALUATE)
        rows = []
        for node, reply in self.exchange(messages).items():
            if reply is None or reply.has_error():
                why = "it did not answer within federation.flower.round_timeout" if reply is None else error_line(reply)
                log.warning("evaluation: node %d (clients %s) left out: %s", node, by_node[node], why)
                continue
            rows.extend(decode_rows(reply.content))
        return sorted(rows, key=lambda row: row["client"])


def error_line(reply: Message) -> str:
    """The last line of an error reply's reason (the exception), or its code."""
    lines = (reply.error.reason or "").strip().splitlines()
    return lines[-1] if lines else f"error code {reply.error.code}"


def discover_nodes(grid: Grid, cfg: RecipeConfig, run: ConfigRecord) -> tuple[dict[int, int], dict[int, str]]:
    """Ask every connected node which partitions it holds and of what kind their
    data is (sending it the `run` record to build that data with), until every
    client id of the recipe has a node, or raise after federation.flower.connect_timeout.
    Returns the node and the kind of every client id."""
    wanted, timeout = set(range(cfg.federation.clients)), cfg.federation.flower.connect_timeout
    nodes: dict[int, int] = {}
    kinds: dict[int, str] = {}
    asked: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            queries = [Message(RecordDict({RUN: run}), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
            for reply in grid.send_and_receive(queries, timeout=max(1.0, deadline - time.monotonic())):
                if reply.has_error():
                    raise UserError(f"node {reply.metadata.src_node_id}: {error_line(reply)}")
                answer = reply.content.config_records[RUN]
                for partition, kind in zip(answer["partitions"], answer["kinds"]):
                    if partition in nodes:
                        raise UserError(f"node config: partition-id {partition} is held by two nodes "
                                        f"({nodes[partition]} and {reply.metadata.src_node_id})")
                    nodes[int(partition)], kinds[int(partition)] = reply.metadata.src_node_id, str(kind)
            asked.update(new)
        if wanted <= set(nodes):
            return {c: nodes[c] for c in sorted(wanted)}, {c: kinds[c] for c in sorted(wanted)}
        if time.monotonic() > deadline:
            missing = sorted(wanted - set(nodes))
            raise UserError(f"federation.flower.connect_timeout: after {timeout:g}s no connected node holds "
                            f"partition-id {', '.join(map(str, missing))} (federation.clients={cfg.federation.clients})")
        time.sleep(POLL_SECONDS)


def check_resumable(cfg: RecipeConfig, resume: bool) -> None:
    """Refuse to resume a run whose clients keep state between rounds (personal
    layers, FlexMatch's learning status, ...): it lived on the nodes, not in the
    server's checkpoint, and would silently start afresh."""
    if resume and build_algorithm(cfg).keeps_client_state:
        raise UserError(f"cannot resume: with algorithm.name={cfg.algorithm.name} (and its algorithm.ssl settings) "
                        f"each client keeps state between rounds on its Flower node, which the server's checkpoint "
                        f"does not hold; start a new run, or run it with federation.backend=inprocess")


def serve(grid: Grid, cfg: RecipeConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """The whole run on the server: the loop's `run_federation` over Flower nodes."""
    check_resumable(cfg, resume)
    return run_federation(cfg, run_dir, resume=resume, build=lambda c: FlowerFederation.on_grid(c, grid))


# For deployment (`flwr run`): the run directory, prepared by the submitter with
# its resolved config.yaml, comes in the run config.
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_dir = Path(str(context.run_config["run-dir"]))
    try:
        serve(grid, load_recipe(run_dir / "config.yaml"), run_dir, resume=bool(context.run_config.get("resume", False)))
    except Exception as error:
        # The submitter only sees the run directory: leave the reason there, one line.
        (run_dir / SERVER_ERROR).write_text(f"{type(error).__name__}: {error}\n")
        raise
