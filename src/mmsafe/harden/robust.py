"""Adversarial robustness hardeners: FARE fine-tuning of the image tower, and WiSE-FT.

* :func:`fare_finetune` -- FARE (Schlarmann et al., 2024, "Robust CLIP: Unsupervised Adversarial
  Fine-Tuning of Vision Embeddings for Robust Large Vision-Language Models"): fine-tune the image
  tower so that the embedding of an adversarially perturbed image stays close to the *original*
  model's embedding of the clean image. No labels and no text are needed, so the text tower and
  the shared embedding space (zero-shot prompts) stay valid.
* :func:`wise_ft` -- WiSE-FT (Wortsman et al., 2022, "Robust fine-tuning of zero-shot models"):
  linear interpolation in weight space between the zero-shot and a fine-tuned model, trading the
  fine-tuned model's gain (here: robustness) against the original's clean accuracy.

Both return new models (deep copies, fingerprints reset) and never modify their inputs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mmsafe.engine.cache import atomic_write_json
from mmsafe.harden.base import Hardened, Hardener, HardenError, register_hardener
from mmsafe.methods.attacks.pixel import project
from mmsafe.models.base import EncoderModel

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.engine.runner import Engine
    from mmsafe.tasks.base import Task

__all__ = [
    "AdversarialHardener",
    "choose_alpha",
    "fare_finetune",
    "fare_loss",
    "robust_sweep_point",
    "wise_ft",
]


def _image_tower(model: nn.Module) -> nn.Module:
    if "image" in getattr(model, "locked_towers", ()):
        raise ValueError(
            f"{type(model).__name__}'s image tower is locked (it is neither trained nor saved with "
            "the model), so a FARE-tuned tower would be lost; harden a model whose image tower "
            "trains (tiny-clip, hf:)"
        )
    tower = getattr(model, "image", None)
    if not isinstance(tower, nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no image tower module at `.image`; FARE fine-tunes the "
            "image encoder of a CLIP-like model (e.g. tiny-clip)"
        )
    return tower


def _as_pixels(model: EncoderModel, images: Tensor | Sequence[Any]) -> Tensor:
    """Pixels ``(N, 3, H, W)`` in ``[0, 1]`` on the CPU, from a tensor or raw images."""
    if isinstance(images, Tensor):
        x = images.detach()
    else:
        batch = model.preprocess("image", list(images))
        if not isinstance(batch, Tensor):
            raise ValueError("the model's image preprocessing did not return a pixel tensor")
        x = batch
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, 3, H, W) batch, got {tuple(x.shape)}")
    return x.float().cpu()


def fare_loss(embedding: Tensor, target: Tensor) -> Tensor:
    """Per-sample squared L2 distance ``||embedding - target||_2^2``, shape ``(B,)``.

    Example:
        >>> fare_loss(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.zeros(2, 2)).tolist()
        [5.0, 0.0]
    """
    return (embedding.float() - target.float()).pow(2).sum(dim=-1)


def _fare_attack(
    tower: nn.Module,
    x: Tensor,
    target: Tensor,
    eps: float,
    steps: int,
    generator: torch.Generator,
) -> Tensor:
    """PGD L-inf (random start, step ``2.5 * eps / steps``) maximising :func:`fare_loss`."""
    alpha = 2.5 * eps / steps
    u = torch.rand(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
    x_adv = (x + project((2 * u - 1) * eps, eps, "linf")).clamp(0.0, 1.0)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = fare_loss(tower(x_adv), target).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = (x + project(x_adv.detach() + alpha * grad.sign() - x, eps, "linf")).clamp(0, 1)
    return x_adv.detach()


def _free_replays(
    tower: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    target: Tensor,
    delta: Tensor,
    eps: float,
    replays: int,
    losses: list[float],
) -> Tensor:
    """``replays`` free-AT steps on one batch; returns the perturbation to carry over."""
    for _ in range(replays):
        d = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = fare_loss(tower((x + d).clamp(0.0, 1.0)), target).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert d.grad is not None
        # the same backward gave the ascent direction: one signed step, back into the ball
        delta = project(d.detach() + eps * d.grad.sign(), eps, "linf")
        delta = (x + delta).clamp(0.0, 1.0) - x
    return delta


def fare_finetune(
    model: EncoderModel,
    images: Tensor | Sequence[Any],
    *,
    eps: float = 4 / 255,
    steps: int = 3,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
    free: int = 0,
) -> EncoderModel:
    """FARE: unsupervised adversarial fine-tuning of the image tower in embedding space.

    For each batch of clean pixels ``x``, an L-inf PGD attack (``steps`` steps, random start,
    budget ``eps``) finds ``x_adv`` maximising ``||f(x_adv) - f0(x)||^2``, where ``f0`` is a
    frozen copy of the original image tower and ``f`` the tower being trained (unnormalised
    embeddings, as in the paper); one AdamW step (no weight decay) then minimises that loss.
    Only the image tower's parameters train. Batch-norm layers stay in eval mode (their running
    statistics are the original ones), so the only change is to trainable weights.

    Args:
        model: a CLIP-like model with its image encoder at ``model.image`` (pixels in ``[0, 1]``
            -> unnormalised embeddings), e.g. tiny-clip. It is not modified.
        images: unlabelled training images: pixels ``(N, 3, H, W)`` in ``[0, 1]``, or raw images
            for ``model.preprocess("image", ...)``. Use the ``train`` split, never the audited one.
        eps: the L-inf training budget on ``[0, 1]`` pixels.
        steps: PGD steps of the inner attack.
        epochs: passes over ``images``.
        lr: AdamW learning rate.
        batch_size: images per optimisation step.
        seed: seeds the data order and the attack's random starts.
        free: ``m > 0`` uses "free" adversarial training (Shafahi et al., 2019) instead of the
            inner PGD: each batch is replayed ``m`` times, and every replay's single backward
            pass updates both the weights (descent) and the perturbation (one signed ascent
            step of size ``eps``, kept in the ball and carried over to the next batch). The
            attack then costs nothing beyond the training passes; ``steps`` is unused. Divide
            ``epochs`` by ``m`` for the cost of plain training.

    Returns:
        A fine-tuned deep copy of ``model`` in eval mode, with its fingerprint reset and (when
        the model keeps a ``training_info`` dict) a ``fare`` entry recording the settings.

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
        >>> m = TinyClip(TinyClipConfig.for_size("xs")).eval()
        >>> x = torch.rand(4, 3, m.cfg.image_size, m.cfg.image_size)
        >>> r = fare_finetune(m, x, steps=1, batch_size=4)
        >>> r is m, torch.equal(r.text.proj.weight, m.text.proj.weight)
        (False, True)
        >>> torch.equal(r.image.proj.weight, m.image.proj.weight)
        False
    """
    if not eps > 0 or steps < 1 or epochs < 1 or batch_size < 1 or not lr > 0 or free < 0:
        raise ValueError(
            "eps and lr must be > 0; steps, epochs and batch_size must be >= 1; free >= 0"
        )
    _image_tower(model)
    pixels = _as_pixels(model, images)
    out = copy.deepcopy(model).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    tower = _image_tower(out)
    frozen = copy.deepcopy(tower).eval()
    params = list(tower.parameters())
    for p in params:
        p.requires_grad_(True)
    device = next(iter(params)).device if params else torch.device("cpu")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    delta = torch.zeros((0,))
    for _ in range(epochs):
        order = torch.randperm(len(pixels), generator=gen)
        for lo in range(0, len(order), batch_size):
            x = pixels[order[lo : lo + batch_size]].to(device)
            with torch.no_grad():
                target = frozen(x)
            if free:
                if delta.shape != x.shape:  # a random start (at 0 the gradient is 0)
                    u = torch.rand(x.shape, generator=gen, dtype=torch.float32)
                    delta = ((2 * u - 1) * eps).to(x.device, x.dtype)
                delta = _free_replays(tower, opt, x, target, delta, eps, free, losses)
                continue
            x_adv = _fare_attack(tower, x, target, eps, steps, gen)
            with torch.enable_grad():
                loss = fare_loss(tower(x_adv), target).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    for p in out.parameters():
        p.requires_grad_(True)
    out.eval()
    out.invalidate_fingerprint()
    info = getattr(out, "training_info", None)
    if isinstance(info, dict):
        out.training_info = {
            **info,
            "fare": {
                "eps": eps,
                "steps": steps,
                "epochs": epochs,
                "lr": lr,
                "batch_size": batch_size,
                "seed": seed,
                "free": free,
                "n_images": len(pixels),
                "optimizer_steps": len(losses),
                "final_loss": round(float(np.mean(losses[-5:])), 6) if losses else math.nan,
            },
        }
    return out


def wise_ft(
    zero_shot_model: EncoderModel, finetuned_model: EncoderModel, alpha: float
) -> EncoderModel:
    """WiSE-FT: ``theta = (1 - alpha) * theta_0 + alpha * theta_1`` for every float tensor.

    Every floating-point parameter and buffer of the state dict is interpolated; other entries
    (integer counters such as batch norm's ``num_batches_tracked``) are taken from
    ``zero_shot_model`` (from ``finetuned_model`` when ``alpha = 1``).
    ``alpha = 0`` and ``alpha = 1`` reproduce the two state dicts exactly.

    Args:
        zero_shot_model: the original model (``theta_0``).
        finetuned_model: a fine-tuned copy of the same architecture (``theta_1``).
        alpha: the weight of the fine-tuned model, in ``[0, 1]``.

    Returns:
        A new model (deep copy of ``zero_shot_model``) in eval mode, fingerprint reset.

    Raises:
        ValueError: ``alpha`` outside ``[0, 1]``, different model classes or configs, or state
            dicts with different keys, shapes or dtypes.

    Example:
        >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
        >>> _ = nn.init.zeros_(a.weight), nn.init.ones_(b.weight)
        >>> wise_ft(a, b, 0.25).weight.tolist()
        [[0.25, 0.25]]
        >>> wise_ft(a, nn.Linear(3, 1), 0.5)
        Traceback (most recent call last):
        ...
        ValueError: wise_ft: 'weight' has shape (1, 2) vs (1, 3)
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"wise_ft: alpha must be in [0, 1], got {alpha}")
    if type(zero_shot_model) is not type(finetuned_model):
        raise ValueError(
            f"wise_ft: different model classes {type(zero_shot_model).__name__} and "
            f"{type(finetuned_model).__name__}"
        )
    cfg0 = getattr(zero_shot_model, "config", None)
    cfg1 = getattr(finetuned_model, "config", None)
    if callable(cfg0) and callable(cfg1) and cfg0() != cfg1():
        raise ValueError(f"wise_ft: different architectures {cfg0()} and {cfg1()}")
    s0, s1 = zero_shot_model.state_dict(), finetuned_model.state_dict()
    if s0.keys() != s1.keys():
        diff = sorted(set(s0) ^ set(s1))
        raise ValueError(f"wise_ft: the state dicts have different keys, e.g. {diff[:5]}")
    merged: dict[str, Tensor] = {}
    for key, t0 in s0.items():
        t1 = s1[key]
        if t0.shape != t1.shape or t0.dtype != t1.dtype:
            raise ValueError(
                f"wise_ft: {key!r} has shape {tuple(t0.shape)} vs {tuple(t1.shape)}"
                if t0.shape != t1.shape
                else f"wise_ft: {key!r} has dtype {t0.dtype} vs {t1.dtype}"
            )
        if alpha == 1.0:
            merged[key] = t1.detach().clone().to(t0.device)
        elif not t0.is_floating_point() or alpha == 0.0:
            merged[key] = t0.detach().clone()
        else:
            merged[key] = (1.0 - alpha) * t0.detach() + alpha * t1.detach().to(t0.device)
    out = copy.deepcopy(zero_shot_model)
    out.load_state_dict(merged)
    out.eval()
    if isinstance(out, EncoderModel):
        out.invalidate_fingerprint()
    info = getattr(out, "training_info", None)
    if isinstance(info, dict):
        out.training_info = {**info, "wise_ft": {"alpha": alpha}}
    return out


