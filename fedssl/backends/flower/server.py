"""The ServerApp: the round engine's rounds, with clients on Flower nodes.

`FlowerClients` is the round engine's `Clients` on Flower nodes: a round's sampled
clients are trained by sending each its payload as a Flower message and receiving
its update (`fit`), and clients are scored on their own local test splits by the
nodes that hold them (`score`). A node receives only
what its clients need: a train message carries the client's payload, an evaluate
message the global model's weights (`Algorithm.global_weights`), never the server's
state or another client's arrays. Every message also tells the node which of its
clients' updates the server used (`accept` notes them), so that nodes keep only
what their clients learned with those. Nothing a node sends back is trusted: a
malformed or implausible update or evaluation row is dropped with a warning and
counted (`fedssl.engine.checks`). Sampling, the fault checks, retries,
aggregation, central DP, evaluation, checkpoints and logging (metrics.jsonl,
summary.json, W&B) are the engine's and `run_federation`'s, run on the server.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedssl.backends.flower.client import DRAW, RUN
from fedssl.backends.flower.codec import MalformedMessage, decode_rows, decode_update, encode_evaluate, encode_payload
from fedssl.config.load import load_recipe, to_yaml
from fedssl.config.schema import RecipeConfig
from fedssl.errors import UserError
from fedssl.algorithms.base import build_algorithm
from fedssl.algorithms.capabilities import check_compatible
from fedssl.clients import Holding, Scored
from fedssl.engine.checks import accept_rows
from fedssl.inprocess.clients import data_holdings
from fedssl.engine.federation import Federation
from fedssl.engine.run import run_federation
from fedssl.messages import Arrays, Payload, Update, array_bytes
from fedssl.run_lock import hold_run_dir

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # between checks for connecting nodes
SERVER_ERROR = "server_error.txt"  # why a deployed ServerApp stopped, for whoever submitted the run


@dataclass
class FlowerClients:
    """A run's clients on Flower nodes reached through `grid` (the `Clients` interface)."""

    cfg: RecipeConfig
    grid: Grid
    run: ConfigRecord  # what every node needs to build its part of the run: the recipe and the class names
    nodes: dict[int, int]  # fedssl client id -> Flower node id
    # client id -> what it holds: the server's own partition, or what a node with its own data declared
    holdings: dict[int, Holding]
    draws: int = 0  # rounds drawn so far, retries included: the current draw's number
    accepted: dict[int, str] = field(default_factory=dict)  # client id -> draw of its last accepted update

    @classmethod
    def on_grid(cls, federation: Federation, grid: Grid) -> FlowerClients:
        """The clients of the connected nodes (waiting for every client id to have one)."""
        cfg = federation.cfg
        run = ConfigRecord({"recipe": to_yaml(cfg), "classes": list(federation.data.class_names)})
        nodes, declared = discover_nodes(grid, cfg, run)
        own = data_holdings(federation.data, federation.held_out)  # the recipe's partition, which nodes without data-path rebuild
        return cls(cfg, grid, run, nodes, {c: declared[c] or own[c] for c in nodes})

    def fit(self, round_index: int, payloads: dict[int, Payload]) -> Iterator[tuple[int, Update | Exception, str | None]]:
        """Send every client its payload at once and wait (bounded) for the updates; a
        client that errs, stays silent past round_timeout or replies malformed is dropped."""
        self.draws += 1
        messages = {}
        for client_id, payload in payloads.items():
            content = encode_payload(payload, client_id)
            content[RUN] = self.run
            content[DRAW] = ConfigRecord({"draw": str(self.draws), "accepted": self.accepted.get(client_id, "")})
            messages[client_id] = Message(content, dst_node_id=self.nodes[client_id], message_type=MessageType.TRAIN,
                                          group_id=str(round_index))
        for client_id, reply in self.exchange(messages).items():
            yield client_id, *self.result(client_id, reply)

    def accept(self, client_ids: Collection[int]) -> None:
        """Remembered, for the nodes to keep what these clients learned in this draw
        (every later message to a node says so)."""
        self.accepted |= {client_id: str(self.draws) for client_id in client_ids}

    def exchange(self, messages: dict[int, Message]) -> dict[int, Message | None]:
        """Send all `messages` at once; the reply to each, or None where none came
        within federation.flower.round_timeout."""
        sent = self.grid.send_and_receive(list(messages.values()), timeout=self.cfg.federation.flower.round_timeout)
        replies = {reply.metadata.reply_to_message_id: reply for reply in sent}
        return {key: replies.get(message.metadata.message_id) for key, message in messages.items()}

    def result(self, client_id: int, reply: Message | None) -> tuple[Update | Exception, str | None]:
        """A reply's update, or the exception standing for it and why it is unusable.
        The engine checks the update itself (it trusts no node)."""
        timeout = self.cfg.federation.flower.round_timeout
        if reply is None:
            error = TimeoutError(f"no reply from node {self.nodes[client_id]} within {timeout:g}s")
            return error, f"it did not answer within federation.flower.round_timeout={timeout:g}s"
        if reply.has_error():
            return RuntimeError(error_line(reply)), f"its node replied with an error: {error_line(reply)}"
        try:
            return decode_update(reply.content), None
        except MalformedMessage as error:
            return error, f"its node sent a malformed reply: {error}"

    def score(self, weights: Arrays, client_ids: list[int]) -> Scored:
        """Ask each node to score its clients (global and personalized model, on
        their local test splits: data and personal state stay on the node), sending
        it the global `weights` and which clients to score. A row that fails
        `faults.check_row` (or a node that errs, stays silent past round_timeout or
        sends a malformed reply) is left out of this evaluation with a warning, and
        counted as dropped."""
        by_node: dict[int, list[int]] = {}
        for client_id in client_ids:
            by_node.setdefault(self.nodes[client_id], []).append(client_id)
        messages = {}
        for node, held in by_node.items():
            content = encode_evaluate(weights, held)
            content[RUN] = self.run
            content[DRAW] = ConfigRecord({"accepted": [self.accepted.get(c, "") for c in held]})
            messages[node] = Message(content, dst_node_id=node, message_type=MessageType.EVALUATE)
        rows, dropped = [], 0
        for node, reply in self.exchange(messages).items():
            held = by_node[node]
            try:
                if reply is None:
                    raise TimeoutError("it did not answer within federation.flower.round_timeout")
                if reply.has_error():
                    raise RuntimeError(error_line(reply))
                received = decode_rows(reply.content)
            except (TimeoutError, RuntimeError, MalformedMessage) as error:
                log.warning("evaluation: node %d (clients %s) left out: %s", node, held, error)
                dropped += len(held)
                continue
            good, problems = accept_rows(received, held, self.holdings)
            for problem in problems:
                log.warning("evaluation: dropped from node %d (clients %s): %s", node, held, problem)
            rows, dropped = rows + good, dropped + len(problems)
        return Scored(sorted(rows, key=lambda row: row["client"]), bytes_down=len(messages) * array_bytes(weights),
                      dropped=dropped)

    def state_dict(self, directory: Path | None = None, round_index: int = 0) -> dict:
        return {}  # what clients keep lives on their nodes (resuming such a run is refused: `check_resumable`)

    def load_state_dict(self, states: dict, directory: Path | None = None) -> None:
        pass

    def close(self) -> None:
        pass  # the nodes are Flower's to start and stop


