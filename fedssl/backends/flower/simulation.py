"""`fedssl run RECIPE federation.backend=flower`: a run on Flower's simulation engine.

One virtual SuperNode per client (Flower names its partition `partition-id`, the
client id), ClientApps in Ray actors with the recipe's client resources, and the
ServerApp in this process writing the run directory as the in-process loop does.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedssl.backends.flower.client import app as fedssl_client_app
from fedssl.backends.flower.server import check_resumable, serve
from fedssl.config.schema import RecipeConfig


def simulate(cfg: RecipeConfig, run_dir: Path, resume: bool = False,
             client_app: ClientApp = fedssl_client_app) -> dict[str, Any]:
    """Run the federation on Flower's simulation engine; returns its summary. The
    virtual nodes run `client_app` (fedssl's own; tests pass one that misbehaves)."""
    check_resumable(cfg, resume)  # before the engine starts: a refusal takes a second, not Ray's start-up
    result: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        result.update(serve(grid, cfg, run_dir, resume))

    flower = cfg.federation.flower
    backend_config = {
        "client_resources": {"num_cpus": flower.num_cpus, "num_gpus": flower.num_gpus},
        # Ray's own log lines drown the run's progress; errors still surface
        "init_args": {"logging_level": logging.WARNING, "log_to_driver": False},
    }
    flower_log, notice = logging.getLogger("flwr"), RunSimulationNotice()
    flower_log.addFilter(notice)
    try:
        with warnings.catch_warnings():
            # Ray's tip about a future default (it hides GPUs from actors with num_gpus 0, as we want)
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.clients,
                           backend_config=backend_config)
    finally:
        flower_log.removeFilter(notice)
    if not result:  # the engine logged the server's failure but returned
        raise RuntimeError("the Flower simulation ended without a summary; see the log above")
    return result


class RunSimulationNotice(logging.Filter):
    """Hides Flower's advice to replace `run_simulation` with `flwr run`: fedssl keeps
    it so that `fedssl run` gets the summary back in its own process (deployments do
    submit with `flwr run`), and the advice would only puzzle fedssl's users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()
