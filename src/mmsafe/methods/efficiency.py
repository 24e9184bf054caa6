"""Efficiency measurements: parameters, FLOPs, latency, throughput, peak memory and TPME.

Pure functions over a model (or any callable); :mod:`mmsafe.checks.efficiency.profile` wraps them
into
the ``efficiency.profile`` check and :mod:`mmsafe.methods.adapt` uses them to compare adaptation
methods.

- **Parameters** per tower, total and trainable (:func:`tower_parameters`).
- **FLOPs** per sample per modality, counted by :class:`torch.utils.flop_counter.FlopCounterMode`
  (:func:`count_flops`, :func:`encode_flops_per_sample`). A multiply-add counts as 2 FLOPs; only
  the matrix products and convolutions are counted (element-wise work, norms and activations are
  not), as in the usual FLOP tables.
- **Latency** p50/p95 per batch size and **throughput** (:func:`measure_latency`,
  :func:`latency_profile`), wall-clock with a warm-up; CUDA is synchronised around each call.
- **Peak memory** (:func:`peak_memory`): on CUDA the peak of ``torch.cuda.max_memory_allocated``
  above what was allocated before; on the CPU the peak resident set size (Linux ``VmHWM``, reset
  through ``/proc/self/clear_refs``) above the RSS before, falling back to :mod:`tracemalloc`
  (Python allocations only) where that is not available.
- **TPME** (:func:`tpme`), IISAN's composite of training time, trainable parameters and memory,
  min–max normalised across the compared methods; lower is better. See ``docs/efficiency.md``.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import time
import tracemalloc
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

T = TypeVar("T")

PAPER_WEIGHTS: tuple[float, float, float] = (0.45, 0.10, 0.45)
"""IISAN's TPME weights (time, trainable parameters, memory)."""


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParamCount:
    """Parameter count of a module or a group of parameters.

    Attributes:
        total: number of scalar parameters.
        trainable: those with ``requires_grad``.
    """

    total: int
    trainable: int

    def to_dict(self) -> dict[str, int]:
        """``{"total": int, "trainable": int}``."""
        return asdict(self)


def count_parameters(params: nn.Module | Iterable[nn.Parameter]) -> ParamCount:
    """Total and trainable scalar parameters of a module (shared parameters counted once).

    Example:
        >>> lin = nn.Linear(3, 2)  # 3 * 2 weights + 2 biases
        >>> lin.bias.requires_grad_(False)  # doctest: +ELLIPSIS
        Parameter containing:...
        >>> count_parameters(lin)
        ParamCount(total=8, trainable=6)
    """
    items = params.parameters() if isinstance(params, nn.Module) else params
    seen: set[int] = set()
    total = trainable = 0
    for p in items:
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return ParamCount(total, trainable)


