"""Build hook: ship the top-level configs/ inside the package, so an installed wheel runs `recdistill demo`.

configs/ stays the one source (no copy is committed); the wheel gets it as recdistill/_shipped/configs/, where
recdistill.config.ROOT points when there is no checkout around the package. Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithConfigs(build_py):
    """build_py that also copies configs/**/*.yaml|json into <build_lib>/recdistill/_shipped/configs."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads configs/ of the checkout itself
            return
        dest = Path(self.build_lib) / "recdistill" / "_shipped" / "configs"
        for src in sorted((HERE / "configs").rglob("*")):
            if src.suffix in {".yaml", ".json"}:
                target = dest / src.relative_to(HERE / "configs")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)


setup(cmdclass={"build_py": BuildPyWithConfigs})
