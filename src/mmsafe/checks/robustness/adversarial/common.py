"""Pieces shared by the ``robustness.adversarial`` check and its retrieval / extra-attack parts.

:class:`AttackSettings` is the check's configuration as one frozen value, so that the attack
paths in :mod:`mmsafe.checks.robustness.adversarial.check`,
:mod:`mmsafe.checks.robustness.adversarial.extra` and
:mod:`mmsafe.checks.robustness.adversarial.retrieval` are plain functions of ``(ctx, settings,
...)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmsafe.checks.base import AuditContext, Finding, Metric
from mmsafe.methods.attacks.pixel import Forward, Norm, run_attack
from mmsafe.models.base import to_device

REMEDIATION = (
    "Adversarially fine-tune the image tower (e.g. TeCoA or FARE-style robust fine-tuning of "
    "CLIP), or ensemble with a robust encoder; never let untrusted pixels drive a high-stakes "
    "decision alone. Re-run with more steps/restarts (or attacks=['apgd']) before trusting a "
    "high robust accuracy: weak attacks overestimate robustness."
)
SEVERITY_ORDER: Mapping[str, int] = {"high": 0, "medium": 1, "low": 2, "info": 3}
"""Findings are reported most severe first (a stable sort keeps the order within a level)."""


@dataclass(frozen=True)
class AttackSettings:
    """The validated options of the adversarial check (:class:`AdversarialCheck`).

    The fields mirror the check's constructor arguments of the same name (see its docstring);
    ``eps`` is ``{norm: sorted budgets}`` for the selected ``norms`` only.
    """

    norms: tuple[str, ...]
    eps: Mapping[str, tuple[float, ...]]
    attacks: tuple[str, ...]
    steps: int
    restarts: int
    random_start: bool
    max_rows: int | None
    batch_size: int
    max_drop: float
    n_boot: int
    early_stop: bool
    text_attacks: tuple[str, ...]
    query_budgets: tuple[int, ...]
    flips: tuple[int, ...]
    co_attack: bool
    co_alpha: float
    co_flips: int
    universal: bool
    universal_rows: int
    universal_epochs: int

    @property
    def any_extra(self) -> bool:
        """Whether any opt-in attack (text, Co-Attack, universal) is configured."""
        return bool(self.text_attacks or self.co_attack or self.universal)


@dataclass(frozen=True)
class AttackOutcome:
    """What one attack path reports: the parts of a :class:`~mmsafe.checks.base.CheckResult`."""

    metrics: dict[str, Metric]
    findings: tuple[Finding, ...]
    plots: dict[str, dict[str, Any]]


def eps_label(eps: float) -> str:
    """A short, stable label for a budget, used in metric names.

    Example:
        >>> eps_label(2 / 255), eps_label(0.25)
        ('0.007843', '0.25')
    """
    return f"{eps:.4g}"


def attack_success_rate(clean_correct: np.ndarray, adv_correct: np.ndarray) -> float:
    """``ASR = flipped / initially correct`` (NaN when no row was initially correct).

    Example:
        >>> attack_success_rate(np.array([1, 1, 1, 0]), np.array([1, 0, 0, 0]))
        0.6666666666666666
    """
    c = np.asarray(clean_correct, dtype=bool)
    a = np.asarray(adv_correct, dtype=bool)
    n = int(c.sum())
    return float((c & ~a).sum() / n) if n else float("nan")


def by_severity(findings: list[Finding]) -> tuple[Finding, ...]:
    """``findings`` most severe first, in their given order within a severity."""
    return tuple(sorted(findings, key=lambda f: SEVERITY_ORDER[f.severity]))


def select_rows(ctx: AuditContext, max_rows: int | None) -> np.ndarray:
    """The evaluated rows to attack: labelled rows (``retrieval``: all pairs), seeded subsample.

    Args:
        ctx: the audit context.
        max_rows: at most this many rows (``None``: all).

    Returns:
        Sorted row indices into ``ctx.data``.
    """
    if ctx.task.kind == "retrieval":
        rows = np.arange(len(ctx.data))
    else:
        rows = np.flatnonzero(ctx.outputs.labels >= 0)
    if max_rows is not None and len(rows) > max_rows:
        rng = ctx.rng("rows")
        rows = np.sort(rng.choice(rows, size=max_rows, replace=False))
    return rows


def batches(targets: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive chunks of ``targets`` of at most ``batch_size`` entries."""
    return [targets[i : i + batch_size] for i in range(0, len(targets), batch_size)]


def pixels(ctx: AuditContext, idx: np.ndarray) -> Tensor:
    """The preprocessed ``[0, 1]`` pixels of rows ``idx`` of ``ctx.data``, on the engine device."""
    images = [ctx.data.modalities["image"][i] for i in idx]
    x = to_device(ctx.model.preprocess("image", images), ctx.engine.device)
    assert isinstance(x, Tensor)
    return x


def universal_train_pixels(ctx: AuditContext, n_rows: int) -> Tensor | None:
    """Up to ``n_rows`` seeded train (else calibration) images, or ``None`` when there are none.

    Args:
        ctx: the audit context.
        n_rows: how many training images to draw.

    Returns:
        Preprocessed pixels ``(n, C, H, W)`` on the CPU, or ``None``.
    """
    source = ctx.train if ctx.train is not None and len(ctx.train) else ctx.calibration
    if source is None or "image" not in source.modalities or len(source) == 0:
        return None
    rng = ctx.rng("universal-rows")
    pick = rng.permutation(len(source))[:n_rows]
    px = ctx.model.preprocess("image", [source.modalities["image"][i] for i in pick])
    assert isinstance(px, Tensor)
    return px


def task_embeddings(
    ctx: AuditContext,
    idx: np.ndarray | Tensor,
    exclude: Sequence[str] = ("image",),
    device: torch.device | None = None,
) -> dict[str, Tensor]:
    """The clean embeddings of rows ``idx`` for the task's modalities, but ``exclude``.

    These are what an attack on the excluded modalities holds fixed (e.g. the caption of a
    ``fusion`` row while its image is attacked).
    """
    sel = torch.as_tensor(idx)
    return {
        m: e[sel] if device is None else e[sel].to(device)
        for m, e in ctx.outputs.embeddings.items()
        if m in ctx.task.modalities and m not in exclude
    }


def sweep(
    s: AttackSettings,
    forward: Forward,
    x: Tensor,
    y: Tensor,
    generator: torch.Generator,
    early_stop: bool = False,
) -> Iterator[tuple[tuple[str, str, float], Tensor]]:
    """``((norm, attack, eps), x_adv)`` for every configured image attack on one batch.

    The attacks run lazily, in the settings' order, drawing their random starts from
    ``generator``.
    """
    for norm in s.norms:
        for atk in s.attacks:
            for e in s.eps[norm]:
                yield (
                    (norm, atk, e),
                    run_attack(
                        atk,
                        forward,
                        x,
                        y,
                        e,
                        as_norm(norm),
                        steps=s.steps,
                        restarts=s.restarts,
                        random_start=s.random_start,
                        generator=generator,
                        early_stop=early_stop,
                    ),
                )


def as_norm(norm: str) -> Norm:
    """``norm`` as the :data:`mmsafe.methods.attacks.pixel.Norm` literal."""
    return "linf" if norm == "linf" else "l2"
