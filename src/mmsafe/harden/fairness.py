"""Fairness mitigation for fusion heads: group norming (pre), an adversary (in), thresholds (post).

Three hardeners, one per stage of the pipeline, each aimed at a group gap that
``controllability.fairness`` measures (see :mod:`mmsafe.metrics.fairness`):

* **pre** -- :class:`GroupStandardizer`: standardise each modality's embedding with the mean and
  standard deviation of the row's group (fitted on the train split, applied to any split; a group
  not seen in training, or too small, falls back to the global statistics). A group-wide shift
  of the embeddings (e.g. the background tone of an image) no longer reaches the head. The group
  must be known at prediction time.
* **in** -- :func:`fit_adversarial_fusion_head`: FMMRec-style adversarial removal of group
  information (Chen et al., 2024, "FMMRec: Fairness-aware Multimodal Recommendation"; the
  gradient-reversal recipe of Ganin & Lempitsky, 2015). A group adversary reads the head's fused
  hidden representation through a gradient-reversal layer, so the head learns a representation
  that predicts the label but not the group. ``adversary_weight`` scales the reversed gradient.
  With ``adversary_sees_label=True`` (default) the adversary also gets the true label, which
  targets equalized odds rather than demographic parity (Zhang et al., 2018, "Mitigating
  Unwanted Biases with Adversarial Learning"): only group information *beyond* the label is
  removed, so a train split where group and label are correlated does not cost the label.
* **post** -- :class:`GroupThresholdOptimizer`: group-specific thresholds from fairlearn's
  :class:`~fairlearn.postprocessing.ThresholdOptimizer` (``prefit=True``,
  ``predict_method="predict_proba"``) on a held-out split. ThresholdOptimizer is binary, so a
  multiclass head is post-processed **one class against the rest**, exactly as the fairness check
  binarises it: for the chosen ``positive_class`` ``c`` the score is ``P(c | x)``; a row the
  optimizer accepts is predicted ``c``, and a row it rejects whose arg-max was ``c`` falls back to
  its second most probable class. The one-vs-rest prediction for ``c`` is therefore exactly
  fairlearn's, and the other classes' predictions change only where ``c`` was taken away.

:func:`mitigate_fairness` runs the lot on a dataset with ``train``/``calibration``/``test``
splits and returns a :class:`FairnessMitigationReport`: accuracy, statistical-parity and
equalized-odds differences (from :func:`mmsafe.metrics.fairness.group_fairness`, the check's own
formulas) on the test split, for the unmitigated head and each method::

    report = mitigate_fairness(model, data, methods=("pre", "in", "post"))
    report.table()  # one row per method, with the change against the unmitigated head
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from mmsafe.harden.base import Hardened, Hardener, HardenError, register_hardener
from mmsafe.metrics.fairness import FairnessReport, group_fairness
from mmsafe.models.heads import (
    FusionHead,
    HeadTrainConfig,
    HeadTrainHooks,
    check_inputs,
    fit_fusion_head,
)

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.engine.runner import Engine
    from mmsafe.models.base import EncoderModel
    from mmsafe.tasks.base import Task

__all__ = [
    "METHODS",
    "AdversaryHooks",
    "FairnessHardener",
    "FairnessMitigationReport",
    "GroupStandardizer",
    "GroupThresholdOptimizer",
    "MitigationRow",
    "fit_adversarial_fusion_head",
    "mitigate_fairness",
    "one_vs_rest_override",
]

METHODS: tuple[str, ...] = ("pre", "in", "post")
"""The mitigation stages :func:`mitigate_fairness` knows."""
BASELINE = "none"
"""The method name of the unmitigated head's row."""
CONSTRAINTS = ("equalized_odds", "demographic_parity")
"""The fairlearn constraints :class:`GroupThresholdOptimizer` accepts."""


class NotFittedError(RuntimeError):
    """A hardener was used before ``fit``; call ``fit`` first."""


def _groups_array(groups: Sequence[Any], n: int) -> np.ndarray:
    g = np.asarray([str(x) for x in groups])
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"groups must be 1-D with one entry per row ({n}), got {g.shape}.")
    return g


# --------------------------------------------------------------------------- pre: group norming


