"""Where a semi-supervised round's time goes: one round of a recipe, by phase.

    OMP_NUM_THREADS=1 python tools/profile_ssl.py [RECIPE ...] [--set KEY=VALUE ...] [--top 15] [--out FILE.json]
    OMP_NUM_THREADS=1 python tools/profile_ssl.py --augment cpu    # augmentation images/s, both backends

Default recipes: the Fashion-MNIST Table 2 set (FedMatch labels-at-client,
labels-at-server, FedProx-FixMatch). For each, the federation is built, `--warmup`
rounds run unmeasured (FedMatch's helpers exist only once clients have reported),
then one round is measured: training of every sampled client, the server's own
training, aggregation, evaluation on the server's test set and the clients' local
test splits, and the checkpoint. `--set` takes recipe overrides (e.g.
`federation.clients_per_round=3` for a shorter round with the same per-step work).

Time is process CPU time (all threads), which a shared machine disturbs far less
than wall time; both are printed. Each phase is *exclusive*: a phase timed inside
another (the helpers' forward pass inside a training step) is taken out of the
outer one, so the phases add up to the round. Phases are found by wrapping the
functions that do the work (those absent in a version of fedssl read 0).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from fedssl.config.load import load_recipe
from fedssl.engine.checkpoint import save_checkpoint
from fedssl.engine.federation import Federation

RECIPES = ("ssl_fedmatch_client_fashion_mnist", "ssl_fedmatch_server_fashion_mnist", "ssl_fedprox_fixmatch_fashion_mnist")


class PhaseClock:
    """Exclusive process-CPU and wall seconds per named phase (a stack of open phases)."""

    def __init__(self):
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[str] = []
        self.last = (time.process_time(), time.perf_counter())

    def _charge(self) -> None:
        now = (time.process_time(), time.perf_counter())
        phase = self.stack[-1] if self.stack else "other"
        self.cpu[phase] += now[0] - self.last[0]
        self.wall[phase] += now[1] - self.last[1]
        self.last = now

    @contextmanager
    def phase(self, name: str):
        self._charge()
        self.stack.append(name)
        self.calls[name] += 1
        try:
            yield
        finally:
            self._charge()
            self.stack.pop()

    def reset(self) -> None:
        self.cpu.clear(), self.wall.clear(), self.calls.clear()
        self.last = (time.process_time(), time.perf_counter())

    def wrap(self, owner: object, attr: str, name: str | Callable[..., str]) -> None:
        """Time every call of `owner.attr` as phase `name` (or `name(*args)`); no-op if absent."""
        original = getattr(owner, attr, None)
        if original is None:
            return
        clock = self

        def timed(*args, **kwargs):
            with clock.phase(name(*args, **kwargs) if callable(name) else name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)


def instrument(clock: PhaseClock, federation: Federation) -> None:
    """Wrap the functions that do each phase's work (old and new fedssl alike)."""
    import lightning_fabric
    import fedssl.inprocess.client_data as client_data
    import fedssl.engine.federation as engine
    import fedssl.inprocess.clients as clients
    import fedssl.data.tensors as tensors
    import fedssl.learners.fedmatch as fedmatch_learner

    aug = federation.trainer.augmentations

    def augment_kind(transform, *_args, **_kwargs) -> str:
        kind = {id(aug.weak): "weak", id(aug.strong): "strong", id(aug.labeled): "labeled"}.get(id(transform), "?")
        return f"augment: {kind}"

    # albumentations per image (before) and the batched torch path (`TorchAugment.__call__`), alike
    clock.wrap(client_data, "augment_batch", augment_kind)
    torch_augment = getattr(sys.modules.get("fedssl.data.batch_augment"), "TorchAugment", None)
    if torch_augment is not None:
        clock.wrap(torch_augment, "__call__", augment_kind)
    clock.wrap(tensors.TensorPool, "tensor", "data movement: uint8 -> normalized tensor")
    clock.wrap(tensors.TensorPool, "normalize", "data movement: uint8 -> normalized tensor")
    clock.wrap(client_data.ClientDataModule, "batches", "batching (indices, gathers)")
    learner = type(federation.trainer.learner)
    clock.wrap(learner, "training_step", "model forward + losses")
    clock.wrap(learner, "helper_log_probs", "helpers' forward")
    clock.wrap(lightning_fabric.Fabric, "backward", "backward")
    clock.wrap(torch.optim.SGD, "step", "optimizer step")
    clock.wrap(fedmatch_learner, "encode_update", "sparse encoding (client)")
    clock.wrap(client_data.ClientDataModule, "begin", "round start (load weights, start_round)")
    algorithm = type(federation.algorithm)
    clock.wrap(algorithm, "aggregate", "aggregation (decode, average)")
    clock.wrap(algorithm, "embed", "helper selection: embeddings")
    clock.wrap(algorithm, "refresh_helpers", "helper selection: KD-tree, snapshots")
    clock.wrap(algorithm, "payload", "payloads")
    clock.wrap(engine, "score", "evaluation: server test set")
    clock.wrap(clients.InProcessClients, "score_rows", "evaluation: clients' local tests")
    clock.wrap(engine.Federation, "train_on_server", "server training (outside its steps)")


