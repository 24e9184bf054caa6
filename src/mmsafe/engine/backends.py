"""Backends: where the engine's missing shards are computed, by name.

``local`` (the default) is the engine's own process. ``ray`` fans shards out to a Ray cluster's
actors (:mod:`mmsafe.engine.ray_backend`); Ray is an extra, and asking for it without Ray
installed is a user error that says how to install it.

Example:
    >>> create_backend("local", None) is None
    True
    >>> create_backend("spark", None)
    Traceback (most recent call last):
    ...
    mmsafe.engine.backends.BackendError: unknown --backend 'spark'; choose local or ray
"""

from __future__ import annotations

import importlib.util

from mmsafe.engine.runner import Backend

BACKENDS: tuple[str, ...] = ("local", "ray")

RAY_INSTALL = "pip install 'mmsafe[ray]' (Ray Data: ray[data]==2.55.1)"


class BackendError(ValueError):
    """An unknown backend, or one whose library is not installed."""


def create_backend(name: str, workers: int | None) -> Backend | None:
    """The backend called ``name``; ``None`` for ``local`` (the engine's own process).

    Args:
        name: ``local`` or ``ray``.
        workers: the Ray workers (actors); ``None``: 2.

    Raises:
        BackendError: an unknown name, or ``ray`` without Ray Data installed.
    """
    if name == "local":
        return None
    if name != "ray":
        raise BackendError(f"unknown --backend {name!r}; choose {' or '.join(BACKENDS)}")
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None:
        raise BackendError(f"--backend ray needs Ray Data, which is not installed: {RAY_INSTALL}")
    from mmsafe.engine.ray_backend import RayBackend

    return RayBackend(workers=2 if workers is None else workers)