class GroupStandardizer:
    """Standardise each modality's embeddings per group: ``(x - mean_g) / std_g``.

    Statistics are per dimension. Groups with fewer than ``min_group_size`` rows in ``fit``, and
    groups first seen at ``transform``, use the global mean and standard deviation instead.

    Args:
        min_group_size: Fewest rows a group needs for its own statistics.
        eps: Floor of the standard deviation.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0], [2.0], [10.0], [12.0]])
        >>> gs = GroupStandardizer(min_group_size=2).fit({"image": x}, ["a", "a", "b", "b"])
        >>> gs.transform({"image": x}, ["a", "a", "b", "b"])["image"].flatten().tolist()
        [-1.0, 1.0, -1.0, 1.0]
        >>> sorted(gs.groups_), gs.transform({"image": x[:1]}, ["new"])["image"].shape
        (['a', 'b'], torch.Size([1, 1]))
    """

    def __init__(self, min_group_size: int = 5, eps: float = 1e-6) -> None:
        self.min_group_size = min_group_size
        self.eps = eps

    def fit(self, embeddings: Mapping[str, Tensor], groups: Sequence[Any]) -> GroupStandardizer:
        """Record per-group and global mean/std of every modality.

        Args:
            embeddings: ``{modality: (N, D_m)}`` training embeddings.
            groups: ``(N,)`` group of each row (any hashable; compared as ``str``).

        Returns:
            ``self``, with ``mean_``/``std_`` (``{modality: {group: (D_m,)}}``),
            ``global_mean_``/``global_std_`` and ``groups_`` (the groups with own statistics).
        """
        if self.min_group_size < 2:
            raise ValueError(f"min_group_size must be >= 2, got {self.min_group_size}.")
        if not embeddings:
            raise ValueError("GroupStandardizer needs at least one modality.")
        n = next(iter(embeddings.values())).shape[0]
        g = _groups_array(groups, n)
        names, counts = np.unique(g, return_counts=True)
        own = [str(k) for k, c in zip(names, counts, strict=True) if c >= self.min_group_size]
        self.mean_: dict[str, dict[str, Tensor]] = {}
        self.std_: dict[str, dict[str, Tensor]] = {}
        self.global_mean_: dict[str, Tensor] = {}
        self.global_std_: dict[str, Tensor] = {}
        for m, e in embeddings.items():
            x = torch.as_tensor(e).detach().float().cpu()
            if x.ndim != 2 or x.shape[0] != n:
                raise ValueError(f"Embeddings of {m!r} must be ({n}, D), got {tuple(x.shape)}.")
            self.global_mean_[m] = x.mean(0)
            self.global_std_[m] = x.std(0, unbiased=False).clamp_min(self.eps)
            self.mean_[m], self.std_[m] = {}, {}
            for k in own:
                rows = x[torch.as_tensor(g == k)]
                self.mean_[m][k] = rows.mean(0)
                self.std_[m][k] = rows.std(0, unbiased=False).clamp_min(self.eps)
        self.groups_ = tuple(own)
        return self

    def transform(
        self, embeddings: Mapping[str, Tensor], groups: Sequence[Any]
    ) -> dict[str, Tensor]:
        """Standardised copies of the embeddings (modalities not seen in ``fit`` raise).

        Args:
            embeddings: ``{modality: (N, D_m)}``.
            groups: ``(N,)`` group of each row.

        Returns:
            ``{modality: (N, D_m)}`` float32 tensors.
        """
        if not hasattr(self, "groups_"):
            raise NotFittedError("GroupStandardizer.fit() must run before transform().")
        unknown = sorted(set(embeddings) - set(self.global_mean_))
        if unknown:
            raise ValueError(f"Modalities {unknown} were not seen in fit().")
        out = {}
        for m, e in embeddings.items():
            x = torch.as_tensor(e).detach().float().cpu()
            g = _groups_array(groups, x.shape[0])
            mean = self.global_mean_[m].expand_as(x).clone()
            std = self.global_std_[m].expand_as(x).clone()
            for k in self.groups_:
                rows = torch.as_tensor(g == k)
                mean[rows] = self.mean_[m][k]
                std[rows] = self.std_[m][k]
            out[m] = (x - mean) / std
        return out

    def fit_transform(
        self, embeddings: Mapping[str, Tensor], groups: Sequence[Any]
    ) -> dict[str, Tensor]:
        """:meth:`fit`, then :meth:`transform` of the same rows."""
        return self.fit(embeddings, groups).transform(embeddings, groups)


# --------------------------------------------------------------------------- in: adversary


class _GradReverse(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``-weight`` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: float) -> Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.weight * grad, None


def _representation(head: FusionHead, inputs: Mapping[str, Tensor]) -> Tensor:
    """The fused hidden representation: the classifier's hidden layer (after its activation)."""
    return head.classifier[1](head.classifier[0](head.fused(inputs)))


ADVERSARIAL_DEFAULTS = HeadTrainConfig(hidden=64)
"""The head recipe of :func:`fit_adversarial_fusion_head` (an MLP: it has a hidden layer)."""


