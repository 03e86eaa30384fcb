"""A loopback Flower deployment: a SuperLink and N SuperNodes on 127.0.0.1, a run
submitted with `flwr run`, and every process stopped on exit, also on failure.

    python tools/flower_loopback.py RECIPE [key=value ...] [--nodes N] [--timeout S] [--data-paths DIR ...] [--insecure]

Each SuperNode is its own process started with Flower's `flower-supernode`, holding
the partitions `--node-config "partition-id=..."` names (client ids are dealt
round-robin over the nodes) and, with `--data-paths`, its own images
(`data-path=...`, one per node). The run directory is prepared as `fedssl run` does;
the ServerApp writes metrics.jsonl and summary.json into it.

By default the deployment is encrypted and authenticated as docs/deployment.md
shows: a CA and the SuperLink's certificate made by
`flower_certs.py`, TLS on the SuperLink's one port, `--enable-supernode-auth`, each
SuperNode's public key registered with `flwr supernode register` before the node
starts with its private key. `--insecure` (`secure=False`) runs all of it in
plaintext with self-registering nodes, as Flower's `--insecure` does.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedssl.backends.flower.server import SERVER_ERROR
from fedssl.config.load import load_recipe, to_yaml
from fedssl.io import atomic_write_text
from fedssl.run_dir import SUMMARY, prepare_run_dir
from fedssl.run_lock import hold_run_dir

import flower_certs  # next to this file, in tools/

APP_TOML = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedssl-app"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedssl"

[tool.flwr.app.components]
serverapp = "fedssl.backends.flower.server:app"
clientapp = "fedssl.backends.flower.client:app"

[tool.flwr.app.config]
run-dir = ""
resume = false
"""


