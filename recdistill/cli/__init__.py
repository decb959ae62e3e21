"""The `recdistill` command line.

    recdistill demo                       # the main job on the embedded default (what `make demo` runs)
    recdistill demo --set data.source=parquet --set data.path=DIR
    recdistill experiment --config configs/experiments/ablations.yaml   # one teacher, many students compared
    recdistill teacher --dry-run --config configs/teacher/7b.yaml   # size a teacher; without --dry-run: train it
    recdistill student --config configs/demo.yaml --set student.signals_uri=DIR   # one student on a signal store
    recdistill predict --model RUN/student_main_tower.pt2 --data DIR --out preds.parquet   # score with the export
    recdistill data export DIR            # write the synthetic world as Parquet (DESIGN §4 layout)
    recdistill signals inspect URI        # see `recdistill signals --help`
    recdistill config --config configs/demo.yaml   # the resolved config, every field described
    recdistill bench data                 # data-generation throughput -> benchmarks/results/

Every command is registered here, one module of this package each (`register(subparsers)` sets `func`).
Config-taking commands accept --config FILE and repeatable --set KEY=VALUE; config errors exit with status 2 and
a message naming the key and its source.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from recdistill.config import ConfigError

#: The commands, in help order: module `recdistill.cli.<name>` has `register(subparsers)`. Imported on use, so
#: `recdistill --help` stays fast and one command's heavy imports do not slow another.
COMMANDS = ("demo", "experiment", "teacher", "student", "predict", "data", "signals", "config", "bench")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all subcommands)."""
    parser = argparse.ArgumentParser(prog="recdistill", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    done: set[str] = set()
    for name in COMMANDS:
        module = "demo" if name == "experiment" else name  # demo.py registers both
        if module not in done:
            importlib.import_module(f"recdistill.cli.{module}").register(sub)
            done.add(module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `recdistill` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"recdistill {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
