"""The `recdistill` command line.

    recdistill demo                       # the main job on the embedded default (what `make demo` runs)
    recdistill demo --set data.source=parquet --set data.path=DIR
    recdistill experiment --config configs/experiments/ablations.yaml   # one teacher, many students compared
    recdistill demo --streaming           # then the streaming phase: teacher, joiner, students on live streams
    recdistill stream --resume-from RUN   # the streaming phase of a batch run (stream.days set, one teacher process)
    recdistill teacher --dry-run --config configs/teacher/7b.yaml   # size a teacher; without --dry-run: train it
    recdistill student --config configs/demo.yaml --set student.signals_uri=DIR   # one student on a signal store
    recdistill baselines --config configs/demo.yaml --out DIR   # logistic regression + LightGBM alone, AUC/NE
    recdistill predict --model RUN/student_main_tower.pt2 --data DIR --out preds.parquet   # score with the export
    recdistill data export DIR            # write the synthetic world as Parquet (DESIGN §4 layout)
    recdistill signals inspect URI        # see `recdistill signals --help`
    recdistill config --config configs/demo.yaml   # the resolved config, every field described
    recdistill bench data                 # data-generation throughput -> benchmarks/results/

Every command is registered here, one module of this package each (`register(subparsers)` sets `func`).
Config-taking commands accept --config FILE and repeatable --set KEY=VALUE.

When something goes wrong, the project's own errors (recdistill/errors.py: config, data, signals, a failed
teacher, a run directory that cannot be used) reach the terminal as one line, ``recdistill COMMAND: <cause>;
fix: <fix>``, without a traceback; `recdistill --debug COMMAND ...` keeps the traceback. Exit status:

    0    ok
    1    unusable data or signal store, a failed run (e.g. the teacher: its log's path is in the message)
    2    bad config or arguments (the message names the key and where it came from)
    130  interrupted (Ctrl-C), also while the teacher's processes run
    141  stdout closed early (e.g. `recdistill config | head`): the rest of the output is dropped quietly
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from recdistill.errors import RecdistillError
from recdistill.runtime import prepare_process

#: The commands, in help order: module `recdistill.cli.<name>` has `register(subparsers)`. Imported on use, so
#: `recdistill --help` stays fast and one command's heavy imports do not slow another.
COMMANDS = ("demo", "experiment", "stream", "teacher", "student", "baselines", "predict", "data", "signals", "config",
            "bench")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all subcommands)."""
    parser = argparse.ArgumentParser(prog="recdistill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    done: set[str] = set()
    for name in COMMANDS:
        module = "demo" if name == "experiment" else name  # demo.py registers both
        if module not in done:
            importlib.import_module(f"recdistill.cli.{module}").register(sub)
            done.add(module)
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null: its reader is gone, and the interpreter's flush at exit would fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (a test's capture): nothing to flush
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `recdistill` console script; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    prepare_process()
    command = " ".join(filter(None, [args.command, getattr(args, f"{args.command}_command", None)]))
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe is met inside the try and not at interpreter exit
        return code
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"recdistill {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except RecdistillError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"recdistill {command}: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