class AdversaryHooks(HeadTrainHooks):
    """A gradient-reversal adversary that reads the head's hidden layer and predicts the group.

    Args:
        groups: ``(N,)`` group code of each labelled training row.
        n_groups: Number of groups.
        weight: Scale of the reversed gradient.
        sees_label: Give the adversary the one-hot true label too.
        hidden: Hidden width of the adversary MLP.
    """

    def __init__(
        self, groups: Tensor, n_groups: int, *, weight: float, sees_label: bool, hidden: int
    ) -> None:
        self.groups = groups
        self.n_groups = n_groups
        self.weight = float(weight)
        self.sees_label = sees_label
        self.hidden = hidden
        self.adversary_: nn.Module | None = None

    def init(self, head: FusionHead, config: HeadTrainConfig) -> None:  # noqa: D102
        assert head.cfg.hidden is not None
        extra = head.cfg.num_classes if self.sees_label else 0
        self.adversary_ = nn.Sequential(
            nn.Linear(head.cfg.hidden + extra, self.hidden),
            nn.GELU(),
            nn.Linear(self.hidden, self.n_groups),
        )

    def parameters(self, head: FusionHead) -> list[nn.Parameter]:  # noqa: D102
        assert self.adversary_ is not None
        return [*head.parameters(), *self.adversary_.parameters()]

    def _adversary(self, head: FusionHead, r: Tensor, y: Tensor) -> Tensor:
        assert self.adversary_ is not None
        a = _GradReverse.apply(r, self.weight)
        if self.sees_label:
            a = torch.cat([a, torch.eye(head.cfg.num_classes)[y]], dim=-1)
        return self.adversary_(a)

    def loss(  # noqa: D102
        self, head: FusionHead, batch: Mapping[str, Tensor], y: Tensor, idx: Tensor
    ) -> Tensor:
        r = _representation(head, batch)
        loss = nn.functional.cross_entropy(head.classifier[2](r), y)
        return loss + nn.functional.cross_entropy(self._adversary(head, r, y), self.groups[idx])

    def finish(  # noqa: D102
        self, head: FusionHead, embs: Mapping[str, Tensor], y: Tensor
    ) -> dict[str, Any]:
        with torch.no_grad():
            r = _representation(head, embs)
            acc = float(self._adversary(head, r, y).argmax(-1).eq(self.groups).float().mean())
        return {
            "adversary_weight": self.weight,
            "adversary_sees_label": self.sees_label,
            "adversary_group_accuracy": acc,
        }


def fit_adversarial_fusion_head(
    embeddings: Mapping[str, Tensor],
    labels: Tensor,
    groups: Sequence[Any],
    config: HeadTrainConfig = ADVERSARIAL_DEFAULTS,
    *,
    adversary_weight: float = 1.0,
    adversary_sees_label: bool = True,
    adversary_hidden: int = 32,
    **options: Any,
) -> FusionHead:
    """Train a :class:`~mmsafe.models.heads.FusionHead` whose hidden layer hides the group.

    The head (an MLP classifier, so there is a fused hidden representation ``r``) minimises
    cross-entropy on the label. An adversary MLP reads ``r`` through a gradient-reversal layer
    (and, with ``adversary_sees_label``, the one-hot true label) and minimises cross-entropy on
    the group; the reversed gradient pushes ``r`` to carry no group information the adversary
    can use. Both train jointly with one AdamW optimiser: this is
    :func:`~mmsafe.models.heads.fit_fusion_head` with :class:`AdversaryHooks`. The adversary
    is dropped afterwards: the result is a plain head (same config, statistics and
    ``save``/``load`` as any other). ``adversary_weight=0`` trains the head without any
    pressure from the adversary. Rows labelled ``-1`` are dropped; deterministic for a given
    seed.

    What it does and does not do: the head stops *using* the group (its group gaps and its
    reliance on a group shortcut shrink), but a fresh probe trained afterwards can usually still
    read the group from the hidden layer; gradient reversal fools its own adversary, it does
    not erase every linear trace (Elazar & Goldberg, 2018, "Adversarial Removal of Demographic
    Attributes from Text Data"). Do not use it as a guarantee that the representation is
    group-free.

    Args:
        embeddings: ``{modality: (N, D_m)}`` training embeddings.
        labels: ``(N,)`` class indices, ``-1`` = unlabelled.
        groups: ``(N,)`` sensitive group of each row.
        adversary_weight: Scale of the reversed gradient (0 = no adversarial pressure).
        adversary_sees_label: Give the adversary the true label too (equalized-odds flavour).
        adversary_hidden: Hidden width of the adversary MLP.
        config: The head and its recipe (default :data:`ADVERSARIAL_DEFAULTS`, an MLP with 64
            hidden units: the representation the adversary reads). The adversary trains with
            the head, on the same AdamW optimiser.
        **options: Fields of :class:`~mmsafe.models.heads.HeadTrainConfig` overriding
            ``config``'s (``hidden=8``, ``epochs=20``, ``seed=1``, ...).

    Returns:
        The trained head in eval mode; ``fit_info`` records the settings, the training accuracy
        and the adversary's final training accuracy on the group.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(200) % 2
        >>> grp = ["a" if i % 4 < 2 else "b" for i in range(200)]
        >>> x = torch.randn(200, 4, generator=g) + 3 * y[:, None].float()
        >>> head = fit_adversarial_fusion_head({"image": x}, y, grp, hidden=8, epochs=20)
        >>> head.fit_info["train_accuracy"] > 0.9, head({"image": x[:2]}).shape
        (True, torch.Size([2, 2]))
    """
    config = config.replace(**options)
    if config.hidden is None or config.hidden < 1:
        raise ValueError(
            f"The adversary reads the hidden layer: hidden must be >= 1, got {config.hidden}."
        )
    if adversary_weight < 0 or adversary_hidden < 1:
        raise ValueError(
            f"Need adversary_weight >= 0 and adversary_hidden >= 1, got {adversary_weight}, "
            f"{adversary_hidden}."
        )
    raw_y = torch.as_tensor(labels)
    g_all = _groups_array(groups, int(raw_y.shape[0]))
    check_inputs(embeddings, raw_y)
    g_names, g_codes = np.unique(g_all[raw_y.cpu().numpy() >= 0], return_inverse=True)
    if len(g_names) < 2:
        raise ValueError("The adversary needs at least two groups among the labelled rows.")
    hooks = AdversaryHooks(
        torch.as_tensor(g_codes, dtype=torch.long),
        len(g_names),
        weight=adversary_weight,
        sees_label=adversary_sees_label,
        hidden=adversary_hidden,
    )
    head = fit_fusion_head(embeddings, raw_y, config, hooks=hooks)
    head.fit_info["groups"] = [str(x) for x in g_names]
    return head


