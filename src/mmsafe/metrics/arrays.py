"""Array conversion shared by the metric modules (no other mmsafe import: no circles)."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_numpy(x: Any, name: str) -> np.ndarray:
    """Convert an array-like (numpy, list, CPU/GPU torch tensor) to a numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`{name}` could not be converted to a numpy array: {exc}") from exc
