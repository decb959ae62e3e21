"""Process settings of the entry points (recdistill/runtime.py): the allocator thresholds and the op cache."""

import subprocess
import sys

import pytest

from recdistill.runtime import extensions_dir, tune_allocator

_GLIBC = sys.platform == "linux" and "glibc" in " ".join(__import__("platform").libc_ver())


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
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert extensions_dir() == __import__("pathlib").Path(sys.prefix) / "torch_extensions"
    code = ("import os; from recdistill.runtime import prepare_process; prepare_process(); "
            "import subprocess, sys; print(subprocess.run([sys.executable, '-c', "
            "'import os; print(os.environ[\"TORCH_EXTENSIONS_DIR\"])'], capture_output=True, text=True).stdout)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(extensions_dir())
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    assert str(extensions_dir()) == "/somewhere/else"
