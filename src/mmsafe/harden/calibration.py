"""Calibration hardeners: temperature scaling, and CML regularisation of fusion heads.

**Temperature scaling** (Guo et al., ICML 2017) divides every logit by one scalar ``T > 0``
learned on held-out labelled rows by minimising the negative log-likelihood. It never changes
the arg-max prediction (so accuracy is untouched) and fixes a model that is uniformly over-
(``T > 1``) or under-confident (``T < 1``)::

    scaler = TemperatureScaler().fit(cal_logits, cal_labels)   # the calibration split
    probs = scaler.predict_proba(test_logits)
    scaler.save("temperature.json")

**CML** (Ma et al., "Calibrating Multimodal Learning", ICML 2023) fine-tunes a fusion head so
that removing a modality never *raises* its confidence. :func:`cml_finetune` adds the released
regulariser to cross-entropy on the full and the modality-reduced inputs (a removed modality is
replaced by the head's null embedding, the training mean).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from mmsafe.engine.cache import atomic_write_json
from mmsafe.harden.base import Hardened, Hardener, register_hardener
from mmsafe.models.heads import FusionHead, check_inputs, num_threads

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.engine.runner import Engine
    from mmsafe.models.base import EncoderModel
    from mmsafe.tasks.base import Task

__all__ = [
    "TemperatureHardener",
    "TemperatureScaler",
    "cml_finetune",
    "cml_loss",
    "fit_temperature",
    "temperature_nll",
]

FORMAT = "mmsafe.temperature/1"
T_MIN, T_MAX = 1e-2, 1e2
"""The fitted temperature is clipped to this range (a perfectly separable calibration set
would otherwise drive ``T`` to 0)."""


# --------------------------------------------------------------------------- temperature scaling


def _as_logits(logits: Any) -> Tensor:
    """``(N, C)`` float64 CPU tensor of finite logits."""
    z = torch.as_tensor(np.asarray(logits) if not isinstance(logits, Tensor) else logits)
    z = z.detach().cpu().to(torch.float64)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2:
        raise ValueError(f"logits must be (N, C) with N >= 1 and C >= 2, got {tuple(z.shape)}.")
    if not torch.isfinite(z).all():
        raise ValueError("logits contain NaN or infinite values.")
    return z


def _as_labels(labels: Any, n: int, n_classes: int) -> Tensor:
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
    y = y.detach().cpu()
    if y.ndim != 1 or y.shape[0] != n or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(
            f"labels must be {n} integer class indices, got {y.dtype} {tuple(y.shape)}."
        )
    y = y.long()
    if (y < -1).any() or (y >= n_classes).any():
        raise ValueError(f"labels must be in [0, {n_classes}) or -1 (unlabelled).")
    return y


def _labelled(logits: Any, labels: Any) -> tuple[Tensor, Tensor]:
    """Validated float64 logits and long labels with the ``-1`` rows dropped."""
    z = _as_logits(logits)
    y = _as_labels(labels, z.shape[0], z.shape[1])
    keep = y >= 0
    if not keep.any():
        raise ValueError("Every row is unlabelled (-1); temperature scaling needs labels.")
    return z[keep], y[keep]


def temperature_nll(logits: Any, labels: Any, temperature: float) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)`` (rows with ``-1`` dropped).

    Example:
        >>> round(temperature_nll([[2.0, 0.0], [0.0, 2.0]], [0, 0], 1.0), 4)
        1.1269
    """
    z, y = _labelled(logits, labels)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    return float(nn.functional.cross_entropy(z / float(temperature), y))


def _fit_log_temperature(z: Tensor, y: Tensor, max_iter: int) -> float:
    """Minimise the NLL over ``log T`` with L-BFGS (strong Wolfe line search), float64."""
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_t],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z * torch.exp(-log_t), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    value = float(log_t.detach())
    if not math.isfinite(value):
        value = math.log(T_MIN) if value < 0 else math.log(T_MAX)
    return value


