"""Process-wide settings the entry points apply once at start (the `recdistill` CLI, each teacher rank, each rank of
the streaming phase): :func:`prepare_process`; and the process's share of the machine: :func:`usable_cores`,
:func:`intra_op_threads`.

DeepSpeed's JIT-built ops (on CPU: the shared-memory comm op every engine loads, 30-40 s of g++ on the 2-core box)
are cached in TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions, one cache for every Python environment
of the user: an op built by another virtualenv is rebuilt, and then that environment rebuilds it again. Here the
default is a directory inside this environment, and `launch/setup.sh` builds the op there (:func:`build_ops`), so
a first `recdistill demo` does not pay for it.

glibc's allocator: by default it returns freed memory to the OS as soon as the top of the heap holds more than a
dynamic threshold, and serves blocks above another dynamic threshold with their own mmap. A training step allocates
and frees the same large activations every step, so each step paid page faults and zeroing for memory it had just
given back (seen as 25-32% system time in the teacher ranks). Fixing both thresholds keeps that memory in the
process: the teacher trains about 20% more steps per second on the 2-core box (docs/LOG.md, 2026-12-03); the price
is that a process keeps up to TRIM_THRESHOLD of freed heap instead of returning it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Blocks this large and larger get their own mmap (glibc refuses more than 32 MiB on 64-bit: HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of the heap above this is given back to the OS.
TRIM_THRESHOLD = 512 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_allocator() -> bool:
    """Fix glibc's trim and mmap thresholds for this process (module docstring). Does nothing, and returns False,
    off glibc, where the user set the allocator through MALLOC_*_ or GLIBC_TUNABLES, or with
    RECDISTILL_MALLOC=default."""
    if os.environ.get("RECDISTILL_MALLOC", "") == "default":
        return False
    if any(k in os.environ for k in _USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # the user's own choice stands
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl, macOS: leave the allocator alone)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, e.g. under taskset or a cgroup)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block (process-wide), the previous number restored after."""
    import torch  # here: `recdistill --help` imports this module and should not pay for torch

    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def extensions_dir() -> Path:
    """Where JIT-built torch / DeepSpeed ops are cached: TORCH_EXTENSIONS_DIR if set, else <sys.prefix>/torch_extensions
    (inside the virtualenv)."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(sys.prefix) / "torch_extensions")


def prepare_process() -> None:
    """What every entry point does first: the allocator settings and the per-environment op cache (exported, so the
    ranks a launcher starts inherit it)."""
    tune_allocator()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))


def build_ops() -> list[str]:
    """Build (or find already built) the DeepSpeed ops a CPU teacher loads, into :func:`extensions_dir`; returns
    their names; none on a CUDA machine (DeepSpeed's CUDA accelerator does not load the CPU comm op)."""
    prepare_process()
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return []
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return []
    builder.load(verbose=False)
    return [builder.NAME]


if __name__ == "__main__":  # launch/setup.sh: python -m recdistill.runtime
    print(f"setup: DeepSpeed ops built in {extensions_dir()}: {', '.join(build_ops()) or 'none needed here'}")
