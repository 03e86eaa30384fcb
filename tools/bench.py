"""Simulation cost: fedssl's federation loop against an ideal plain PyTorch loop.

The standard workload (DESIGN.md, issue 6): FedAvg, 20 clients x 3,000 random
28x28x1 images of 10 classes, 1 local epoch, batch 10, SGD (lr 0.01), the FedAvg
CNN: 6,000 SGD steps per round. The "ideal" reference, run in the same process on
the same device, trains one model with a plain loop doing the same number of SGD
steps on data (and batch indices) already on the device. The population is then
scaled at a constant 60,000 images (100 x 600, 1000 x 60) to show how the cost of
many small clients grows. Each (population, concurrency) row runs in a fresh
process, so its peak memory is its own.

    python tools/bench.py                                   # device auto, 20,100,1000 clients, sequential and vmap
    python tools/bench.py --device cpu --populations 20 --concurrency sequential --repeats 3
    python tools/bench.py --device cpu --populations 20 --workers 2    # sequential, vmap and 2 worker processes
    python tools/bench.py --personal                        # 1,000 FedPer clients: peak host memory under 2 GB?
    python tools/bench.py --flower --device cpu             # the 20-client workload on Flower's simulation engine
    python tools/bench.py --overhead --device cpu           # per-step cost of the Lightning Fabric client path
    python tools/bench.py --device cpu --populations 20 --concurrency sequential --precision bf16-mixed
    python tools/bench.py --device cpu --populations 20 --concurrency none --workers 2 --memory-format contiguous

`--concurrency vmap` trains a round's clients together (fedssl.inprocess.vmap);
`sequential` one after another; `workers` in `--workers` forked worker processes of
one torch thread each (fedssl.inprocess.workers; on a CPU the default run adds
this row with one worker per core). The ideal loop runs in the row's own process
on torch's default threads. Also printed: the albumentations pipelines' images/s
(data.augment weak/strong), to compare with the loop's training images/s.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedssl.config.load import merge_config
from fedssl.data.dataset import ImageDataset, SourceData
from fedssl.data.federated import build_federated_data
from fedssl.data.transforms import augment_batch, build_transform
from fedssl.errors import UserError
from fedssl.inprocess.trainer import Tally, round_steps
from fedssl.inprocess.clients import resolve_device
from fedssl.inprocess.executors import Vmap, Workers
from fedssl.engine.federation import Federation
from fedssl.data.tensors import cycle_batches
from fedssl.inprocess.workers import usable_cores
from fedssl.models.factory import build_model
from fedssl.tracking.run_logger import read_metrics

TOTAL_IMAGES = 60_000  # 20 clients x 3,000: every population holds as many
BATCH = 10
MEMORY_LIMIT_MB = 2048  # issue 6: 1,000 clients with personal heads in 2 GB of host memory


def random_source(num_samples: int, seed: int = 0, num_test: int = 100) -> SourceData:
    """`num_samples` random training images of 10 classes, and a small test set."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num_samples + num_test, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, size=num_samples + num_test).astype(np.int64)
    names = tuple(str(i) for i in range(10))
    test = ImageDataset(images[:num_test], labels[:num_test], names)
    return SourceData(train=ImageDataset(images[num_test:], labels[num_test:], names), test=test)


def workload(clients: int, device: str, concurrency: str, precision: str = "32", workers: int = 0,
             memory_format: str = "auto", states_in_memory: int | None = None, **federation) -> dict:
    """The standard workload's recipe, as a config layer (`workers`: federation.execution.workers;
    0, in process, unless a row asks for worker processes)."""
    return {
        "data": {"image_size": 28, "partition": {"scheme": "iid", "local_test_fraction": 0.0}},
        "train": {"lr": 0.01, "batch_size": BATCH, "local_epochs": 1, "precision": precision, "memory_format": memory_format},
        "federation": {"clients": clients, "clients_per_round": clients, **federation, "execution": {
            "device": device, "concurrency": concurrency, "workers": str(workers),
            **({} if states_in_memory is None else {"states_in_memory": states_in_memory})}},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
    }


def peak_host_mb() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ideal_loop(cfg, images: torch.Tensor, labels: torch.Tensor, batches: list[torch.Tensor]) -> float:
    """One model, data and batch indices on the device, plain SGD over the batches."""
    model = build_model(cfg.model, 10, 1, 28).to(images.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    synchronize(images.device)
    began = time.perf_counter()
    for index in batches:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images[index]), labels[index]).backward()
        optimizer.step()
    synchronize(images.device)
    return time.perf_counter() - began


