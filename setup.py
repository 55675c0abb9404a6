"""Build step: the demo's policies ship inside the package, so an installed `fedgate demo` runs.

policies/ stays the one copy in the repository (the demo, the tests and the policy guide read
it). Building the package copies the demo's files into gateway/resources/demo_policies/, where
gateway/demo.py looks when it does not run from a checkout. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEMO_POLICY_FILES = ("model.conf", "hospital.csv", "insurer.csv", "lab.csv")


class BuildWithDemoPolicies(build_py):
    """build_py, then the demo's policies into the built package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install runs from the checkout, which has policies/
        target = Path(self.build_lib) / "gateway" / "resources" / "demo_policies"
        target.mkdir(parents=True, exist_ok=True)
        for name in DEMO_POLICY_FILES:
            shutil.copyfile(ROOT / "policies" / name, target / name)


setup(cmdclass={"build_py": BuildWithDemoPolicies})
