"""A finished run's per-class table: test images, precision, recall and F1 of each
class, and the macro average, from the confusion matrix in its summary.json.

    python tools/class_report.py RUN_DIR            # print the markdown table
    python tools/class_report.py RUN_DIR --png OUT  # and copy its confusion_matrix.png to OUT

The numbers are those the run reported (`global_f1_macro`, `global_recall/<class>`):
the table recomputes nothing the run did not measure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from fedssl.evaluation.class_metrics import f1_macro, f1_per_class, precision_per_class, recall_per_class
from fedssl.run_dir import CONFUSION_PNG, SUMMARY


def class_table(summary: dict) -> str:
    confusion = np.array(summary["global_confusion"])
    columns = zip(summary["class_names"], confusion.sum(axis=1), precision_per_class(confusion),
                  recall_per_class(confusion), f1_per_class(confusion))
    lines = ["| class | test images | precision | recall | F1 |", "| --- | ---: | ---: | ---: | ---: |"]
    cell = lambda value: "—" if np.isnan(value) else f"{value:.3f}"  # noqa: E731
    lines += [f"| {name} | {count} | {cell(p)} | {cell(r)} | {cell(f)} |" for name, count, p, r, f in columns]
    lines.append(f"| **macro average** | {confusion.sum()} | {cell(np.nanmean(precision_per_class(confusion)))} | "
                 f"{cell(np.nanmean(recall_per_class(confusion)))} | **{f1_macro(confusion):.3f}** |")
    lines.append(f"\naccuracy {summary['global_acc']:.3f}, macro-F1 {summary['global_f1_macro']:.3f} "
                 f"after {summary['rounds']} rounds ({summary['name']}, {summary['algorithm']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--png", type=Path, help="copy the run's confusion matrix image here")
    args = parser.parse_args(argv)
    summary = json.loads((args.run_dir / SUMMARY).read_text())
    if "global_confusion" not in summary:
        print(f"{args.run_dir / SUMMARY}: no confusion matrix (a run from before fedssl recorded one)", file=sys.stderr)
        return 2
    print(class_table(summary))
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.run_dir / CONFUSION_PNG, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