class TemperatureScaler:
    """Post-hoc temperature scaling, scikit-learn style (``fit`` / ``transform``).

    ``fit`` learns ``temperature_`` by minimising the mean NLL of ``softmax(logits / T)`` over
    ``log T`` with L-BFGS in float64, starting from ``T = 1``; the result is clipped to
    ``[0.01, 100]``. Rows labelled ``-1`` are ignored.

    Args:
        max_iter: the most L-BFGS iterations.

    Attributes:
        temperature_: the fitted ``T`` (after ``fit`` or ``load``).
        nll_before_: calibration NLL at ``T = 1``.
        nll_after_: calibration NLL at the fitted ``T``.
        n_fit_: labelled rows it was fitted on.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(2000, 3, generator=g)
        >>> y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
        >>> scaler = TemperatureScaler().fit(4 * z, y)  # 4x overconfident
        >>> abs(scaler.temperature_ - 4.0) < 0.3
        True
        >>> scaler.transform(torch.tensor([[4.0, 0.0]])).mul(scaler.temperature_).round().tolist()
        [[4.0, 0.0]]
    """

    def __init__(self, max_iter: int = 100) -> None:
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}.")
        self.max_iter = max_iter
        self.temperature_: float | None = None
        self.nll_before_: float | None = None
        self.nll_after_: float | None = None
        self.n_fit_: int = 0

    def fit(self, logits: Any, labels: Any) -> TemperatureScaler:
        """Learn the temperature on labelled held-out rows.

        Args:
            logits: ``(N, C)`` logits (numpy or torch; any device).
            labels: ``(N,)`` class indices, ``-1`` = unlabelled (ignored).

        Returns:
            ``self``.
        """
        z, y = _labelled(logits, labels)
        log_t = _fit_log_temperature(z, y, self.max_iter)
        self.temperature_ = float(np.clip(math.exp(log_t), T_MIN, T_MAX))
        with torch.no_grad():
            self.nll_before_ = float(nn.functional.cross_entropy(z, y))
            self.nll_after_ = float(nn.functional.cross_entropy(z / self.temperature_, y))
        self.n_fit_ = int(y.shape[0])
        return self

    def _t(self) -> float:
        if self.temperature_ is None:
            raise RuntimeError("This TemperatureScaler is not fitted: call fit() or load().")
        return self.temperature_

    def transform(self, logits: Any) -> Any:
        """``logits / T``: a tensor stays a tensor (same dtype, device), anything else -> numpy."""
        t = self._t()
        if isinstance(logits, Tensor):
            return logits / t
        return np.asarray(logits, dtype=np.float64) / t

    def predict_proba(self, logits: Any) -> np.ndarray:
        """``softmax(logits / T)`` as float64 numpy ``(N, C)``."""
        z = torch.as_tensor(np.asarray(logits) if not isinstance(logits, Tensor) else logits)
        z = z.detach().cpu().to(torch.float64)
        return torch.softmax(z / self._t(), dim=-1).numpy()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state."""
        return {
            "format": FORMAT,
            "temperature": self._t(),
            "max_iter": self.max_iter,
            "nll_before": self.nll_before_,
            "nll_after": self.nll_after_,
            "n_fit": self.n_fit_,
        }

    def save(self, path: str | Path) -> Path:
        """Write the fitted state to a JSON file (atomically)."""
        return atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TemperatureScaler:
        """Inverse of :meth:`to_dict`."""
        if d.get("format") != FORMAT:
            raise ValueError(f"Not a saved TemperatureScaler (format {d.get('format')!r}).")
        t = float(d["temperature"])
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"Saved temperature must be positive and finite, got {t}.")
        scaler = cls(max_iter=int(d.get("max_iter", 100)))
        scaler.temperature_ = t
        scaler.nll_before_ = d.get("nll_before")
        scaler.nll_after_ = d.get("nll_after")
        scaler.n_fit_ = int(d.get("n_fit", 0))
        return scaler

    @classmethod
    def load(cls, path: str | Path) -> TemperatureScaler:
        """Read a scaler written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


