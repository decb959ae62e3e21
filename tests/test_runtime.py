"""Process settings of the entry points (recdistill/runtime.py): the allocator thresholds, the op cache, threads."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recdistill.runtime import extensions_dir, intra_op_threads, prepare_process, tune_allocator

_GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _GLIBC, reason="mallopt thresholds exist in glibc only")
def test_allocator_is_tuned_unless_the_user_chose(monkeypatch):
    for k in ("RECDISTILL_MALLOC", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
              "GLIBC_TUNABLES"):
        monkeypatch.delenv(k, raising=False)
    assert tune_allocator() is True  # glibc accepted both values (mallopt returns 0 for one it refuses)
    monkeypatch.setenv("RECDISTILL_MALLOC", "default")
    assert tune_allocator() is False
    monkeypatch.delenv("RECDISTILL_MALLOC")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the user's own setting stands
    assert tune_allocator() is False


def test_op_cache_is_inside_the_environment_and_exported_to_children(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)  # restored (absent or not) after the test
    assert extensions_dir() == Path(sys.prefix) / "torch_extensions"
    prepare_process()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['TORCH_EXTENSIONS_DIR'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert child == str(extensions_dir())
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    assert str(extensions_dir()) == "/somewhere/else"


def test_intra_op_threads_are_restored_even_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), intra_op_threads(before + 1):
        assert torch.get_num_threads() == before + 1
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before