def round_batches(federation: Federation) -> tuple[list[int], list[torch.Tensor]]:
    """Each client's SGD steps in a round, and all the round's batch indices on the device."""
    clients, cfg = federation.data.clients, federation.cfg
    steps = [round_steps(len(c.labeled), 0, cfg.train, 0) for c in clients]
    device = federation.pool.images.device
    return steps, [torch.from_numpy(indices).to(device) for c, n in zip(clients, steps)
                   for indices in islice(cycle_batches(c.labeled, BATCH, np.random.default_rng(c.client_id), drop_last=cfg.train.drop_last), n)]


def measure(clients: int, device: str, concurrency: str, repeats: int, chunk: int, precision: str = "32",
            workers: int = 0, memory_format: str = "auto") -> dict:
    """Best-of-`repeats` seconds of one fedssl round and of the ideal loop (alternated);
    `chunk`: federation.execution.concurrent_clients (0: the recipe default); `workers`:
    federation.execution.workers (the first round also forks them)."""
    cfg = merge_config([workload(clients, device, concurrency, precision, workers, memory_format,
                                 **({"concurrent_clients": chunk} if chunk else {}))])
    data = build_federated_data(random_source(TOTAL_IMAGES), cfg.data, clients, cfg.seed)
    federation = Federation.build(cfg, data)
    pool, dev = federation.pool, federation.pool.images.device
    steps, batches = round_batches(federation)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fl_times, ideal_times = [], []
    state = federation.initial_state()
    for repeat in range(repeats):
        synchronize(dev)
        began = time.perf_counter()
        state, _ = federation.fit_round(repeat + 1, state)
        synchronize(dev)
        fl_times.append(time.perf_counter() - began)
        ideal_times.append(ideal_loop(cfg, pool.images, pool.labels, batches))
    federation.close()
    executor = federation.clients.executor
    return {
        "clients": clients, "samples": TOTAL_IMAGES // clients, "steps": sum(steps),
        "concurrency": f"vmap ({cfg.federation.execution.concurrent_clients} at once)" if isinstance(executor, Vmap)
        else f"workers ({executor.pool.size} processes)" if isinstance(executor, Workers) else "sequential",
        "fedssl": min(fl_times), "ideal": min(ideal_times), "host_mb": peak_host_mb(),
        "device_mb": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
    }


def step_overhead(device: str, precision: str, repeats: int) -> dict:
    """Per-step cost of the loop's client path (`ClientTrainer.fit`: Lightning Fabric,
    `self.log`, autocast at `precision`) against the same client's same batches in a
    plain hand loop (`ClientTrainer.fit` before Fabric: zero_grad, loss, backward,
    step, the same tally and update, no logging), best of `repeats` rounds each,
    alternated, in one process; plus the
    ideal loop over the same batch indices (no batch dicts at all). Both wall-clock
    and this process's CPU time: on a shared machine the CPU time is the steadier."""
    # Contiguous, as the ideal loop: this measures the path's overhead, not the layout's gain.
    cfg = merge_config([workload(20, device, "sequential", precision, memory_format="contiguous")])
    data = build_federated_data(random_source(TOTAL_IMAGES), cfg.data, 20, cfg.seed)
    federation = Federation.build(cfg, data)
    trainer, learner, client = federation.trainer, federation.trainer.learner, data.clients[0]
    payload = federation.algorithm.payload(1, federation.initial_state(), client.client_id)
    dev = federation.pool.images.device

    def fabric_round() -> int:
        return trainer.fit(client.client_id, client.labeled, client.unlabeled, payload)[0].num_examples

    def plain_round() -> int:
        client_data = trainer.client_data(client.client_id, client.labeled, client.unlabeled, payload)
        steps = client_data.begin(learner)
        optimizer, tally = learner.configure_optimizers(), Tally()
        for batch in client_data.batches(np.random.default_rng(client_data.seed), steps):
            optimizer.zero_grad(set_to_none=True)
            loss = learner.supervised_loss(batch)  # training_step, without its self.log
            loss.backward()
            optimizer.step()
            tally.add(loss, {}, batch, None)
        return client_data.finish(learner, tally.metrics(), trainer.shared_names)[0].num_examples

    steps = round_steps(len(client.labeled), 0, cfg.train, 0)
    batches = [torch.from_numpy(b).to(dev) for b in islice(cycle_batches(client.labeled, BATCH, np.random.default_rng(0), drop_last=cfg.train.drop_last), steps)]
    ideal = lambda: ideal_loop(cfg, federation.pool.images, federation.pool.labels, batches)  # noqa: E731
    wall, cpu = {"plain": [], "fabric": [], "ideal": []}, {"plain": [], "fabric": [], "ideal": []}
    for repeat in range(repeats):
        order = [("plain", plain_round), ("fabric", fabric_round), ("ideal", ideal)]
        for name, run in order if repeat % 2 else order[::-1]:
            synchronize(dev)
            began, began_cpu = time.perf_counter(), time.process_time()
            run()
            synchronize(dev)
            wall[name].append(time.perf_counter() - began)
            cpu[name].append(time.process_time() - began_cpu)
    return {"steps": steps, "wall": {k: min(v) for k, v in wall.items()}, "cpu": {k: min(v) for k, v in cpu.items()}}