# --------------------------------------------------------------------------- the hardener


def robust_sweep_point(
    model: EncoderModel,
    data: Dataset,
    task: Task,
    engine: Engine,
    *,
    eps: float,
    steps: int = 10,
    max_rows: int | None = 200,
    fit_data: Dataset | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """``(clean, robust)`` accuracy of ``model`` under PGD L-inf ``eps`` on ``data``'s rows.

    ``data`` is evaluated as a whole (pass the calibration split to choose a hyper-parameter
    without touching the audited test rows); ``task`` is re-prepared on the model, fitting what
    it learns (a fusion head) on ``fit_data``.
    """
    from mmsafe.checks.base import AuditContext
    from mmsafe.checks.robustness.adversarial.check import AdversarialCheck, eps_label

    task.prepare(model, engine, data.classes, fit_data=fit_data)
    ctx = AuditContext(
        model=model,
        task=task,
        data=data,
        outputs=engine.outputs(model, task, data),
        engine=engine,
        seed=seed,
    )
    check = AdversarialCheck(
        norms=("linf",),
        eps={"linf": [eps]},
        attacks=("pgd",),
        steps=steps,
        max_rows=max_rows,
        n_boot=100,
    )
    metrics = check.run(ctx).metrics
    return (
        metrics["clean_accuracy"].value,
        metrics[f"linf/pgd/eps={eps_label(eps)}/robust_accuracy"].value,
    )


def choose_alpha(sweep: Sequence[Mapping[str, float]], max_clean_drop: float) -> float:
    """The WiSE-FT ``alpha`` with the best robust accuracy among those that keep clean accuracy.

    A point qualifies when its clean accuracy is at most ``max_clean_drop`` below that of
    ``alpha = 0`` (the original model, which always qualifies). Ties go to the smaller alpha.

    Example:
        >>> sweep = [{"alpha": 0.0, "clean": 0.70, "robust": 0.20},
        ...          {"alpha": 0.5, "clean": 0.69, "robust": 0.26},
        ...          {"alpha": 1.0, "clean": 0.60, "robust": 0.30}]
        >>> choose_alpha(sweep, 0.02), choose_alpha(sweep, 0.2)
        (0.5, 1.0)
    """
    base = next(p for p in sweep if p["alpha"] == 0.0)["clean"]
    ok = [p for p in sweep if p["clean"] >= base - max_clean_drop - 1e-12]
    best = max(ok, key=lambda p: (p["robust"], -p["alpha"]))
    return float(best["alpha"])


@register_hardener
class AdversarialHardener(Hardener):
    """``mmsafe harden adversarial``: FARE fine-tuning, a WiSE-FT sweep, and the chosen model.

    1. FARE (:func:`fare_finetune`) fine-tunes the image tower on the ``train`` images (no
       labels) against PGD L-inf ``eps`` (or, with ``free = m``, with free adversarial
       training: ``m`` replays per batch, no separate attack passes).
    2. WiSE-FT (:func:`wise_ft`) interpolates original and fine-tuned weights for every
       ``alpha``; clean and PGD-``eval_eps`` robust accuracy of each are measured on the
       ``calibration`` rows, and :func:`choose_alpha` keeps the most robust one whose clean
       accuracy falls by at most ``max_clean_drop``.
    3. :meth:`save` writes the chosen model (safetensors; load it with
       ``--model tiny-clip:<out>/model``) and ``wise_ft_sweep.json`` beside it; the audits run
       ``performance`` and ``robustness.adversarial`` at ``eval_eps`` (and 1/255, 2/255,
       4/255).

    Args:
        eps: FARE training budget (L-inf, in [0, 1] pixels).
        eval_eps: PGD budget of the sweep and the re-audit.
        steps: PGD steps of each FARE training attack.
        epochs: FARE passes over the train images.
        lr: FARE learning rate (AdamW).
        alphas: WiSE-FT weights swept (comma-separated; must include 0).
        max_clean_drop: Largest clean-accuracy fall WiSE-FT may cost.
        eval_steps: PGD steps of the sweep and the re-audit.
        max_rows: Rows attacked per sweep point and audit (``None``: all).
        free: Free adversarial training: replays per batch (0: PGD).

    Attributes:
        model_: the chosen model.
        alpha_: its WiSE-FT weight.
        sweep_: ``{"alpha", "clean", "robust"}`` per swept alpha (calibration rows).
    """

    name = "adversarial"
    description = "FARE fine-tuning of the image tower + a WiSE-FT sweep; robust accuracy."
    needs = ("train", "calibration")
    checks = "performance,robustness.adversarial"
    artifact = "model"

    def __init__(
        self,
        *,
        eps: float = 4 / 255,
        eval_eps: float = 2 / 255,
        steps: int = 3,
        epochs: int = 10,
        lr: float = 1e-4,
        alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
        max_clean_drop: float = 0.02,
        eval_steps: int = 10,
        max_rows: int | None = 200,
        free: int = 0,
    ) -> None:
        self.eps = eps
        self.eval_eps = eval_eps
        self.steps = steps
        self.epochs = epochs
        self.lr = lr
        self.alphas = alphas
        self.max_clean_drop = max_clean_drop
        self.eval_steps = eval_steps
        self.max_rows = max_rows
        self.free = free
        self.model_: EncoderModel | None = None
        self.alpha_: float | None = None
        self.sweep_: list[dict[str, float]] = []

    def validate(self, model: EncoderModel, task: Task, data: Dataset) -> None:  # noqa: D102
        if not hasattr(model, "save_pretrained"):
            raise HardenError(
                f"{model.name} cannot be saved after fine-tuning; adversarial hardening "
                "supports tiny-clip models for now."
            )
        alphas = list(self.alphas)
        if 0.0 not in alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
            raise HardenError(f"alphas must lie in [0, 1] and include 0, got {alphas}")
        super().validate(model, task, data)

    def audit_options(self) -> dict[str, dict[str, Any]]:  # noqa: D102
        from mmsafe.checks.robustness.adversarial.check import DEFAULT_EPS

        return {
            "robustness.adversarial": {
                "norms": ("linf",),
                "eps": {"linf": sorted({self.eval_eps, *DEFAULT_EPS["linf"]})},
                "attacks": ("pgd",),
                "steps": self.eval_steps,
                "max_rows": self.max_rows,
            }
        }

    def fit(  # noqa: D102
        self, model: EncoderModel, task: Task, data: Dataset, engine: Engine, *, seed: int = 0
    ) -> AdversarialHardener:
        train, calibration = data.split("train"), data.split("calibration")
        try:
            fare = fare_finetune(
                model,
                train.modalities["image"],
                eps=self.eps,
                steps=self.steps,
                epochs=self.epochs,
                lr=self.lr,
                seed=seed,
                free=self.free,
            )
        except ValueError as exc:
            raise HardenError(f"FARE cannot fine-tune {model.name}: {exc}") from None
        self.sweep_, candidates = [], {}
        for alpha in sorted({float(a) for a in self.alphas}):
            candidate = model if alpha == 0.0 else wise_ft(model, fare, alpha)
            clean, robust = robust_sweep_point(
                candidate,
                calibration,
                task,
                engine,
                eps=self.eval_eps,
                steps=self.eval_steps,
                max_rows=self.max_rows,
                fit_data=train,
                seed=seed,
            )
            self.sweep_.append({"alpha": alpha, "clean": clean, "robust": robust})
            candidates[alpha] = candidate
        self.alpha_ = choose_alpha(self.sweep_, self.max_clean_drop)
        self.model_ = candidates[self.alpha_]
        return self

    def transform(self, model: EncoderModel, task: Task) -> Hardened:  # noqa: D102
        if self.model_ is None:
            raise RuntimeError("AdversarialHardener.fit() must run first.")
        return Hardened(self.model_, task)

    def summary(self) -> dict[str, Any]:  # noqa: D102
        return {
            "alpha": self.alpha_,
            **{f"alpha={p['alpha']:g}/robust": p["robust"] for p in self.sweep_},
        }

    def save(self, path: Path) -> Path:  # noqa: D102
        if self.model_ is None:
            raise RuntimeError("AdversarialHardener.fit() must run first.")
        artifact = self.model_.save_pretrained(path)  # type: ignore[attr-defined]
        atomic_write_json(
            path.parent / "wise_ft_sweep.json",
            {
                "split": "calibration",
                "eval_eps": self.eval_eps,
                "train_eps": self.eps,
                "chosen_alpha": self.alpha_,
                "max_clean_drop": self.max_clean_drop,
                "sweep": self.sweep_,
            },
        )
        return Path(artifact)