# --------------------------------------------------------------------------- post: thresholds


@functools.cache
def _class_score_type() -> type:
    """A prefit sklearn classifier over class probabilities (sklearn imported lazily).

    Its input ``X`` is the head's ``(N, C)`` class probabilities and
    ``predict_proba(X) = [1 - X[:, c], X[:, c]]``, so fairlearn's ThresholdOptimizer thresholds
    ``P(c | x)`` per group without re-running the head.
    """
    from sklearn.base import BaseEstimator, ClassifierMixin

    class ClassScore(ClassifierMixin, BaseEstimator):
        def __init__(self, positive_class: int = 0) -> None:
            self.positive_class = positive_class

        def fit(self, X: Any, y: Any = None) -> ClassScore:  # noqa: N803 (sklearn's name)
            self.classes_ = np.array([0, 1])
            return self

        def predict_proba(self, X: Any) -> np.ndarray:  # noqa: N803
            p = np.asarray(X, dtype=np.float64)[:, self.positive_class]
            return np.stack([1.0 - p, p], axis=1)

        def predict(self, X: Any) -> np.ndarray:  # noqa: N803
            return (np.asarray(X).argmax(axis=1) == self.positive_class).astype(int)

    return ClassScore


def one_vs_rest_override(probs: np.ndarray, positive_class: int, accept: np.ndarray) -> np.ndarray:
    """Multiclass predictions whose one-vs-rest decision for ``positive_class`` is ``accept``.

    Accepted rows predict ``positive_class``; rejected rows whose arg-max was ``positive_class``
    take their second most probable class; every other row keeps its arg-max.

    Example:
        >>> p = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])
        >>> one_vs_rest_override(p, 0, np.array([0, 1, 0])).tolist()
        [1, 0, 2]
    """
    p = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-p, axis=1, kind="stable")
    top, second = order[:, 0], order[:, 1]
    a = np.asarray(accept).astype(bool)
    return np.where(a, positive_class, np.where(top == positive_class, second, top)).astype(
        np.int64
    )


