"""White-box adversarial attacks on pixels: FGSM, PGD and APGD-CE under L-inf and L2.

Every attack is a pure, batched function of a differentiable ``forward`` that maps pixels
``(B, 3, H, W)`` in ``[0, 1]`` to logits ``(B, C)``. For an
:class:`~mmsafe.models.base.EncoderModel` and a prepared task, :func:`pixel_forward` builds it:
the image is encoded, the other modalities' embeddings (the row's caption for ``fusion``;
nothing for ``zero_shot``, whose class prompts are fixed) are held at their clean values, and
the task's logits are recomputed.

Guarantees, for every attack and every row: ``||x_adv - x|| <= eps`` in the attack's norm (up to
float rounding), and ``0 <= x_adv <= 1``. Attacks maximise the cross-entropy of the true label
(untargeted). Gradients are taken with :func:`torch.autograd.grad` w.r.t. the pixels only, so the
model's ``.grad`` fields are never touched.

References: FGSM (Goodfellow et al., 2015); PGD with random start (Madry et al., 2018), in the
convention of torchattacks (``alpha`` per step, per-sample projection, clamp to ``[0, 1]``);
APGD-CE (Croce & Hein, 2020), step-size halving at checkpoints with momentum 0.75.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from mmsafe.models.base import EncoderModel
    from mmsafe.tasks.base import Task

Norm = Literal["linf", "l2"]
Forward = Callable[[Tensor], Tensor]
"""Pixels ``(B, 3, H, W)`` in ``[0, 1]`` -> logits ``(B, C)``; must be differentiable."""

NORMS: tuple[str, ...] = ("linf", "l2")
ATTACKS: tuple[str, ...] = ("fgsm", "pgd", "apgd")
_TINY = 1e-12


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


def _flat_norm(t: Tensor) -> Tensor:
    """Per-sample L2 norm, shaped ``(B, 1, ..., 1)`` to broadcast against ``t``."""
    n = t.flatten(1).norm(p=2, dim=1)
    return n.view(-1, *([1] * (t.dim() - 1)))


def perturbation_norm(delta: Tensor, norm: Norm) -> Tensor:
    """Per-sample size ``(B,)`` of a perturbation in the given norm.

    Example:
        >>> d = torch.zeros(2, 3, 2, 2); d[0, 0, 0, 0] = -0.3; d[1] += 0.1
        >>> perturbation_norm(d, "linf").tolist()
        [0.30000001192092896, 0.10000000149011612]
        >>> [round(v, 4) for v in perturbation_norm(d, "l2").tolist()]
        [0.3, 0.3464]
    """
    _check_norm(norm)
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(p=2, dim=1)


def project(delta: Tensor, eps: float, norm: Norm) -> Tensor:
    """Project each sample's perturbation onto the ``eps`` ball of ``norm``.

    Example:
        >>> d = torch.full((1, 1, 2, 2), 0.5)
        >>> torch.equal(project(d, 0.1, "linf"), torch.full_like(d, 0.1))
        True
        >>> round(float(perturbation_norm(project(d, 0.1, "l2"), "l2")), 6)
        0.1
    """
    _check_norm(norm)
    if norm == "linf":
        return delta.clamp(-eps, eps)
    factor = (eps / (_flat_norm(delta) + _TINY)).clamp(max=1.0)
    return delta * factor


def _ascent_direction(grad: Tensor, norm: Norm) -> Tensor:
    """The steepest-ascent unit step: ``sign(g)`` for L-inf, ``g / ||g||_2`` for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / (_flat_norm(grad) + 1e-10)


def _random_delta(x: Tensor, eps: float, norm: Norm, generator: torch.Generator | None) -> Tensor:
    """A random start inside the ball.

    Uniform per pixel for L-inf; for L2 a random direction with a uniform radius in ``[0, eps]``
    (as torchattacks does).
    """
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device="cpu", dtype=torch.float32)
        return ((2 * u - 1) * eps).to(x.device, x.dtype)
    d = torch.randn(x.shape, generator=generator, device="cpu", dtype=torch.float32)
    r = torch.rand((x.shape[0],), generator=generator, device="cpu", dtype=torch.float32)
    d = d / (_flat_norm(d) + _TINY) * r.view(-1, *([1] * (x.dim() - 1))) * eps
    return d.to(x.device, x.dtype)


