"""DP-CLIP: differentially private contrastive fine-tuning of tiny-clip (per-batch noisy SGD).

The CLIP (InfoNCE) loss couples every (image, text) pair of a batch through its softmax
denominators, so a per-example gradient is not defined and per-example clipping (DP-SGD, as in
:func:`~mmsafe.harden.dp.dp_fit_fusion_head`) bounds nothing. DP-CLIP (Huang et al. 2023,
arXiv 2306.08173; methods reference §11a) clips the gradient of the *whole batch's* loss
instead and adds Gaussian noise. :func:`dp_contrastive_finetune` runs, for every step::

    B  = Poisson sample of the pairs, each kept with probability q
    g  = grad of the symmetric InfoNCE loss of B (trainable parameters only)
    g <- g * min(1, C / ||g||)                      # clip the batch gradient
    g <- g + N(0, (sigma * 2C)^2 I)                 # Gaussian mechanism, sensitivity 2C
    theta <- SGD-with-momentum step on g

**Sensitivity.** Adding, removing or replacing one pair changes the sampled batch, and through
the softmax every pair's loss term, so the two batch gradients can differ arbitrarily; but both
are clipped into the ball of radius ``C``, so they differ by at most ``2C``. The noise std is
``sigma * 2C``: ``sigma`` (``noise_multiplier``) is the noise relative to that sensitivity, and
each step is a sampled Gaussian mechanism with noise multiplier ``sigma`` and rate ``q``.
Per-example DP-SGD accounting with sensitivity ``C`` would overstate the privacy by that factor
of two; it is not used. opacus' ``get_noise_multiplier`` picks ``sigma`` for the target budget
and its RDP (or PRV) accountant reports the ``epsilon`` actually spent.

**Proven versus assumed.** :data:`ACCOUNTING_ASSUMPTION` (copied into every report as
``accounting_assumption``) spells it out. The reported ``epsilon`` is a guarantee for the
fine-tuning pairs under add/remove adjacency *provided* that (1) the sampled-Gaussian RDP bound
applies to a batch function that is not a sum of per-example terms (Mironov, Talwar & Zhang
2019 state it for any function of the sampled subset with bounded sensitivity; we rely on that
and on opacus' implementation, we do not re-prove it) and (2) the starting model is public. The
quick tiny-clip was pre-trained on its world's ``train`` rows, so fine-tuning it on those rows
gives them **no** end-to-end guarantee; fine-tune on rows it never saw (the tests use the
``calibration`` rows).

**Utility cost.** Per-batch noise is not averaged over the batch: DP-SGD's averaged gradient
has noise std ``sigma * C / B``, DP-CLIP's has ``2 * sigma * C`` whatever ``B``. With ~10^5
trainable parameters and a few hundred pairs, moderate budgets (``epsilon`` ~ 8) drown the
signal; see ``docs/privacy.md`` for measured numbers.

Requires the optional dependency ``opacus`` (for the accountant only; tested with opacus 1.6.0).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from mmsafe.engine.cache import atomic_write_json
from mmsafe.harden.base import Hardened, Hardener, HardenError, register_hardener
from mmsafe.models.heads import num_threads
from mmsafe.models.tiny_clip import EVAL_TEMPLATES, MAX_LOGIT_SCALE, TinyClip, contrastive_loss

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.engine.runner import Engine
    from mmsafe.models.base import EncoderModel
    from mmsafe.tasks.base import Task

__all__ = [
    "ACCOUNTING_ASSUMPTION",
    "DPClipHardener",
    "DPContrastiveReport",
    "dp_contrastive_finetune",
    "trainable_parameter_names",
]

TrainTowers = Literal["image", "text", "both"]

ACCOUNTING_ASSUMPTION = (
    "Per-batch clipping (DP-CLIP): each step clips the gradient of the whole Poisson-sampled "
    "batch's InfoNCE loss to norm C and adds N(0, (2*sigma*C)^2 I). PROVEN here: adding, "
    "removing or replacing one (image, text) pair moves the clipped batch gradient by at most "
    "2C (both lie in the C-ball), so with noise std 2*sigma*C each step is a sampled Gaussian "
    "mechanism with noise multiplier sigma and rate q, and epsilon is opacus' accountant for "
    "(sigma, q, steps), with add/remove-one-pair adjacency (replace-one: group privacy, about "
    "twice epsilon, not reported). ASSUMED, not proven here: (1) the sampled-Gaussian RDP bound "
    "holds for a batch function that is not a sum of per-example terms (Mironov, Talwar & Zhang "
    "2019 state it for any bounded-sensitivity function of the sample; relied on, not re-proved); "
    "(2) the starting model is public - if it was trained on these rows (as the quick shapes "
    "tiny-clip was on its train split) the released model has no guarantee for them; "
    "(3) only the fine-tuning rows are covered: held-out rows scored for utility are not; "
    "(4) the noise comes from torch's non-cryptographic PRNG in floating point (opacus' "
    "secure_mode is off)."
)
"""How the reported epsilon is obtained, and which parts of it are assumptions."""


@dataclass(frozen=True)
class DPContrastiveReport:
    """What a DP-CLIP fine-tuning run spent and achieved.

    Attributes:
        epsilon: Privacy budget spent, from opacus' accountant for ``(noise_multiplier,
            sample_rate, steps)`` at ``delta``; a guarantee only under
            ``accounting_assumption``.
        delta: The delta of the guarantee.
        target_epsilon: The budget that was asked for.
        noise_multiplier: ``sigma``: noise std divided by the sensitivity ``2 * max_grad_norm``.
        noise_std: Std of the Gaussian noise added to each coordinate of the clipped batch
            gradient (``noise_multiplier * sensitivity``).
        max_grad_norm: ``C``, the norm the whole batch gradient is clipped to.
        sensitivity: ``2 * max_grad_norm``: the most one pair can move a clipped batch gradient.
        sample_rate: Poisson sampling rate of each pair per step.
        steps: Noisy steps taken (what the accountant composed).
        epochs: Passes (in expectation) over the pairs.
        batch_size: Expected pairs per step.
        n_train: Fine-tuning pairs.
        lr: SGD learning rate.
        momentum: SGD momentum.
        train: Which towers trained: ``"image"``, ``"text"`` or ``"both"``.
        blocks: How many last blocks of each trained tower trained (besides the projection).
        n_trainable: Number of trainable scalars (the dimension the noise is added in).
        trainable: Names of the trainable parameters (``model.named_parameters()`` names).
        zero_shot_before: Zero-shot accuracy on the evaluation rows before fine-tuning
            (``None`` without evaluation rows).
        zero_shot_after: The same after fine-tuning.
        n_eval: Evaluation rows scored.
        accountant: opacus accounting mechanism (``"rdp"`` or ``"prv"``).
        adjacency: The neighbouring-dataset relation ``epsilon`` refers to.
        accounting_assumption: What the accounting proves and what it assumes.
        opacus_version: Version of opacus whose accountant was used.
    """

    epsilon: float
    delta: float
    target_epsilon: float
    noise_multiplier: float
    noise_std: float
    max_grad_norm: float
    sensitivity: float
    sample_rate: float
    steps: int
    epochs: int
    batch_size: int
    n_train: int
    lr: float
    momentum: float
    train: str
    blocks: int
    n_trainable: int
    trainable: tuple[str, ...]
    zero_shot_before: float | None
    zero_shot_after: float | None
    n_eval: int
    accountant: str
    adjacency: str
    accounting_assumption: str
    opacus_version: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = asdict(self)
        d["trainable"] = list(self.trainable)
        return d


# --------------------------------------------------------------------------- parameter choice


def _tower_prefixes(model: TinyClip, tower: str, blocks: int) -> list[str]:
    """Parameter-name prefixes that train in one tower: its projection and last ``blocks``."""
    if tower == "image":
        n = len(model.image.stages)
        return ["image.proj."] + [f"image.stages.{i}." for i in range(n - min(blocks, n), n)]
    n = len(model.text.layers)
    return ["text.proj.", "text.ln."] + [f"text.layers.{i}." for i in range(n - min(blocks, n), n)]


def trainable_parameter_names(
    model: TinyClip, train: TrainTowers = "both", blocks: int = 1
) -> tuple[str, ...]:
    """Names of the parameters :func:`dp_contrastive_finetune` trains.

    Each trained tower trains its projection (the text tower also its final LayerNorm) and its
    last ``blocks`` blocks (CNN stages of the image tower, transformer blocks of the text
    tower). Token and position embeddings and the logit scale never train.

    Args:
        model: a tiny-clip.
        train: ``"image"``, ``"text"`` or ``"both"``.
        blocks: last blocks per trained tower, ``0`` for the projections only.

    Returns:
        The names, in ``model.named_parameters()`` order.

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
        >>> m = TinyClip(TinyClipConfig.for_size("xs"))
        >>> trainable_parameter_names(m, "image", blocks=0)
        ('image.proj.weight', 'image.proj.bias')
    """
    if train not in ("image", "text", "both"):
        raise ValueError(f"train must be 'image', 'text' or 'both', got {train!r}.")
    if blocks < 0:
        raise ValueError(f"blocks must be >= 0, got {blocks}.")
    towers = ("image", "text") if train == "both" else (train,)
    prefixes = tuple(p for t in towers for p in _tower_prefixes(model, t, blocks))
    return tuple(name for name, _ in model.named_parameters() if name.startswith(prefixes))


# --------------------------------------------------------------------------- forward pieces


def _image_prefix(model: TinyClip, pixels: Tensor, blocks: int) -> Tensor:
    """Output of the frozen image stages (input of the first trainable one)."""
    tower = model.image
    n_frozen = len(tower.stages) - min(blocks, len(tower.stages))
    out = []
    with torch.no_grad():
        for lo in range(0, len(pixels), 256):
            x = (pixels[lo : lo + 256] - tower.mean) / tower.std
            for stage in tower.stages[:n_frozen]:
                x = stage(x)
            out.append(x)
    return torch.cat(out)


def _image_rest(model: TinyClip, x: Tensor, blocks: int) -> Tensor:
    tower = model.image
    for stage in tower.stages[len(tower.stages) - min(blocks, len(tower.stages)) :]:
        x = stage(x)
    return tower.proj(torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1))


def _text_prefix(model: TinyClip, texts: Sequence[str], blocks: int) -> tuple[Tensor, Tensor]:
    """Hidden states entering the first trainable text block, padded, and the attention mask."""
    tower = model.text
    tok = model.preprocess("text", list(texts))
    assert isinstance(tok, dict)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    keep = mask.bool()
    n_frozen = len(tower.layers) - min(blocks, len(tower.layers))
    with torch.no_grad():
        x = tower.token(ids) + tower.position[: ids.shape[1]]
        for layer in tower.layers[:n_frozen]:
            x = layer(x, keep)
    return x, mask


def _text_rest(model: TinyClip, x: Tensor, mask: Tensor, blocks: int) -> Tensor:
    tower = model.text
    keep = mask.bool()
    for layer in tower.layers[len(tower.layers) - min(blocks, len(tower.layers)) :]:
        x = layer(x, keep)
    x = tower.ln(x)
    m = mask.unsqueeze(-1).to(x.dtype)
    return tower.proj((x * m).sum(1) / m.sum(1).clamp_min(1.0))


@torch.no_grad()
def _zero_shot_accuracy(
    model: TinyClip,
    pixels: Tensor,
    labels: np.ndarray,
    classes: Sequence[str],
    templates: Sequence[str],
) -> float:
    """Accuracy of the prompt-ensemble zero-shot classifier (as ``heldout_zero_shot_accuracy``)."""
    class_emb = []
    for name in classes:
        prompts = [t.format(name) for t in templates]
        e = model.encode({"text": model.preprocess("text", prompts)})["text"].mean(0)
        class_emb.append(F.normalize(e, dim=-1))
    cls = torch.stack(class_emb)
    preds = []
    for lo in range(0, len(pixels), 256):
        emb = model.encode({"image": pixels[lo : lo + 256]})["image"]
        preds.append((emb @ cls.T).argmax(1))
    return float((torch.cat(preds).numpy() == labels).mean())


def _as_pixels(model: TinyClip, images: Tensor | Sequence[Any], what: str) -> Tensor:
    """A detached float copy of the pixels (the caller's tensor is never touched)."""
    if isinstance(images, Tensor):
        x = images.detach().float().cpu().clone()
    else:
        batch = model.preprocess("image", list(images))
        assert isinstance(batch, Tensor)
        x = batch.float()
    side = model.cfg.image_size
    if x.dim() != 4 or x.shape[1:] != (3, side, side):
        raise ValueError(f"{what} must be (N, 3, {side}, {side}) pixels, got {tuple(x.shape)}.")
    return x


# --------------------------------------------------------------------------- the fine-tuning


def dp_contrastive_finetune(
    model: TinyClip,
    images: Tensor | Sequence[Any],
    texts: Sequence[str],
    *,
    target_epsilon: float = 8.0,
    delta: float | None = None,
    batch_size: int = 64,
    epochs: int = 5,
    max_grad_norm: float = 1.0,
    lr: float = 0.05,
    momentum: float = 0.9,
    seed: int = 0,
    train: TrainTowers = "both",
    blocks: int = 1,
    eval_images: Tensor | Sequence[Any] | None = None,
    eval_labels: Sequence[int] | np.ndarray | Tensor | None = None,
    classes: Sequence[str] | None = None,
    templates: Sequence[str] = EVAL_TEMPLATES,
    accountant: Literal["rdp", "prv"] = "rdp",
) -> tuple[TinyClip, DPContrastiveReport]:
    """Fine-tune a tiny-clip contrastively with DP-CLIP (per-batch clipping + Gaussian noise).

    Every step draws a Poisson sample of the pairs (rate ``q = 1 / ceil(n / batch_size)``, as
    opacus' DP-SGD), computes the symmetric InfoNCE loss of
    :func:`~mmsafe.models.tiny_clip.contrastive_loss` on it (pairs with identical captions
    count as positives for each other; logit scale frozen), clips the gradient of that batch
    loss to ``max_grad_norm`` (``C``), adds ``N(0, (2 * sigma * C)^2)`` to every trainable
    coordinate and takes an SGD step with momentum. ``sigma`` is the smallest noise multiplier
    (opacus ``get_noise_multiplier``) for which ``epochs * ceil(n / batch_size)`` steps spend at
    most ``target_epsilon``; the reported ``epsilon`` is recomputed by the accountant from the
    steps actually taken. See :data:`ACCOUNTING_ASSUMPTION` for what that number guarantees.

    The model runs in eval mode throughout (batch-norm statistics stay those of the starting
    model: updating them would release batch statistics outside the noisy gradient), so only
    the parameters named by :func:`trainable_parameter_names` change. The frozen lower layers
    are applied once to every pair and reused, which is exact because they are deterministic.
    No augmentation. Deterministic for a ``seed`` (own generators for sampling and noise; the
    global RNG is left alone).

    Args:
        model: the tiny-clip to start from; treated as public (not covered by the guarantee) and
            not modified.
        images: the private fine-tuning images: ``(N, 3, S, S)`` pixels in ``[0, 1]`` or raw
            images for ``model.preprocess("image", ...)``. Not modified.
        texts: their ``N`` captions.
        target_epsilon: privacy budget to spend.
        delta: delta of the guarantee (default ``1 / N``).
        batch_size: expected pairs per step (sets the sampling rate).
        epochs: passes over the pairs, in expectation.
        max_grad_norm: ``C``, the clipping norm of the whole batch gradient.
        lr: SGD learning rate.
        momentum: SGD momentum.
        seed: seeds the Poisson sampling (``seed``) and the noise (``seed + 1``).
        train: towers to fine-tune: ``"image"``, ``"text"`` or ``"both"``.
        blocks: last blocks of each trained tower to fine-tune besides its projection.
        eval_images: optional held-out images for the zero-shot accuracy before and after.
        eval_labels: their class indices into ``classes`` (rows labelled ``-1`` are skipped).
        classes: class names for the zero-shot prompts.
        templates: zero-shot prompt templates (the class embedding is their renormalised mean).
        accountant: opacus accountant, ``"rdp"`` (default) or ``"prv"``.

    Returns:
        ``(model, report)``: a fine-tuned deep copy in eval mode (fingerprint reset,
        ``training_info["dp_clip"]`` holds the report) and a :class:`DPContrastiveReport`.

    Raises:
        ValueError: bad arguments, or a budget too small for opacus to find a noise multiplier.

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
        >>> m = TinyClip(TinyClipConfig.for_size("xs")).eval()
        >>> x = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        >>> caps = [f"a {c} shape" for c in ["red", "blue", "green", "pink"] * 10]
        >>> out, rep = dp_contrastive_finetune(m, x, caps, target_epsilon=2.0, epochs=2,
        ...                                    batch_size=10, train="text", blocks=0)
        >>> rep.steps, rep.sample_rate, rep.sensitivity, rep.epsilon <= 2.0 + 0.05
        (8, 0.25, 2.0, True)
        >>> torch.equal(out.image.proj.weight, m.image.proj.weight)
        True
    """
    import opacus
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import get_noise_multiplier

    if not isinstance(model, TinyClip):
        raise ValueError(
            f"dp_contrastive_finetune fine-tunes a tiny-clip, got {type(model).__name__}."
        )
    if not (target_epsilon > 0 and max_grad_norm > 0 and lr > 0 and 0 <= momentum < 1):
        raise ValueError(
            "Need target_epsilon > 0, max_grad_norm > 0, lr > 0 and 0 <= momentum < 1; got "
            f"{target_epsilon}, {max_grad_norm}, {lr}, {momentum}."
        )
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"Need epochs >= 1 and batch_size >= 1; got {epochs}, {batch_size}.")
    if accountant not in ("rdp", "prv"):
        raise ValueError(f"accountant must be 'rdp' or 'prv', got {accountant!r}.")
    names = trainable_parameter_names(model, train, blocks)
    pixels = _as_pixels(model, images, "images")
    captions = [str(t) for t in texts]
    n = int(pixels.shape[0])
    if len(captions) != n or n < 2:
        raise ValueError(f"Need as many texts as images (at least 2); got {len(captions)}, {n}.")
    delta = 1.0 / n if delta is None else float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")
    evaluate = _ZeroShotEval(model, eval_images, eval_labels, classes, templates)

    steps_per_epoch = math.ceil(n / batch_size)
    q = 1.0 / steps_per_epoch
    n_steps = epochs * steps_per_epoch
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        try:
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=float(target_epsilon),
                    target_delta=delta,
                    sample_rate=q,
                    steps=n_steps,
                    accountant=accountant,
                )
            )
        except ValueError as err:
            raise ValueError(
                f"opacus found no noise multiplier for epsilon={target_epsilon}, delta={delta}, "
                f"q={q:.4g}, {n_steps} steps: {err}"
            ) from err
    sens = 2.0 * float(max_grad_norm)
    noise_std = sigma * sens

    out = copy.deepcopy(model).eval()
    params = dict(out.named_parameters())
    trainable = [params[k] for k in names]
    for p in out.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.SGD(trainable, lr=lr, momentum=momentum)
    scale = out.log_logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE)
    img_blocks = blocks if train in ("image", "both") else 0
    txt_blocks = blocks if train in ("text", "both") else 0
    sampler = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 1)
    acct = create_accountant(accountant)
    same_caption = np.asarray(captions, dtype=object)
    before = evaluate(out)
    with num_threads():
        # Frozen lower layers, once; a frozen tower is reduced to its embeddings.
        img_x = _image_prefix(out, pixels, img_blocks)
        txt_x, txt_mask = _text_prefix(out, captions, txt_blocks)
        if train == "text":
            with torch.no_grad():
                img_x = _image_rest(out, img_x, 0)
        if train == "image":
            with torch.no_grad():
                txt_x = _text_rest(out, txt_x, txt_mask, 0)
        for _ in range(n_steps):
            idx = torch.nonzero(torch.rand(n, generator=sampler) < q).flatten()
            opt.zero_grad(set_to_none=True)
            if len(idx) >= 2:  # one pair alone has zero InfoNCE loss (softmax over one logit)
                img = img_x[idx] if train == "text" else _image_rest(out, img_x[idx], img_blocks)
                if train == "image":
                    txt = txt_x[idx]
                else:
                    width = int(txt_mask[idx].sum(1).max())  # drop all-padding columns
                    txt = _text_rest(out, txt_x[idx, :width], txt_mask[idx, :width], txt_blocks)
                loss = contrastive_loss(
                    F.normalize(img, dim=-1),
                    F.normalize(txt, dim=-1),
                    scale,
                    same_caption[idx.numpy()].tolist(),
                )
                loss.backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
            norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
            factor = min(1.0, float(max_grad_norm) / (norm + 1e-12))
            for p, g in zip(trainable, grads, strict=True):
                p.grad = g * factor + noise_std * torch.randn(
                    p.shape, generator=noise_gen, dtype=p.dtype
                )
            opt.step()
            acct.step(noise_multiplier=sigma, sample_rate=q)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the")
            epsilon = float(acct.get_epsilon(delta=delta))
    for p in out.parameters():
        p.requires_grad_(True)
    out.eval()
    out.invalidate_fingerprint()
    after = evaluate(out)
    report = DPContrastiveReport(
        epsilon=epsilon,
        delta=delta,
        target_epsilon=float(target_epsilon),
        noise_multiplier=sigma,
        noise_std=noise_std,
        max_grad_norm=float(max_grad_norm),
        sensitivity=sens,
        sample_rate=q,
        steps=n_steps,
        epochs=epochs,
        batch_size=batch_size,
        n_train=n,
        lr=float(lr),
        momentum=float(momentum),
        train=train,
        blocks=blocks,
        n_trainable=sum(p.numel() for p in trainable),
        trainable=names,
        zero_shot_before=before,
        zero_shot_after=after,
        n_eval=evaluate.n_rows,
        accountant=accountant,
        adjacency="add/remove one (image, text) pair of the fine-tuning rows",
        accounting_assumption=ACCOUNTING_ASSUMPTION,
        opacus_version=str(opacus.__version__),
    )
    info = dict(getattr(out, "training_info", None) or {})
    out.training_info = {**info, "dp_clip": report.to_dict()}
    return out, report


