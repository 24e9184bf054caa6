"""Differentially private training of a fusion head (DP-SGD with opacus).

:func:`dp_fit_fusion_head` trains the same :class:`~mmsafe.models.heads.FusionHead` as
:func:`~mmsafe.models.heads.fit_fusion_head`, but with DP-SGD: each step draws a Poisson
sample of the training rows, clips every row's gradient to ``max_grad_norm`` and adds Gaussian
noise. opacus' ``PrivacyEngine.make_private_with_epsilon`` picks the noise multiplier that
spends at most ``target_epsilon`` (at ``delta``) over the requested epochs, and its accountant
reports the budget actually spent::

    head, report = dp_fit_fusion_head({"image": img, "text": txt}, labels, target_epsilon=8.0)
    report.epsilon, report.noise_multiplier  # e.g. 7.96, 1.07

The guarantee covers the labelled training rows (example-level DP, add/remove adjacency). To
keep it, nothing else is fitted on those rows: the head's per-modality centre (its *null
embedding*) and scale are zero and one unless ``public_embeddings`` supplies rows that need no
protection to compute them from. The number of classes should come from the task
(``num_classes``), not from the private labels.

Requires the optional dependency ``opacus`` (tested with opacus 1.6.0 and torch 2.13).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mmsafe.harden.base import Hardened, Hardener, HardenError, register_hardener
from mmsafe.models.heads import (
    FusionConfig,
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


@dataclass(frozen=True)
class DPReport:
    """What a DP-SGD fit spent and achieved.

    Attributes:
        epsilon: Privacy budget spent, from opacus' accountant (at ``delta``).
        delta: The delta of the guarantee.
        target_epsilon: The budget that was asked for.
        noise_multiplier: Std of the added noise divided by ``max_grad_norm``.
        max_grad_norm: Per-example gradient clipping norm.
        sample_rate: Poisson sampling rate of each row per step.
        steps: Optimiser steps taken (what the accountant composed).
        epochs: Passes (in expectation) over the training rows.
        n_train: Labelled training rows.
        train_accuracy: Accuracy of the final head on its training rows.
        accountant: opacus accounting mechanism (``"rdp"`` or ``"prv"``).
        opacus_version: Version of opacus that trained the head.
    """

    epsilon: float
    delta: float
    target_epsilon: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    epochs: int
    n_train: int
    train_accuracy: float
    accountant: str
    opacus_version: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


class _ConcatInput(nn.Module):
    """Feeds a :class:`FusionHead` from one concatenated tensor, the input opacus expects."""

    def __init__(self, head: FusionHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        parts = torch.split(x, list(self.head.cfg.dims), dim=1)
        return self.head(dict(zip(self.head.cfg.modalities, parts, strict=True)))


DP_DEFAULTS = HeadTrainConfig(epochs=30, lr=0.1, batch_size=64, weight_decay=0.0)
"""The head recipe of :func:`dp_fit_fusion_head` (SGD with momentum; no weight decay)."""


class DPSGDHooks(HeadTrainHooks):
    """:func:`~mmsafe.models.heads.fit_fusion_head` with opacus' DP-SGD instead of AdamW.

    The statistics come from public rows (else zero and one), and :meth:`optimise` runs
    ``make_private_with_epsilon`` with Poisson sampling; after training, ``report_`` holds
    the :class:`DPReport`.
    """

    def __init__(
        self,
        *,
        target_epsilon: float,
        delta: float,
        max_grad_norm: float,
        momentum: float,
        public_embeddings: Mapping[str, Tensor] | None,
        accountant: str,
    ) -> None:
        self.target_epsilon = float(target_epsilon)
        self.delta = delta
        self.max_grad_norm = float(max_grad_norm)
        self.momentum = momentum
        self.public_embeddings = public_embeddings
        self.accountant = accountant
        self.report_: DPReport | None = None
        self._spent: dict[str, Any] = {}

    def statistics(  # noqa: D102
        self, cfg: FusionConfig, embs: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        return _statistics(cfg, self.public_embeddings)

    def optimise(  # noqa: D102
        self,
        head: FusionHead,
        embs: dict[str, Tensor],
        y: Tensor,
        config: HeadTrainConfig,
        gen: torch.Generator,
    ) -> FusionHead:
        from opacus import PrivacyEngine

        cfg = head.cfg
        x = torch.cat([embs[m] for m in cfg.modalities], dim=1)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y),
            batch_size=config.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(config.seed),
        )
        model = _ConcatInput(head)
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=self.momentum,
            weight_decay=config.weight_decay,
        )
        with warnings.catch_warnings():
            # opacus warns that secure_mode is off (documented above) and torch that the inputs
            # need no gradient (they are data); neither is actionable here.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            engine = PrivacyEngine(accountant=self.accountant)
            dp_model, dp_opt, dp_loader = engine.make_private_with_epsilon(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                target_epsilon=self.target_epsilon,
                target_delta=self.delta,
                epochs=config.epochs,
                max_grad_norm=self.max_grad_norm,
                poisson_sampling=True,
                noise_generator=torch.Generator().manual_seed(config.seed + 1),
            )
            dp_model.train()
            for _ in range(config.epochs):
                for xb, yb in dp_loader:
                    dp_opt.zero_grad(set_to_none=True)
                    if len(yb) == 0:  # an empty Poisson sample still takes a (pure-noise) step
                        dp_model(x[:0]).sum().backward()
                    else:
                        nn.functional.cross_entropy(dp_model(xb), yb).backward()
                    dp_opt.step()
            self._spent = {
                "epsilon": float(engine.get_epsilon(self.delta)),
                "noise_multiplier": float(dp_opt.noise_multiplier),
                "sample_rate": float(dp_loader.sample_rate),
                "steps": sum(int(s) for _, _, s in engine.accountant.history),
                "epochs": config.epochs,
            }
        # A clean head, free of opacus' hooks and per-sample gradient attributes.
        trained = FusionHead(cfg)
        trained.load_state_dict(head.state_dict())
        return trained

    def finish(  # noqa: D102
        self, head: FusionHead, embs: Mapping[str, Tensor], y: Tensor
    ) -> dict[str, Any]:
        import opacus

        with torch.no_grad():
            train_acc = float(head(embs).argmax(-1).eq(y).float().mean())
        self.report_ = DPReport(
            delta=self.delta,
            target_epsilon=self.target_epsilon,
            max_grad_norm=self.max_grad_norm,
            n_train=int(y.shape[0]),
            train_accuracy=train_acc,
            accountant=self.accountant,
            opacus_version=str(opacus.__version__),
            **self._spent,
        )
        return {
            "dp": self.report_.to_dict(),
            "momentum": self.momentum,
            "public_statistics": self.public_embeddings is not None,
        }


def dp_fit_fusion_head(
    train_embeddings: Mapping[str, Tensor],
    labels: Tensor,
    config: HeadTrainConfig = DP_DEFAULTS,
    *,
    target_epsilon: float = 8.0,
    delta: float | None = None,
    max_grad_norm: float = 1.0,
    momentum: float = 0.9,
    public_embeddings: Mapping[str, Tensor] | None = None,
    accountant: str = "rdp",
    **options: Any,
) -> tuple[FusionHead, DPReport]:
    """Train a :class:`~mmsafe.models.heads.FusionHead` with DP-SGD (opacus, Poisson sampling).

    :func:`~mmsafe.models.heads.fit_fusion_head` with :class:`DPSGDHooks`. Rows labelled ``-1``
    are dropped first. The optimiser is SGD with momentum on clipped, noised per-example
    gradients; the noise multiplier is the smallest one (found by opacus) for which
    ``config.epochs`` passes at sampling rate ``1 / ceil(n / batch_size)`` spend at most
    ``target_epsilon``. Deterministic for a given seed (the sampler and the noise have their
    own generators; the global RNG is left alone). Not for cryptographic-grade deployments:
    opacus' ``secure_mode`` is off.

    Args:
        train_embeddings: ``{modality: (N, D_m)}`` embeddings of the private training rows.
        labels: ``(N,)`` class indices, ``-1`` = unlabelled.
        config: The head and its recipe (default :data:`DP_DEFAULTS`: 30 epochs, expected
            batch 64, SGD lr 0.1). Pass ``num_classes`` from the task, not from the private
            labels (the default reads them), for a clean guarantee; ``modality_dropout`` must
            be 0.
        target_epsilon: Privacy budget to spend.
        delta: Delta of the guarantee (default ``1 / n`` for ``n`` labelled rows).
        max_grad_norm: Per-example gradient clipping norm.
        momentum: SGD momentum.
        public_embeddings: Optional ``{modality: (M, D_m)}`` non-private rows from which the
            head's per-modality centre and scale are computed; without them the centre is zero
            and the scale one, so no statistic of the private rows escapes outside DP-SGD.
        accountant: opacus accountant, ``"rdp"`` (default) or ``"prv"``.
        **options: Fields of :class:`~mmsafe.models.heads.HeadTrainConfig` overriding
            ``config``'s (``epochs=10``, ``mode="gated"``, ``num_classes=5``, ...).

    Returns:
        ``(head, report)``: the trained head in eval mode (``fit_info`` holds the report) and a
        :class:`DPReport`.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(400) % 2
        >>> x = torch.randn(400, 4, generator=g) * 0.3 + torch.stack([y, 1 - y], 1).repeat(1, 2)
        >>> head, rep = dp_fit_fusion_head({"image": x}, y, target_epsilon=4.0, epochs=10)
        >>> rep.epsilon <= 4.0 + 0.05, rep.delta == 1 / 400, rep.train_accuracy > 0.9
        (True, True, True)
        >>> head({"image": x[:3]}).shape
        torch.Size([3, 2])
    """
    config = config.replace(**options)
    if target_epsilon <= 0 or max_grad_norm <= 0:
        raise ValueError(
            f"Need target_epsilon > 0 and max_grad_norm > 0; got {target_epsilon}, {max_grad_norm}."
        )
    if config.modality_dropout:
        raise ValueError("DP-SGD does not support modality_dropout (it would need accounting).")
    if accountant not in ("rdp", "prv"):
        raise ValueError(f"accountant must be 'rdp' or 'prv', got {accountant!r}.")
    n = int(check_inputs(train_embeddings, labels)[1].shape[0])
    delta = 1.0 / n if delta is None else float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")
    hooks = DPSGDHooks(
        target_epsilon=target_epsilon,
        delta=delta,
        max_grad_norm=max_grad_norm,
        momentum=momentum,
        public_embeddings=public_embeddings,
        accountant=accountant,
    )
    head = fit_fusion_head(train_embeddings, labels, config, hooks=hooks)
    assert hooks.report_ is not None
    return head, hooks.report_


def _statistics(
    cfg: FusionConfig, public: Mapping[str, Tensor] | None
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Per-modality centre and RMS scale: from public rows, else zero and one."""
    if public is None:
        return {m: torch.zeros(d) for m, d in zip(cfg.modalities, cfg.dims, strict=True)}, {
            m: 1.0 for m in cfg.modalities
        }
    missing = [m for m in cfg.modalities if m not in public]
    if missing:
        raise ValueError(f"public_embeddings lacks the modalities {missing}.")
    null, scale = {}, {}
    for m, d in zip(cfg.modalities, cfg.dims, strict=True):
        p = torch.as_tensor(public[m]).detach().float().cpu()
        if p.ndim != 2 or p.shape[1] != d or p.shape[0] < 1:
            raise ValueError(f"public_embeddings[{m!r}] must be (M, {d}), got {tuple(p.shape)}.")
        null[m] = p.mean(0)
        rms = float((p - null[m]).pow(2).sum(1).mean().sqrt())
        scale[m] = rms if math.isfinite(rms) and rms > 1e-6 else 1.0
    return null, scale