def fabric_call_costs(calls: int = 20_000) -> dict[str, float]:
    """Microseconds per call of what the Fabric path adds to each step, on a 2x2
    linear model (so that the Python overhead, not the arithmetic, is timed): each
    Fabric call against its plain counterpart, and `self.log` with Fabric attached."""
    from fedssl.inprocess.trainer import RoundFabric
    from fedssl.learners.supervised import SupervisedLearner

    fabric = RoundFabric(accelerator="cpu", devices=1, precision="32")
    model, x, value = torch.nn.Linear(2, 2), torch.randn(1, 2), torch.tensor(1.0)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    learner = SupervisedLearner(model, merge_config([]).train)
    learner.fabric = fabric

    def per_call(function) -> float:
        function()
        began = time.perf_counter()
        for _ in range(calls):
            function()
        return (time.perf_counter() - began) / calls * 1e6

    costs = {
        "zero_grad": per_call(lambda: wrapped.zero_grad(set_to_none=True)) - per_call(lambda: plain.zero_grad(set_to_none=True)),
        "optimizer step": per_call(wrapped.step) - per_call(plain.step),
        "backward": per_call(lambda: fabric.backward(model(x).sum())) - per_call(lambda: model(x).sum().backward()),
        "autocast context (precision 32)": per_call(lambda: fabric.autocast().__enter__()),
        "self.log": per_call(lambda: learner.log("train_loss", value, prog_bar=True, batch_size=10)),
    }
    return costs


def personal_memory(clients: int, per_round: int, samples: int, rounds: int, device: str) -> dict:
    """FedPer over `clients` clients, `per_round` sampled each round, every personal
    head kept in memory (federation.execution.states_in_memory = clients), then evaluated."""
    cfg = merge_config([workload(clients, device, "auto", states_in_memory=clients, clients_per_round=per_round), {
        "algorithm": {"name": "fedper"},
        "data": {"partition": {"local_test_fraction": 0.2}},
    }])
    data = build_federated_data(random_source(clients * samples), cfg.data, clients, cfg.seed)
    federation = Federation.build(cfg, data)
    built_mb = peak_host_mb()
    began = time.perf_counter()
    state = federation.initial_state()
    for round_index in range(1, rounds + 1):
        state, _ = federation.fit_round(round_index, state)
    federation.evaluate(state)
    return {"clients": clients, "per_round": per_round, "samples": samples, "rounds": rounds,
            "seconds": time.perf_counter() - began, "heads_in_memory": federation.clients.store.in_memory,
            "built_mb": built_mb, "host_mb": peak_host_mb()}


def round_seconds(run_dir: Path) -> list[float]:
    """Seconds of each round but the last (which also evaluates), from metrics.jsonl."""
    elapsed = [0.0] + [m["seconds"] for m in read_metrics(run_dir / "metrics.jsonl")]
    return [after - before for before, after in zip(elapsed[:-2], elapsed[1:-1])]


