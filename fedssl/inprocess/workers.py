"""A round's clients trained by worker processes on the CPU (`federation.execution.workers`).

On a CPU, one client's batch-10 step splits poorly over two threads: the
in-process loop ran the standard workload at 0.88-1.15x an ideal loop, while
Flower's simulation, two single-thread actors training two clients at once, ran
it at 0.77-0.79x (issue 20). A `WorkerPool` does the same in process: N worker
processes, each on one torch thread, each training one client at a time.

The workers are forked from the server's process when the first round trains,
so each holds the run's data, image pool and learner without building anything
(fork is copy-on-write: the images are not copied), and they live until the run
ends (`close`). A task is what `InProcessClients.train` needs: the client, its
payload as it travelled, and its own kept state, read from the server's client
state store (which stays in the server's process, so checkpoints and resume are
those of a sequential run); the reply is its update (or the exception it raised)
and what it would keep, which `InProcessClients.accept` stores as it does for a
client trained in process. A worker runs exactly `InProcessClients.train`, and
every random draw of a client's round comes from (seed, round, client), so a
worker trains a client as the server's process would at one torch thread.
Results come back in the payloads' order, so aggregation sums in the same order.

Messages cross a pipe pickled: both ends are this run's own processes, forked
from this one (the replies are still checked by the engine as any update is).
A worker that dies (killed, out of memory) stands for its client as an exception,
and a fresh one is forked for the next task: a round never waits for a dead one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterator

import torch

from fedssl.errors import UserError
from fedssl.messages import Payload, Update

log = logging.getLogger(__name__)

Kept = dict[str, torch.Tensor]  # what a client keeps until its next round
# What a worker trains: a client's round from its payload and its stored state; what it returns.
Train = Callable[[int, Payload, Kept], tuple[Update | Exception, Kept]]


class WorkerDied(RuntimeError):
    """The worker process training a client ended before it replied."""


def worker_count(setting: str, device: torch.device, clients_per_round: int, round_steps: int,
                 cores: int | None = None) -> int:
    """How many worker processes train a round's clients (0: in this process).

    `setting` is `federation.execution.workers` ("auto" or a count, validated). A count of 0
    or 1 trains in this process; a count above `clients_per_round` is capped to it
    (a worker trains one client at a time, so the others would only idle), and a
    warning says so — once, as this is resolved once per run. `auto` uses min(cores,
    clients per round) workers on a CPU with at least 2 cores, where a round holds at
    least `MIN_AUTO_STEPS` SGD steps (`round_steps`, estimated from the data) — below
    that, forking and warming the workers costs more than the round saves
    (docs/running.md).
    """
    if setting != "auto":
        count = int(setting)
        if count > clients_per_round:
            log.warning("federation.execution.workers: %d worker processes capped to the %d clients a round trains",
                        count, clients_per_round)
            return clients_per_round
        return count
    cores = usable_cores() if cores is None else cores
    if device.type != "cpu" or cores < 2 or clients_per_round < 2 or round_steps < MIN_AUTO_STEPS:
        return 0
    return min(cores, clients_per_round)


# A round of fewer SGD steps trains in this process under `federation.execution.workers: auto`:
# starting two workers costs about as much as this many steps (measured, docs/running.md).
MIN_AUTO_STEPS = 1000


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Worker:
    process: multiprocessing.Process
    conn: Connection
    client: int | None = None  # the client it is training, None: idle


class WorkerPool:
    """`size` forked processes that train clients with `train` (see the module docstring).

    Started on the first `map`; `close` ends them (also when a `map` is abandoned
    with tasks in flight, so a stale reply never reaches a later round).
    """

    def __init__(self, train: Train, size: int):
        if size < 2:
            raise ValueError(f"a worker pool has at least 2 workers, got {size}")
        self.train, self.size = train, size
        self.workers: list[Worker] = []

    def start(self) -> None:
        while len(self.workers) < self.size:
            self.workers.append(self.fork())

    def fork(self) -> Worker:
        context = multiprocessing.get_context("fork")
        ours, theirs = context.Pipe()
        inherited = [w.conn for w in self.workers] + [ours]  # the child closes its copies of the server's ends
        process = context.Process(target=serve, args=(self.train, theirs, inherited), daemon=True,
                                  name=f"fedssl-worker-{len(self.workers)}")
        # Ctrl-C is held back while forking: one arriving then would be raised inside an
        # at-fork callback (logging's, torch's), which Python reports and swallows, and
        # the run would go on. Held back, it is raised as soon as the fork is done.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        theirs.close()
        return Worker(process, ours)

    def map(self, client_ids: list[int], task: Callable[[int], tuple[Payload, Kept]]
            ) -> Iterator[tuple[int, Update | Exception, Kept]]:
        """Each client's (client, update or exception, kept), in `client_ids`' order.
        `task(client)` gives its payload and stored state, asked as it is sent."""
        self.start()
        waiting, replies, order = deque(client_ids), {}, list(client_ids)
        finished = False
        try:
            for client_id in order:
                while client_id not in replies:
                    for worker in self.workers:
                        if worker.client is None and waiting:
                            worker.client = waiting.popleft()
                            payload, state = task(worker.client)
                            worker.conn.send_bytes(pickle.dumps((worker.client, payload, state), pickle.HIGHEST_PROTOCOL))
                    self.receive(replies)
                yield replies.pop(client_id)
            finished = True
        finally:
            if not finished and any(w.client is not None for w in self.workers):
                self.close()  # abandoned mid-round: its replies must not reach the next one

    def receive(self, replies: dict[int, tuple[int, Update | Exception, Kept]]) -> None:
        """Wait for a busy worker to reply or die; file what it stands for under `replies`."""
        busy = [w for w in self.workers if w.client is not None]
        wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
        for index, worker in enumerate(self.workers):
            if worker.client is None:
                continue
            reply = None
            if worker.conn.poll():
                try:
                    reply = pickle.loads(worker.conn.recv_bytes())
                except (EOFError, OSError):
                    reply = None  # it died while replying
            elif worker.process.is_alive():
                continue
            if reply is None:
                code = worker.process.exitcode
                log.warning("worker %s died (exit code %s) training client %d", worker.process.name, code, worker.client)
                replies[worker.client] = (worker.client, WorkerDied(f"its worker process died (exit code {code})"), {})
                self.stop(worker)
                self.workers[index] = self.fork()
                continue
            client_id, update, kept, user_error = reply
            worker.client = None
            if user_error is not None:  # a mistake in the recipe, as in process: the run stops
                raise UserError(user_error)
            replies[client_id] = (client_id, update, kept)

    @staticmethod
    def stop(worker: Worker, timeout: float = 5.0) -> None:
        worker.conn.close()  # an idle worker reads the end of its pipe and exits
        worker.process.join(timeout if worker.client is None else 0)
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join(timeout)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.process.close()

    def close(self) -> None:
        """End every worker (idle ones exit on their own; busy ones are terminated)."""
        workers, self.workers = self.workers, []
        for worker in workers:
            self.stop(worker)

    def __del__(self) -> None:
        if getattr(self, "workers", None):
            self.close()


def serve(train: Train, conn: Connection, inherited: list[Connection]) -> None:
    """A worker's life: train the clients it is sent, one at a time, until its pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle: it ends the workers
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # held back while forking (`WorkerPool.fork`)
    for other in inherited:
        other.close()
    torch.set_num_threads(1)
    while True:
        try:
            client_id, payload, state = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the server closed the pipe (end of run) or is gone
        try:
            conn.send_bytes(reply_bytes(train, client_id, payload, state))
        except OSError:
            return  # the server is gone (killed): nobody waits for the reply


def reply_bytes(train: Train, client_id: int, payload: Payload, state: Kept) -> bytes:
    """The pickled reply: (client, update or exception, kept, a UserError's message or None)."""
    try:
        update, kept = train(client_id, payload, state)
        reply: tuple[Any, ...] = (client_id, update, kept, None)
    except UserError as error:
        reply = (client_id, None, {}, str(error))
    try:
        data = pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)
        if isinstance(reply[1], Exception):
            pickle.loads(data)  # some exceptions pickle but cannot be rebuilt (other constructor arguments)
        return data
    except Exception as error:  # an exception that does not travel still stands for its client
        update = reply[1]
        stand_in = RuntimeError(f"{type(update).__name__}: {update}") if isinstance(update, Exception) else error
        return pickle.dumps((client_id, stand_in, {}, reply[3]), pickle.HIGHEST_PROTOCOL)