def error_line(reply: Message) -> str:
    """The last line of an error reply's reason (the exception), or its code."""
    lines = (reply.error.reason or "").strip().splitlines()
    return lines[-1] if lines else f"error code {reply.error.code}"


def discover_nodes(grid: Grid, cfg: RecipeConfig, run: ConfigRecord) -> tuple[dict[int, int], dict[int, Holding | None]]:
    """Ask every connected node which partitions it holds and what their data is
    (sending it the `run` record to build that data with), until every client id of
    the recipe has a node, or raise after federation.flower.connect_timeout.
    Returns the node of every client id, and what a node with its own data
    (`data-path`) declares the client holds (None where the node rebuilds the
    recipe's partition, which the server knows itself). Such a declaration is the
    node's word: it bounds the node's later replies, but nothing verifies it."""
    wanted, timeout = set(range(cfg.federation.clients)), cfg.federation.flower.connect_timeout
    nodes: dict[int, int] = {}
    declared: dict[int, Holding | None] = {}
    asked: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            queries = [Message(RecordDict({RUN: run}), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
            for reply in grid.send_and_receive(queries, timeout=max(1.0, deadline - time.monotonic())):
                node = reply.metadata.src_node_id
                if reply.has_error():
                    raise UserError(f"node {node}: {error_line(reply)}")
                for partition, holding in node_answer(reply.content, node).items():
                    if partition in nodes:
                        raise UserError(f"node config: partition-id {partition} is held by two nodes "
                                        f"({nodes[partition]} and {node})")
                    nodes[partition], declared[partition] = node, holding
            asked.update(new)
        if wanted <= set(nodes):
            return {c: nodes[c] for c in sorted(wanted)}, {c: declared[c] for c in sorted(wanted)}
        if time.monotonic() > deadline:
            missing = sorted(wanted - set(nodes))
            raise UserError(f"federation.flower.connect_timeout: after {timeout:g}s no connected node holds "
                            f"partition-id {', '.join(map(str, missing))} (federation.clients={cfg.federation.clients})")
        time.sleep(POLL_SECONDS)


def node_answer(content: RecordDict, node: int) -> dict[int, Holding | None]:
    """A node's answer to the query: per partition it holds, what it declares the
    partition holds where it brings its own data, None where it rebuilds the
    recipe's. A malformed answer stops the run here, before any round, naming the node."""
    try:
        answer = content.config_records[RUN]
        lists = [list(answer[key]) for key in ("partitions", "kinds", "examples", "test_samples")]
        own = answer["own_data"]
        if len({len(values) for values in lists}) != 1 or not isinstance(own, bool):
            raise ValueError("its lists differ in length or own_data is not a bool")
        partitions, kinds, examples, tests = lists
        return {int(p): Holding(int(e), int(t), str(k)) if own else None
                for p, k, e, t in zip(partitions, kinds, examples, tests, strict=True)}
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"node {node}: its answer to the server's query is malformed ({type(error).__name__}: "
                        f"{error}); is it running the same fedssl version as the server?") from None


def check_resumable(cfg: RecipeConfig, resume: bool) -> None:
    """Refuse, before the engine starts, what the algorithm cannot do on Flower, and to
    resume a run whose clients keep state between rounds (personal layers, FlexMatch's
    learning status, error feedback's residuals): it lived on the nodes, not in the
    server's checkpoint, and would silently start afresh (`check_compatible`)."""
    check_compatible(cfg, build_algorithm(cfg).capabilities, resume_on_nodes=resume)


def serve(grid: Grid, cfg: RecipeConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """The whole run on the server: `run_federation` with its clients on Flower nodes."""
    check_resumable(cfg, resume)
    return run_federation(cfg, run_dir, resume=resume, clients=lambda federation: FlowerClients.on_grid(federation, grid))


# For deployment (`flwr run`): the run directory, prepared by the submitter with
# its resolved config.yaml, comes in the run config.
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_dir = Path(str(context.run_config["run-dir"]))
    with hold_run_dir(run_dir):  # refused, it writes nothing there: the directory is another process's
        try:
            serve(grid, load_recipe(run_dir / "config.yaml"), run_dir, resume=bool(context.run_config.get("resume", False)))
        except Exception as error:
            # The submitter only sees the run directory: leave the reason there, one line.
            (run_dir / SERVER_ERROR).write_text(f"{type(error).__name__}: {error}\n")
            raise