class _ZeroShotEval:
    """Zero-shot accuracy on fixed evaluation rows, or ``None`` when there are none."""

    def __init__(
        self,
        model: TinyClip,
        images: Tensor | Sequence[Any] | None,
        labels: Sequence[int] | np.ndarray | Tensor | None,
        classes: Sequence[str] | None,
        templates: Sequence[str],
    ) -> None:
        given = [images is not None, labels is not None, classes is not None]
        if any(given) and not all(given):
            raise ValueError("eval_images, eval_labels and classes go together; pass all three.")
        self.n_rows = 0
        if images is None or labels is None or classes is None:
            return
        y = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels).copy()
        x = _as_pixels(model, images, "eval_images")
        if y.shape != (x.shape[0],):
            raise ValueError(f"eval_labels must be ({x.shape[0]},), got {y.shape}.")
        if y.max(initial=-1) >= len(classes):
            raise ValueError(f"eval_labels index past the {len(classes)} classes.")
        keep = y >= 0
        self.pixels, self.labels = x[torch.from_numpy(keep)], y[keep].astype(np.int64)
        self.classes, self.templates = list(classes), list(templates)
        self.n_rows = int(keep.sum())

    def __call__(self, model: TinyClip) -> float | None:
        if self.n_rows == 0:
            return None
        return _zero_shot_accuracy(model, self.pixels, self.labels, self.classes, self.templates)


