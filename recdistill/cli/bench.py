"""`recdistill bench NAME`: run the repo's benchmark scripts (each writes a results JSON and prints one JSON line).

    recdistill bench data [--quick]       # benchmarks/data_bench.py    -> benchmarks/results/data_gen-*.json
    recdistill bench signals [--quick]    # benchmarks/signals_bench.py -> benchmarks/results/signals-*.json
    recdistill bench all [--quick]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from recdistill.config import ROOT

BENCHES = {
    "data": [str(ROOT / "benchmarks" / "data_bench.py")],
    "signals": [str(ROOT / "benchmarks" / "signals_bench.py")],
}


def run_bench(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Run the named benchmark(s) in child processes, passing --quick through; first failure's code is returned."""
    names = list(BENCHES) if args.name == "all" else [args.name]
    missing = [script for name in names for script in BENCHES[name] if not Path(script).is_file()]
    if missing:  # an installed wheel ships configs/, not the benchmark scripts
        print(f"recdistill bench: {missing[0]} not found; the benchmarks run from a checkout of the repository",
              file=sys.stderr)
        return 2
    for name in names:
        cmd = [sys.executable, *BENCHES[name], *(["--quick"] if args.quick else [])]
        print(f"bench {name}: {' '.join(cmd)}", flush=True)
        code = subprocess.call(cmd, cwd=ROOT)
        if code:
            print(f"bench {name}: failed with exit code {code}", file=sys.stderr)
            return code
    return 0


def register(sub) -> None:  # noqa: ANN001 - argparse subparsers
    """Add `recdistill bench`."""
    p = sub.add_parser("bench", help="run benchmarks (results JSON under benchmarks/results)")
    p.add_argument("name", choices=[*BENCHES, "all"], help="which benchmark: data generation, the signal store, or all")
    p.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    p.set_defaults(func=run_bench)
