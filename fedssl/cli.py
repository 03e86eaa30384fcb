"""The `fedssl` command line: run | config | recipes | data | sweep | compare | personalize | predict."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

from fedssl import __version__
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
    # On a terminal, descriptions wrap under themselves; piped, one line a recipe (for grep).
    columns = shutil.get_terminal_size().columns if sys.stdout.isatty() else 0
    for path in recipes:
        description = recipe_description(path)
        if columns > width + 20:
            description = ("\n" + " " * (width + 2)).join(textwrap.wrap(description, columns - width - 2))
        print(f"{path.stem:<{width}}  {description}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from fedssl.config.load import load_recipe, to_yaml

    print(to_yaml(load_recipe(args.recipe, args.overrides)), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from fedssl.launch import finished_summary, launch_resolved, resolve

    cfg = resolve(args.recipe, args.overrides, args.name_from)
    run_dir = Path(cfg.output_dir) / cfg.name
    summary = finished_summary(cfg, run_dir) if args.resume else None
    if summary is not None:  # nothing to train: say so rather than evaluate it again
        rounds = cfg.federation.rounds
        print(f"{cfg.name}: already complete (round {rounds} of {rounds} done); nothing to resume, "
              "its run directory is left as it was")
    else:
        summary = launch_resolved(cfg, args.resume, args.overwrite)
    print(summary_line(cfg.name, summary, run_dir))
    return 0


def summary_line(name: str, summary: dict, run_dir: Path) -> str:
    """The line `fedssl run` ends with, from a summary just computed or read back
    from summary.json (where a NaN was written as null)."""
    def value(key: str, digits: int = 4) -> str:
        number = summary.get(key)
        return f"{number:.{digits}f}" if isinstance(number, (int, float)) else "nan"

    return (f"{name}: global_acc {value('global_acc')}, global_f1_macro {value('global_f1_macro')}, "
            f"client_acc_mean {value('client_acc_mean')} "
            f"after {summary.get('rounds')} rounds in {value('seconds', 1)}s; run directory {run_dir}")


def cmd_sweep(args: argparse.Namespace) -> int:
    import yaml

    from fedssl.config.load import load_recipe
    from fedssl.io import atomic_write_text
    from fedssl.launch import complete
    from fedssl.sweep import check_sweep_name, grid, parse_param, seed_values, wandb_sweep_config

    if not args.param:
        raise UserError("sweep: give at least one --param key=value1,value2")
    params = [parse_param(text) for text in args.param]
    base = load_recipe(args.recipe, args.overrides)
    sweep_name = check_sweep_name(args.name, base.name)
    seeds = seed_values(base.seed, args.seeds)
    recipe = args.recipe  # as the user gave it: the W&B agent resolves it where it runs
    name_from = [p.key for p in params] + ["seed"]

    if args.runs is not None and args.runs < 1:
        raise UserError(f"--runs: must be at least 1, got {args.runs}")
    if args.local and args.method != "grid":
        raise UserError(f"sweep: --local runs a grid; a {args.method} sweep is drawn by a W&B agent (drop --local)")
    config = wandb_sweep_config(recipe, sweep_name, params, seeds, args.overrides, args.method, args.runs)
    config_path = Path(base.output_dir) / f"{sweep_name}.sweep.yaml"
    atomic_write_text(config_path, yaml.safe_dump(config, sort_keys=False))
    if args.method != "grid":
        cap = f"at most {args.runs} runs" if args.runs else "runs until you stop the agent (cap them with --runs N)"
        print(f"wrote the W&B {args.method} sweep configuration {config_path} ({cap})")
        print(f"start it with: wandb sweep {config_path}  (then run the 'wandb agent ...' it prints)")
        return 0
    grid_overrides = [[*args.overrides, *combo, f"logging.wandb.group={sweep_name}"] for combo in grid(params, seeds)]
    print(f"wrote the W&B sweep configuration {config_path} ({len(grid_overrides)} runs)")
    if not args.local:
        print(f"start it with: wandb sweep {config_path}  (then run the 'wandb agent ...' it prints)")
        print(f"or run the grid here, one run after another: fedssl sweep {args.recipe} ... --local")
        return 0
    for overrides in grid_overrides:
        run_dir, kept = complete(recipe, overrides, name_from)
        print(f"{run_dir.name}: finished before, kept" if kept else f"{run_dir.name}: finished")
    print(f"compare them with: fedssl compare --group {sweep_name} --runs-root {base.output_dir}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedssl.extras import require
    from fedssl.io import atomic_write_text, ensure_dir
    from fedssl.tracking.compare import check_axis, comparison_table, group_variants, plot_curves, rank_variants
    from fedssl.tracking.runs import find_group, read_run_dir, read_wandb_group

    if not args.run_dirs and not args.group:
        raise UserError("compare: give run directories, or --group NAME")
    if args.wandb and not args.group:
        raise UserError("compare: --wandb needs --group NAME")
    require("matplotlib", "plots", "fedssl compare (its plot)")
    if args.wandb:
        records = read_wandb_group(args.wandb, args.group)
    else:
        run_dirs = [Path(d) for d in args.run_dirs] or find_group(Path(args.runs_root), args.group)
        records = [read_run_dir(d) for d in run_dirs]
    variants = rank_variants(group_variants(records), args.metric)
    check_axis(variants, args.x)  # before anything is written
    table = comparison_table(variants, args.metric)
    out = ensure_dir(Path(args.out), "--out")
    atomic_write_text(out / "comparison.md", table + "\n")
    plot_curves(variants, out / f"{args.metric}.png", metric=args.metric, x=args.x)
    print(table)
    print(f"wrote {out / 'comparison.md'} and {out / (args.metric + '.png')}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from fedssl.config.load import load_recipe
    from fedssl.data.federated import build_federated_data
    from fedssl.data.report import client_table, plot_class_samples, plot_partition_heatmap
    from fedssl.data.sources import load_source
    from fedssl.io import ensure_dir
    from fedssl.tracking.wandb_run import log_data_images

    cfg = load_recipe(args.recipe, args.overrides)
    fed = build_federated_data(load_source(cfg.data), cfg.data, cfg.federation.clients, cfg.seed)
    print(client_table(fed))
    out = ensure_dir(Path(args.out) if args.out else Path(cfg.output_dir) / f"data-{cfg.name}", "--out")
    plot_partition_heatmap(fed, out / "partition.png")
    plot_class_samples(fed.pool, out / "samples.png", seed=cfg.seed)
    print(f"wrote {out / 'partition.png'} and {out / 'samples.png'}")
    if log_data_images(cfg, out, {"partition": out / "partition.png", "samples": out / "samples.png"}):
        print(f"logged them to W&B (logging.wandb.mode={cfg.logging.wandb.mode}, under {out / 'wandb'})")
    return 0


def cmd_personalize(args: argparse.Namespace) -> int:
    from fedssl.io import check_dir_target
    from fedssl.personalize import FineTuneOptions, personalize
    from fedssl.run_dir import is_run_dir
    from fedssl.run_lock import hold_run_dir

    # Lightning's device banner ("GPU available: False ...") tells a CPU fine-tuning nothing.
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    options = FineTuneOptions(
        mode=args.mode, epochs=args.epochs, patience=args.patience, steps=args.steps, lr=args.lr,
        batch_size=args.batch_size, holdout=args.holdout, augment=args.augment, seed=args.seed,
        skip_bad=args.skip_bad, progress=not args.no_progress, accelerator=args.accelerator,
    )
    if args.out:
        check_dir_target(Path(args.out), "--out")  # before the fine-tuning, not after it
    # the default --out is RUN/personalized-MODE: writing into a run directory takes its lock
    run_dir = (Path(args.run).parent if Path(args.run).is_file() else Path(args.run)).resolve()
    into_run = is_run_dir(run_dir) and (not args.out or Path(args.out).resolve().is_relative_to(run_dir))
    with hold_run_dir(run_dir, hint="pass --out elsewhere") if into_run else nullcontext():
        personalize(args.run, args.data, options, out_dir=args.out, export_format=args.format)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fedssl.export import load_exported

    model = load_exported(args.model, trust_code=args.trust_model_code)
    images = model.read_images(args.images)  # every file is checked before anything is printed
    for path, prediction in zip(args.images, model.predict(images)):
        print(f"{path}\t{prediction.label}\t{prediction.confidence:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedssl", description="Semi-supervised and personalized federated learning.")
    parser.add_argument("--version", action="version", version=f"fedssl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train a recipe across simulated clients",
                              epilog="fedssl recipes lists the shipped recipes; fedssl config RECIPE [key=value ...] "
                                     "prints one fully resolved; docs/recipe-reference.md gives every key, its default "
                                     "and its meaning.")
    run.add_argument("recipe", help="a recipe YAML file, or the name of a shipped recipe")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. federation.rounds=5")
    run.add_argument("--resume", action="store_true", help="continue the run in output_dir/name from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="delete an existing run directory of the same name first")
    run.add_argument("--name-from", type=lambda text: text.split(","), default=[], metavar="KEY,...",
                     help="append these keys' values to the run name (as sweeps do)")
    run.set_defaults(func=cmd_run)

    config = commands.add_parser("config", help="print a recipe fully resolved (its bases, defaults and overrides) as YAML")
    config.add_argument("recipe", help="a recipe YAML file, or the name of a shipped recipe")
    config.add_argument("overrides", nargs="*", help="key=value overrides, e.g. federation.rounds=5")
    config.set_defaults(func=cmd_config)

    recipes = commands.add_parser("recipes", help="list the shipped recipes")
    recipes.set_defaults(func=cmd_recipes)

    sweep = commands.add_parser("sweep", help="a W&B sweep configuration (grid, random or bayes), "
                                              "or a grid run here with --local")
    sweep.add_argument("recipe")
    sweep.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    sweep.add_argument("--param", action="append", default=[],
                       help="key=value1,value2,... (repeatable; the grid is their product); random and bayes also "
                            "take key=MIN..MAX or key=log:MIN..MAX")
    sweep.add_argument("--method", default="grid", choices=("grid", "random", "bayes"),
                       help="W&B's sweep method: grid (default; --local runs it here), random or bayes (a W&B agent)")
    sweep.add_argument("--runs", type=int, help="random/bayes: the most runs the agent draws (W&B's run_cap)")
    sweep.add_argument("--seeds", type=int, default=1, help="seeds per combination: the recipe's seed, seed+1, ...")
    sweep.add_argument("--name", help="the sweep's name and W&B group (default: NAME-sweep)")
    sweep.add_argument("--local", action="store_true", help="run the grid here, sequentially, without a W&B agent")
    sweep.set_defaults(func=cmd_sweep)

    compare = commands.add_parser("compare", help="a table and plot comparing finished runs, averaged over seeds")
    compare.add_argument("run_dirs", nargs="*", help="run directories")
    compare.add_argument("--group", help="every finished run of this W&B group (under --runs-root, or in --wandb)")
    compare.add_argument("--runs-root", default="runs", help="where to look for the group's run directories")
    compare.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the group from this W&B project (online)")
    compare.add_argument("--metric", default="global_acc",
                         help="the metric that ranks the variants and is plotted against round (any metric in the "
                              "runs' summary.json, e.g. global_f1_macro or global_recall/disgust)")
    compare.add_argument("--x", default="round", choices=("round", "sim_time"),
                         help="the plot's x axis: round, or sim_time (simulated seconds, federation.system)")
    compare.add_argument("--out", default="comparison", help="folder for comparison.md and the PNG")
    compare.set_defaults(func=cmd_compare)

    data = commands.add_parser("data", help="show how a recipe splits its data across clients")
    data.add_argument("recipe")
    data.add_argument("overrides", nargs="*")
    data.add_argument("--out", help="folder for the PNGs (default: output_dir/data-NAME)")
    data.set_defaults(func=cmd_data)

    personal = commands.add_parser("personalize", help="fine-tune a run's model on your labeled images and export it")
    personal.add_argument("run", help="a run directory, or its checkpoint.pt")
    personal.add_argument("--data", required=True, help="a folder of class subfolders, or a FER2013-style CSV")
    personal.add_argument("--mode", default="head",
                          help="head: the classifier only (default); full: every layer; maml: --steps SGD steps on every layer")
    personal.add_argument("--out", help="folder for the model, personalize.json and logs (default: RUN/personalized-MODE)")
    personal.add_argument("--format", default="safetensors",
                          help="safetensors (default: model.safetensors + model.json, data only), onnx (needs the "
                               "onnx extra), pt2 (torch.export) or torchscript; pt2 and torchscript are programs "
                               "that predict loads only with --trust-model-code")
    personal.add_argument("--epochs", type=int, default=20, help="head/full: at most this many epochs")
    personal.add_argument("--patience", type=int, default=3, help="head/full: stop after this many epochs without a lower held-out loss")
    personal.add_argument("--steps", type=int, default=5, help="maml: adaptation steps")
    personal.add_argument("--lr", type=float, help="learning rate (maml: the inner lr; default: the recipe's train.lr)")
    personal.add_argument("--batch-size", type=int, help="default: the recipe's train.batch_size")
    personal.add_argument("--holdout", type=float, default=0.2, help="share held out for evaluation when the data has no test split")
    personal.add_argument("--augment", help="none | weak | strong (default: the recipe's data.augment)")
    personal.add_argument("--seed", type=int, help="default: the recipe's seed")
    personal.add_argument("--skip-bad", action="store_true", help="skip unreadable images and bad CSV rows, and count them")
    personal.add_argument("--no-progress", action="store_true", help="no progress bar")
    personal.add_argument("--accelerator", default="auto",
                          help="auto (default: a CUDA GPU where there is one), cpu or cuda; the exported model runs anywhere")
    personal.set_defaults(func=cmd_personalize)

    predict = commands.add_parser("predict", help="label images with a model exported by fedssl personalize")
    predict.add_argument("model", help="an export folder or its model.safetensors or model.json; model.onnx (needs "
                                       "onnxruntime); model.pt2 or model.pt (with --trust-model-code)")
    predict.add_argument("images", nargs="+", help="image files; one line each: path, label, confidence")
    predict.add_argument("--trust-model-code", action="store_true",
                         help="load a model.pt2 or model.pt, programs that can run any code when loaded: only for "
                              "a file you trust as you would a script")
    predict.set_defaults(func=cmd_predict)
    return parser


def configure_logging() -> None:
    """fedssl's own INFO lines; other libraries' (Flower, Ray, alembic, Lightning) only
    from WARNING up. A filter on the handler, because a library's records reach it
    through propagation whatever the root logger's level."""
    handler = logging.StreamHandler()
    handler.addFilter(lambda record: record.levelno >= logging.WARNING or record.name.startswith("fedssl"))
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow the flags (`run R --resume a.b=1`)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    configure_logging()
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a reader that went away is handled, not at exit
        return code
    except UserError as error:
        print(f"fedssl: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`fedssl recipes | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail too
        return 141  # as a shell reports a process ended by SIGPIPE
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a full disk is never a bug, wherever a write met it (a log line, W&B's files)
        print(f"fedssl: error: {error.filename or 'writing'}: disk full ({error.strerror}); free some space "
              "and try again (a run continues with --resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedssl: interrupted; continue the run with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