__all__ = [
    "DP_DEFAULTS",
    "DPHardener",
    "DPReport",
    "DPSGDHooks",
    "dp_fit_fusion_head",
    "privacy_summary",
]


def privacy_summary(report: Any) -> dict[str, Any]:
    """The headline of a DP report (:class:`DPReport` or DP-CLIP's)."""
    return {k: getattr(report, k) for k in ("epsilon", "delta", "noise_multiplier", "steps")}


@register_hardener
class DPHardener(Hardener):
    """``mmsafe harden dp``: retrain the fusion head with DP-SGD (opacus) on the train rows.

    The head is trained on the ``train`` rows' embeddings by :func:`dp_fit_fusion_head`
    (example-level (epsilon, delta)-DP for those rows; the encoders stay as they are), with the
    task's architecture. It is saved with its privacy report, and the audit (by default
    performance, calibration and membership inference) runs with the task's own head before
    and the DP head after.

    Args:
        target_epsilon: Privacy budget to spend.
        delta: Delta of the guarantee (default: 1 / training rows).
        max_grad_norm: Per-example gradient clipping norm.
        epochs: DP-SGD passes over the training rows.

    Attributes:
        head_: the DP head.
        report_: its :class:`DPReport`.
    """

    name = "dp"
    description = "DP-SGD (opacus) fusion head: epsilon, utility and membership-inference AUC."
    needs = ("train",)
    tasks = ("fusion",)
    default_task = "fusion"
    checks = "performance,calibration,controllability.privacy"
    artifact = "head"

    def __init__(
        self,
        *,
        target_epsilon: float = 8.0,
        delta: float | None = None,
        max_grad_norm: float = 1.0,
        epochs: int = 30,
    ) -> None:
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.max_grad_norm = max_grad_norm
        self.epochs = epochs
        self.head_: FusionHead | None = None
        self.report_: DPReport | None = None

    def fit(  # noqa: D102
        self, model: EncoderModel, task: Task, data: Dataset, engine: Engine, *, seed: int = 0
    ) -> DPHardener:
        train, classes = data.split("train"), data.classes
        embeddings = engine.embed(model, train, task.modalities, desc="DP-SGD train rows")
        try:
            self.head_, self.report_ = dp_fit_fusion_head(
                embeddings,
                torch.as_tensor(train.labels),
                target_epsilon=self.target_epsilon,
                delta=self.delta,
                max_grad_norm=self.max_grad_norm,
                epochs=self.epochs,
                seed=seed,
                mode=getattr(task, "mode", "concat"),
                hidden=getattr(task, "hidden", None),
                num_classes=len(classes),
                classes=tuple(classes),
            )
        except ValueError as exc:
            raise HardenError(f"DP-SGD cannot train the head: {exc}") from None
        return self

    def _fitted(self) -> tuple[FusionHead, DPReport]:
        if self.head_ is None or self.report_ is None:
            raise RuntimeError("DPHardener.fit() must run first.")
        return self.head_, self.report_

    def transform(self, model: EncoderModel, task: Task) -> Hardened:  # noqa: D102
        from mmsafe.tasks.fusion import PrefitFusionTask

        head, report = self._fitted()
        return Hardened(model, PrefitFusionTask(head, label=f"dp-sgd eps={report.epsilon:.3g}"))

    def summary(self) -> dict[str, Any]:  # noqa: D102
        return privacy_summary(self._fitted()[1])

    def save(self, path: Path) -> Path:  # noqa: D102
        head, report = self._fitted()
        return head.save(path, extra={"dp": report.to_dict()})