class GroupThresholdOptimizer:
    """Group-specific thresholds on one class's probability, via fairlearn's ThresholdOptimizer.

    Wraps ``ThresholdOptimizer(prefit=True, predict_method="predict_proba")`` around the scores
    ``P(positive_class | x)``; see the module docstring for how a multiclass prediction is
    rebuilt from the binary decision.

    Args:
        positive_class: The class ``c`` of the one-vs-rest problem; ``None`` picks, at ``fit``,
            the class with the largest equalized-odds difference of the unmitigated arg-max
            prediction on the fitting rows (the check's ``_worst`` class).
        constraints: ``"equalized_odds"`` or ``"demographic_parity"``.
        objective: fairlearn's objective (``"accuracy_score"`` or
            ``"balanced_accuracy_score"``).
        grid_size: fairlearn's grid size.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = rng.integers(0, 3, 300); g = rng.choice(["a", "b"], 300)
        >>> p = np.eye(3)[y] * 0.5 + rng.random((300, 3)); p /= p.sum(1, keepdims=True)
        >>> opt = GroupThresholdOptimizer(positive_class=1).fit(p, y, g)
        >>> opt.predict(p, g, random_state=0).shape
        (300,)
    """

    def __init__(
        self,
        positive_class: int | None = None,
        constraints: Literal["equalized_odds", "demographic_parity"] = "equalized_odds",
        objective: str = "accuracy_score",
        grid_size: int = 1000,
    ) -> None:
        self.positive_class = positive_class
        self.constraints = constraints
        self.objective = objective
        self.grid_size = grid_size

    def fit(self, probs: Any, target: Any, groups: Sequence[Any]) -> GroupThresholdOptimizer:
        """Fit fairlearn's thresholds on held-out rows (never on the rows you evaluate).

        Args:
            probs: ``(N, C)`` class probabilities of the head.
            target: ``(N,)`` true classes (rows ``< 0`` are dropped).
            groups: ``(N,)`` sensitive group of each row.

        Returns:
            ``self``, with ``positive_class_`` and ``optimizer_`` (the fitted
            ``ThresholdOptimizer``).
        """
        from fairlearn.postprocessing import ThresholdOptimizer

        if self.constraints not in CONSTRAINTS:
            raise ValueError(f"constraints must be one of {CONSTRAINTS}, got {self.constraints!r}")
        p, y = np.asarray(probs, dtype=np.float64), np.asarray(target, dtype=np.int64)
        if p.ndim != 2 or p.shape[0] != y.shape[0] or p.shape[1] < 2:
            raise ValueError(f"probs must be (N, C) with N = {y.shape[0]}, got {p.shape}.")
        g = _groups_array(groups, y.shape[0])
        keep = y >= 0
        p, y, g = p[keep], y[keep], g[keep]
        c = self.positive_class
        if c is None:
            rep = group_fairness(y, p.argmax(1), g, p.shape[1])
            c = int(np.nanargmax(rep.per_class["equalized_odds_difference"]))
        if not 0 <= int(c) < p.shape[1]:
            raise ValueError(f"positive_class {c} is out of range for {p.shape[1]} classes.")
        self.positive_class_ = int(c)
        self.optimizer_ = ThresholdOptimizer(
            estimator=_class_score_type()(self.positive_class_).fit(p),
            constraints=self.constraints,
            objective=self.objective,
            grid_size=self.grid_size,
            prefit=True,
            predict_method="predict_proba",
        ).fit(p, (y == self.positive_class_).astype(int), sensitive_features=g)
        return self

    def predict_binary(
        self, probs: Any, groups: Sequence[Any], random_state: int | None = None
    ) -> np.ndarray:
        """Fairlearn's (randomised) 0/1 decision for the positive class, ``(N,)``."""
        if not hasattr(self, "optimizer_"):
            raise NotFittedError("GroupThresholdOptimizer.fit() must run before predicting.")
        p = np.asarray(probs, dtype=np.float64)
        g = _groups_array(groups, p.shape[0])
        out = self.optimizer_.predict(p, sensitive_features=g, random_state=random_state)
        return np.asarray(out).astype(np.int64)

    def predict(
        self, probs: Any, groups: Sequence[Any], random_state: int | None = None
    ) -> np.ndarray:
        """Multiclass predictions ``(N,)`` (see :func:`one_vs_rest_override`)."""
        accept = self.predict_binary(probs, groups, random_state)
        return one_vs_rest_override(np.asarray(probs), self.positive_class_, accept)


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class MitigationRow:
    """One method's test-split numbers (gaps as in ``controllability.fairness``).

    Attributes:
        method: ``"none"`` (the unmitigated head), ``"pre"``, ``"in"`` or ``"post"``.
        accuracy: Multiclass accuracy.
        statistical_parity_difference: Macro over classes of the one-vs-rest
            ``max_g - min_g`` selection rate.
        equalized_odds_difference: Macro over classes of ``max(ΔTPR, ΔFPR)``.
        equalized_odds_difference_worst: The worst class's equalized-odds difference.
        positive_class_statistical_parity_difference: The gap on the report's positive class
            (the class the ``post`` method thresholds).
        positive_class_equalized_odds_difference: Ditto for equalized odds.
        accuracy_difference: ``max_g - min_g`` accuracy.
    """

    method: str
    accuracy: float
    statistical_parity_difference: float
    equalized_odds_difference: float
    equalized_odds_difference_worst: float
    positive_class_statistical_parity_difference: float
    positive_class_equalized_odds_difference: float
    accuracy_difference: float

    @classmethod
    def from_report(cls, method: str, report: FairnessReport, positive_class: int) -> MitigationRow:
        """The row of a :class:`~mmsafe.metrics.fairness.FairnessReport`."""
        s, pc = report.summary, report.per_class
        return cls(
            method=method,
            accuracy=float(s["overall_accuracy"]),
            statistical_parity_difference=float(s["statistical_parity_difference"]),
            equalized_odds_difference=float(s["equalized_odds_difference"]),
            equalized_odds_difference_worst=float(s["equalized_odds_difference_worst"]),
            positive_class_statistical_parity_difference=float(
                pc["statistical_parity_difference"][positive_class]
            ),
            positive_class_equalized_odds_difference=float(
                pc["equalized_odds_difference"][positive_class]
            ),
            accuracy_difference=float(s["accuracy_difference"]),
        )


TABLE_METRICS: tuple[str, ...] = (
    "accuracy",
    "statistical_parity_difference",
    "equalized_odds_difference",
    "equalized_odds_difference_worst",
    "positive_class_statistical_parity_difference",
    "positive_class_equalized_odds_difference",
    "accuracy_difference",
)
"""The numeric columns of :meth:`FairnessMitigationReport.table`."""