def tower_prefixes(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Parameter-name prefixes of each tower of a dual encoder.

    A model may declare them as a ``tower_prefixes`` attribute (``{tower: (prefix, ...)}``).
    Otherwise: Hugging Face CLIP / SigLIP (``model.vision_model`` + ``visual_projection``, ...),
    then any child module named after a modality (tiny-clip's ``image`` and ``text``).

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
        >>> tower_prefixes(TinyClip(TinyClipConfig.for_size("xs")))
        {'image': ('image.',), 'text': ('text.',)}
    """
    declared = getattr(model, "tower_prefixes", None)
    if isinstance(declared, Mapping):
        return {str(k): tuple(v) for k, v in declared.items()}
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "vision_model"):
        return {
            "image": ("model.vision_model.", "model.visual_projection."),
            "text": ("model.text_model.", "model.text_projection."),
        }
    children = dict(model.named_children())
    mods = getattr(model, "modalities", ())
    return {m: (f"{m}.",) for m in mods if isinstance(children.get(m), nn.Module)}


def tower_parameters(model: nn.Module) -> dict[str, ParamCount]:
    """Parameter counts per tower, the rest (``shared``: temperature, ...) and ``total``.

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
        >>> counts = tower_parameters(TinyClip(TinyClipConfig.for_size("xs")))
        >>> sorted(counts)
        ['image', 'shared', 'text', 'total']
        >>> counts["shared"]  # the learned log temperature
        ParamCount(total=1, trainable=1)
    """
    prefixes = tower_prefixes(model)
    groups: dict[str, list[nn.Parameter]] = {t: [] for t in prefixes}
    groups["shared"] = []
    for name, p in model.named_parameters():
        tower = next((t for t, pre in prefixes.items() if name.startswith(pre)), "shared")
        groups[tower].append(p)
    out = {t: count_parameters(ps) for t, ps in groups.items()}
    out["total"] = count_parameters(model)
    return out


# --------------------------------------------------------------------------- FLOPs


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as counted by ``FlopCounterMode`` (forward and backward ops).

    Example:
        >>> lin = nn.Linear(10, 5)
        >>> count_flops(lambda: lin(torch.zeros(3, 10)))  # 2 * 3 * 10 * 5
        300
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def batch_size_of(batch: Any) -> int:
    """Rows of a preprocessed batch (a tensor, or a dict of tensors such as text ids + mask).

    Example:
        >>> batch_size_of({"input_ids": torch.zeros(4, 7)}), batch_size_of(torch.zeros(2, 3))
        (4, 2)
    """
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return batch_size_of(next(iter(batch.values())))
    raise TypeError(f"Cannot tell the batch size of a {type(batch).__name__}.")


def encode_flops_per_sample(model: Any, modality: str, batch: Any) -> float:
    """Forward FLOPs per sample of ``model.encode`` on one modality's preprocessed batch.

    Args:
        model: an :class:`~mmsafe.models.base.EncoderModel`.
        modality: the tower to run.
        batch: ``model.preprocess(modality, values)`` (on the model's device).

    Returns:
        Total FLOPs of the batch divided by its size.
    """
    n = batch_size_of(batch)
    if n == 0:
        raise ValueError("Need a non-empty batch to count FLOPs per sample.")
    with torch.inference_mode():
        flops = count_flops(lambda: model.encode({modality: batch}))
    return flops / n


# --------------------------------------------------------------------------- latency


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of repeated calls, in seconds.

    Attributes:
        p50: median.
        p95: 95th percentile (linear interpolation).
        mean: mean.
        n: number of timed calls.
    """

    p50: float
    p95: float
    mean: float
    n: int


def latency_stats(seconds: Sequence[float]) -> LatencyStats:
    """Summarise timed calls.

    Example:
        >>> latency_stats([0.1, 0.2, 0.3, 0.4, 1.0])
        LatencyStats(p50=0.3, p95=0.88, mean=0.4, n=5)
    """
    s = np.asarray(seconds, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError("Need at least one timing.")
    p50, p95 = np.percentile(s, [50, 95])
    return LatencyStats(round(float(p50), 12), round(float(p95), 12), float(s.mean()), int(s.size))


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    fn: Callable[[], Any],
    *,
    repeats: int = 10,
    warmup: int = 2,
    device: torch.device | str | None = None,
) -> LatencyStats:
    """Time ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    Args:
        fn: the call to time.
        repeats: timed calls (``>= 1``).
        warmup: untimed calls first (allocator, caches, lazy initialisation).
        device: a CUDA device is synchronised before and after each call.

    Example:
        >>> measure_latency(lambda: None, repeats=3, warmup=0).n
        3
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"Need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}.")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return latency_stats(times)


@dataclass(frozen=True)
class LatencyRow:
    """Latency and throughput of one modality at one batch size.

    Attributes:
        modality: the tower.
        batch_size: rows per call.
        p50_ms: median latency of a batch, in milliseconds.
        p95_ms: 95th-percentile latency of a batch, in milliseconds.
        throughput: samples per second at the median latency.
    """

    modality: str
    batch_size: int
    p50_ms: float
    p95_ms: float
    throughput: float


def latency_profile(
    model: Any,
    modality: str,
    values: Sequence[Any],
    batch_sizes: Sequence[int] = (1, 8, 32),
    *,
    repeats: int = 5,
    warmup: int = 1,
) -> list[LatencyRow]:
    """Latency p50/p95 and throughput of ``model.encode`` per batch size, preprocessing excluded.

    Batch sizes larger than ``len(values)`` are skipped (values are not repeated).

    Args:
        model: an :class:`~mmsafe.models.base.EncoderModel` (its device is used).
        modality: the tower to run.
        values: raw values of that modality (at least one).
        batch_sizes: the batch sizes to time.
        repeats: timed calls per batch size.
        warmup: untimed calls per batch size.
    """
    device = _model_device(model)
    rows = []
    for bs in batch_sizes:
        if bs < 1 or bs > len(values):
            continue
        batch = _to(model.preprocess(modality, list(values[:bs])), device)

        def call(batch: Any = batch) -> Any:
            with torch.inference_mode():
                return model.encode({modality: batch})

        st = measure_latency(call, repeats=repeats, warmup=warmup, device=device)
        rows.append(LatencyRow(modality, bs, st.p50 * 1e3, st.p95 * 1e3, bs / max(st.p50, 1e-12)))
    return rows


def _model_device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    p = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryPeak:
    """Peak memory of one call, above what was in use before it.

    Attributes:
        bytes: the peak increase in bytes (``>= 0``).
        method: ``cuda_max_allocated``, ``rss_hwm`` (Linux peak RSS) or ``tracemalloc``.
    """

    bytes: int
    method: str

    @property
    def mib(self) -> float:
        """The peak in MiB."""
        return self.bytes / 2**20


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) of this process; False if not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (``malloc_trim`` on glibc), so RSS deltas show.

    A no-op where glibc is not available.
    """
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory(
    fn: Callable[[], T], device: torch.device | str | None = None
) -> tuple[T, MemoryPeak]:
    """Run ``fn`` once and measure its peak memory above the memory in use before it.

    On CUDA: ``torch.cuda.max_memory_allocated`` (reset first) minus the allocated bytes before.
    On the CPU (Linux): the peak resident set size during the call (``VmHWM`` after resetting it
    through ``/proc/self/clear_refs``) minus the RSS before; freed heap memory is released to
    the OS first (``malloc_trim``), so memory the allocator still holds does not hide growth.
    Elsewhere: the :mod:`tracemalloc` peak (Python allocations only; torch's own allocations are
    not seen, so treat it as a lower bound).

    Returns:
        ``(fn(), MemoryPeak)``.

    Example:
        >>> out, peak = peak_memory(lambda: torch.ones(2**24).sum())  # a 64 MiB tensor
        >>> int(out), peak.method in ("rss_hwm", "tracemalloc")
        (16777216, True)
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return out, MemoryPeak(max(0, int(peak - before)), "cuda_max_allocated")
    release_free_memory()
    rss_before = _status_kib("VmRSS")
    if rss_before is not None and _reset_hwm():
        out = fn()
        hwm = _status_kib("VmHWM")
        assert hwm is not None
        return out, MemoryPeak(max(0, (hwm - rss_before) * 1024), "rss_hwm")
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    try:
        out = fn()
        _, top = tracemalloc.get_traced_memory()
    finally:
        if started:
            tracemalloc.stop()
    return out, MemoryPeak(max(0, int(top - base)), "tracemalloc")


# --------------------------------------------------------------------------- TPME


def minmax_normalise(values: Sequence[float]) -> np.ndarray:
    """``(v - min) / (max - min)``; an axis where every value is equal maps to zeros.

    Example:
        >>> minmax_normalise([2.0, 4.0, 3.0]).tolist()
        [0.0, 1.0, 0.5]
        >>> minmax_normalise([5.0, 5.0]).tolist()
        [0.0, 0.0]
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0 or not np.isfinite(v).all():
        raise ValueError("Need a non-empty 1-D sequence of finite values.")
    span = v.max() - v.min()
    return np.zeros_like(v) if span == 0 else (v - v.min()) / span


def tpme(
    times: Sequence[float],
    params: Sequence[float],
    memory: Sequence[float],
    weights: Sequence[float] = PAPER_WEIGHTS,
) -> np.ndarray:
    """IISAN's TPME of K compared methods: ``a1*t_hat + a2*p_hat + a3*m_hat``; lower is better.

    Each axis (training time, trainable parameters, memory) is min–max normalised across the
    methods compared together (an axis where all methods tie contributes 0), so TPME is relative
    to that set: recompute it whenever a method is added. The paper weights time, parameters and
    memory by 0.45, 0.10 and 0.45.

    Args:
        times: training time per method (any unit; e.g. seconds per epoch).
        params: trainable parameters per method.
        memory: peak memory per method (any unit).
        weights: ``(a1, a2, a3)``, non-negative, summing to 1.

    Returns:
        ``(K,)`` TPME scores in ``[0, 1]``.

    Example:
        >>> tpme([443.0, 22.0, 365.0], [1.9e8, 4.0e6, 2.0e6], [47.0, 3.0, 38.0]).round(4).tolist()
        [1.0, 0.0011, 0.7246]
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (3,) or (w < 0).any() or not math.isclose(float(w.sum()), 1.0, abs_tol=1e-9):
        raise ValueError(f"weights must be 3 non-negative numbers summing to 1, got {weights}.")
    if not len(times) == len(params) == len(memory):
        raise ValueError("times, params and memory need one value per method each.")
    axes = [minmax_normalise(a) for a in (times, params, memory)]
    return w[0] * axes[0] + w[1] * axes[1] + w[2] * axes[2]


__all__ = [
    "PAPER_WEIGHTS",
    "LatencyRow",
    "LatencyStats",
    "MemoryPeak",
    "ParamCount",
    "batch_size_of",
    "count_flops",
    "count_parameters",
    "encode_flops_per_sample",
    "latency_profile",
    "latency_stats",
    "measure_latency",
    "minmax_normalise",
    "peak_memory",
    "release_free_memory",
    "tower_parameters",
    "tower_prefixes",
    "tpme",
]
