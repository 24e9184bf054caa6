"""The engine: batching, device, seeds and progress; it owns every forward pass of an audit.

Embeddings are the expensive part of every audit, so the engine computes them once per
(model fingerprint, data fingerprint, modality, variant, shard) and keeps them in memory and on
disk; it counts what it encoded (:meth:`Engine.accounting`). Task
outputs (logits) are cheap maps of the embeddings and are memoised per task fingerprint, so every
check of an audit reads the same clean outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, overload

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmsafe.engine.cache import TensorCache, stable_hash
from mmsafe.engine.variants import Variant
from mmsafe.methods.perturb import row_seed
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


COUNTERS: tuple[str, ...] = ("attack_iterations", "gradient_passes", "training_passes")
"""Passes the cache cannot serve, counted on their own lines of :meth:`Engine.accounting`."""
SHARD = 0
"""The shard index of every cache entry (a later layout stores outputs as several shards)."""


def _entry_key(*parts: Any, shard: int = SHARD) -> str:
    """The cache key of one entry: a hash of ``parts`` and the shard index, shard suffixed.

    The suffix keeps every shard of one entry side by side on disk (``<hash>-0000``).
    """
    return f"{stable_hash('embed', *parts, shard)}-{shard:04d}"


def _root_rows(data: Dataset, modality: str, rows: np.ndarray) -> tuple[Dataset, np.ndarray]:
    """The dataset ``data`` was cut from by ``Dataset.subset`` and ``rows`` as its positions.

    Follows the subset chain while the modality's column is still the parent's selection, so
    the test split, the calibration split and any subset of them share the root's cache entry
    (and a row is never encoded twice because two checks cut different subsets).
    """
    while True:
        origin = getattr(data, "_origin", None)  # set by Dataset.subset: (parent, rows, columns)
        if origin is None:
            return data, rows
        parent, raw, built = origin
        source, column = built.get(modality, (None, None))
        if column is not data.modalities.get(modality) or source is not parent.modalities.get(
            modality
        ):
            return data, rows
        rows = np.frombuffer(raw, dtype=np.int64)[rows]
        data = parent


def _batch_rows(batch: Any) -> int:
    """The number of rows of a preprocessed batch (a tensor or a dict of tensors)."""
    if isinstance(batch, dict):
        return max((_batch_rows(v) for v in batch.values()), default=0)
    return int(batch.shape[0]) if isinstance(batch, Tensor) and batch.ndim else 0


def _value_digest(value: Any) -> str:
    """A content digest of one raw value (an array, a tensor, a string or anything repr-able)."""
    h = hashlib.blake2b(digest_size=12)
    if isinstance(value, Tensor):
        value = value.detach().cpu().contiguous().numpy()
    if isinstance(value, np.ndarray):
        h.update(repr((value.shape, value.dtype.str)).encode())
        h.update(np.ascontiguousarray(value).view(np.uint8).reshape(-1).data)
    else:
        h.update(type(value).__name__.encode() + b"\x1f" + str(value).encode())
    return h.hexdigest()


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
    """Runs models over data in batches, caches what it computes and counts every pass.

    Every forward pass of an audit goes through :meth:`embed` (rows of a dataset) or
    :meth:`embed_values` (raw values: prompts, crops, views), clean or under a
    :class:`~mmsafe.engine.variants.Variant`. Results are cached in memory and on disk under
    (model fingerprint, data fingerprint or value digest, modality, variant key, shard index),
    so checks that ask for the same variant share it. Passes that cannot be cached (attack
    iterations, gradient passes, training passes) are counted with :meth:`count`;
    :meth:`accounting` reports the totals.

    Args:
        device: ``cpu``, ``cuda``, ``cuda:1`` or ``auto``.
        batch_size: rows per forward pass.
        cache_dir: folder for the on-disk embedding cache; ``None`` keeps it in memory.
        seed: seed set before each forward sweep, for determinism.
        progress: report progress: bars on a terminal, one line per stage otherwise.
        stream: where progress goes (``sys.stderr`` by default).
    """

    def __init__(
        self,
        device: str = "cpu",
        batch_size: int = 256,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        progress: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.seed = seed
        self.progress = progress
        self.stream = stream
        self.cache = TensorCache(None if cache_dir is None else Path(cache_dir) / "embeddings")
        self._outputs: dict[str, Outputs] = {}
        self._encoded: dict[str, int] = {}
        self._distinct: dict[str, set[tuple[Any, ...]]] = {}
        self._counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._in_forward = False

    # ------------------------------------------------------------------ accounting
    def count(self, name: str, n: int = 1) -> None:
        """Count ``n`` passes that the cache cannot serve (``attack_iterations`` etc.)."""
        if name not in COUNTERS:
            raise ValueError(f"unknown pass counter {name!r}; known: {', '.join(COUNTERS)}")
        self._counters[name] += int(n)

    @contextlib.contextmanager
    def counting(self, model: EncoderModel, name: str) -> Iterator[None]:
        """Count every row ``model.encode`` sees inside the block under ``name``.

        For passes the cache cannot serve (an attack's forward/backward steps, integrated
        gradients): wrap the code that calls ``model.encode`` directly. Passes made through
        the engine inside the block are counted as encoded rows, not twice.
        """
        self.count(name, 0)  # validates the name
        inner = model.encode

        def encode(batch: Any, *args: Any, **kwargs: Any) -> Any:
            if not self._in_forward:
                self.count(name, sum(_batch_rows(v) for v in batch.values()))
            return inner(batch, *args, **kwargs)

        shadowed = model.__dict__.get("encode")  # an outer block's wrapper, if any
        object.__setattr__(model, "encode", encode)
        try:
            yield
        finally:
            if shadowed is None:
                object.__delattr__(model, "encode")
            else:
                object.__setattr__(model, "encode", shadowed)

    def accounting(self) -> dict[str, Any]:
        """What went through the models: rows encoded vs distinct (row, variant) pairs.

        ``duplication`` is ``rows_encoded / distinct_row_variants`` (1.0 when nothing was
        encoded): how often the same row under the same variant was encoded again. Counts
        only, no timings, so the same audit gives the same accounting.
        """
        mods = {}
        for m in sorted(self._encoded):
            enc, distinct = self._encoded[m], len(self._distinct[m])
            mods[m] = {
                "rows_encoded": enc,
                "distinct_row_variants": distinct,
                "variants": len({k[1] for k in self._distinct[m]}),
                "duplication": round(enc / distinct, 4) if distinct else 1.0,
            }
        enc = sum(v["rows_encoded"] for v in mods.values())
        distinct = sum(v["distinct_row_variants"] for v in mods.values())
        return {
            "modalities": mods,
            "rows_encoded": enc,
            "distinct_row_variants": distinct,
            "duplication": round(enc / distinct, 4) if distinct else 1.0,
            **self._counters,
        }

    # ------------------------------------------------------------------ embeddings
    @overload
    def embed(
        self,
        model: EncoderModel,
        data: Dataset,
        modalities: str,
        *,
        variant: Variant | None = None,
        rows: Sequence[int] | np.ndarray | None = None,
        desc: str = "",
        data_fingerprint: str | None = None,
    ) -> Tensor: ...

    @overload
    def embed(
        self,
        model: EncoderModel,
        data: Dataset,
        modalities: Sequence[str] | None = None,
        *,
        variant: Variant | None = None,
        rows: Sequence[int] | np.ndarray | None = None,
        desc: str = "",
        data_fingerprint: str | None = None,
    ) -> dict[str, Tensor]: ...

    def embed(
        self,
        model: EncoderModel,
        data: Dataset,
        modalities: str | Sequence[str] | None = None,
        *,
        variant: Variant | None = None,
        rows: Sequence[int] | np.ndarray | None = None,
        desc: str = "",
        data_fingerprint: str | None = None,
    ) -> Tensor | dict[str, Tensor]:
        """Embeddings of ``data``'s rows, clean or under ``variant``, from the cache when known.

        Args:
            model: the encoder.
            data: the dataset.
            modalities: one modality (returns a tensor) or several (returns a dict);
                ``None``: all of ``data``'s.
            variant: the transform of the rows (``None``: clean).
            rows: positions in ``data`` (any order, repeats allowed); ``None``: every row.
                Only rows not cached yet are encoded.
            desc: a label for progress.
            data_fingerprint: ``data.fingerprint()`` when the caller has it.

        Returns:
            ``(len(rows), D)`` float32 CPU embeddings (per modality for a list).
        """
        data_fp = data_fingerprint or data.fingerprint()
        if isinstance(modalities, str):
            return self._embed_rows(model, data, modalities, variant, rows, data_fp, desc)
        return {
            m: self._embed_rows(model, data, m, variant, rows, data_fp, desc)
            for m in (modalities or data.modality_names)
        }

    def embed_values(
        self,
        model: EncoderModel,
        modality: str,
        values: Sequence[Any] | Tensor,
        desc: str = "",
        variant: Variant | None = None,
        preprocessed: bool = False,
    ) -> Tensor:
        """Embed raw values of one modality (prompts, crops, views); ``(N, D)`` float32, CPU.

        Cached and counted like :meth:`embed`, keyed by a digest of the values; a variant's
        row ``i`` draws from ``row_seed(variant.seed, i)``.

        Args:
            model: the encoder.
            modality: the values' modality.
            values: what ``model.preprocess(modality, ...)`` takes, or with ``preprocessed``
                an already preprocessed ``(N, ...)`` tensor (e.g. window crops at the model's
                input size).
            desc: a label for progress.
            variant: a transform of the values (``None``: as they are).
            preprocessed: ``values`` is a preprocessed tensor; ``model.preprocess`` is skipped.
        """
        if preprocessed:
            assert isinstance(values, Tensor)
            whole = _value_digest(values)
            idents = [("pixels", whole, i) for i in range(len(values))]
        else:
            digests = [_value_digest(v) for v in values]
            whole = stable_hash(digests)
            idents = [("value", d) for d in digests]
        vkey = None if variant is None else variant.key
        key = _entry_key("values", model.fingerprint(), whole, modality, vkey, preprocessed)
        hit = self.cache.get(key)
        if hit is None:
            seeds = (
                None if variant is None else [row_seed(variant.seed, i) for i in range(len(values))]
            )
            vals = values if preprocessed else list(values)
            emb = self._forward(model, modality, vals, variant, seeds, idents, desc, preprocessed)
            self.cache.put(key, {"embeddings": emb})
            hit = self.cache.get(key)
            assert hit is not None
        return hit["embeddings"].clone()  # the cached tensor stays untouched by the caller

    def _embed_rows(
        self,
        model: EncoderModel,
        data: Dataset,
        modality: str,
        variant: Variant | None,
        rows: Sequence[int] | np.ndarray | None,
        data_fp: str,
        desc: str,
    ) -> Tensor:
        n = len(data)
        want = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if want.size and (want.min() < 0 or want.max() >= n):
            raise IndexError(f"rows must lie in [0, {n}) for {data.name!r}")
        root, want = _root_rows(data, modality, want)
        if root is not data:  # a subset's rows are its parent's: one cache entry for both
            data, data_fp = root, root.fingerprint()
        vkey = None if variant is None else variant.key
        key = _entry_key("rows", model.fingerprint(), data_fp, modality, vkey)
        entry = self.cache.get(key)
        have = np.zeros(0, np.int64) if entry is None else entry["rows"].numpy()
        missing = np.setdiff1d(want, have)
        if missing.size:
            values = [data.modalities[modality][i] for i in missing]
            ids = [data.ids[i] for i in missing]
            seeds = None if variant is None else [row_seed(variant.seed, i) for i in ids]
            idents = [("row", data.source, i) for i in ids]
            label = desc or data.name
            emb = self._forward(model, modality, values, variant, seeds, idents, label)
            all_rows = np.concatenate([have, missing])
            all_emb = emb if entry is None else torch.cat([entry["embeddings"], emb])
            order = np.argsort(all_rows, kind="stable")
            entry = {
                "rows": torch.from_numpy(all_rows[order]),
                "embeddings": all_emb[torch.from_numpy(order)],
            }
            self.cache.put(key, entry)
            entry = self.cache.get(key)
        assert entry is not None
        at = np.searchsorted(entry["rows"].numpy(), want)
        return entry["embeddings"][torch.from_numpy(at)]

    def _forward(
        self,
        model: EncoderModel,
        modality: str,
        values: list[Any] | Tensor,
        variant: Variant | None,
        row_seeds: list[int] | None,
        identities: list[tuple[Any, ...]],
        desc: str,
        preprocessed: bool = False,
    ) -> Tensor:
        """Encode ``values`` in batches (the only place a model's forward pass runs)."""
        model = model.to(self.device).eval()
        set_seed(self.seed)
        label = f"embed {modality}" + (f" ({variant.label})" if variant else "")
        label += f" [{desc}]" if desc else ""
        chunks = []
        starts = range(0, len(values), self.batch_size)
        stream = self.stream or sys.stderr
        tty = bool(getattr(stream, "isatty", lambda: False)())
        bar = tqdm(
            starts,
            desc=label,
            unit="batch",
            leave=False,
            file=stream,
            disable=not (self.progress and tty) or len(starts) < 2,
        )
        self._in_forward = True
        with contextlib.ExitStack() as done, torch.inference_mode():
            done.callback(setattr, self, "_in_forward", False)
            for start in bar:
                stop = start + self.batch_size
                raw = values[start:stop]
                if variant is not None and variant.stage == "values":
                    assert row_seeds is not None
                    raw = variant.apply(raw, row_seeds[start:stop])
                batch = raw if preprocessed else model.preprocess(modality, raw)
                batch = to_device(batch, self.device)
                if variant is not None and variant.stage == "pixels":
                    assert row_seeds is not None
                    batch = variant.apply(batch, row_seeds[start:stop])
                if variant is not None and variant.stage == "model":
                    assert row_seeds is not None
                    with variant.apply(model, row_seeds[start:stop]):
                        emb = model.encode({modality: batch})[modality]
                else:
                    emb = model.encode({modality: batch})[modality]
                chunks.append(emb.float().cpu())
        if self.progress and not tty and len(values):
            stream.write(f"{label}: {len(values)} rows\n")
            stream.flush()
        fp = model.fingerprint()
        vkey = None if variant is None else variant.key
        self._encoded[modality] = self._encoded.get(modality, 0) + len(values)
        self._distinct.setdefault(modality, set()).update((fp, vkey, *i) for i in identities)
        if not chunks:
            return torch.zeros(0, getattr(model, "embed_dim", 0))
        return torch.cat(chunks)

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
