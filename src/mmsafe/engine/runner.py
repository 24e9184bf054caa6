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
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TextIO, overload

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm.auto import tqdm

from mmsafe.data.columns import is_lazy
from mmsafe.engine.cache import TensorCache, stable_hash
from mmsafe.engine.variants import Variant
from mmsafe.methods.ood import pool_states
from mmsafe.methods.perturb import row_seed
from mmsafe.models.base import to_device

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.models.base import EncoderModel
    from mmsafe.tasks.base import Outputs, Task


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU, and CUDA when torch sees it).

    ``torch.manual_seed`` would also queue lazy seeding for CUDA, XPU and MTIA, recording a
    stack trace for each (milliseconds per call) even where none of them exists; the CPU
    generator plus CUDA or MPS when available is the same seeding for every device mmsafe runs on.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(seed)


def ready(model: Any, device: torch.device) -> Any:
    """``model`` on ``device`` in eval mode, moved or switched only when it is not already.

    ``model.to(device).eval()`` walks every module and tensor on each call (milliseconds for a
    small model, paid per forward sweep); a model already there is returned as it is.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()).train()
        >>> ready(net, torch.device("cpu")) is net, net.training, net[1].training
        (True, False, False)
    """
    first = next(iter(model.parameters()), None)
    if first is not None and first.device != device:
        model = model.to(device)
    if any(m.training for m in model.modules()):
        model.eval()
    return model


PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
"""The engine's inference precisions: full, or mixed (autocast) in bfloat16 / float16."""


class PrecisionError(ValueError):
    """An unknown precision (``--precision``)."""


COUNTERS: tuple[str, ...] = (
    "attack_iterations",
    "gradient_passes",
    "training_passes",
    "generation_requests",
    "generated_rows",
    "image_requests",
    "generated_images",
)
"""Counted on their own lines of :meth:`Engine.accounting`: passes the cache cannot serve, a
VLM's answers asked for (``generation_requests``) against those generated (``generated_rows``),
and a generator's images asked for (``image_requests``) against those drawn
(``generated_images``)."""
SHARD_ROWS = 16384
"""Rows per shard: a dataset's row ``i`` is stored in shard ``i // SHARD_ROWS`` of its entry."""


def _entry_key(*parts: Any, shard: int = 0) -> str:
    """The cache key of one shard of an entry: a hash of ``parts`` and the shard index.

    The ``-<shard>`` suffix keeps the shards of one entry side by side on disk (``<hash>-0000``).
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


class RowsJob(NamedTuple):
    """Embeddings of rows of one dataset: what a backend's worker needs to compute a shard.

    A worker calls ``Engine.embed(model, data, modality, variant=variant, rows=shard_rows)``
    on an engine of its own that shares the driver's cache folder; the shard it completes is
    written there atomically, under the same key the driver reads.
    """

    model: Any
    data: Dataset
    modality: str
    variant: Variant | None
    data_fp: str

    @property
    def vkey(self) -> str | None:
        """The variant's cache key (``None``: clean)."""
        return None if self.variant is None else self.variant.key

    def identities(self, rows: np.ndarray) -> list[tuple[Any, ...]]:
        """The pass-accounting identity of each row: ``("row", source, id)``."""
        return [("row", self.data.source, self.data.ids[i]) for i in rows]


class Backend(Protocol):
    """Where missing shards are computed when not in the engine's own process (e.g. Ray)."""

    name: str

    def fill(self, engine: Engine, job: RowsJob, todo: list[tuple[int, np.ndarray]]) -> None:
        """Compute rows ``missing`` of each ``(shard, missing)`` and store them in the cache."""


def _column_rows(column: Sequence[Any], rows: np.ndarray) -> Sequence[Any]:
    """Rows ``rows`` of a column: a lazy view (decoded later, in batches) or a list."""
    if is_lazy(column):
        return column.take(rows)  # type: ignore[attr-defined]
    return [column[i] for i in rows]


