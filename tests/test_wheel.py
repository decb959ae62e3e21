"""The built wheel works outside the checkout: `recdistill --help`, `recdistill config`, the shipped demo config.

The wheel is built from a copy of the sources (an in-tree build would leave build/ in the checkout) with this
venv's pip and setuptools, installed with --no-deps into a fresh venv that sees this venv's site-packages through a
.pth file (the dependencies, not recdistill: PYTHONPATH is cleared), and run from a directory outside the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# what the build reads; configs/ is copied into the package by setup.py
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "recdistill", "kernels", "configs")

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def _call(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run without PYTHONPATH (it would put a checkout's recdistill before the wheel's)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = _call(cmd, cwd, timeout)
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{tail}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(bin dir of a fresh venv with the wheel installed, its site-packages, an empty dir outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
          "."], cwd=src)
    wheel = next((tmp / "dist").glob("recdistill-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp)
    bin_dir = venv / "bin"
    site = Path(_run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=tmp).stdout.strip())
    # the dependencies come from this venv; recdistill itself must come from the wheel, so this venv's editable
    # recdistill (a .pth or finder pointing at a checkout) must not be picked up: the test checks __file__ below
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp)
    work = tmp / "elsewhere"
    work.mkdir()
    return bin_dir, site, work


def test_wheel_imports_the_installed_package(installed):
    bin_dir, site, work = installed
    out = _run([str(bin_dir / "python"), "-c", "import recdistill.config as c; print(c.__file__); print(c.ROOT)"],
               cwd=work).stdout.split()
    assert Path(out[0]).is_relative_to(site), f"recdistill imported from {out[0]}, not the wheel"
    assert Path(out[1]) == Path(out[0]).parent / "_shipped", "ROOT should be the shipped data inside the package"
    assert (Path(out[1]) / "configs" / "demo.yaml").is_file()
    assert (Path(out[1]) / "configs" / "deepspeed" / "zero2.json").is_file()


def test_wheel_help_and_config(installed):
    bin_dir, site, work = installed
    cli = str(bin_dir / "recdistill")
    help_text = _run([cli, "--help"], cwd=work).stdout
    for command in ("demo", "experiment", "stream", "teacher", "student", "baselines", "data", "signals", "config",
                    "bench"):
        assert command in help_text
    assert "--set" in _run([cli, "demo", "--help"], cwd=work).stdout
    bench = _call([cli, "bench", "data", "--quick"], cwd=work)
    assert bench.returncode == 2 and "checkout" in bench.stderr  # the benchmark scripts are not in the wheel
    defaults = _run([cli, "config"], cwd=work).stdout
    assert "teacher:" in defaults and "  # " in defaults  # sections with their field descriptions
    demo = site / "recdistill" / "_shipped" / "configs" / "demo.yaml"
    shown = yaml.safe_load(_run([cli, "config", "--config", str(demo), "--yaml"], cwd=work).stdout)
    # the demo's own values (it differs from the defaults here) come through the resolved config
    assert shown["data"]["samples_per_day"] == yaml.safe_load(demo.read_text())["data"]["samples_per_day"]
