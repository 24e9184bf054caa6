"""The engine: batching, device, seeds and progress, with clean outputs computed once.

Embeddings are the expensive part of every audit, so the engine computes them once per
(model fingerprint, data fingerprint, modality) and keeps them in memory and on disk. Task
outputs (logits) are cheap maps of the embeddings and are memoised per task fingerprint, so every
check of an audit reads the same clean outputs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmsafe.engine.cache import TensorCache, stable_hash
from mmsafe.models.base import Batch

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.models.base import EncoderModel
    from mmsafe.tasks.base import Outputs, Task


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class DeviceError(ValueError):
    """The asked-for device is not available."""


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; anything else is passed to ``torch.device``.

    Example:
        >>> resolve_device("cpu").type
        'cpu'
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but torch sees no CUDA device. Use cpu.")
    return dev


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move a tensor, or every tensor of a dict, to ``device``."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


class Engine:
    """Runs models over data in batches and caches what it computes.

    Args:
        device: ``cpu``, ``cuda``, ``cuda:1`` or ``auto``.
        batch_size: rows per forward pass.
        cache_dir: folder for the on-disk embedding cache; ``None`` keeps it in memory.
        seed: seed set before each forward sweep, for determinism.
        progress: show progress bars.
    """

    def __init__(
        self,
        device: str = "cpu",
        batch_size: int = 256,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.seed = seed
        self.progress = progress
        self.cache = TensorCache(None if cache_dir is None else Path(cache_dir) / "embeddings")
        self._outputs: dict[str, Outputs] = {}
        self.forward_batches = 0  # how many batches went through a model (for tests and bench)

    # ------------------------------------------------------------------ embeddings
    def embed_values(
        self, model: EncoderModel, modality: str, values: Sequence[Any], desc: str = ""
    ) -> Tensor:
        """Embed raw values of one modality, batched; ``(N, D)`` float32 on the CPU."""
        model = model.to(self.device).eval()
        set_seed(self.seed)
        chunks = []
        starts = range(0, len(values), self.batch_size)
        bar = tqdm(
            starts,
            desc=f"embed {modality}" + (f" ({desc})" if desc else ""),
            unit="batch",
            leave=False,
            disable=not self.progress or len(starts) < 2,
        )
        with torch.inference_mode():
            for start in bar:
                batch = model.preprocess(modality, values[start : start + self.batch_size])
                emb = model.encode({modality: to_device(batch, self.device)})[modality]
                chunks.append(emb.float().cpu())
                self.forward_batches += 1
        if not chunks:
            return torch.zeros(0, getattr(model, "embed_dim", 0))
        return torch.cat(chunks)

    def embed(
        self,
        model: EncoderModel,
        data: Dataset,
        modalities: Sequence[str] | None = None,
        desc: str = "",
        data_fingerprint: str | None = None,
    ) -> dict[str, Tensor]:
        """Embeddings of ``data`` per modality, from the cache when they were computed before."""
        data_fp = data_fingerprint or data.fingerprint()
        out: dict[str, Tensor] = {}
        for m in modalities or data.modality_names:
            key = stable_hash("embed", model.fingerprint(), data_fp, m)
            hit = self.cache.get(key)
            if hit is None:
                emb = self.embed_values(model, m, data.modalities[m], desc=desc or data.name)
                self.cache.put(key, {"embeddings": emb})
                hit = self.cache.get(key)
            assert hit is not None
            out[m] = hit["embeddings"]
        return out

    # ------------------------------------------------------------------ task outputs
    def outputs(self, model: EncoderModel, task: Task, data: Dataset) -> Outputs:
        """The task's clean outputs on ``data``, computed once per (model, data, task)."""
        data_fp = data.fingerprint()
        key = stable_hash("outputs", model.fingerprint(), data_fp, task.fingerprint())
        if key not in self._outputs:
            task.check_data(data)
            emb = self.embed(model, data, task.modalities, data_fingerprint=data_fp)
            self._outputs[key] = task.outputs(emb, data)
        return self._outputs[key]
