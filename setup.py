"""Ships the interpreter-startup trigger files at the root of site-packages.

The `.pth` import line (and its PEP 829 `.start` twin) is what makes the stock
`exo --inference-engine remote` command work: see exo_remote_engine/_startup.py.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

STARTUP_FILES = ("exo_remote_engine.pth", "exo_remote_engine.start")


class BuildPyWithStartupFiles(build_py):
    def run(self) -> None:
        super().run()
        for name in STARTUP_FILES:
            self.copy_file(str(Path("startup") / name), str(Path(self.build_lib) / name))


setup(cmdclass={"build_py": BuildPyWithStartupFiles})
