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
from typing import Any

import torch
from torch import Tensor, nn

from mmsafe.models.heads import (
    FusionConfig,
    FusionHead,
    _check_inputs,
    _head_config,
    _one_thread,
)


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


def dp_fit_fusion_head(
    train_embeddings: Mapping[str, Tensor],
    labels: Tensor,
    *,
    target_epsilon: float = 8.0,
    delta: float | None = None,
    max_grad_norm: float = 1.0,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 0.1,
    momentum: float = 0.9,
    seed: int = 0,
    mode: str = "concat",
    hidden: int | None = None,
    width: int | None = None,
    num_classes: int | None = None,
    classes: tuple[str, ...] = (),
    public_embeddings: Mapping[str, Tensor] | None = None,
    accountant: str = "rdp",
) -> tuple[FusionHead, DPReport]:
    """Train a :class:`~mmsafe.models.heads.FusionHead` with DP-SGD (opacus, Poisson sampling).

    Rows labelled ``-1`` are dropped first. The optimiser is SGD with momentum on clipped,
    noised per-example gradients; the noise multiplier is the smallest one (found by opacus)
    for which ``epochs`` passes at sampling rate ``1 / ceil(n / batch_size)`` spend at most
    ``target_epsilon``. Deterministic for a given ``seed`` (the sampler and the noise have their
    own generators; the global RNG is left alone). Not for cryptographic-grade deployments:
    opacus' ``secure_mode`` is off.

    Args:
        train_embeddings: ``{modality: (N, D_m)}`` embeddings of the private training rows.
        labels: ``(N,)`` class indices, ``-1`` = unlabelled.
        target_epsilon: Privacy budget to spend.
        delta: Delta of the guarantee (default ``1 / n`` for ``n`` labelled rows).
        max_grad_norm: Per-example gradient clipping norm.
        epochs: Passes over the training rows (in expectation).
        batch_size: Expected rows per step (sets the sampling rate).
        lr: SGD learning rate.
        momentum: SGD momentum.
        seed: Seeds initialisation, sampling and noise.
        mode: ``"concat"`` or ``"gated"``, as in :func:`~mmsafe.models.heads.fit_fusion_head`.
        hidden: Hidden width of the classifier MLP; ``None`` for a linear classifier.
        width: Projection width of the gated mode (default ``hidden`` or the largest ``D_m``).
        num_classes: Number of classes (default ``max(label) + 1``, which reads the private
            labels; pass it from the task for a clean guarantee).
        classes: Optional class names stored in the config.
        public_embeddings: Optional ``{modality: (M, D_m)}`` non-private rows from which the
            head's per-modality centre and scale are computed; without them the centre is zero
            and the scale one, so no statistic of the private rows escapes outside DP-SGD.
        accountant: opacus accountant, ``"rdp"`` (default) or ``"prv"``.

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
    import opacus
    from opacus import PrivacyEngine

    embs, y = _check_inputs(train_embeddings, labels)
    n = int(y.shape[0])
    if target_epsilon <= 0 or max_grad_norm <= 0 or lr <= 0:
        raise ValueError(
            f"Need target_epsilon > 0, max_grad_norm > 0, lr > 0; got {target_epsilon}, "
            f"{max_grad_norm}, {lr}."
        )
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"Need epochs >= 1 and batch_size >= 1; got {epochs}, {batch_size}.")
    delta = 1.0 / n if delta is None else float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")
    if accountant not in ("rdp", "prv"):
        raise ValueError(f"accountant must be 'rdp' or 'prv', got {accountant!r}.")
    cfg = _head_config(embs, y, num_classes, mode, hidden, width, classes)
    mods = cfg.modalities
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = FusionHead(cfg)
    head.set_statistics(*_statistics(cfg, public_embeddings))

    x = torch.cat([embs[m] for m in mods], dim=1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    model = _ConcatInput(head)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    engine = PrivacyEngine(accountant=accountant)
    with _one_thread(), warnings.catch_warnings():
        # opacus warns that secure_mode is off (documented above) and torch that the inputs
        # need no gradient (they are data); neither is actionable here.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        dp_model, dp_opt, dp_loader = engine.make_private_with_epsilon(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            target_epsilon=float(target_epsilon),
            target_delta=delta,
            epochs=epochs,
            max_grad_norm=float(max_grad_norm),
            poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(seed + 1),
        )
        dp_model.train()
        for _ in range(epochs):
            for xb, yb in dp_loader:
                dp_opt.zero_grad(set_to_none=True)
                if len(yb) == 0:  # an empty Poisson sample still takes a (pure-noise) step
                    dp_model(x[:0]).sum().backward()
                else:
                    nn.functional.cross_entropy(dp_model(xb), yb).backward()
                dp_opt.step()
        epsilon = float(engine.get_epsilon(delta))

    # A clean head, free of opacus' hooks and per-sample gradient attributes.
    trained = FusionHead(cfg)
    trained.load_state_dict(head.state_dict())
    trained.eval()
    with torch.no_grad():
        train_acc = float(trained(embs).argmax(-1).eq(y).float().mean())
    steps = sum(int(s) for _, _, s in engine.accountant.history)
    report = DPReport(
        epsilon=epsilon,
        delta=delta,
        target_epsilon=float(target_epsilon),
        noise_multiplier=float(dp_opt.noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        sample_rate=float(dp_loader.sample_rate),
        steps=steps,
        epochs=epochs,
        n_train=n,
        train_accuracy=train_acc,
        accountant=accountant,
        opacus_version=str(opacus.__version__),
    )
    trained.fit_info = {
        "dp": report.to_dict(),
        "epochs": epochs,
        "lr": lr,
        "momentum": momentum,
        "seed": seed,
        "batch_size": batch_size,
        "n_train": n,
        "train_accuracy": train_acc,
        "public_statistics": public_embeddings is not None,
    }
    return trained, report


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


__all__ = ["DPReport", "dp_fit_fusion_head"]