class RunFailed(RuntimeError):
    """The ServerApp stopped before writing the summary."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with code {process.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


class Loopback:
    """Starts processes in their own process groups and stops all of them on exit.
    `certs` (from `flower_certs.make`) switches the SuperNodes it starts to TLS."""

    def __init__(self, workdir: Path, superlink: str, env: dict[str, str], certs: dict[str, Path] | None = None):
        self.workdir = workdir
        self.superlink = superlink
        self.env = env
        self.certs = certs
        self.bindir = Path(sys.executable).parent
        self.processes: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")
        # a new session: the process and the apps it spawns form one group we can kill
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.processes.append(process)
        return process

    def start_supernode(self, name: str, node_config: str | None = None,
                        auth_key: Path | None = None) -> subprocess.Popen:
        """A SuperNode dialling the SuperLink: over TLS when there are certificates,
        presenting `auth_key` (an OpenSSH private key) when given."""
        args = [str(self.bindir / "flower-supernode"), "--superlink", self.superlink, "--port", str(free_port())]
        args += ["--root-certificates", str(self.certs["ca"])] if self.certs else ["--insecure"]
        if auth_key is not None:
            args += ["--auth-supernode-private-key", str(auth_key)]
        if node_config:
            args += ["--node-config", node_config]
        return self.start(name, args, self.env)

    def stop(self, process: subprocess.Popen, grace: float = 5.0) -> None:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(grace)
            except ProcessLookupError:
                pass
        try:  # children that outlived their parent (apps spawned by the SuperLink or a SuperNode)
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc) -> None:
        for process in reversed(self.processes):
            self.stop(process)


def run(recipe: str, overrides: list[str], nodes: int, timeout: float, workdir: Path,
        after_start=None, data_paths: list[str] | None = None, secure: bool = True) -> Path:
    """Run the recipe on a loopback deployment; returns the run directory.
    `after_start(loopback, supernodes)` runs once the run is submitted (tests kill nodes
    or start intruders there); `data_paths`, one per node, point each node at its own
    images; `secure` turns on TLS and SuperNode authentication."""
    if data_paths is not None and len(data_paths) != nodes:
        raise ValueError(f"--data-paths: {len(data_paths)} paths for {nodes} nodes")
    cfg = load_recipe(recipe, overrides)
    run_dir = (Path(cfg.output_dir) / cfg.name).resolve()
    with hold_run_dir(run_dir):  # emptied while no other fedssl writes it; the ServerApp takes the lock next
        prepare_run_dir(run_dir, resume=False, overwrite=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    app = workdir / "app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(APP_TOML)
    home = workdir / "flwr-home"
    port = free_port()
    home.mkdir(exist_ok=True)
    certs = None
    if secure:  # throwaway keys, made afresh for every run in a folder of their own
        certs = flower_certs.make(Path(tempfile.mkdtemp(prefix="certs-", dir=workdir)), nodes=nodes)
    # the CLI's side of the connection: verify the SuperLink against our CA, or plaintext
    transport = f'root-certificates = "{certs["ca"]}"' if certs else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\n{transport}\n')
    # the apps import fedssl from wherever this process does
    env = os.environ | {"FLWR_HOME": str(home), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with Loopback(workdir, f"127.0.0.1:{port}", env, certs) as loop:
        flwr = str(loop.bindir / "flwr")
        link_args = [str(loop.bindir / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
                     "--disable-runtime-dependency-installation", "--database", str(workdir / "state.db")]
        if certs:
            link_args += ["--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["server_cert"]),
                          "--ssl-keyfile", str(certs["server_key"]), "--enable-supernode-auth"]
        else:
            link_args += ["--insecure"]
        link = loop.start("superlink", link_args, env)
        wait_for_port(port, link, 60)
        if certs:  # with authentication on, only nodes whose public key was registered may connect
            for node in range(nodes):
                register = subprocess.run([flwr, "supernode", "register", str(certs[f"node{node}_pub"])],
                                          env=env, capture_output=True, text=True, timeout=60)
                if register.returncode:
                    raise RuntimeError(f"flwr supernode register failed: {register.stdout}{register.stderr}")
        supernodes = []
        for node in range(nodes):
            partitions = ",".join(str(c) for c in range(node, cfg.federation.clients, nodes))
            node_config = f'partition-id="{partitions}"'
            if data_paths is not None:
                node_config += f' data-path="{Path(data_paths[node]).resolve()}"'
            supernodes.append(loop.start_supernode(f"supernode{node}", node_config,
                                                   certs[f"node{node}"] if certs else None))
        submit = subprocess.run([flwr, "run", str(app), "--run-config", f'run-dir="{run_dir}"'],
                                env=env, capture_output=True, text=True, timeout=120)
        if submit.returncode:
            raise RuntimeError(f"flwr run failed: {submit.stdout}{submit.stderr}")
        if after_start:
            after_start(loop, supernodes)
        deadline = time.monotonic() + timeout
        while not (run_dir / SUMMARY).is_file():
            if link.poll() is not None:
                raise RuntimeError(f"the SuperLink exited with code {link.returncode}; see {workdir / 'superlink.log'}")
            if (run_dir / SERVER_ERROR).is_file():
                raise RunFailed(f"the ServerApp stopped: {(run_dir / SERVER_ERROR).read_text().strip()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {SUMMARY} in {run_dir} after {timeout:g}s; see the logs in {workdir}")
            time.sleep(0.5)
    return run_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the run's summary")
    parser.add_argument("--data-paths", nargs="+", help="each node's own images (one path per node)")
    parser.add_argument("--insecure", action="store_true",
                        help="plaintext and self-registering SuperNodes (no TLS, no node authentication)")
    args = parser.parse_args()
    if args.data_paths and len(args.data_paths) != args.nodes:
        parser.error(f"--data-paths: {len(args.data_paths)} paths for --nodes {args.nodes}")
    # `kill` (SIGTERM) unwinds like Ctrl-C, so that every process started is stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="fedssl-loopback-") as workdir:
        run_dir = run(args.recipe, args.overrides, args.nodes, args.timeout, Path(workdir),
                      data_paths=args.data_paths, secure=not args.insecure)
    print(f"summary: {run_dir / SUMMARY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
