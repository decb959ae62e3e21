"""The `recdistill` command line.

    recdistill demo                       # the main job on the embedded default (what `make demo` runs)
    recdistill demo --set data.source=parquet --set data.path=DIR
    recdistill experiment --config configs/experiments/ablations.yaml   # one teacher, many students compared
    recdistill data export DIR            # write the synthetic world as Parquet (DESIGN §4 layout)
    recdistill signals inspect URI        # see `recdistill signals --help`
    recdistill bench data                 # data-generation throughput -> benchmarks/results/

Every subcommand takes --config FILE and repeatable --set KEY=VALUE; config errors exit with status 2 and a
message naming the key and its source.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from recdistill.config import ConfigError

#: Modules that contribute subcommands; each has `register(subparsers)` which sets `func` on its parsers.
SUBCOMMAND_MODULES = (
    "recdistill.experiment", "recdistill.data.cli", "recdistill.signals.cli", "recdistill.train.dryrun",
    "recdistill.bench",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all subcommands)."""
    parser = argparse.ArgumentParser(prog="recdistill", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
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