@register_hardener
class TemperatureHardener(Hardener):
    """``mmsafe harden calibration``: a :class:`TemperatureScaler` fitted on the calibration rows.

    The after-audit wraps the task in a :class:`~mmsafe.tasks.base.TemperatureScaledTask`, so
    accuracy is unchanged and ECE / NLL show the effect.

    Attributes:
        scaler_: the fitted :class:`TemperatureScaler`.
    """

    name = "calibration"
    description = "Temperature scaling: fit T on the calibration split; ECE before/after."
    needs = ("calibration",)
    checks = "performance,calibration"
    artifact = "temperature.json"

    def __init__(self) -> None:
        self.scaler_: TemperatureScaler | None = None

    def fit(  # noqa: D102
        self, model: EncoderModel, task: Task, data: Dataset, engine: Engine, *, seed: int = 0
    ) -> TemperatureHardener:
        from mmsafe.harden.flow import calibration_outputs

        cal, _ = calibration_outputs(model, data, task, engine)
        keep = cal.labels >= 0
        self.scaler_ = TemperatureScaler().fit(cal.logits[keep], cal.labels[keep])
        return self

    def _scaler(self) -> TemperatureScaler:
        if self.scaler_ is None:
            raise RuntimeError("TemperatureHardener.fit() must run first.")
        return self.scaler_

    def transform(self, model: EncoderModel, task: Task) -> Hardened:  # noqa: D102
        from mmsafe.tasks.base import TemperatureScaledTask

        return Hardened(model, TemperatureScaledTask(task, self._scaler()._t()))

    def summary(self) -> dict[str, Any]:  # noqa: D102
        return {"temperature": self._scaler()._t()}

    def save(self, path: Path) -> Path:  # noqa: D102
        return self._scaler().save(path)


def fit_temperature(
    scores: Any,
    labels: Any,
    *,
    scores_are: Literal["logits", "probs"] = "logits",
    max_iter: int = 100,
) -> TemperatureScaler:
    """Fit a :class:`TemperatureScaler` on logits, or on probabilities (through their log).

    ``log p`` differs from the logits only by a per-row constant, which softmax ignores, so a
    temperature fitted on ``log p`` equals one fitted on the logits. Probabilities are clipped
    below at ``1e-12`` first.

    Args:
        scores: ``(N, C)`` logits or probabilities of the calibration rows.
        labels: ``(N,)`` class indices, ``-1`` = unlabelled (ignored).
        scores_are: ``"logits"`` or ``"probs"``.
        max_iter: the most L-BFGS iterations.

    Returns:
        The fitted scaler; apply it with ``scaler.transform(logits)`` (or to probabilities
        with ``scaler.transform(np.log(probs))``).

    Example:
        >>> p = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]
        >>> s1 = fit_temperature(p, [0, 1, 1, 0], scores_are="probs")
        >>> s2 = fit_temperature(np.log(p) + 3.0, [0, 1, 1, 0])
        >>> abs(s1.temperature_ - s2.temperature_) < 1e-6
        True
    """
    if scores_are == "probs":
        p = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, float)
        scores = np.log(np.clip(p, 1e-12, None))
    elif scores_are != "logits":
        raise ValueError(f"scores_are must be 'logits' or 'probs', got {scores_are!r}.")
    return TemperatureScaler(max_iter=max_iter).fit(scores, labels)


# --------------------------------------------------------------------------- CML


