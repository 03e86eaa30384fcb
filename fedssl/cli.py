"""The `fedssl` command line: run | recipes | data."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from fedssl.errors import UserError


def recipe_description(path: Path) -> str:
    """A recipe's first comment line is its one-line description."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def cmd_recipes(args: argparse.Namespace) -> int:
    from fedssl.config.load import shipped_recipes

    recipes = shipped_recipes()
    width = max((len(p.stem) for p in recipes), default=0)
    for path in recipes:
        print(f"{path.stem:<{width}}  {recipe_description(path)}")
    return 0


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (run_dir / "checkpoint.pt").is_file():
            raise UserError(f"cannot resume: {run_dir / 'checkpoint.pt'} does not exist")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(
                f"run directory {run_dir} already holds a run: pass --resume to continue it, "
                f"--overwrite to start over, or choose another name=..."
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def cmd_run(args: argparse.Namespace) -> int:
    from fedssl.config.load import load_recipe, to_yaml
    from fedssl.io import atomic_write_text

    # Recipe and run directory are checked before the heavy imports: a typo fails fast.
    cfg = load_recipe(args.recipe, args.overrides)
    run_dir = Path(cfg.output_dir) / cfg.name
    prepare_run_dir(run_dir, args.resume, args.overwrite)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))

    from fedssl.federation.loop import run_federation

    summary = run_federation(cfg, run_dir, resume=args.resume)
    print(
        f"{cfg.name}: global_acc {summary['global_acc']:.4f}, client_acc_mean {summary['client_acc_mean']:.4f} "
        f"after {summary['rounds']} rounds in {summary['seconds']:.1f}s; run directory {run_dir}"
    )
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from fedssl.config.load import load_recipe
    from fedssl.data.federated import build_federated_data
    from fedssl.data.report import client_table, plot_class_samples, plot_partition_heatmap
    from fedssl.data.sources import load_source

    cfg = load_recipe(args.recipe, args.overrides)
    fed = build_federated_data(load_source(cfg.data), cfg.data, cfg.federation.clients, cfg.seed)
    print(client_table(fed))
    out = Path(args.out) if args.out else Path(cfg.output_dir) / f"data-{cfg.name}"
    out.mkdir(parents=True, exist_ok=True)
    plot_partition_heatmap(fed, out / "partition.png")
    plot_class_samples(fed.pool, out / "samples.png", seed=cfg.seed)
    print(f"wrote {out / 'partition.png'} and {out / 'samples.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedssl", description="Semi-supervised and personalized federated learning.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train a recipe across simulated clients")
    run.add_argument("recipe", help="a recipe YAML file, or the name of a shipped recipe")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. federation.rounds=5")
    run.add_argument("--resume", action="store_true", help="continue the run in output_dir/name from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="delete an existing run directory of the same name first")
    run.set_defaults(func=cmd_run)

    recipes = commands.add_parser("recipes", help="list the shipped recipes")
    recipes.set_defaults(func=cmd_recipes)

    data = commands.add_parser("data", help="show how a recipe splits its data across clients")
    data.add_argument("recipe")
    data.add_argument("overrides", nargs="*")
    data.add_argument("--out", help="folder for the PNGs (default: output_dir/data-NAME)")
    data.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except UserError as error:
        print(f"fedssl: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedssl: interrupted; continue the run with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
