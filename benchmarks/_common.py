"""What every benchmark script shares: the machine's name and where its result JSON goes."""

from __future__ import annotations

import json
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def result_path(bench: str, quick: bool) -> Path:
    """results/<bench>-<cpu>[-quick].json: where this machine's result of `bench` goes."""
    name = cpu_name().lower().replace("(r)", "").replace("(tm)", "").replace(" ", "-")[:40]
    return RESULTS / f"{bench}-{name}{'-quick' if quick else ''}.json"


def write_result(bench: str, res: dict, quick: bool, out: str | None = None) -> Path:
    """Write `res` to out, or to results/<bench>-<cpu>[-quick].json; returns the path."""
    path = Path(out) if out else result_path(bench, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    return path