def profile_round(recipe: str, overrides: list[str], warmup: int, top: int) -> dict:
    cfg = load_recipe(recipe, [*overrides, "logging.progress=false"])
    federation = Federation.build(cfg)
    state = federation.initial_state()
    for round_index in range(1, warmup + 1):
        state, _ = federation.fit_round(round_index, state)
    clock = PhaseClock()
    instrument(clock, federation)
    profiler = cProfile.Profile(time.process_time)
    round_index = warmup + 1
    clock.reset()
    began = time.process_time(), time.perf_counter()
    if top:
        profiler.enable()
    state, metrics = federation.fit_round(round_index, state)
    with clock.phase("evaluation: other (metrics, personal)"):
        evaluated, _ = federation.evaluate(state)
    with clock.phase("checkpoint"):
        path = Path(f"/tmp/profile_ssl_{recipe}.pt")
        save_checkpoint(path, {"server_state": {"params": state.params, "momentum": state.momentum, "extras": state.extras},
                               "client_states": federation.clients.state_dict()})
        path.unlink()
    profiler.disable()
    clock._charge()
    cpu, wall = time.process_time() - began[0], time.perf_counter() - began[1]
    stream = io.StringIO()
    if top:  # cProfile's own overhead is in these figures then
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    return {"recipe": recipe, "round": round_index, "cpu_s": cpu, "wall_s": wall, "threads": torch.get_num_threads(),
            "global_acc": evaluated["global_acc"], "steps": metrics.get("pl_seen", 0),
            "phases": {k: {"cpu_s": clock.cpu[k], "wall_s": clock.wall[k], "calls": clock.calls.get(k, 0)}
                       for k in sorted(clock.cpu, key=clock.cpu.get, reverse=True)},
            "top": stream.getvalue()}


def augment_throughput(device: str, batch: int = 448, side: int = 28, repeats: int = 10) -> list[dict]:
    """Images per CPU second (GPU: per wall second, synchronized) of each backend's
    weak and strong views of uint8 `side`-pixel grayscale batches."""
    from fedssl.data.batch_augment import TorchAugment
    from fedssl.data.transforms import augment_batch, build_transform

    images = torch.randint(0, 256, (batch, 1, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    on_device, raw = images.to(device), images.permute(0, 2, 3, 1).numpy().copy()
    cuda = device.startswith("cuda")
    clock = time.perf_counter if cuda else time.process_time
    rows = []
    for kind in ("weak", "strong"):
        runs = {"torch": lambda a=TorchAugment(kind, 0): a(on_device)}
        if not cuda:
            runs["albumentations"] = lambda t=build_transform(kind, side, seed=0): augment_batch(t, raw)
        for backend, run in runs.items():
            run()  # warm-up
            if cuda:
                torch.cuda.synchronize()
            began = clock()
            for _ in range(repeats):
                run()
            if cuda:
                torch.cuda.synchronize()
            rows.append({"backend": backend, "kind": kind, "device": device,
                         "images_per_s": batch * repeats / (clock() - began)})
    return rows


def report(result: dict) -> str:
    lines = [f"## {result['recipe']}: round {result['round']}, {result['cpu_s']:.1f} CPU s, {result['wall_s']:.1f} wall s "
             f"({result['threads']} torch threads), global_acc {result['global_acc']:.4f}",
             "", "| phase | CPU s | share | wall s | calls |", "| --- | --- | --- | --- | --- |"]
    total = sum(p["cpu_s"] for p in result["phases"].values()) or 1.0
    for name, p in result["phases"].items():
        lines.append(f"| {name} | {p['cpu_s']:.2f} | {p['cpu_s'] / total:.1%} | {p['wall_s']:.2f} | {p['calls']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", help="recipe overrides, KEY=VALUE")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (FedMatch needs 1 for helpers)")
    parser.add_argument("--top", type=int, default=0, help="also print cProfile's top N functions by own time")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--augment", metavar="DEVICE",
                        help="only measure augmentation throughput on DEVICE (cpu, cuda), both backends")
    args = parser.parse_args()
    if args.augment:
        for row in augment_throughput(args.augment):
            print(f"{row['backend']:>14} {row['kind']:>6} on {row['device']}: {row['images_per_s']:,.0f} images/s")
        return
    results = []
    for recipe in args.recipes:
        results.append(profile_round(recipe, args.overrides, args.warmup, args.top))
        print(report(results[-1]), flush=True)
        if args.top:
            print(results[-1]["top"], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
