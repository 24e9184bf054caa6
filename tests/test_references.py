"""Every reference library the tests compare against imports, at the version they were checked on.

The tests import these libraries where they use them and fail (never skip) without them; this
file names each one, so a missing or mismatched reference fails loudly in one place.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import require

# import name -> distribution name
REFERENCES = {
    "mapie": "mapie",
    "torchattacks": "torchattacks",
    "opacus": "opacus",
    "fairlearn": "fairlearn",
    "torchmetrics": "torchmetrics",
    "sklearn": "scikit-learn",
    "captum": "captum",
    "peft": "peft",
    "flwr": "flwr",
    "ray": "ray",
    "transformers": "transformers",
}
TORCHATTACKS = "3.5.1"  # installed without its dependencies by the Makefile


def _pins() -> dict[str, Requirement]:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return {(r := Requirement(s)).name.lower(): r for s in reqs}


@pytest.mark.parametrize("module", sorted(REFERENCES))
def test_reference_library_imports_at_its_pinned_version(module: str) -> None:
    require(module)
    dist = REFERENCES[module]
    installed = version(dist)
    if dist == "torchattacks":
        assert installed == TORCHATTACKS, installed
        return
    pin = _pins().get(dist)  # ray comes through flwr[simulation]
    if pin is not None:
        assert pin.specifier.contains(installed, prereleases=True), (dist, installed, str(pin))


def test_a_missing_library_fails_with_how_to_install_it() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"no_such_reference_lib.*make test"):
        require("no_such_reference_lib")
    with pytest.raises(pytest.fail.Exception, match=r"--no-deps torchattacks==3.5.1"):
        require("torchattacks.no_such_submodule")