@dataclass(frozen=True)
class FairnessMitigationReport:
    """Before/after fairness of a fusion head under each mitigation, on the test split.

    Attributes:
        rows: The unmitigated head (method ``"none"``) first, then one row per method run.
        feature: The sensitive feature (e.g. ``"group"``; intersections joined by ``&``).
        groups: The groups of the test split.
        classes: Class names.
        positive_class: Name of the class the ``post`` method thresholds (and the
            ``positive_class_*`` columns report).
        constraints: fairlearn constraint of the ``post`` method.
        adversary_weight: Gradient-reversal weight of the ``in`` method.
        n_train: Labelled train rows (``pre`` and ``in`` fit on them).
        n_calibration: Labelled calibration rows (``post`` fits on them).
        n_test: Labelled test rows (every row of the table is measured on them).
        seed: Seed of the heads and of the randomised thresholds.
        details: Per-method extras (e.g. the adversary's group accuracy, the thresholds).
    """

    rows: tuple[MitigationRow, ...]
    feature: str
    groups: tuple[str, ...]
    classes: tuple[str, ...]
    positive_class: str
    constraints: str
    adversary_weight: float
    n_train: int
    n_calibration: int
    n_test: int
    seed: int
    details: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def methods(self) -> tuple[str, ...]:
        """Method names of the rows, ``"none"`` first."""
        return tuple(r.method for r in self.rows)

    def row(self, method: str) -> MitigationRow:
        """The row of ``method`` (``"none"`` for the unmitigated head)."""
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(f"No row {method!r}; the report has {list(self.methods)}.")

    def table(self) -> list[dict[str, Any]]:
        """One JSON-able dict per row: every metric and its change against ``"none"``.

        The keys are ``method``, each name in :data:`TABLE_METRICS`, and ``delta/<name>``.
        """
        base = self.row(BASELINE)
        out = []
        for r in self.rows:
            d: dict[str, Any] = {"method": r.method}
            for k in TABLE_METRICS:
                v = getattr(r, k)
                d[k] = v if math.isfinite(v) else None
                dv = v - getattr(base, k)
                d[f"delta/{k}"] = dv if math.isfinite(dv) else None
            out.append(d)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``rows`` as :meth:`table`)."""
        d = asdict(self)
        d["rows"] = self.table()
        return d


# --------------------------------------------------------------------------- one call


def _probs(head: FusionHead, emb: Mapping[str, Tensor]) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(head(emb).float(), dim=-1).numpy()


def mitigate_fairness(
    encoder: EncoderModel,
    dataset: Dataset,
    methods: Sequence[str] = METHODS,
    *,
    engine: Engine | None = None,
    seed: int = 0,
    attributes: Sequence[str] | None = ("group",),
    modalities: Sequence[str] | None = None,
    mode: str = "concat",
    hidden: int = 64,
    epochs: int = 60,
    min_group_size: int = 5,
    adversary_weight: float = 1.0,
    adversary_sees_label: bool = True,
    constraints: Literal["equalized_odds", "demographic_parity"] = "equalized_odds",
    positive_class: int | str | None = None,
) -> FairnessMitigationReport:
    """Fit the fusion head with and without each mitigation and compare their group gaps.

    Embeds the ``train``, ``calibration`` and ``test`` splits with ``encoder`` (cached by the
    engine), trains the unmitigated head on train (:func:`~mmsafe.models.heads.fit_fusion_head`,
    an MLP with ``hidden`` units so it has the same architecture as the ``in`` head), then:

    * ``pre``: a :class:`GroupStandardizer` fitted on train, a head trained on the standardised
      train rows, evaluated on the standardised test rows;
    * ``in``: :func:`fit_adversarial_fusion_head` on train;
    * ``post``: a :class:`GroupThresholdOptimizer` on the unmitigated head's probabilities,
      fitted on the calibration split, applied to test (``random_state=seed``).

    Every row of the report is measured on the labelled test rows with
    :func:`mmsafe.metrics.fairness.group_fairness`.

    Args:
        encoder: The CLIP-like model whose frozen embeddings feed the heads.
        dataset: Labelled data with ``train``, ``calibration`` (for ``post``) and ``test`` splits
            and a sensitive feature.
        methods: Any of ``"pre"``, ``"in"``, ``"post"``.
        engine: Embedding engine (default: CPU, no progress bars).
        seed: Seed of every head and of the randomised thresholds.
        attributes: Sensitive features as in ``controllability.fairness`` (``"group"`` is the
            group column, other names meta keys; several are intersected). ``None``: the group
            column plus every ``group_*`` meta key.
        modalities: Modalities fused (default: all of the dataset's).
        mode: Fusion mode of every head.
        hidden: Hidden width of every head's classifier.
        epochs: Training epochs of every head.
        min_group_size: ``pre``: fewest train rows a group needs for its own statistics.
        adversary_weight: ``in``: gradient-reversal weight.
        adversary_sees_label: ``in``: give the adversary the true label (equalized odds).
        constraints: ``post``: ``"equalized_odds"`` or ``"demographic_parity"``.
        positive_class: ``post``: class index or name to threshold; ``None`` = the class with
            the largest equalized-odds gap of the unmitigated head on the calibration split.

    Returns:
        A :class:`FairnessMitigationReport`.

    Raises:
        ValueError: Unknown method, missing split, or fewer than two groups.
    """
    from mmsafe.audit import evaluation_splits
    from mmsafe.checks.controllability.fairness import SEP, intersect, sensitive_features
    from mmsafe.engine.runner import Engine

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"Unknown mitigation method(s) {unknown}; use any of {METHODS}.")
    test, calibration, train = evaluation_splits(dataset)
    if train is None or not dataset.has_split("test") or not train.labelled.any():
        raise ValueError(
            f"Fairness mitigation trains on the 'train' split and measures on 'test'; "
            f"{dataset.name!r} needs both (a 'split' column)."
        )
    if "post" in methods and (calibration is None or not calibration.labelled.any()):
        raise ValueError(
            "The 'post' method fits its thresholds on labelled 'calibration' rows, which "
            f"{dataset.name!r} lacks; add some or drop 'post' from methods."
        )
    engine = engine or Engine(progress=False)
    mods = tuple(modalities or dataset.modality_names)
    classes = tuple(dataset.classes)
    n_cls = len(classes)

    def split_arrays(d: Dataset) -> tuple[dict[str, Tensor], np.ndarray, np.ndarray]:
        keep = d.labelled
        emb = engine.embed(encoder, d, mods)
        cols = sensitive_features(d, attributes)
        if not cols:
            raise ValueError("Fairness mitigation needs a 'group' column or group_* meta keys.")
        g = np.asarray(intersect(cols))[keep]
        idx = torch.as_tensor(np.flatnonzero(keep))
        return {m: e[idx] for m, e in emb.items()}, np.asarray(d.labels)[keep], g

    feature = SEP.join(sensitive_features(train, attributes))
    x_tr, y_tr, g_tr = split_arrays(train)
    x_te, y_te, g_te = split_arrays(test)
    if len(np.unique(g_te)) < 2:
        raise ValueError("The test split needs at least two groups to measure a gap.")
    y_tr_t = torch.as_tensor(y_tr)
    head_kw: dict[str, Any] = {"num_classes": n_cls, "mode": mode, "hidden": hidden, "seed": seed}

    base = fit_fusion_head(x_tr, y_tr_t, epochs=epochs, classes=classes, **head_kw)
    p_te = _probs(base, x_te)
    preds: dict[str, np.ndarray] = {BASELINE: p_te.argmax(1)}
    details: dict[str, dict[str, Any]] = {
        BASELINE: {"train_accuracy": base.fit_info["train_accuracy"]}
    }

    # The positive class of the post method (and of the positive_class_* columns).
    post: GroupThresholdOptimizer | None = None
    x_cal: dict[str, Tensor] = {}
    if isinstance(positive_class, str):
        if positive_class not in classes:
            raise ValueError(f"positive_class {positive_class!r} is not one of {list(classes)}.")
        positive_class = classes.index(positive_class)
    if calibration is not None and calibration.labelled.any():
        x_cal, y_cal, g_cal = split_arrays(calibration)
        post = GroupThresholdOptimizer(positive_class, constraints=constraints)
        post.fit(_probs(base, x_cal), y_cal, g_cal)
        pos = post.positive_class_
    else:
        pos = int(positive_class) if positive_class is not None else 0

    for method in methods:
        if method == "pre":
            norm = GroupStandardizer(min_group_size=min_group_size).fit(x_tr, g_tr)
            head = fit_fusion_head(
                norm.transform(x_tr, g_tr), y_tr_t, epochs=epochs, classes=classes, **head_kw
            )
            preds["pre"] = _probs(head, norm.transform(x_te, g_te)).argmax(1)
            details["pre"] = {
                "groups_with_own_statistics": list(norm.groups_),
                "train_accuracy": head.fit_info["train_accuracy"],
            }
        elif method == "in":
            head = fit_adversarial_fusion_head(
                x_tr,
                y_tr_t,
                g_tr,
                adversary_weight=adversary_weight,
                adversary_sees_label=adversary_sees_label,
                epochs=epochs,
                classes=classes,
                **head_kw,
            )
            preds["in"] = _probs(head, x_te).argmax(1)
            details["in"] = {
                k: head.fit_info[k]
                for k in ("train_accuracy", "adversary_group_accuracy", "adversary_sees_label")
            }
        else:
            assert post is not None
            preds["post"] = post.predict(p_te, g_te, random_state=seed)
            details["post"] = {
                "positive_class": classes[pos],
                "constraints": constraints,
                "thresholds": _thresholds(post),
            }

    rows = tuple(
        MitigationRow.from_report(m, group_fairness(y_te, p, g_te, n_cls), pos)
        for m, p in preds.items()
    )
    return FairnessMitigationReport(
        rows=rows,
        feature=feature,
        groups=tuple(str(x) for x in np.unique(g_te)),
        classes=classes,
        positive_class=classes[pos],
        constraints=constraints,
        adversary_weight=float(adversary_weight),
        n_train=int(y_tr.shape[0]),
        n_calibration=int(next(iter(x_cal.values())).shape[0]) if x_cal else 0,
        n_test=int(y_te.shape[0]),
        seed=seed,
        details=details,
    )


def _thresholds(post: GroupThresholdOptimizer) -> dict[str, Any]:
    """Fairlearn's per-group interpolated thresholds, JSON-able."""
    out: dict[str, Any] = {}
    thr = getattr(post.optimizer_.interpolated_thresholder_, "interpolation_dict", {})
    for g, rule in thr.items():
        out[str(g)] = {
            k: float(v) if np.isscalar(v) and isinstance(v, int | float | np.floating) else str(v)
            for k, v in dict(rule).items()
        }
    return out


# --------------------------------------------------------------------------- the hardener


@register_hardener
class FairnessHardener(Hardener):
    """``mmsafe harden fairness``: pre / in / post mitigation of the fusion head, with a table.

    :func:`mitigate_fairness` trains the unmitigated head and one head (or threshold set) per
    method and measures each on the test rows; :meth:`save` writes the table as
    ``fairness_mitigation.json`` and :meth:`annotate` adds it to the card of the audit
    (``performance`` and ``controllability.fairness``) of the unmitigated fusion head, as the
    plot ``mitigation`` of the fairness check. Nothing is deployed, so there is no
    before-audit.

    Args:
        methods: Comma-separated: pre, in, post.
        constraints: post: equalized_odds or demographic_parity.
        positive_class: post: class to threshold (default: the least fair).

    Attributes:
        report_: the :class:`FairnessMitigationReport`.
    """

    name = "fairness"
    description = "Group norming (pre), adversarial head (in), group thresholds (post): gaps."
    tasks = ("fusion",)
    default_task = "fusion"
    checks = "performance,controllability.fairness"
    artifact = "fairness_mitigation.json"
    audits_before = False

    def __init__(
        self,
        *,
        methods: tuple[str, ...] = METHODS,
        constraints: str = "equalized_odds",
        positive_class: str | None = None,
    ) -> None:
        self.methods = methods
        self.constraints = constraints
        self.positive_class = positive_class
        self.report_: FairnessMitigationReport | None = None

    def validate(self, model: EncoderModel, task: Task, data: Dataset) -> None:  # noqa: D102
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise HardenError(f"Unknown mitigation method(s) {unknown}; use any of {METHODS}.")
        if self.constraints not in CONSTRAINTS:
            raise HardenError(
                f"Unknown constraints {self.constraints!r}; use one of {', '.join(CONSTRAINTS)}."
            )
        super().validate(model, task, data)

    def fit(  # noqa: D102
        self, model: EncoderModel, task: Task, data: Dataset, engine: Engine, *, seed: int = 0
    ) -> FairnessHardener:
        try:
            self.report_ = mitigate_fairness(
                model,
                data,
                self.methods,
                engine=engine,
                seed=seed,
                constraints=self.constraints,  # type: ignore[arg-type]
                positive_class=self.positive_class,
            )
        except ValueError as exc:
            raise HardenError(str(exc)) from None
        return self

    def _report(self) -> FairnessMitigationReport:
        if self.report_ is None:
            raise RuntimeError("FairnessHardener.fit() must run first.")
        return self.report_

    def transform(self, model: EncoderModel, task: Task) -> Hardened:  # noqa: D102
        return Hardened(model, task)

    def summary(self) -> dict[str, Any]:  # noqa: D102
        return {
            f"{r.method}/{m}": getattr(r, m)
            for r in self._report().rows
            for m in ("accuracy", "equalized_odds_difference")
        }

    def save(self, path: Path) -> Path:  # noqa: D102
        from mmsafe.engine.cache import atomic_write_json

        return atomic_write_json(path, self._report().to_dict())

    def annotate(self, card: dict[str, Any]) -> bool:
        """Add the mitigation table to the fairness check's plots (when that check ran)."""
        report = self._report()
        fairness = card["checks"].get("controllability.fairness")
        if fairness is None or fairness.get("status") != "ok":
            return False
        fairness["plots"]["mitigation"] = {
            "kind": "table",
            "title": f"Mitigation on the test rows (post thresholds class "
            f"{report.positive_class!r}, {report.constraints})",
            "columns": ["method", *(m.replace("_", " ") for m in TABLE_METRICS)],
            "rows": [[r["method"], *(r[m] for m in TABLE_METRICS)] for r in report.table()],
        }
        return True