def _clip(x: Tensor, delta: Tensor, eps: float, norm: Norm) -> Tensor:
    """``clamp(x + project(delta), 0, 1)``; clamping never enlarges the perturbation."""
    return (x + project(delta, eps, norm)).clamp(0.0, 1.0)


def _loss_and_grad(forward: Forward, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample cross-entropy ``(B,)``, its gradient w.r.t. ``x_adv``, and the logits."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = forward(x_adv)
        loss = nn.functional.cross_entropy(logits.float(), y, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    return loss.detach(), grad.detach(), logits.detach()


def _validate(x: Tensor, y: Tensor, eps: float) -> None:
    if x.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be (B, ...) with B = len(y); got {tuple(x.shape)}, {len(y)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def fgsm(forward: Forward, x: Tensor, y: Tensor, eps: float, norm: Norm = "linf") -> Tensor:
    """Fast Gradient (Sign) Method: one step of size ``eps`` along the ascent direction.

    Args:
        forward: pixels -> logits, differentiable.
        x: clean pixels ``(B, 3, H, W)`` in ``[0, 1]``.
        y: true labels ``(B,)``.
        eps: the budget, in the units of ``norm`` on ``[0, 1]`` pixels.
        norm: ``linf`` (sign of the gradient) or ``l2`` (normalised gradient; "FGM").

    Returns:
        Adversarial pixels, detached, in ``[0, 1]`` with ``||x_adv - x|| <= eps``.

    Example:
        >>> w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
        >>> fwd = lambda x: x.flatten(1) @ w.T
        >>> x = torch.full((1, 1, 2, 2), 0.5)
        >>> fgsm(fwd, x, torch.tensor([0]), 0.1).flatten().tolist()
        [0.4000000059604645, 0.5, 0.5, 0.5]
    """
    _check_norm(norm)
    _validate(x, y, eps)
    x = x.detach()
    _, grad, _ = _loss_and_grad(forward, x, y)
    return _clip(x, eps * _ascent_direction(grad, norm), eps, norm).detach()


def pgd(
    forward: Forward,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: Norm = "linf",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    early_stop: bool = False,
) -> Tensor:
    """Projected Gradient Descent (ascent on the cross-entropy) with random restarts.

    Each step moves ``step_size`` along ``sign(grad)`` (L-inf) or ``grad / ||grad||_2`` (L2),
    projects the perturbation of each sample back onto its ``eps`` ball and clamps the pixels to
    ``[0, 1]``. With several restarts, a row keeps the first restart that misclassifies it, and
    otherwise the restart with the highest final loss.

    Args:
        forward: pixels -> logits, differentiable.
        x: clean pixels ``(B, 3, H, W)`` in ``[0, 1]``.
        y: true labels ``(B,)``.
        eps: the budget.
        norm: ``linf`` or ``l2``.
        steps: gradient steps per restart.
        step_size: ``alpha`` per step; default ``2.5 * eps / steps`` (Madry et al.).
        random_start: start each restart at a random point of the ball (else at ``x``).
        restarts: independent runs; the worst case per row is kept.
        generator: a CPU generator for the random starts (reproducibility).
        early_stop: freeze a row at the first iterate that misclassifies it and drop it from
            the batch (later steps and restarts only run on the rows still correct). The other
            rows follow exactly the same trajectory, so the attack is never weaker; it is
            cheaper whenever rows fall early.

    Returns:
        Adversarial pixels, detached, in ``[0, 1]`` with ``||x_adv - x|| <= eps``.

    Example:
        >>> w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
        >>> fwd = lambda x: x.flatten(1) @ w.T
        >>> x = torch.full((1, 1, 2, 2), 0.5)
        >>> adv = pgd(fwd, x, torch.tensor([0]), 0.25, "l2", steps=5, random_start=False)
        >>> round(float(adv[0, 0, 0, 0]), 4)
        0.25
    """
    _check_norm(norm)
    _validate(x, y, eps)
    if steps < 1 or restarts < 1:
        raise ValueError("steps and restarts must be >= 1")
    alpha = 2.5 * eps / steps if step_size is None else float(step_size)
    x = x.detach()
    best = x.clone()
    best_loss = torch.full((x.shape[0],), -math.inf, device=x.device)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if early_stop:
        return _pgd_early_stop(
            forward, x, y, eps, norm, steps, alpha, random_start, restarts, generator
        )
    for _ in range(restarts):
        delta = _random_delta(x, eps, norm, generator) if random_start else torch.zeros_like(x)
        x_adv = _clip(x, delta, eps, norm)
        for _ in range(steps):
            _, grad, _ = _loss_and_grad(forward, x_adv, y)
            x_adv = _clip(x, x_adv + alpha * _ascent_direction(grad, norm) - x, eps, norm)
        with torch.no_grad():
            logits = forward(x_adv)
            loss = nn.functional.cross_entropy(logits.float(), y, reduction="none")
            wrong = logits.argmax(dim=-1) != y
        take = ~fooled & (wrong | (loss > best_loss))
        best[take] = x_adv[take]
        best_loss = torch.where(take, loss, best_loss)
        fooled |= wrong
        if bool(fooled.all()):
            break
    return best.detach()


def _pgd_early_stop(
    forward: Forward,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: Norm,
    steps: int,
    alpha: float,
    random_start: bool,
    restarts: int,
    generator: torch.Generator | None,
) -> Tensor:
    """:func:`pgd` on a shrinking batch: a row leaves at the first iterate that fools it.

    A ``forward`` with per-row context (e.g. :func:`pixel_forward` for ``fusion``) must offer
    ``forward.select(idx)``; any other ``forward`` must treat rows independently.
    """

    def restricted(rows: Tensor) -> Forward:
        select = getattr(forward, "select", None)
        return select(rows) if callable(select) else forward

    best = x.clone()
    best_loss = torch.full((x.shape[0],), -math.inf, device=x.device)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        idx = torch.nonzero(~fooled).squeeze(1)
        if idx.numel() == 0:
            break
        xs, ys = x[idx], y[idx]
        fwd = restricted(idx)
        delta = _random_delta(xs, eps, norm, generator) if random_start else torch.zeros_like(xs)
        x_adv = _clip(xs, delta, eps, norm)
        for _ in range(steps):
            _, grad, logits = _loss_and_grad(fwd, x_adv, ys)
            hit = logits.argmax(dim=-1) != ys
            if bool(hit.any()):
                best[idx[hit]] = x_adv[hit]
                fooled[idx[hit]] = True
                keep = ~hit
                idx, xs, ys, x_adv, grad = idx[keep], xs[keep], ys[keep], x_adv[keep], grad[keep]
                if idx.numel() == 0:
                    break
                fwd = restricted(idx)
            x_adv = _clip(xs, x_adv + alpha * _ascent_direction(grad, norm) - xs, eps, norm)
        if idx.numel() == 0:
            continue
        with torch.no_grad():
            logits = fwd(x_adv)
            loss = nn.functional.cross_entropy(logits.float(), ys, reduction="none")
            wrong = logits.argmax(dim=-1) != ys
        take = wrong | (loss > best_loss[idx])
        best[idx[take]] = x_adv[take]
        best_loss[idx[take]] = loss[take]
        fooled[idx[wrong]] = True
    return best.detach()


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations ``w_j = ceil(p_j * steps) < steps`` at which APGD may halve its step size.

    ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (Croce & Hein,
    2020), computed in whole hundredths so that float rounding never moves a checkpoint.

    Example:
        >>> apgd_checkpoints(100)
        [22, 41, 57, 70, 80, 87, 93, 99]
        >>> apgd_checkpoints(20)
        [5, 9, 12, 14, 16, 18, 19]
    """
    p = [0, 22]  # hundredths of the run
    while p[-1] < 100:
        p.append(p[-1] + max(p[-1] - p[-2] - 3, 6))
    return sorted({w for q in p[1:] if (w := -(-q * steps // 100)) < steps})


def apgd_ce(
    forward: Forward,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: Norm = "linf",
    steps: int = 20,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    rho: float = 0.75,
) -> Tensor:
    """Auto-PGD on the cross-entropy (Croce & Hein, 2020): step-size-free PGD with momentum.

    Starts at a random point, takes a first step of size ``2 * eps``, then momentum steps
    (``alpha = 0.75``); at checkpoints ``p_j`` (``p_0 = 0, p_1 = 0.22``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``) the step size of a row is halved and the
    row restarts from its best point when fewer than ``rho`` of the steps since the last
    checkpoint raised its loss over the previous iterate, or when neither the step size nor the
    best loss changed since. Returns the highest-loss point found per row (or a misclassifying one).

    Args:
        forward: pixels -> logits, differentiable.
        x: clean pixels in ``[0, 1]``.
        y: true labels.
        eps: the budget.
        norm: ``linf`` or ``l2``.
        steps: iterations per restart.
        restarts: independent random starts; the worst case per row is kept.
        generator: a CPU generator for the random starts.
        rho: the fraction of successful steps below which the step size is halved.

    Returns:
        Adversarial pixels, detached, in ``[0, 1]`` with ``||x_adv - x|| <= eps``.
    """
    _check_norm(norm)
    _validate(x, y, eps)
    if steps < 1 or restarts < 1:
        raise ValueError("steps and restarts must be >= 1")
    x = x.detach()
    b = x.shape[0]
    shape = (b, *([1] * (x.dim() - 1)))
    checkpoints = apgd_checkpoints(steps)
    out = x.clone()
    out_loss = torch.full((b,), -math.inf, device=x.device)
    out_fooled = torch.zeros(b, dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        x_k = _clip(x, _random_delta(x, eps, norm, generator), eps, norm)
        loss_k, grad, logits = _loss_and_grad(forward, x_k, y)
        fooled = logits.argmax(-1) != y
        x_best, loss_best, grad_best = x_k.clone(), loss_k.clone(), grad.clone()
        x_adv = torch.where(fooled.view(shape), x_k, x.clone())
        step = torch.full(shape, 2.0 * eps, device=x.device)
        x_prev = x_k.clone()
        successes = torch.zeros(b, device=x.device)
        last_check, loss_best_at_check = 0, loss_best.clone()
        step_reduced_at_check = torch.ones(b, dtype=torch.bool, device=x.device)
        for k in range(steps):
            z = _clip(x, x_k + step * _ascent_direction(grad, norm) - x, eps, norm)
            momentum = 1.0 if k == 0 else 0.75
            x_next = _clip(
                x, x_k + momentum * (z - x_k) + (1 - momentum) * (x_k - x_prev) - x, eps, norm
            )
            x_prev = x_k
            x_k = x_next
            loss_prev = loss_k
            loss_k, grad, logits = _loss_and_grad(forward, x_k, y)
            wrong = logits.argmax(-1) != y
            newly = wrong & ~fooled
            x_adv[newly] = x_k[newly]
            fooled |= wrong
            successes += (loss_k > loss_prev).float()  # a step that raised the loss
            improved = loss_k > loss_best
            x_best[improved] = x_k[improved]
            grad_best[improved] = grad[improved]
            loss_best = torch.where(improved, loss_k, loss_best)
            if k + 1 in checkpoints:
                span = k + 1 - last_check
                cond1 = successes < rho * span
                cond2 = ~step_reduced_at_check & (loss_best_at_check >= loss_best)
                reduce = cond1 | cond2
                step = torch.where(reduce.view(shape), step / 2, step)
                x_k = torch.where(reduce.view(shape), x_best, x_k)
                grad = torch.where(reduce.view(shape), grad_best, grad)
                step_reduced_at_check = reduce
                loss_best_at_check = loss_best.clone()
                successes.zero_()
                last_check = k + 1
        x_adv = torch.where(fooled.view(shape), x_adv, x_best)
        final = torch.where(fooled, torch.full_like(loss_best, math.inf), loss_best)
        take = ~out_fooled & (fooled | (final > out_loss))
        out[take] = x_adv[take]
        out_loss = torch.where(take, final, out_loss)
        out_fooled |= fooled
        if bool(out_fooled.all()):
            break
    return out.detach()


def pixel_forward(
    model: EncoderModel,
    task: Task,
    fixed: Mapping[str, Tensor] | None = None,
    modality: str = "image",
) -> Forward:
    """The differentiable map pixels -> task logits for one batch of rows.

    Args:
        model: the encoder (put it in ``eval`` mode on the pixels' device first).
        task: a prepared classification task (``zero_shot``, ``fusion``).
        fixed: clean embeddings ``{modality: (B, D)}`` of the other modalities of the same rows
            (the captions for ``fusion``); ignored for modalities the task does not read.
        modality: the attacked modality.

    Returns:
        ``forward(x) -> logits``; ``forward.select(idx)`` is the same map for the rows ``idx``
        only (used by ``pgd(..., early_stop=True)`` when the batch shrinks).
    """
    others = {k: v for k, v in (fixed or {}).items() if k != modality}
    return _PixelForward(model, task, others, modality)


class _PixelForward:
    """``pixels -> logits`` for fixed rows; ``select(idx)`` restricts the fixed context."""

    def __init__(
        self, model: EncoderModel, task: Task, others: Mapping[str, Tensor], modality: str
    ) -> None:
        self.model, self.task, self.others, self.modality = model, task, others, modality

    def __call__(self, x: Tensor) -> Tensor:
        emb = self.model.encode({self.modality: x})[self.modality]
        fixed = {k: v.to(emb.device) for k, v in self.others.items()}
        return self.task.logits({**fixed, self.modality: emb})

    def select(self, idx: Tensor) -> _PixelForward:
        others = {k: v[idx.to(v.device)] for k, v in self.others.items()}
        return _PixelForward(self.model, self.task, others, self.modality)


def run_attack(
    name: str,
    forward: Forward,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: Norm,
    steps: int = 10,
    restarts: int = 1,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    clean_logits: Tensor | None = None,
    early_stop: bool = False,
) -> Tensor:
    """Dispatch to :func:`fgsm`, :func:`pgd` or :func:`apgd_ce` by name.

    Args:
        name: ``fgsm``, ``pgd`` or ``apgd`` (APGD-CE with ``2 * steps`` iterations).
        forward: pixels -> logits, differentiable.
        x: clean pixels ``(B, 3, H, W)`` in ``[0, 1]``.
        y: true labels ``(B,)``.
        eps: the budget.
        norm: ``linf`` or ``l2``.
        steps: PGD iterations.
        restarts: random restarts (PGD, APGD).
        random_start: start PGD at a random point of the ball.
        generator: a CPU generator for the random starts.
        clean_logits: the cached clean logits ``(B, C)`` of ``x`` (e.g. the engine's outputs);
            rows they already misclassify are returned unchanged, unattacked, at no cost
            (``forward`` must then treat rows independently or offer ``select(idx)``).
        early_stop: PGD only: drop a row from the batch at its first misclassifying iterate
            (see :func:`pgd`).

    Returns:
        Adversarial pixels ``(B, 3, H, W)``, detached.

    Example:
        >>> run_attack("cw", lambda x: x, torch.zeros(1, 2), torch.tensor([0]), 0.1, "linf")
        Traceback (most recent call last):
        ...
        ValueError: unknown attack 'cw'; choose from fgsm, pgd, apgd
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    if clean_logits is not None:
        todo = torch.nonzero(clean_logits.argmax(dim=-1).to(y.device) == y).squeeze(1)
        out = x.detach().clone()
        if todo.numel():
            select = getattr(forward, "select", None)
            out[todo] = run_attack(
                name,
                select(todo) if callable(select) else forward,
                x[todo],
                y[todo],
                eps,
                norm,
                steps,
                restarts,
                random_start,
                generator,
                None,
                early_stop,
            )
        return out
    if name == "fgsm":
        return fgsm(forward, x, y, eps, norm)
    if name == "pgd":
        return pgd(
            forward, x, y, eps, norm, steps, None, random_start, restarts, generator, early_stop
        )
    return apgd_ce(forward, x, y, eps, norm, 2 * steps, restarts, generator)
