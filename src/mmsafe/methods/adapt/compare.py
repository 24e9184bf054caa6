"""Compare adaptation methods: TPME across them, and the comparison tables."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from mmsafe.data.dataset import Dataset
from mmsafe.methods.adapt.options import METHODS, RETRIEVAL_METHODS, SEQREC_METHODS
from mmsafe.methods.adapt.report import AdaptReport
from mmsafe.methods.adapt.train import adapt
from mmsafe.methods.efficiency import tpme


def with_tpme(reports: Sequence[AdaptReport]) -> list[AdaptReport]:
    """The reports with TPME filled in, computed across them (epoch time, params, memory)."""
    scores = tpme(
        [r.epoch_seconds for r in reports],
        [float(r.trainable_params) for r in reports],
        [r.peak_memory_mib for r in reports],
    )
    return [dataclasses.replace(r, tpme=float(s)) for r, s in zip(reports, scores, strict=True)]


def default_methods(objective: str) -> tuple[str, ...]:
    """Every method of ``objective``."""
    return {"retrieval": RETRIEVAL_METHODS, "seqrec": SEQREC_METHODS}.get(objective, METHODS)


def compare_methods(
    model: Any,
    train: Dataset,
    test: Dataset,
    methods: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[AdaptReport]:
    """Run :func:`adapt` for each method (same seed and batch order) and add TPME.

    Args:
        model: the encoder to adapt (not modified).
        train: training rows.
        test: evaluation rows.
        methods: the methods to compare; ``None``: every method of the objective
            (:data:`METHODS`, or :data:`RETRIEVAL_METHODS` for ``objective="retrieval"``).
        **kwargs: passed to :func:`adapt` (``objective``, ``epochs``, ``batch_size``, ...;
            ``towers`` to ``crossan`` only).
    """
    if methods is None:
        methods = default_methods(kwargs.get("objective", "classification"))
    others = {k: v for k, v in kwargs.items() if k != "towers"}  # towers: crossan's alone
    reports = [
        adapt(model, train, test, m, **(kwargs if m == "crossan" else others)).report
        for m in methods
    ]
    return with_tpme(reports)


def _quality_label(reports: Sequence[AdaptReport]) -> str:
    objectives = {r.objective for r in reports}
    if len(objectives) > 1:
        raise ValueError(f"Cannot tabulate reports of different objectives {sorted(objectives)}.")
    if objectives == {"seqrec"}:
        return "NDCG@10 (test)"
    return "R@1 (mean i2t, t2i)" if objectives == {"retrieval"} else "accuracy"


def _recall_columns(reports: Sequence[AdaptReport]) -> list[str]:
    if not reports or reports[0].objective not in ("retrieval", "seqrec"):
        return []
    if reports[0].objective == "seqrec":
        return [k for k in reports[0].metrics if k.startswith("hr@")]
    return list(reports[0].metrics)


def _with_backbone(reports: Sequence[AdaptReport]) -> bool:
    """Whether to show the peak with the backbone's weights (any report measured it)."""
    return any(math.isfinite(r.peak_memory_with_backbone_mib) for r in reports)


def comparison_table(reports: Sequence[AdaptReport]) -> dict[str, Any]:
    """A ``table`` plot spec comparing adaptation methods."""
    quality, recalls = _quality_label(reports), _recall_columns(reports)
    backbone = _with_backbone(reports)
    return {
        "kind": "table",
        "title": f"Adaptation methods: cost and {quality} (TPME: lower is better)",
        "columns": [
            "method",
            "s / epoch",
            "peak memory (MiB)",
            *(["peak w/ backbone (MiB)"] if backbone else []),
            "trainable params",
            quality,
            *recalls,
            "TPME",
        ],
        "rows": [
            [
                r.method,
                r.epoch_seconds,
                r.peak_memory_mib,
                *([r.peak_memory_with_backbone_mib] if backbone else []),
                r.trainable_params,
                r.accuracy,
                *(r.metrics.get(k, math.nan) for k in recalls),
                r.tpme,
            ]
            for r in reports
        ],
    }


def markdown_table(reports: Sequence[AdaptReport]) -> str:
    """The comparison as a Markdown table.

    The quality column is ``accuracy`` (classification), ``R@1 (mean i2t, t2i)`` followed by
    every recall of :attr:`AdaptReport.metrics` (retrieval) or ``NDCG@10 (test)`` followed by
    the test HR@10 (seqrec). A ``peak w/ backbone (MiB)`` column follows the peak memory when
    the reports measured it.

    Example:
        >>> r = AdaptReport("full", 1, 2.0, (2.0,), 10.0, "rss_hwm", 100, 100, 0.9, (1.0,))
        >>> print(markdown_table([r]).splitlines()[2])
        | full | 2.000 | 10.0 | 100 | 0.900 | - |
    """
    quality, recalls = _quality_label(reports), _recall_columns(reports)
    backbone = _with_backbone(reports)
    mem = ["peak memory (MiB)", *(["peak w/ backbone (MiB)"] if backbone else [])]
    head = ["s / epoch", *mem, "trainable params", quality, *recalls, "TPME"]
    lines = [
        "| method | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(head),
    ]
    for r in reports:
        t = "-" if math.isnan(r.tpme) else f"{r.tpme:.3f}"
        rec = "".join(f"{r.metrics.get(k, math.nan):.3f} | " for k in recalls)
        with_bb = f"{r.peak_memory_with_backbone_mib:.1f} | " if backbone else ""
        lines.append(
            f"| {r.method} | {r.epoch_seconds:.3f} | {r.peak_memory_mib:.1f} | {with_bb}"
            f"{r.trainable_params} | {r.accuracy:.3f} | {rec}{t} |"
        )
    return "\n".join(lines)
