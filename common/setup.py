"""Build shim for the SmartGas shared package (smartgas-common): metadata lives in pyproject.toml.

Kept so that ``python setup.py test`` runs this package's pytest suite, as the original lab did
(setuptools 72 removed its own ``test`` command, so the command is provided here).
"""

import subprocess
import sys
from typing import ClassVar

from setuptools import Command, setup


class PytestCommand(Command):
    """``python setup.py test``: run the pytest suite under tests/ and fail if it fails."""

    description = "run the package's pytest suite"
    user_options: ClassVar[list[tuple[str, str, str]]] = [("pytest-args=", "a", "extra arguments for pytest")]

    def initialize_options(self) -> None:
        self.pytest_args = ""

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        # A subprocess, not pytest.main(): the suite must import the installed package,
        # not modules half-loaded by setuptools.
        status = subprocess.call([sys.executable, "-m", "pytest", *self.pytest_args.split()])
        if status != 0:
            raise SystemExit(status)


setup(cmdclass={"test": PytestCommand})