# --------------------------------------------------------------------------- the hardener


@register_hardener
class DPClipHardener(Hardener):
    """``mmsafe harden dp-clip``: DP-CLIP fine-tuning of tiny-clip on one split's pairs.

    See :func:`dp_contrastive_finetune` for the mechanism and for what its accounting proves
    and assumes (the report's ``accounting_assumption``, saved beside the model as
    ``dp_clip.json``). Zero-shot accuracy before/after fine-tuning is measured on the labelled
    ``calibration`` rows; the model is saved under ``out/model`` (``--model tiny-clip:<dir>``).

    Args:
        split: The private fine-tuning pairs (best: rows the model never saw).
        target_epsilon: Privacy budget to spend.
        delta: Delta of the guarantee (default: 1 / fine-tuning rows).
        max_grad_norm: Norm the whole batch gradient is clipped to.
        epochs: Passes (in expectation) over the pairs.
        lr: SGD learning rate.

    Attributes:
        model_: the fine-tuned model.
        report_: its :class:`DPContrastiveReport`.
    """

    name = "dp-clip"
    description = "DP-CLIP contrastive fine-tuning (per-batch noisy SGD): epsilon, utility, MIA."
    checks = "performance,controllability.privacy"
    artifact = "model"

    def __init__(
        self,
        *,
        split: str = "train",
        target_epsilon: float = 8.0,
        delta: float | None = None,
        max_grad_norm: float = 1.0,
        epochs: int = 5,
        lr: float = 0.05,
    ) -> None:
        self.split = split
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.max_grad_norm = max_grad_norm
        self.epochs = epochs
        self.lr = lr
        self.model_: TinyClip | None = None
        self.report_: DPContrastiveReport | None = None

    def validate(self, model: EncoderModel, task: Task, data: Dataset) -> None:  # noqa: D102
        if not isinstance(model, TinyClip):
            raise HardenError(
                f"DP-CLIP fine-tuning supports tiny-clip models for now, not {model.name}."
            )
        if not data.has_split(self.split):
            raise HardenError(f"--split {self.split!r}: {data.name!r} has no such rows.")
        super().validate(model, task, data)

    def fit(  # noqa: D102
        self, model: EncoderModel, task: Task, data: Dataset, engine: Engine, *, seed: int = 0
    ) -> DPClipHardener:
        assert isinstance(model, TinyClip)
        private = data.split(self.split)
        cal = data.split("calibration") if data.has_split("calibration") else None
        scored = cal if cal is not None and cal.labelled.any() else None
        try:
            self.model_, self.report_ = dp_contrastive_finetune(
                model,
                private.modalities["image"],
                [str(t) for t in private.modalities["text"]],
                target_epsilon=self.target_epsilon,
                delta=self.delta,
                max_grad_norm=self.max_grad_norm,
                epochs=self.epochs,
                lr=self.lr,
                seed=seed,
                eval_images=None if scored is None else scored.modalities["image"],
                eval_labels=None if scored is None else scored.labels,
                classes=None if scored is None else scored.classes,
            )
        except ValueError as exc:
            raise HardenError(f"DP-CLIP cannot fine-tune {model.name}: {exc}") from None
        return self

    def _fitted(self) -> tuple[TinyClip, DPContrastiveReport]:
        if self.model_ is None or self.report_ is None:
            raise RuntimeError("DPClipHardener.fit() must run first.")
        return self.model_, self.report_

    def transform(self, model: EncoderModel, task: Task) -> Hardened:  # noqa: D102
        return Hardened(self._fitted()[0], task)

    def summary(self) -> dict[str, Any]:  # noqa: D102
        from mmsafe.harden.dp import privacy_summary

        return privacy_summary(self._fitted()[1])

    def save(self, path: Path) -> Path:  # noqa: D102
        hardened, report = self._fitted()
        artifact = hardened.save_pretrained(path)
        atomic_write_json(path / "dp_clip.json", report.to_dict())
        return Path(artifact)