def _top_confidence(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Max softmax probability and arg-max, per row."""
    return torch.softmax(logits, dim=-1).max(dim=-1)


def cml_loss(
    head: FusionHead,
    batch: Mapping[str, Tensor],
    y: Tensor,
    removal_rank: Tensor,
    *,
    eps: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy on a chain of modality-reduced inputs, and the CML regulariser.

    For ``V`` modalities, input ``k = 0 .. V-1`` has the modalities with ``removal_rank < k``
    replaced by the head's null embedding (``k = 0`` is the full input; ``k = V-1`` keeps one
    modality). With ``c_k``, ``yhat_k`` the top confidence and prediction on input ``k``, the
    regulariser is (CML's released code, mean over rows instead of sum)::

        sum_k mean_i  1[yhat_k = y] ReLU(c_{k+1} - c_k - eps)
                    + 1[yhat_k != y and yhat_{k+1} != y] ReLU(c_{k+1} - stopgrad(c_k) - eps)

    Args:
        head: the fusion head (train or eval mode).
        batch: ``{modality: (B, D_m)}`` embeddings of every modality of the head.
        y: ``(B,)`` labels.
        removal_rank: ``(B, V)`` integers; row ``i`` removes modality ``m`` at step
            ``removal_rank[i, m] + 1`` (a permutation of ``0 .. V-1`` per row).
        eps: tolerance margin.

    Returns:
        ``(ce, reg)``: the cross-entropy averaged over the ``V`` inputs, and the regulariser.
    """
    mods = head.modalities
    null = head.null_embeddings
    conf, pred, ce = [], [], []
    for k in range(len(mods)):
        inputs = {}
        for j, m in enumerate(mods):
            x = batch[m].to(null[m].dtype)
            removed = (removal_rank[:, j] < k)[:, None]
            inputs[m] = torch.where(removed, null[m].expand_as(x), x)
        logits = head(inputs)
        ce.append(nn.functional.cross_entropy(logits, y))
        c, p = _top_confidence(logits)
        conf.append(c)
        pred.append(p)
    reg = torch.zeros((), dtype=conf[0].dtype)
    for k in range(len(mods) - 1):
        right = (pred[k] == y).to(conf[k].dtype)
        both_wrong = ((pred[k] != y) & (pred[k + 1] != y)).to(conf[k].dtype)
        rise = torch.relu(conf[k + 1] - conf[k] - eps)
        rise_sg = torch.relu(conf[k + 1] - conf[k].detach() - eps)
        reg = reg + (right * rise + both_wrong * rise_sg).mean()
    return torch.stack(ce).mean(), reg


def cml_finetune(
    head: FusionHead,
    embeddings: Mapping[str, Tensor],
    labels: Any,
    *,
    lam: float = 10.0,
    epochs: int = 60,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    eps: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> FusionHead:
    """Fine-tune a copy of a fusion head with CML regularisation.

    Minimises ``CE (averaged over the full and the modality-reduced inputs) + lam * L_CML`` with
    AdamW (see :func:`cml_loss`); each row draws a fresh random modality-removal order every
    epoch. The null embeddings (training means) and scales of ``head`` are kept, so a removed
    modality means the same thing as at audit time. The input head is not modified.

    The released code sums the regulariser over a batch of 200 and weights it by
    ``beta / 100 = 0.1``; with the mean over rows used here that corresponds to ``lam = 20``.
    The default ``lam = 10`` sits in that range.

    Args:
        head: a fitted :class:`~mmsafe.models.heads.FusionHead` (e.g. ``task.head_``).
        embeddings: ``{modality: (N, D_m)}`` embeddings of labelled rows (the train split);
            every modality of the head must be present.
        labels: ``(N,)`` class indices, ``-1`` = unlabelled (dropped).
        lam: weight of the regulariser.
        epochs: passes over the rows.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        eps: CML's tolerance margin.
        batch_size: rows per step.
        seed: seeds the batch order and the removal orders (the global RNG is left alone).

    Returns:
        The fine-tuned copy, in eval mode, with ``fit_info["cml"]`` recording the settings.

    Example:
        >>> from mmsafe.models.heads import fit_fusion_head
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(40) % 2
        >>> emb = {"image": torch.randn(40, 4, generator=g) + y[:, None],
        ...        "text": torch.randn(40, 3, generator=g) + y[:, None]}
        >>> head = fit_fusion_head(emb, y, epochs=5)
        >>> tuned = cml_finetune(head, emb, y, epochs=2)
        >>> tuned is head, tuned.fit_info["cml"]["lam"]
        (False, 10.0)
    """
    embs, y = check_inputs(embeddings, torch.as_tensor(np.asarray(labels)))
    missing = [m for m in head.modalities if m not in embs]
    if missing:
        raise ValueError(
            f"cml_finetune needs embeddings of every head modality; missing {missing}."
        )
    if len(head.modalities) < 2:
        raise ValueError("CML needs a head over at least two modalities.")
    if lam < 0 or eps < 0 or epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError("Need lam >= 0, eps >= 0, epochs >= 1, batch_size >= 1 and lr > 0.")
    tuned = copy.deepcopy(head)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=weight_decay)
    n, v = int(y.shape[0]), len(tuned.modalities)
    tuned.train()
    with num_threads(), torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            ranks = torch.argsort(torch.rand(n, v, generator=gen), dim=1)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                batch = {m: embs[m][idx] for m in tuned.modalities}
                ce, reg = cml_loss(tuned, batch, y[idx], ranks[idx], eps=eps)
                loss = ce + lam * reg
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    tuned.eval()
    tuned.fit_info = {
        **head.fit_info,
        "cml": {
            "lam": float(lam),
            "epochs": epochs,
            "lr": lr,
            "weight_decay": weight_decay,
            "eps": float(eps),
            "batch_size": batch_size,
            "seed": seed,
            "n_train": n,
        },
    }
    return tuned