def flower_cost(rounds: int, device: str, num_cpus: float) -> dict:
    """Best round of the 20-client workload on Flower's simulation engine (one virtual
    SuperNode per client, ClientApps in Ray actors of `num_cpus` cores each) and of
    the same recipe in-process, against the ideal loop. Flower's nodes build their
    data from the recipe, so the images are synthetic faces drawn at 28x28x1
    (75,000, of which 60,000 train), not a handed-in random source."""
    from fedssl.backends.flower.simulation import simulate
    from fedssl.engine.run import run_federation

    cfg = merge_config([workload(20, device, "sequential"), {
        "data": {"source": "synthetic_faces", "num_samples": TOTAL_IMAGES * 5 // 4, "test_fraction": 0.2, "channels": 1},
        "federation": {"rounds": rounds, "evaluation": {"eval_every": rounds}, "flower": {"num_cpus": num_cpus}},
    }])
    with tempfile.TemporaryDirectory() as tmp:
        run_federation(cfg, Path(tmp) / "inprocess")
        simulate(cfg, Path(tmp) / "flower")
        inprocess, flower = round_seconds(Path(tmp) / "inprocess"), round_seconds(Path(tmp) / "flower")
    federation = Federation.build(cfg)
    steps, batches = round_batches(federation)
    ideal = min(ideal_loop(cfg, federation.pool.images, federation.pool.labels, batches) for _ in range(2))
    return {"steps": sum(steps), "inprocess": min(inprocess), "flower": min(flower), "ideal": ideal,
            "flower_rounds": flower}


def in_child(function, *args):
    """Run `function(*args)` in a fresh process (its peak memory is then its own), not
    a daemon, so that it may fork worker processes of its own (federation.execution.workers)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def augmentation_rates(count: int = 2000) -> dict[str, float]:
    """Images/s of the albumentations pipelines a client applies (data.augment), on
    one process, as the loop applies them: image by image on the CPU."""
    images = np.random.default_rng(0).integers(0, 256, size=(count, 28, 28, 1), dtype=np.uint8)
    rates = {}
    for kind in ("weak", "strong"):
        transform = build_transform(kind, 28, seed=0)
        began = time.perf_counter()
        augment_batch(transform, images)
        rates[kind] = count / (time.perf_counter() - began)
    return rates


def machine(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return f"{name}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--populations", default="20,100,1000", help="client counts; each holds 60,000 images in all")
    parser.add_argument("--concurrency", default="sequential,vmap",
                        help="comma-separated: sequential, vmap; none: only the --workers row")
    parser.add_argument("--concurrent-clients", type=int, default=0,
                        help="vmap: federation.execution.concurrent_clients (0: the recipe default)")
    parser.add_argument("--workers", type=int, default=-1,
                        help="a row of this many worker processes (federation.execution.workers); default: one per core on a "
                             "CPU of 2+ cores, none elsewhere; 0: no workers row")
    parser.add_argument("--repeats", type=int, default=2, help="rounds timed per row (best of)")
    parser.add_argument("--personal", action="store_true", help="only the FedPer memory check")
    parser.add_argument("--personal-clients", type=int, default=1000)
    parser.add_argument("--personal-per-round", type=int, default=0, help="clients sampled per round (0: all)")
    parser.add_argument("--personal-samples", type=int, default=20, help="samples per client in the memory check")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the memory check")
    parser.add_argument("--flower", action="store_true", help="only the Flower simulation cost (20 clients)")
    parser.add_argument("--flower-rounds", type=int, default=3, help="rounds of the Flower row (the last also evaluates)")
    parser.add_argument("--flower-cpus", type=float, default=1.0, help="federation.flower.num_cpus of the Flower row")
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "16-mixed"], help="train.precision")
    parser.add_argument("--memory-format", default="auto", choices=["auto", "channels_last", "contiguous"],
                        help="train.memory_format of the fedssl rows (the ideal loop stays a plain contiguous loop)")
    parser.add_argument("--overhead", action="store_true",
                        help="only the per-step cost of the Lightning Fabric client path against a plain hand loop")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except UserError as error:
        parser.error(str(error))
    if args.precision == "16-mixed" and device.type != "cuda":
        parser.error("--precision: 16-mixed needs a CUDA device (train.precision)")
    print(f"machine: {machine(device)}; device {device}")

    if args.personal:
        per_round = args.personal_per_round or args.personal_clients
        row = in_child(personal_memory, args.personal_clients, per_round, args.personal_samples, args.rounds,
                       str(device))
        verdict = "under" if row["host_mb"] < MEMORY_LIMIT_MB else "OVER"
        print(f"fedper, {row['clients']} clients x {row['samples']} samples, {row['per_round']} per round, "
              f"{row['rounds']} rounds + evaluation ({row['seconds']:.1f} s), {row['heads_in_memory']} clients' "
              f"personal states in memory: peak host memory {row['host_mb']:,.0f} MB ({row['built_mb']:,.0f} MB "
              f"after imports and building), {verdict} {MEMORY_LIMIT_MB:,} MB")
        return

    if args.overhead:
        row = in_child(step_overhead, str(device), args.precision, max(args.repeats, 3))
        steps = row["steps"]
        print(f"one client of the standard workload: {steps} steps of batch {BATCH}, train.precision={args.precision}, "
              f"best of {max(args.repeats, 3)} rounds each, alternated")
        print("| path | wall per step | vs plain | CPU time per step | vs plain |")
        print("| --- | --- | --- | --- | --- |")
        wall, cpu = row["wall"], row["cpu"]
        for name, label in (("plain", "plain hand loop (the loop before Fabric)"),
                            ("fabric", "Lightning Fabric (ClientTrainer.fit)"), ("ideal", "ideal loop (no batch dicts)")):
            print(f"| {label} | {wall[name] / steps * 1e3:.3f} ms | **{wall[name] / wall['plain']:.3f}** | "
                  f"{cpu[name] / steps * 1e3:.3f} ms | **{cpu[name] / cpu['plain']:.3f}** |")
        print(f"Fabric path: {(wall['fabric'] - wall['plain']) / steps * 1e6:+.0f} us per step wall-clock, "
              f"{(cpu['fabric'] - cpu['plain']) / steps * 1e6:+.0f} us CPU time")
        costs = in_child(fabric_call_costs)
        print("what Fabric adds per step, in Python (us per call, a 2x2 model): "
              + ", ".join(f"{name} {cost:+.1f}" for name, cost in costs.items())
              + f"; in all {sum(costs.values()):+.1f} us")
        return

    if args.flower:
        if args.flower_rounds < 2:
            parser.error("--flower-rounds: at least 2 (the last round also evaluates and is not timed)")
        row = in_child(flower_cost, args.flower_rounds, str(device), args.flower_cpus)
        print(f"workload: FedAvg CNN, 20 clients, batch {BATCH}, 1 local epoch, SGD, {row['steps']:,} steps per round; "
              f"best of {args.flower_rounds - 1} rounds; federation.flower.num_cpus={args.flower_cpus:g}")
        print("| backend | fedssl round | ideal loop | ratio fedssl/ideal |")
        print("| --- | --- | --- | --- |")
        for name in ("inprocess", "flower"):
            print(f"| {name} | {row[name]:.2f} s | {row['ideal']:.2f} s | **{row[name] / row['ideal']:.2f}** |")
        print("flower rounds: " + ", ".join(f"{s:.2f} s" for s in row["flower_rounds"]))
        return

    modes = [m.strip() for m in args.concurrency.split(",") if m.strip() and m.strip() != "none"]
    workers = args.workers if args.workers >= 0 else (usable_cores() if device.type == "cpu" else 0)
    if workers == 1 or (workers and device.type != "cpu"):
        parser.error("--workers: 0 (no row) or 2+ worker processes, on a CPU (federation.execution.workers)")
    if set(modes) - {"sequential", "vmap"} or not (modes or workers):
        parser.error(f"--concurrency: give sequential, vmap, both or none (with --workers), got {args.concurrency!r}")
    if workers:
        modes.append("workers")
    print(f"workload: FedAvg CNN, batch {BATCH}, 1 local epoch, SGD, train.precision={args.precision}, "
          f"train.memory_format={args.memory_format}; "
          f"{TOTAL_IMAGES:,} images per round; best of {args.repeats}")
    print("| clients x samples | concurrency | fedssl round | ideal loop | ratio fedssl/ideal | images/s (fedssl) "
          "| peak host memory | peak device memory |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    best_rate = 0.0
    for clients in [int(c) for c in args.populations.split(",")]:
        for mode in modes:
            concurrency, count = ("sequential", workers) if mode == "workers" else (mode, 0)
            row = in_child(measure, clients, str(device), concurrency, args.repeats, args.concurrent_clients,
                           args.precision, count, args.memory_format)
            rate = row["steps"] * BATCH / row["fedssl"]
            best_rate = max(best_rate, rate)
            shown = row["concurrency"] if row["concurrency"].startswith(mode) else f"{mode} (fell back to sequential)"
            gpu = f"{row['device_mb']:,.0f} MB" if row["device_mb"] is not None else "-"
            print(f"| {row['clients']} x {row['samples']} | {shown} | {row['fedssl']:.2f} s | {row['ideal']:.2f} s | "
                  f"**{row['fedssl'] / row['ideal']:.2f}** | {rate:,.0f} | {row['host_mb']:,.0f} MB | {gpu} |", flush=True)
    for kind, rate in augmentation_rates().items():
        print(f"augmentation {kind}: {rate:,.0f} images/s on one CPU process "
              f"({rate / best_rate:.2f}x the loop's best training rate of {best_rate:,.0f} images/s)")


if __name__ == "__main__":
    main()