def _worker_context() -> str | None:
    """``fork`` where the platform has it: workers inherit the model and the column, unpickled."""
    import multiprocessing

    return "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def _gather(stored: dict[int, dict[str, Tensor] | None], want: np.ndarray) -> dict[str, Tensor]:
    """Rows ``want`` (positions, any order, repeats allowed) gathered from their shards."""
    entries = [stored[s] for s in sorted(stored)]
    assert all(e is not None for e in entries)
    rows = np.concatenate([e["rows"].numpy() for e in entries])  # type: ignore[index]
    at = torch.from_numpy(np.searchsorted(rows, want))
    names = [n for n in entries[0] if n != "rows"] if entries else []  # type: ignore[union-attr]
    if len(entries) == 1:
        return {n: entries[0][n][at] for n in names}  # type: ignore[index]
    return {n: torch.cat([e[n] for e in entries])[at] for n in names}  # type: ignore[index]


class _Batches(TorchDataset):
    """Batch ``k`` of ``values``, loaded, transformed and preprocessed, ready for the model.

    A map-style dataset that DataLoader workers index: lazy values are decoded here, then a
    ``values``-stage variant applies, then ``model.preprocess``.
    """

    def __init__(
        self,
        model: Any,
        modality: str,
        values: Sequence[Any] | Tensor,
        variant: Variant | None,
        row_seeds: list[int] | None,
        batch_size: int,
        preprocessed: bool = False,
    ) -> None:
        self.model, self.modality, self.values = model, modality, values
        self.variant, self.row_seeds = variant, row_seeds
        self.batch_size, self.preprocessed = batch_size, preprocessed

    def __len__(self) -> int:
        return -(-len(self.values) // self.batch_size)

    def __getitem__(self, k: int) -> Any:
        start, stop = k * self.batch_size, min((k + 1) * self.batch_size, len(self.values))
        if is_lazy(self.values):
            raw = self.values.load(np.arange(start, stop))  # type: ignore[union-attr]
        else:
            raw = self.values[start:stop]
        if self.variant is not None and self.variant.stage == "values":
            assert self.row_seeds is not None
            raw = self.variant.apply(raw, self.row_seeds[start:stop])
        return raw if self.preprocessed else self.model.preprocess(self.modality, raw)


class Engine:
    """Runs models over data in batches, caches what it computes and counts every pass.

    Every forward pass of an audit goes through :meth:`embed` (rows of a dataset) or
    :meth:`embed_values` (raw values: prompts, crops, views), clean or under a
    :class:`~mmsafe.engine.variants.Variant`, or :meth:`hidden_states` (a tower's intermediate
    states, e.g. feature maps). Results are cached in memory and on disk under
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
        workers: DataLoader worker processes that decode lazy columns (image files, large
            worlds) beside the forward passes; ``None``: half the CPUs, at least one; ``0``:
            decode in this process. Values already in memory never use workers.
        backend: computes missing shards of dataset rows elsewhere (e.g.
            :class:`~mmsafe.engine.ray_backend.RayBackend`); ``None``: in this process.
        precision: ``fp32``, or ``bf16`` / ``fp16`` for mixed precision (``torch.autocast``)
            in the engine's inference passes only: embeddings, variants and hidden states.
            Gradient passes (attacks, training) stay in full precision. Cached apart from
            full-precision results and recorded in the card's ``engine`` section.
    """

    def __init__(
        self,
        device: str = "cpu",
        batch_size: int = 256,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        progress: bool = True,
        stream: TextIO | None = None,
        workers: int | None = None,
        backend: Backend | None = None,
        precision: str = "fp32",
    ) -> None:
        if precision not in PRECISIONS:
            raise PrecisionError(f"--precision {precision!r}: choose {', '.join(PRECISIONS)}")
        if workers is not None and workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if backend is not None and cache_dir is None:
            raise ValueError(
                f"the {backend.name} backend's workers write shards to the on-disk cache: "
                "give the engine a cache_dir (--cache-dir)"
            )
        self.device = resolve_device(device)
        self.workers = workers
        self.backend = backend
        self.precision = precision
        self.batch_size = batch_size
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.seed = seed
        self.progress = progress
        self.stream = stream
        self.cache = TensorCache(None if cache_dir is None else Path(cache_dir) / "embeddings")
        self._outputs: dict[str, Outputs] = {}
        self._generated: dict[str, str] = {}
        self._images: dict[str, Tensor] = {}
        self._encoded: dict[str, int] = {}
        # modality -> (model fingerprint, variant key) -> hashes of the distinct rows encoded
        self._distinct: dict[str, dict[tuple[str, str | None], set[int]]] = {}
        self._counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._in_forward = False
        self._sweep_lines, self._last_label = True, ""

    @property
    def _precision_key(self) -> tuple[str, ...]:
        """Extra cache-key parts: none at full precision (keys stay as they were)."""
        return () if self.precision == "fp32" else (f"precision={self.precision}",)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision for an inference pass, or nothing at ``fp32``."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

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
            enc = self._encoded[m]
            distinct = sum(len(rows) for rows in self._distinct[m].values())
            mods[m] = {
                "rows_encoded": enc,
                "distinct_row_variants": distinct,
                "variants": len({vkey for _, vkey in self._distinct[m]}),
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
            **({} if self.precision == "fp32" else {"precision": self.precision}),
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
        key = _entry_key(
            "values", model.fingerprint(), whole, modality, vkey, preprocessed, *self._precision_key
        )
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
        data, want, data_fp = self._root(data, modality, rows, data_fp)
        vkey = None if variant is None else variant.key
        parts = ("rows", model.fingerprint(), data_fp, modality, vkey, *self._precision_key)

        job = RowsJob(model, data, modality, variant, data_fp)

        def encode(missing: np.ndarray) -> dict[str, Tensor]:
            values = _column_rows(data.modalities[modality], missing)
            ids = [data.ids[i] for i in missing]
            seeds = None if variant is None else [row_seed(variant.seed, i) for i in ids]
            idents = job.identities(missing)
            label = desc or data.name
            emb = self._forward(model, modality, values, variant, seeds, idents, label)
            return {"embeddings": emb}

        return self._cached_rows(parts, want, encode, job)["embeddings"]

    @staticmethod
    def _root(
        data: Dataset,
        modality: str,
        rows: Sequence[int] | np.ndarray | None,
        data_fp: str | None,
    ) -> tuple[Dataset, np.ndarray, str]:
        """``(root dataset, rows as its positions, its fingerprint)`` of the asked rows.

        ``data_fp``: ``data.fingerprint()`` when the caller has it.
        """
        n = len(data)
        want = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if want.size and (want.min() < 0 or want.max() >= n):
            raise IndexError(f"rows must lie in [0, {n}) for {data.name!r}")
        root, want = _root_rows(data, modality, want)
        if root is not data:  # a subset's rows are its parent's: one cache entry for both
            return root, want, root.fingerprint()
        return data, want, data_fp or data.fingerprint()

    def _cached_rows(
        self,
        parts: tuple[Any, ...],
        want: np.ndarray,
        compute: Callable[[np.ndarray], dict[str, Tensor]],
        job: RowsJob | None = None,
    ) -> dict[str, Tensor]:
        """The tensors of rows ``want`` of the entry ``parts``; ``compute(missing)`` fills gaps.

        An entry is stored as shards of :data:`SHARD_ROWS` consecutive row positions, each
        holding ``rows`` (its sorted positions so far) and tensors with one row per position.
        Only rows not stored yet are computed, shard by shard, and each shard is written (on
        disk, atomically) as soon as it is complete: an interrupted sweep resumes from the
        shards it finished, whatever the batch size or backend of the next run.
        """
        want = np.asarray(want, dtype=np.int64)
        needed = np.unique(want)
        if not needed.size:
            return compute(needed)
        shards = np.unique(needed // SHARD_ROWS)
        stored: dict[int, dict[str, Tensor] | None] = {}
        todo: list[tuple[int, np.ndarray]] = []
        for shard in shards.tolist():
            entry = self.cache.get(_entry_key(*parts, shard=shard))
            stored[shard] = entry
            have = np.zeros(0, np.int64) if entry is None else entry["rows"].numpy()
            lo, hi = np.searchsorted(needed, [shard * SHARD_ROWS, (shard + 1) * SHARD_ROWS])
            missing = np.setdiff1d(needed[lo:hi], have)
            if missing.size:
                todo.append((shard, missing))
        if todo and job is not None and self.backend is not None:
            todo = self._fill_remotely(parts, job, todo, stored)
        with self._stage(len(todo), int(sum(m.size for _, m in todo))):
            for shard, missing in todo:
                stored[shard] = self._fill_shard(parts, shard, stored[shard], missing, compute)
        return _gather(stored, want)

    def _fill_remotely(
        self,
        parts: tuple[Any, ...],
        job: RowsJob,
        todo: list[tuple[int, np.ndarray]],
        stored: dict[int, dict[str, Tensor] | None],
    ) -> list[tuple[int, np.ndarray]]:
        """Let the backend fill ``todo``'s shards on disk; read them back; what is still missing.

        The rows the workers encoded are counted here, as if this engine had encoded them.
        """
        assert self.backend is not None
        self.backend.fill(self, job, todo)
        left = []
        for shard, missing in todo:
            entry = self.cache.get(_entry_key(*parts, shard=shard), fresh=True)
            have = np.zeros(0, np.int64) if entry is None else entry["rows"].numpy()
            still = np.setdiff1d(missing, have)
            done = np.setdiff1d(missing, still)
            if done.size:
                self._account(job.model.fingerprint(), job.modality, job.vkey, job.identities(done))
                stored[shard] = entry
            if still.size:
                left.append((shard, still))
        return left

    @contextlib.contextmanager
    def _stage(self, shards: int, rows: int) -> Iterator[None]:
        """One progress line for a sweep over several shards (not one per shard) off a tty."""
        if shards < 2:
            yield
            return
        self._sweep_lines, self._last_label = False, ""
        try:
            yield
        finally:
            self._sweep_lines = True
        stream = self.stream or sys.stderr
        if self.progress and not bool(getattr(stream, "isatty", lambda: False)()):
            stream.write(f"{self._last_label}: {rows} rows in {shards} shards\n")
            stream.flush()

    def _fill_shard(
        self,
        parts: tuple[Any, ...],
        shard: int,
        entry: dict[str, Tensor] | None,
        missing: np.ndarray,
        compute: Callable[[np.ndarray], dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Compute ``missing`` rows of one shard, merge them into ``entry`` and store it."""
        new = compute(missing)
        have = np.zeros(0, np.int64) if entry is None else entry["rows"].numpy()
        all_rows = np.concatenate([have, missing])
        order = torch.from_numpy(np.argsort(all_rows, kind="stable"))
        merged = {"rows": torch.from_numpy(np.sort(all_rows, kind="stable"))}
        for name, t in new.items():
            both = t if entry is None else torch.cat([entry[name], t])
            merged[name] = both[order]
        key = _entry_key(*parts, shard=shard)
        self.cache.put(key, merged)
        return merged

    # ------------------------------------------------------------------ hidden states
    def hidden_states(
        self,
        model: EncoderModel,
        data: Dataset,
        modality: str,
        layers: Sequence[int] | None,
        *,
        rows: Sequence[int] | np.ndarray | None = None,
        desc: str = "",
        data_fingerprint: str | None = None,
        pool: bool = False,
    ) -> list[Tensor]:
        """Hidden states of ``data``'s rows at ``layers`` of one tower, cached and counted.

        One forward pass per row through ``model.hidden_states(modality, batch)`` (the
        ``hidden_states`` capability; e.g. the feature maps of a patch memory bank), in batches
        of ``batch_size``. The chosen states are kept as float32 CPU tensors under (model
        fingerprint, data fingerprint, modality, layers), in memory and on disk like
        embeddings, and only rows not cached yet are run. Each pass counts in
        :meth:`accounting` as an encoded row of the modality, under a variant of its own
        (``hidden`` and the layers), so a row run twice shows as duplication.

        With ``pool``, each state is globally mean-pooled
        (:func:`~mmsafe.methods.ood.pool_states`: ``(B, C, H, W)`` to ``(B, C)``, ``(B, L, D)``
        to ``(B, D)``) on the device, before it is kept: caching every layer of many rows then
        costs one vector per layer and row, not a map. Pooled states are an entry and a variant
        of their own (``pool`` is part of both keys), never mixed with unpooled ones.

        Args:
            model: the encoder.
            data: the dataset.
            modality: the tower (``image``).
            layers: indices into the list ``model.hidden_states`` returns; ``None``: every
                layer it returns (keyed as ``"all"``).
            rows: positions in ``data`` (any order, repeats allowed); ``None``: every row.
            desc: a label for progress.
            data_fingerprint: ``data.fingerprint()`` when the caller has it.
            pool: keep the global mean pooling of each state instead of the state.

        Returns:
            One tensor per layer, in ``layers``' order (the model's for ``None``), with
            ``len(rows)`` rows each.

        Raises:
            NotImplementedError: the model exposes no hidden states.
            IndexError: a layer the model does not have.
        """
        if layers is not None:
            layers = tuple(int(i) for i in layers)
            if not layers:
                raise ValueError("hidden_states needs at least one layer (or None for all)")
        data, want, data_fp = self._root(data, modality, rows, data_fingerprint)
        fp = model.fingerprint()
        layer_key = "all" if layers is None else list(layers)
        pooled = ("pool",) if pool else ()  # unpooled keys stay as they were
        parts = ("hidden", fp, data_fp, modality, layer_key, *pooled, *self._precision_key)
        vkey = stable_hash("hidden", layer_key, *pooled)

        def run(missing: np.ndarray) -> dict[str, Tensor]:
            values = _column_rows(data.modalities[modality], missing)
            idents = [("row", data.source, data.ids[i]) for i in missing]
            label = f"hidden states {modality} {layer_key}{' pooled' if pool else ''}"
            label += f" [{desc or data.name}]"
            net = ready(model, self.device)
            set_seed(self.seed)
            per_layer: list[list[Tensor]] | None = None
            job = _Batches(net, modality, values, None, None, self.batch_size)
            sweep = self._sweep(len(values), label)
            with sweep as starts, torch.inference_mode(), self._autocast():
                for _, batch in zip(starts, self._prepared(job), strict=True):
                    batch = to_device(batch, self.device)
                    states = net.hidden_states(modality, batch)
                    chosen = [states[i] for i in (layers or range(len(states)))]
                    if per_layer is None:
                        per_layer = [[] for _ in chosen]
                    for j, state in enumerate(chosen):
                        state = pool_states(state.float()) if pool else state
                        per_layer[j].append(state.float().cpu())
            self._account(fp, modality, vkey, idents)
            return {f"layer_{j}": torch.cat(c) for j, c in enumerate(per_layer or [])}

        got = self._cached_rows(parts, want, run)
        return [got[f"layer_{j}"] for j in range(len(got))]

    @contextlib.contextmanager
    def _sweep(self, n: int, label: str) -> Iterator[Any]:
        """Batch starts over ``n`` values with progress; passes inside are the engine's own.

        Yields the starts (a progress bar on a terminal); on success without a terminal, one
        line ``<label>: <n> rows`` goes to the stream.
        """
        starts = range(0, n, self.batch_size)
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
        self._in_forward, self._last_label = True, label
        try:
            yield bar
        finally:
            self._in_forward = False
        if self.progress and not tty and n and self._sweep_lines:
            stream.write(f"{label}: {n} rows\n")
            stream.flush()

    def _account(
        self, fp: str, modality: str, vkey: str | None, identities: Sequence[tuple[Any, ...]]
    ) -> None:
        """Count ``len(identities)`` rows run through ``modality``'s tower under ``vkey``."""
        self._encoded[modality] = self._encoded.get(modality, 0) + len(identities)
        # a row's identity as a 64-bit hash: 1M rows cost megabytes, not a million tuples
        seen = self._distinct.setdefault(modality, {}).setdefault((fp, vkey), set())
        seen.update(map(hash, identities))

    def _forward(
        self,
        model: EncoderModel,
        modality: str,
        values: Sequence[Any] | Tensor,
        variant: Variant | None,
        row_seeds: list[int] | None,
        identities: list[tuple[Any, ...]],
        desc: str,
        preprocessed: bool = False,
    ) -> Tensor:
        """Encode ``values`` in batches (the only place a model's forward pass runs)."""
        model = ready(model, self.device)
        set_seed(self.seed)
        label = f"embed {modality}" + (f" ({variant.label})" if variant else "")
        label += f" [{desc}]" if desc else ""
        chunks = []
        job = _Batches(model, modality, values, variant, row_seeds, self.batch_size, preprocessed)
        with self._sweep(len(values), label) as starts, torch.inference_mode(), self._autocast():
            for start, batch in zip(starts, self._prepared(job), strict=True):
                stop = start + self.batch_size
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
        vkey = None if variant is None else variant.key
        self._account(model.fingerprint(), modality, vkey, identities)
        if not chunks:
            return torch.zeros(0, getattr(model, "embed_dim", 0))
        return torch.cat(chunks)

    def workers_for(self, values: Sequence[Any] | Tensor) -> int:
        """DataLoader worker processes for ``values``: none for values already in memory.

        A lazy column (image files, a large world) is decoded by ``self.workers`` processes
        (by default half the CPUs, at least one) while the model runs on the batch before.
        """
        if not is_lazy(values) or len(values) <= self.batch_size:
            return 0
        if self.workers is not None:
            return self.workers
        return max(1, (os.cpu_count() or 1) // 2)

    def _prepared(self, job: _Batches) -> Iterator[Any]:
        """``job``'s preprocessed batches, in order, from worker processes where it pays."""
        workers = self.workers_for(job.values)
        if workers == 0:
            for k in range(len(job)):
                yield job[k]
            return
        job.values.prepare()  # type: ignore[union-attr]  # once here, not once per worker
        loader = DataLoader(
            job,
            batch_size=None,  # every item is already a batch
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            multiprocessing_context=_worker_context(),
        )
        yield from loader

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        model: Any,
        images: Sequence[Any] | Tensor,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int] | None = None,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
    ) -> list[str]:
        """A vision-language model's answer to each (image, prompt, seed), cached.

        ``images`` are uint8 ``(H, W, 3)`` arrays or a float pixel tensor ``(B, 3, S, S)`` in
        ``[0, 1]`` (an attack's adversarial pixels). Answers are kept in memory under (model
        fingerprint, image digest, prompt, seed, decoding settings), so no prompt is generated
        twice with the same image and seed; the accounting counts requests and rows generated.
        """
        n = len(prompts)
        if len(images) != n:
            raise ValueError(f"generate: {len(images)} images for {n} prompts")
        seeds = [0] * n if seeds is None else [int(s) for s in seeds]
        model_fp = model.fingerprint()
        keys = [
            stable_hash("gen", model_fp, _value_digest(images[i]), str(prompts[i]), seeds[i],
                        int(max_new_tokens), float(temperature))
            for i in range(n)
        ]  # fmt: skip
        store = self._generated
        missing = list(dict.fromkeys(k for k in keys if k not in store))
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        self._counters["generation_requests"] += n
        todo = [first[k] for k in missing]
        label = f"generate {getattr(model, 'name', 'model')}"
        with self._sweep(len(todo), label) as starts:
            for s in starts:
                chunk = todo[s : s + self.batch_size]
                if isinstance(images, Tensor):
                    pixels = images[chunk]
                else:
                    pixels = model.preprocess_images([images[i] for i in chunk])
                set_seed(self.seed)
                with torch.inference_mode(), self._autocast():
                    answers = model.generate(
                        pixels.to(self.device),
                        [str(prompts[i]) for i in chunk],
                        max_new_tokens=max_new_tokens,
                        seeds=[seeds[i] for i in chunk],
                        temperature=temperature,
                    )
                for i, a in zip(chunk, answers, strict=True):
                    store[keys[i]] = a
                self._counters["generated_rows"] += len(chunk)
        return [store[k] for k in keys]

    def generate_images(
        self,
        model: Any,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """A text-to-image generator's image for each (prompt, seed), cached.

        Images are kept in memory under (model fingerprint, prompt, seed, steps, guidance), so
        no prompt is drawn twice with the same seed; the accounting counts requests
        (``image_requests``) and images drawn (``generated_images``). Seeds default to 0.

        Returns:
            ``(N, 3, S, S)`` float images in ``[0, 1]`` (CPU).
        """
        n = len(prompts)
        seeds = [0] * n if seeds is None else [int(s) for s in seeds]
        if len(seeds) != n:
            raise ValueError(f"generate_images: {len(seeds)} seeds for {n} prompts")
        model_fp = model.fingerprint()
        keys = [
            stable_hash("img", model_fp, str(prompts[i]), seeds[i], steps, guidance)
            for i in range(n)
        ]
        store = self._images
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        todo = [first[k] for k in dict.fromkeys(k for k in keys if k not in store)]
        self._counters["image_requests"] += n
        label = f"generate {getattr(model, 'name', 'model')}"
        with self._sweep(len(todo), label) as starts:
            for s in starts:
                chunk = todo[s : s + self.batch_size]
                with torch.inference_mode(), self._autocast():
                    images = model.generate(
                        [str(prompts[i]) for i in chunk],
                        [seeds[i] for i in chunk],
                        steps=steps,
                        guidance=guidance,
                    )
                for i, img in zip(chunk, images.float().cpu(), strict=True):
                    store[keys[i]] = img
                self._counters["generated_images"] += len(chunk)
        if not keys:
            side = int(model.image_size)
            return torch.zeros(0, 3, side, side)
        return torch.stack([store[k] for k in keys])

    def regenerate_images(
        self,
        model: Any,
        images: Tensor,
        prompts: Sequence[str],
        strength: float,
        seeds: Sequence[int] | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """A generator's regeneration (SDEdit, ``model.regenerate``) of each image, not cached.

        The inputs are images, so nothing is cached; the accounting counts each row as an image
        asked for (``image_requests``) and drawn (``generated_images``). Seeds default to 0.

        Args:
            model: an ``ImageGenerator`` with ``regenerate`` in its capabilities.
            images: ``(N, 3, S, S)`` float images in ``[0, 1]`` at ``model.image_size``.
            prompts: one prompt per image.
            strength: the time the images are noised to, in ``(0, 1]``.
            seeds: one seed per image (the noise of row ``i`` is seed ``i``'s).
            steps: sampler steps of a full run (the model's default when None).
            guidance: classifier-free guidance scale (the model's default when None).

        Returns:
            ``(N, 3, S, S)`` float images in ``[0, 1]`` (CPU).
        """
        n = len(prompts)
        seeds = [0] * n if seeds is None else [int(s) for s in seeds]
        if len(seeds) != n or len(images) != n:
            raise ValueError(
                f"regenerate_images: {len(images)} images and {len(seeds)} seeds for {n} "
                "prompts; one of each per prompt"
            )
        self._counters["image_requests"] += n
        out = []
        with self._sweep(n, f"regenerate {getattr(model, 'name', 'model')}") as starts:
            for s in starts:
                with torch.inference_mode(), self._autocast():
                    batch = model.regenerate(
                        images[s : s + self.batch_size],
                        [str(p) for p in prompts[s : s + self.batch_size]],
                        strength,
                        seeds[s : s + self.batch_size],
                        steps=steps,
                        guidance=guidance,
                    )
                out.append(batch.float().cpu())
                self._counters["generated_images"] += len(batch)
        if not out:
            side = int(model.image_size)
            return torch.zeros(0, 3, side, side)
        return torch.cat(out)

    # ------------------------------------------------------------------ task outputs
    def outputs(self, model: EncoderModel, task: Task, data: Dataset) -> Outputs:
        """The task's clean outputs on ``data``, computed once per (model, data, task)."""
        data_fp = data.fingerprint()
        key = stable_hash("outputs", model.fingerprint(), data_fp, task.fingerprint())
        if key not in self._outputs:
            task.check_data(data)
            emb = (
                self.embed(model, data, task.modalities, data_fingerprint=data_fp)
                if task.modalities
                else {}
            )
            self._outputs[key] = task.outputs(emb, data)
        return self._outputs[key]
