"""``efficiency.profile``: what the model costs to run (and, optionally, to adapt).

For the model under audit it reports parameters per tower (total and trainable), forward FLOPs
per sample per modality (``torch.utils.flop_counter``), latency p50/p95 per batch size,
throughput, and the peak memory of one forward pass at the largest batch size (CUDA max
allocated on a GPU, peak RSS on the CPU). With ``methods`` set (e.g. ``["full", "iisan"]``) it
also adapts the model with each method on the ``train`` split (fusion classification, see
:mod:`mmsafe.methods.adapt`) and compares training time per epoch, trainable parameters, peak
training
memory, accuracy and TPME. See ``docs/efficiency.md``.

Only what the model *is* (parameters, FLOPs, the adapted accuracy) goes into the result's
``metrics``; what a run *measures* on the clock or the machine (latency, throughput, peak memory,
seconds per epoch, TPME, which is derived from them) goes into its ``timings``, with the findings
and plots derived from them, so the card keeps it apart and ``--fail-on`` never reads it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.methods.efficiency import (
    LatencyRow,
    encode_flops_per_sample,
    latency_profile,
    peak_memory,
    tower_parameters,
)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: v.to(device) for k, v in batch.items()}


def profile_table(rows: Sequence[LatencyRow]) -> dict[str, Any]:
    """A ``table`` plot spec of latency and throughput per modality and batch size.

    Example:
        >>> spec = profile_table([LatencyRow("image", 8, 2.0, 3.0, 4000.0)])
        >>> spec["columns"], spec["rows"]
        (['modality', 'batch size', 'p50 (ms)', 'p95 (ms)', 'throughput (samples/s)'], \
[['image', 8, 2.0, 3.0, 4000.0]])
    """
    return {
        "kind": "table",
        "title": "Latency per batch size (encode only, preprocessing excluded)",
        "columns": ["modality", "batch size", "p50 (ms)", "p95 (ms)", "throughput (samples/s)"],
        "rows": [[r.modality, r.batch_size, r.p50_ms, r.p95_ms, r.throughput] for r in rows],
    }


@register_check
class EfficiencyCheck(Check):
    """Parameters, FLOPs, latency, throughput, peak memory; optionally adaptation costs + TPME.

    Args:
        batch_sizes: batch sizes whose latency is measured (those above the number of evaluated
            rows are skipped).
        repeats: timed calls per batch size.
        warmup: untimed calls per batch size.
        methods: adaptation methods to compare (``full``, ``lora``, ``adapter``,
            ``iisan``, ``iisan-versa``, ``momef``);
            empty: profile the model only. Needs a labelled ``train`` split.
        epochs: training epochs per adaptation method.
        adapt_options: extra keyword arguments for :func:`mmsafe.methods.adapt.compare_methods`.
    """

    name = "efficiency.profile"
    pillar = "efficiency"
    description = "params per tower, FLOPs/sample, latency p50/p95, throughput, peak memory, TPME"
    higher_is_better = {
        "params_total": False,
        "params_trainable": False,
        "params": False,
        "flops": False,
        "latency_p50_ms": False,
        "latency_p95_ms": False,
        "throughput": True,
        "peak_memory_mib": False,
        "epoch_seconds": False,
        "train_peak_memory_mib": False,
        "trainable_params": False,
        "accuracy": True,
        "tpme": False,
    }

    def __init__(
        self,
        batch_sizes: Sequence[int] = (1, 8, 32),
        repeats: int = 5,
        warmup: int = 1,
        methods: Sequence[str] = (),
        epochs: int = 2,
        adapt_options: dict[str, Any] | None = None,
    ) -> None:
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes}")
        if repeats < 1 or warmup < 0:
            raise ValueError(f"Need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
        self.batch_sizes = tuple(int(b) for b in batch_sizes)
        self.repeats = repeats
        self.warmup = warmup
        self.methods = tuple(methods)
        self.epochs = epochs
        self.adapt_options = dict(adapt_options or {})

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        if self.methods and (ctx.train is None or not ctx.train.labelled.any()):
            return "comparing adaptation methods needs a labelled 'train' split"
        if len(ctx.data) == 0:
            return "no evaluated rows to time"
        return super().skip_reason(ctx)

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        model = ctx.model.to(ctx.engine.device).eval()
        device = ctx.engine.device
        metrics: dict[str, Metric] = {}
        plots: dict[str, dict[str, Any]] = {}
        timings: dict[str, Metric] = {}
        timing_plots: dict[str, dict[str, Any]] = {}
        timing_findings: list[Finding] = []

        counts = tower_parameters(model)
        metrics["params_total"] = Metric(float(counts["total"].total))
        metrics["params_trainable"] = Metric(float(counts["total"].trainable))
        for tower, c in counts.items():
            if tower != "total":
                metrics[f"{tower}/params"] = Metric(float(c.total))
                metrics[f"{tower}/params_trainable"] = Metric(float(c.trainable))

        mods = [m for m in model.modalities if m in ctx.data.modalities]
        rows: list[LatencyRow] = []
        flops: dict[str, float] = {}
        memory_method = ""
        for m in mods:
            values = ctx.data.modalities[m][: max(self.batch_sizes)]
            batch = _to(model.preprocess(m, list(values)), device)
            flops[m] = encode_flops_per_sample(model, m, batch)
            metrics[f"{m}/flops"] = Metric(flops[m])
            mod_rows = latency_profile(
                model, m, values, self.batch_sizes, repeats=self.repeats, warmup=self.warmup
            )
            rows += mod_rows
            for r in mod_rows:
                timings[f"{m}/bs{r.batch_size}/latency_p50_ms"] = Metric(r.p50_ms)
                timings[f"{m}/bs{r.batch_size}/latency_p95_ms"] = Metric(r.p95_ms)
            if mod_rows:
                timings[f"{m}/throughput"] = Metric(max(r.throughput for r in mod_rows))

            def forward(batch: Any = batch, m: str = m) -> Any:
                with torch.inference_mode():
                    return model.encode({m: batch})

            _, peak = peak_memory(forward, device)
            memory_method = peak.method
            timings[f"{m}/peak_memory_mib"] = Metric(peak.mib)

        timing_plots["latency"] = profile_table(rows)
        plots["parameters"] = {
            "kind": "table",
            "title": "Parameters per tower and forward FLOPs per sample",
            "columns": ["tower", "parameters", "trainable", "FLOPs / sample"],
            "rows": [[t, c.total, c.trainable, flops.get(t, "")] for t, c in counts.items()],
        }
        timing_plots["throughput"] = {
            "kind": "bar",
            "title": "Throughput per modality and batch size",
            "ylabel": "samples / s",
            "labels": [f"{r.modality} bs={r.batch_size}" for r in rows],
            "values": [r.throughput for r in rows],
        }
        timing_findings.append(
            Finding(
                "info",
                f"Measured on {device} with {torch.get_num_threads()} torch threads "
                f"({os.cpu_count()} CPUs); latency is wall-clock and varies with machine load. "
                f"Peak memory method: {memory_method or 'n/a'}.",
                {"device": str(device), "threads": torch.get_num_threads()},
            )
        )
        jitter = [r for r in rows if r.p95_ms > 2 * r.p50_ms]
        if jitter:
            timing_findings.append(
                Finding(
                    "low",
                    f"Latency is unstable: p95 exceeds twice p50 for {len(jitter)} of "
                    f"{len(rows)} (modality, batch size) settings.",
                    {"settings": [f"{r.modality}/bs{r.batch_size}" for r in jitter]},
                    "Re-measure on an idle machine with more repeats before quoting latency.",
                )
            )
        if self.methods:
            self._compare(ctx, metrics, timings, timing_plots, timing_findings)
        return self.result(
            metrics=metrics,
            plots=plots,
            timings=timings,
            timing_findings=tuple(timing_findings),
            timing_plots=timing_plots,
        )

    def _compare(
        self,
        ctx: AuditContext,
        metrics: dict[str, Metric],
        timings: dict[str, Metric],
        timing_plots: dict[str, dict[str, Any]],
        timing_findings: list[Finding],
    ) -> None:
        """Adapt the model with each method and add the comparison (table, TPME bar chart).

        The accuracy and trainable parameters go to ``metrics``; seconds per epoch, peak
        training memory and TPME (derived from both) go to ``timings``, with the comparison's
        plots and finding.
        """
        from mmsafe.methods.adapt import compare_methods, comparison_table

        assert ctx.train is not None
        reports = compare_methods(
            ctx.model,
            ctx.train,
            ctx.data,
            methods=self.methods,
            epochs=self.epochs,
            device=str(ctx.engine.device),
            seed=ctx.seed,
            **self.adapt_options,
        )
        for r in reports:
            timings[f"{r.method}/epoch_seconds"] = Metric(r.epoch_seconds)
            timings[f"{r.method}/train_peak_memory_mib"] = Metric(r.peak_memory_mib)
            metrics[f"{r.method}/trainable_params"] = Metric(float(r.trainable_params))
            metrics[f"{r.method}/accuracy"] = Metric(r.accuracy)
            timings[f"{r.method}/tpme"] = Metric(r.tpme)
        timing_plots["methods"] = comparison_table(reports)
        timing_plots["tpme"] = {
            "kind": "bar",
            "title": "TPME per adaptation method (lower is better)",
            "ylabel": "TPME",
            "labels": [r.method for r in reports],
            "values": [r.tpme for r in reports],
            "ylim": [0.0, 1.0],
        }
        best = min(reports, key=lambda r: r.tpme)
        timing_findings.append(
            Finding(
                "info",
                f"Most efficient adaptation method by TPME: {best.method} (TPME {best.tpme:.3f}, "
                f"accuracy {best.accuracy:.3f}); TPME is relative to the methods compared.",
                {r.method: r.to_dict() for r in reports},
            )
        )
