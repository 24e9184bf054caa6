"""Machine unlearning for a fusion head: forget some training rows, checked against retraining.

A fusion head (:class:`~mmsafe.models.heads.FusionHead`) is trained on frozen, cached
embeddings, so "forgetting" rows means changing the head alone. :func:`unlearn` fine-tunes a
copy of the head with one of two methods:

* ``"multidelete"``: MultiDelete (Cheng & Amiri, ECCV 2024; methods reference §11b), with the
  released code's three MSE losses, applied to the head's logits (its fused output):

  - *modality decoupling* on the forget rows: the head on a true (image, text) pair should
    answer like the *original* head on a mismatched pair (the other modalities shuffled among
    the forget rows), so the pairing it memorised is no longer special;
  - *multimodal retention* on retained rows: the head on the full input stays close to the
    original head;
  - *unimodal retention* on retained rows: the head with all but one modality replaced by its
    null embedding stays close to the original head in the same state. (The encoders are
    frozen, so their unimodal knowledge cannot change; this keeps what the head does with each
    modality alone.)

* ``"gradient_ascent"``: raise the cross-entropy on the forget rows, each row's loss capped at
  the original head's mean loss on held-out rows (or ``log C`` without them) so it cannot
  diverge, and stopped once the forget rows' mean loss reaches that cap; optionally with
  cross-entropy descent on retained rows.

:func:`retrain_from_scratch` repeats the original head's recipe without the forget rows, the
gold standard unlearning is judged against. :func:`unlearn_fusion` runs the whole comparison
on a dataset (embed, unlearn, retrain, attack) and returns an :class:`UnlearnReport`: the
forget rows' loss-attack membership AUC against held-out rows, and the accuracy on retained and
test rows, for the original, unlearned and retrained heads, with the time each took::

    report = unlearn_fusion(model, data, "forget.txt", out="unlearned")
    print(report.to_markdown())

The forget list is a text file of row ids, one per line (:func:`read_forget_ids`); a bad
line raises a :class:`ForgetListError` naming the file and line.
"""

from __future__ import annotations

import copy
import difflib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from mmsafe.harden.base import Hardened, Hardener, HardenError, register_hardener
from mmsafe.methods.privacy import loss_scores, membership_auc
from mmsafe.models.heads import FusionHead, HeadTrainConfig, fit_fusion_head, num_threads

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.engine.runner import Engine
    from mmsafe.models.base import EncoderModel
    from mmsafe.tasks.base import Task

__all__ = [
    "METHODS",
    "ForgetListError",
    "UnlearnHardener",
    "HeadScores",
    "UnlearnReport",
    "compare_unlearning",
    "read_forget_ids",
    "retrain_from_scratch",
    "score_head",
    "unlearn",
    "unlearn_fusion",
]

METHODS = ("multidelete", "gradient_ascent")
"""The unlearning methods :func:`unlearn` supports."""
MAX_LISTED_PROBLEMS = 10
"""How many bad lines a :class:`ForgetListError` lists before ``... and K more``."""

Embeddings = Mapping[str, Tensor]


# --------------------------------------------------------------------------- forget list


class ForgetListError(HardenError):
    """The forget list cannot be used; ``str(error)`` names the file, the lines and the fix.

    Attributes:
        path: the forget list's path (or ``"<ids>"`` for ids passed in Python).
        problems: ``(line number, reason)`` per bad line; empty when the whole file is at
            fault (missing, or no ids at all).
        unit: What a number counts: ``"line"`` of a file, or ``"item"`` of a list of ids.

    Example:
        >>> print(ForgetListError("ids.txt", [(3, "unknown id 'x7'")]))
        1 bad line in ids.txt:
          line 3: unknown id 'x7'
        Each line must hold one row id of the training split ('id' column); blank lines and \
'#' comments are ignored. Fix or remove these lines.
    """

    def __init__(
        self,
        path: str | Path,
        problems: Sequence[tuple[int, str]] = (),
        *,
        message: str | None = None,
        unit: str = "line",
    ) -> None:
        self.path = str(path)
        self.problems = list(problems)
        if message is None:
            n = len(self.problems)
            lines = [f"{n} bad {unit}{'' if n == 1 else 's'} in {self.path}:"]
            lines += [f"  {unit} {i}: {r}" for i, r in self.problems[:MAX_LISTED_PROBLEMS]]
            if n > MAX_LISTED_PROBLEMS:
                lines.append(f"  ... and {n - MAX_LISTED_PROBLEMS} more")
            lines.append(
                "Each line must hold one row id of the training split ('id' column); blank "
                "lines and '#' comments are ignored. Fix or remove these lines."
            )
            message = "\n".join(lines)
        super().__init__(message)


def _parse_ids(path: Path) -> list[tuple[int, str]]:
    """``(line number, id)`` per id line of ``path`` (1-based; comments and blanks skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ForgetListError(
            path,
            message=f"Forget list {path} not found. Pass a text file with one row id per line.",
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ForgetListError(
            path, message=f"Could not read the forget list {path} as UTF-8 text: {err}"
        ) from err
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            out.append((number, entry))
    return out


def _check_ids(
    where: str,
    entries: Sequence[tuple[int, str]],
    data: Dataset | None,
    split: str | None,
    unit: str = "line",
) -> list[str]:
    """Validate ``(number, id)`` entries against ``data``; return the ids, first copy of each."""
    if not entries:
        raise ForgetListError(
            where,
            message=f"Forget list {where} lists no row ids (only blank lines or '#' comments). "
            "Put one training row id per line.",
        )
    problems: list[tuple[int, str]] = []
    row_of: dict[str, int] = {}
    if data is not None:
        row_of = {ident: i for i, ident in enumerate(data.ids)}
    seen: dict[str, int] = {}
    for number, ident in entries:
        if ident in seen:
            continue  # listing a row twice is harmless
        seen[ident] = number
        if data is None:
            continue
        row = row_of.get(ident)
        if row is None:
            reason = f"unknown id {ident!r}: not a row of {data.name!r}"
            close = difflib.get_close_matches(ident, data.ids, n=1, cutoff=0.8)
            if close:
                reason += f"; did you mean {close[0]!r}?"
            problems.append((number, reason))
        elif split is not None and data.splits is not None and data.splits[row] != split:
            problems.append(
                (
                    number,
                    f"id {ident!r} is in split {data.splits[row]!r}, not {split!r}: only rows "
                    "the head was trained on can be forgotten",
                )
            )
        elif data.labels[row] < 0:
            problems.append(
                (number, f"id {ident!r} is unlabelled, so the head never trained on it")
            )
    if problems:
        raise ForgetListError(where, problems, unit=unit)
    return list(seen)


def read_forget_ids(
    path: str | Path, data: Dataset | None = None, split: str | None = "train"
) -> list[str]:
    r"""Row ids to forget, read from a text file of one id per line.

    Blank lines are skipped, and ``#`` starts a comment (whole-line or trailing). An id
    listed twice is kept once. With ``data``, every id must be a row of ``data`` and, unless
    ``split`` is ``None``, of that split; all bad lines are reported at once.

    Args:
        path: The text file.
        data: The dataset the ids must belong to (``None`` skips the check).
        split: The split the ids must be in (the rows the head was trained on).

    Returns:
        The ids, in file order, without repeats.

    Raises:
        ForgetListError: The file is missing or unreadable, lists no id, or has bad lines
            (each named by its line number).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     p = Path(tmp) / "ids.txt"
        ...     _ = p.write_text("# rows to forget\nr1\n\nr7  # duplicate item\nr1\n")
        ...     read_forget_ids(p)
        ['r1', 'r7']
    """
    p = Path(path)
    return _check_ids(str(p), _parse_ids(p), data, split)


# --------------------------------------------------------------------------- unlearning


def _as_embeddings(embeddings: Embeddings, name: str) -> dict[str, Tensor]:
    out = {m: torch.as_tensor(x).detach().float().cpu() for m, x in embeddings.items()}
    sizes = {x.shape[0] for x in out.values()}
    if len(sizes) != 1 or any(x.ndim != 2 for x in out.values()):
        raise ValueError(f"{name} must map each modality to (N, D) embeddings of one N.")
    return out


def _rows(embs: Mapping[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
    return {m: x[idx] for m, x in embs.items()}


def _n(embs: Mapping[str, Tensor]) -> int:
    return int(next(iter(embs.values())).shape[0])


def _mismatched(
    batch: Mapping[str, Tensor], pool: Mapping[str, Tensor], keep: str, gen: torch.Generator
) -> dict[str, Tensor]:
    """``batch`` with modality ``keep`` kept and every other one taken from another row.

    Each row keeps its ``keep`` embedding (e.g. the image) and gets the other modalities of a
    different, randomly drawn row of ``pool`` (the forget rows, as MultiDelete shuffles within
    the deletion batch), so the pair no longer matches.
    """
    n, n_pool = _n(batch), _n(pool)
    if n_pool > 1:
        offset = torch.randint(1, n_pool, (n,), generator=gen)
        partner = (torch.randint(0, n_pool, (n,), generator=gen) + offset) % n_pool
    else:
        partner = torch.zeros(n, dtype=torch.int64)
    return {m: (x if m == keep else pool[m][partner]) for m, x in batch.items()}


def _multidelete_loss(
    head: FusionHead,
    original: FusionHead,
    forget: dict[str, Tensor],
    forget_pool: dict[str, Tensor],
    retain: dict[str, Tensor],
    gen: torch.Generator,
    weights: tuple[float, float, float],
) -> Tensor:
    """``w_md L_MD + w_mm L_MM + w_uni L_UNI`` (methods reference §11b) on one batch pair.

    ``L_MD`` averages over which modality is kept (image with a foreign text, text with a
    foreign image: MultiDelete's i2t and t2i rows); ``L_UNI`` averages over the modalities.
    """
    w_md, w_mm, w_uni = weights
    mse = nn.functional.mse_loss
    mods = list(forget)
    with torch.no_grad():
        targets_md = [original(_mismatched(forget, forget_pool, m, gen)) for m in mods]
        target_mm = original(retain)
        targets_uni = [original({m: x}) for m, x in retain.items()] if len(mods) > 1 else []
    out = head(forget)
    loss = w_md * sum(mse(out, t) for t in targets_md) / len(mods)
    loss = loss + w_mm * mse(head(retain), target_mm)
    for (m, x), target in zip(retain.items(), targets_uni, strict=False):
        loss = loss + w_uni * mse(head({m: x}), target) / len(targets_uni)
    return loss


def _losses(head: FusionHead, embs: Mapping[str, Tensor], labels: Tensor) -> Tensor:
    with torch.no_grad():
        return nn.functional.cross_entropy(head(embs), labels, reduction="none")


def unlearn(
    head: FusionHead,
    forget: Embeddings,
    retain: Embeddings,
    *,
    method: Literal["multidelete", "gradient_ascent"] = "multidelete",
    forget_labels: Tensor | None = None,
    retain_labels: Tensor | None = None,
    heldout: Embeddings | None = None,
    heldout_labels: Tensor | None = None,
    steps: int = 150,
    lr: float = 3e-3,
    batch_size: int = 64,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    retain_weight: float = 1.0,
    seed: int = 0,
) -> FusionHead:
    """A copy of ``head`` fine-tuned to forget the ``forget`` rows (``head`` is untouched).

    Each step draws a batch of forget rows and a batch of retained rows and takes one Adam
    step on the method's loss (see the module docstring):

    * ``"multidelete"``: ``w_md L_MD + w_mm L_MM + w_uni L_UNI`` with ``weights = (w_md,
      w_mm, w_uni)``; needs no labels.
    * ``"gradient_ascent"``: ``-mean(min(CE_forget, cap)) + retain_weight * CE_retain``. The
      cap is the original head's mean cross-entropy on ``heldout`` rows (rows it never saw),
      else ``log C``; training stops early once the forget rows' mean loss reaches it. Needs
      ``forget_labels`` (and ``retain_labels`` when ``retain_weight > 0``).

    Deterministic for a given ``seed`` (own generator; the global RNG is left alone).

    Args:
        head: The trained head (e.g. from :func:`~mmsafe.models.heads.fit_fusion_head`).
        forget: ``{modality: (N_f, D_m)}`` embeddings of the rows to forget.
        retain: ``{modality: (N_r, D_m)}`` embeddings of the training rows to keep.
        method: ``"multidelete"`` or ``"gradient_ascent"``.
        forget_labels: ``(N_f,)`` labels of the forget rows (gradient ascent).
        retain_labels: ``(N_r,)`` labels of the retained rows (gradient ascent's descent term).
        heldout: Embeddings of rows the head never trained on (gradient ascent's cap).
        heldout_labels: Their labels.
        steps: Optimiser steps (an upper bound for gradient ascent).
        lr: Adam learning rate.
        batch_size: Forget rows and retained rows per step (each).
        weights: MultiDelete's ``(w_md, w_mm, w_uni)`` loss weights (equal in the paper's
            code).
        retain_weight: Weight of gradient ascent's descent on retained rows (0 = off).
        seed: Seeds the batches and the mismatched pairs.

    Returns:
        The unlearned head in eval mode; ``fit_info["unlearn"]`` records the settings, the
        steps taken and (gradient ascent) the cap.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(200) % 2
        >>> x = {"image": torch.randn(200, 3, generator=g) + y[:, None],
        ...      "text": torch.randn(200, 3, generator=g) + y[:, None]}
        >>> head = fit_fusion_head(x, y, epochs=20)
        >>> forget = {m: e[:10] for m, e in x.items()}
        >>> new = unlearn(head, forget, {m: e[10:] for m, e in x.items()}, steps=20)
        >>> new is not head, new.fit_info["unlearn"]["steps_taken"]
        (True, 20)
    """
    if method not in METHODS:
        raise ValueError(f"Unknown unlearning method {method!r}; use one of {METHODS}.")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(
            f"Need steps >= 1, batch_size >= 1, lr > 0; got {steps}, {batch_size}, {lr}."
        )
    f_emb, r_emb = _as_embeddings(forget, "forget"), _as_embeddings(retain, "retain")
    if set(f_emb) != set(head.modalities) or set(r_emb) != set(head.modalities):
        raise ValueError(f"forget and retain need exactly the head's modalities {head.modalities}.")
    n_f, n_r = _n(f_emb), _n(r_emb)
    if n_f == 0 or n_r == 0:
        raise ValueError(f"Need at least one forget row and one retained row; got {n_f}, {n_r}.")
    y_f = y_r = None
    cap = stop_at = math.log(head.cfg.num_classes)
    if method == "gradient_ascent":
        if forget_labels is None or (retain_weight > 0 and retain_labels is None):
            raise ValueError(
                "gradient_ascent needs forget_labels (and retain_labels when retain_weight > 0)."
            )
        y_f = torch.as_tensor(forget_labels, dtype=torch.int64)
        y_r = None if retain_labels is None else torch.as_tensor(retain_labels, dtype=torch.int64)
        if heldout is not None and heldout_labels is not None:
            h_emb = _as_embeddings(heldout, "heldout")
            h_loss = _losses(head, h_emb, torch.as_tensor(heldout_labels, dtype=torch.int64))
            cap, stop_at = float(h_loss.mean()), float(h_loss.median())

    original = copy.deepcopy(head).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    new = copy.deepcopy(head)
    new.train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(new.parameters(), lr=lr)
    taken = 0
    with num_threads():
        for _ in range(steps):
            fi = torch.randperm(n_f, generator=gen)[:batch_size]
            ri = torch.randperm(n_r, generator=gen)[:batch_size]
            fb, rb = _rows(f_emb, fi), _rows(r_emb, ri)
            if method == "multidelete":
                loss = _multidelete_loss(new, original, fb, f_emb, rb, gen, weights)
            else:
                assert y_f is not None
                if float(_losses(new, f_emb, y_f).median()) >= stop_at:
                    break
                ce = nn.functional.cross_entropy(new(fb), y_f[fi], reduction="none")
                loss = -ce.clamp(max=cap).mean()
                if retain_weight > 0 and y_r is not None:
                    loss = loss + retain_weight * nn.functional.cross_entropy(new(rb), y_r[ri])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            taken += 1
    new.eval()
    new.fit_info = dict(head.fit_info)
    new.fit_info["unlearn"] = {
        "method": method,
        "steps": steps,
        "steps_taken": taken,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "n_forget": n_f,
        "n_retain": n_r,
        **({"weights": list(weights)} if method == "multidelete" else {}),
        **(
            {"loss_cap": cap, "stop_at": stop_at, "retain_weight": retain_weight}
            if method != "multidelete"
            else {}
        ),
    }
    return new


def retrain_from_scratch(
    head: FusionHead, retain: Embeddings, retain_labels: Tensor, *, seed: int | None = None
) -> FusionHead:
    """Train a new head on the retained rows only, with ``head``'s architecture and recipe.

    The recipe is :meth:`HeadTrainConfig.of(head) <mmsafe.models.heads.HeadTrainConfig.of>`:
    ``head.cfg`` plus the settings :func:`~mmsafe.models.heads.fit_fusion_head` recorded in
    ``head.fit_info`` (epochs, learning rate, weight decay, batch size, modality dropout,
    seed), as LiRA's shadow heads do.

    Args:
        head: The original head.
        retain: ``{modality: (N_r, D_m)}`` embeddings of the rows to keep.
        retain_labels: ``(N_r,)`` their labels.
        seed: Training seed (default: the original head's).

    Returns:
        The retrained head, in eval mode.
    """
    config = HeadTrainConfig.of(head)
    return fit_fusion_head(
        retain, retain_labels, config if seed is None else config.replace(seed=seed)
    )


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class HeadScores:
    """How one head treats the forget, retained and test rows.

    Attributes:
        forget_auc: Loss-attack membership AUC of the forget rows against held-out rows (0.5:
            the forget rows look like rows never trained on).
        forget_accuracy: Accuracy on the forget rows.
        retain_accuracy: Accuracy on the retained training rows.
        test_accuracy: Accuracy on the labelled test rows.
    """

    forget_auc: float
    forget_accuracy: float
    retain_accuracy: float
    test_accuracy: float


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())


def score_head(
    head: FusionHead,
    *,
    forget: Embeddings,
    forget_labels: Any,
    retain: Embeddings,
    retain_labels: Any,
    heldout: Embeddings,
    heldout_labels: Any,
    test: Embeddings | None = None,
    test_labels: Any = None,
) -> HeadScores:
    """Membership AUC of the forget rows and accuracy on forget, retained and test rows.

    The attack is the loss threshold (:func:`~mmsafe.methods.privacy.loss_scores`): forget rows are
    the members, ``heldout`` rows (never trained on) the non-members.

    Args:
        head: The head to score.
        forget: Embeddings of the forget rows.
        forget_labels: Their labels.
        retain: Embeddings of the retained training rows.
        retain_labels: Their labels.
        heldout: Embeddings of the non-member rows of the attack.
        heldout_labels: Their labels.
        test: Embeddings of the test rows for the test accuracy (default ``heldout``).
        test_labels: Their labels.

    Returns:
        A :class:`HeadScores`.
    """
    if test is None:
        test, test_labels = heldout, heldout_labels

    def run(embs: Embeddings, labels: Any) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            logits = head(_as_embeddings(embs, "embeddings")).double().numpy()
        return logits, np.asarray(labels, dtype=np.int64)

    lf, yf = run(forget, forget_labels)
    lh, yh = run(heldout, heldout_labels)
    lr_, yr = run(retain, retain_labels)
    lt, yt = run(test, test_labels)
    scores = np.concatenate([loss_scores(lf, yf), loss_scores(lh, yh)])
    members = np.r_[np.ones(len(yf), bool), np.zeros(len(yh), bool)]
    return HeadScores(
        forget_auc=membership_auc(scores, members),
        forget_accuracy=_accuracy(lf, yf),
        retain_accuracy=_accuracy(lr_, yr),
        test_accuracy=_accuracy(lt, yt),
    )


@dataclass(frozen=True)
class UnlearnReport:
    """Unlearning compared with retraining from scratch without the forget rows.

    Attributes:
        method: The unlearning method.
        original: Scores of the head before unlearning.
        unlearned: Scores of the unlearned head.
        retrained: Scores of a head retrained without the forget rows (the reference).
        auc_gap: ``unlearned.forget_auc - retrained.forget_auc`` (0 = as forgotten as
            retraining; positive = still more member-like than after retraining).
        retain_accuracy_gap: ``unlearned.retain_accuracy - retrained.retain_accuracy``.
        test_accuracy_gap: ``unlearned.test_accuracy - retrained.test_accuracy``.
        unlearn_seconds: Wall time of unlearning (embeddings cached).
        retrain_seconds: Wall time of retraining the head (embeddings cached).
        time_ratio: ``retrain_seconds / unlearn_seconds`` (> 1: unlearning is faster).
        n_forget: Forget rows.
        n_retain: Retained training rows.
        n_heldout: Held-out (non-member) rows of the attack.
        n_test: Test rows of the test accuracy.
        artifact: Directory of the saved unlearned head, when one was saved.
        head: The unlearned head itself (not part of :meth:`to_dict`).
    """

    method: str
    original: HeadScores
    unlearned: HeadScores
    retrained: HeadScores
    auc_gap: float
    retain_accuracy_gap: float
    test_accuracy_gap: float
    unlearn_seconds: float
    retrain_seconds: float
    time_ratio: float
    n_forget: int
    n_retain: int
    n_heldout: int
    n_test: int
    artifact: str | None = None
    head: FusionHead | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (without the head)."""
        d = asdict(replace(self, head=None))
        del d["head"]
        return d

    def to_markdown(self) -> str:
        """The comparison as a markdown table (one row per head).

        Example:
            >>> s = HeadScores(0.9, 1.0, 0.95, 0.8)
            >>> r = UnlearnReport("multidelete", s, s, s, 0.0, 0.0, 0.0, 0.1, 0.2, 2.0,
            ...                   10, 90, 50, 50)
            >>> print(r.to_markdown().splitlines()[2])
            | original | 0.900 | 1.000 | 0.950 | 0.800 | - |
        """
        rows = [
            "| head | forget MIA AUC | forget acc | retain acc | test acc | time (s) |",
            "|---|---|---|---|---|---|",
        ]
        for name, s, t in (
            ("original", self.original, None),
            (f"unlearned ({self.method})", self.unlearned, self.unlearn_seconds),
            ("retrained from scratch", self.retrained, self.retrain_seconds),
        ):
            time_cell = "-" if t is None else f"{t:.3f}"
            rows.append(
                f"| {name} | {s.forget_auc:.3f} | {s.forget_accuracy:.3f} | "
                f"{s.retain_accuracy:.3f} | {s.test_accuracy:.3f} | {time_cell} |"
            )
        return "\n".join(rows)


def compare_unlearning(
    head: FusionHead,
    embeddings: Embeddings,
    labels: Any,
    forget_mask: Any,
    heldout: Embeddings,
    heldout_labels: Any,
    *,
    test: Embeddings | None = None,
    test_labels: Any = None,
    method: Literal["multidelete", "gradient_ascent"] = "multidelete",
    out: str | Path | None = None,
    seed: int = 0,
    **options: Any,
) -> UnlearnReport:
    """Unlearn the masked training rows, retrain without them, and score all three heads.

    Args:
        head: The original head, trained on all of ``embeddings``.
        embeddings: ``{modality: (N, D_m)}`` of the head's training rows.
        labels: ``(N,)`` their labels.
        forget_mask: ``(N,)`` booleans, ``True`` = forget this row.
        heldout: Embeddings of rows the head never trained on (the attack's non-members,
            and gradient ascent's loss cap).
        heldout_labels: Their labels.
        test: Rows for the test accuracy (default ``heldout``).
        test_labels: Their labels.
        method: ``"multidelete"`` or ``"gradient_ascent"``.
        out: Directory to save the unlearned head to (``FusionHead.save``); ``None`` = not
            saved.
        seed: Seed of the unlearning batches.
        **options: Further keyword arguments of :func:`unlearn` (``steps``, ``lr``, ...).

    Returns:
        An :class:`UnlearnReport`.
    """
    embs = _as_embeddings(embeddings, "embeddings")
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    mask = torch.as_tensor(np.asarray(forget_mask, dtype=bool))
    if mask.shape != y.shape or _n(embs) != y.shape[0]:
        raise ValueError("embeddings, labels and forget_mask must all have one row per row.")
    if not mask.any() or mask.all():
        raise HardenError(
            f"Unlearning needs some rows to forget and some to keep; the forget set has "
            f"{int(mask.sum())} of {len(mask)} training rows."
        )
    forget, retain = _rows(embs, mask), _rows(embs, ~mask)
    y_f, y_r = y[mask], y[~mask]
    h_emb = _as_embeddings(heldout, "heldout")
    y_h = torch.as_tensor(np.asarray(heldout_labels), dtype=torch.int64)

    start = time.perf_counter()
    new = unlearn(
        head,
        forget,
        retain,
        method=method,
        forget_labels=y_f,
        retain_labels=y_r,
        heldout=h_emb,
        heldout_labels=y_h,
        seed=seed,
        **options,
    )
    unlearn_seconds = time.perf_counter() - start
    start = time.perf_counter()
    retrained = retrain_from_scratch(head, retain, y_r)
    retrain_seconds = time.perf_counter() - start

    def scores(h: FusionHead) -> HeadScores:
        return score_head(
            h,
            forget=forget,
            forget_labels=y_f,
            retain=retain,
            retain_labels=y_r,
            heldout=h_emb,
            heldout_labels=y_h,
            test=test,
            test_labels=test_labels,
        )

    s0, s1, s2 = scores(head), scores(new), scores(retrained)
    artifact = None
    if out is not None:
        artifact = str(new.save(out))
    return UnlearnReport(
        method=method,
        original=s0,
        unlearned=s1,
        retrained=s2,
        auc_gap=s1.forget_auc - s2.forget_auc,
        retain_accuracy_gap=s1.retain_accuracy - s2.retain_accuracy,
        test_accuracy_gap=s1.test_accuracy - s2.test_accuracy,
        unlearn_seconds=unlearn_seconds,
        retrain_seconds=retrain_seconds,
        time_ratio=retrain_seconds / max(unlearn_seconds, 1e-9),
        n_forget=int(mask.sum()),
        n_retain=int((~mask).sum()),
        n_heldout=_n(h_emb),
        n_test=_n(h_emb) if test is None else _n(_as_embeddings(test, "test")),
        artifact=artifact,
        head=new,
    )


def _labelled_rows(data: Dataset, split: str) -> Dataset | None:
    if data.splits is None or split not in data.splits:
        return None
    part = data.split(split)
    return part.subset(np.flatnonzero(part.labelled)) if part.labelled.any() else None


def unlearn_fusion(
    model: EncoderModel,
    data: Dataset,
    forget: str | Path | Sequence[str],
    *,
    method: Literal["multidelete", "gradient_ascent"] = "multidelete",
    head: FusionHead | str | Path | None = None,
    engine: Engine | None = None,
    out: str | Path | None = None,
    mode: Literal["concat", "gated"] = "concat",
    hidden: int | None = None,
    epochs: int = 30,
    seed: int = 0,
    **options: Any,
) -> UnlearnReport:
    """Forget training rows of a fusion head, and check the result against retraining.

    The head's training rows are the labelled ``train`` rows of ``data``; the attack's
    non-members are the labelled ``calibration`` and ``test`` rows, and the test accuracy is
    on the labelled ``test`` rows. Embeddings come from ``engine`` (cached), so unlearning and
    retraining touch only the head.

    Args:
        model: The frozen encoder.
        data: The dataset, with a ``split`` column (``train`` plus held-out rows).
        forget: A forget-list file (see :func:`read_forget_ids`) or a sequence of row ids.
        method: ``"multidelete"`` or ``"gradient_ascent"`` (see :func:`unlearn`).
        head: The trained head (a :class:`~mmsafe.models.heads.FusionHead` or a directory
            saved by ``FusionHead.save``). ``None`` trains one on the ``train`` rows as the
            ``fusion`` task does, with ``mode``, ``hidden``, ``epochs`` and ``seed``.
        engine: Computes and caches the embeddings (default: a CPU engine).
        out: Directory to save the unlearned head (``head.safetensors`` + ``head.json``) and
            the report (``unlearn.json``) to; ``None`` = nothing saved.
        mode: Fusion mode of a head trained here.
        hidden: Hidden width of a head trained here.
        epochs: Epochs of a head trained here (the retrained head repeats the recipe).
        seed: Seed of a head trained here and of the unlearning batches.
        **options: Further keyword arguments of :func:`unlearn` (``steps``, ``lr``, ...).

    Returns:
        An :class:`UnlearnReport`.

    Raises:
        ForgetListError: A forget id is unknown, not a labelled training row, or the list is
            empty (the message names the file and line).
        HardenError: ``data`` has no labelled ``train`` or held-out rows, or the forget set
            covers every training row.
    """
    from mmsafe.engine.cache import atomic_write_json
    from mmsafe.engine.runner import Engine

    engine = engine or Engine(progress=False)
    if isinstance(forget, str | Path):
        ids = read_forget_ids(forget, data, split="train")
    else:
        entries = [(i, str(x).strip()) for i, x in enumerate(forget, start=1)]
        ids = _check_ids("the forget ids", entries, data, "train", unit="item")
    train = _labelled_rows(data, "train")
    held = [d for d in (_labelled_rows(data, s) for s in ("calibration", "test")) if d]
    if train is None or not held:
        raise HardenError(
            f"Unlearning needs labelled 'train' rows (the head's training data) and labelled "
            f"held-out rows ('calibration' or 'test'), but {data.name!r} lacks them. Add a "
            "'split' column."
        )
    test = _labelled_rows(data, "test") or held[0]
    if isinstance(head, str | Path):
        head = FusionHead.load(head)
    mods = head.modalities if head is not None else data.modality_names
    emb = engine.embed(model, train, mods, desc="unlearn train rows")
    y = torch.as_tensor(train.labels)
    if head is None:
        head = fit_fusion_head(
            emb,
            y,
            num_classes=len(data.classes),
            mode=mode,
            hidden=hidden,
            epochs=epochs,
            seed=seed,
        )
    per = [engine.embed(model, d, mods, desc="unlearn held-out rows") for d in held]
    heldout = {m: torch.cat([p[m] for p in per]) for m in mods}
    y_held = np.concatenate([d.labels for d in held])
    test_emb = engine.embed(model, test, mods, desc="unlearn test rows")
    forget_set = set(ids)
    mask = np.array([i in forget_set for i in train.ids])
    report = compare_unlearning(
        head,
        emb,
        y,
        mask,
        heldout,
        y_held,
        test=test_emb,
        test_labels=test.labels,
        method=method,
        out=out,
        seed=seed,
        **options,
    )
    if out is not None:
        atomic_write_json(Path(out) / "unlearn.json", {**report.to_dict(), "forget_ids": ids})
    return report


@register_hardener
class UnlearnHardener(Hardener):
    """``mmsafe harden unlearn``: make the fusion head forget training rows, checked by retraining.

    Every forget id must be a labelled ``train`` row (see :func:`read_forget_ids`). The head the
    fusion task fits is unlearned with ``method`` and compared with a head retrained without
    those rows (:func:`unlearn_fusion`); :meth:`save` writes the unlearned head and
    ``unlearn.json`` (that comparison and the forget ids) into one folder.

    Args:
        forget: Text file of train row ids to forget, one per line.
        method: multidelete or gradient_ascent.

    Attributes:
        ids_: the forgotten row ids.
        report_: the :class:`UnlearnReport` (its ``head`` is the unlearned head).
    """

    name = "unlearn"
    description = "Unlearn rows from the fusion head; compare with retraining from scratch."
    needs = ("train",)
    tasks = ("fusion",)
    default_task = "fusion"
    artifact = "head"

    def __init__(self, *, forget: Path, method: str = "multidelete") -> None:
        self.forget = forget
        self.method = method
        self.ids_: list[str] = []
        self.report_: UnlearnReport | None = None

    def validate(self, model: EncoderModel, task: Task, data: Dataset) -> None:  # noqa: D102
        if self.method not in METHODS:
            raise HardenError(
                f"Unknown unlearning method {self.method!r}; use one of {', '.join(METHODS)}."
            )
        if getattr(model, "kind", "encoder") == "recommender":
            raise HardenError(
                "`mmsafe harden unlearn` forgets rows of a fusion head; to forget users of a "
                "recommender, use `mmsafe harden unlearn-rec`."
            )
        super().validate(model, task, data)
        if isinstance(self.forget, str | Path):
            read_forget_ids(self.forget, data)  # a bad line fails before any audit runs

    def fit(  # noqa: D102
        self, model: EncoderModel, task: Task, data: Dataset, engine: Engine, *, seed: int = 0
    ) -> UnlearnHardener:
        from mmsafe.harden.flow import prepare

        forget = self.forget
        self.ids_ = (
            read_forget_ids(forget, data) if isinstance(forget, str | Path) else list(forget)
        )
        prepare(model, data, task, engine)
        self.report_ = unlearn_fusion(
            model,
            data,
            self.ids_,
            method=self.method,  # type: ignore[arg-type]
            head=getattr(task, "head_", None),
            engine=engine,
            seed=seed,
        )
        return self

    def _report(self) -> UnlearnReport:
        if self.report_ is None or self.report_.head is None:
            raise RuntimeError("UnlearnHardener.fit() must run first.")
        return self.report_

    def transform(self, model: EncoderModel, task: Task) -> Hardened:  # noqa: D102
        from mmsafe.tasks.fusion import PrefitFusionTask

        head = self._report().head
        assert head is not None
        label = f"unlearned ({self.method}, {len(self.ids_)} rows)"
        return Hardened(model, PrefitFusionTask(head, label=label))

    def summary(self) -> dict[str, Any]:  # noqa: D102
        r = self._report()
        return {
            "forget_rows": r.n_forget,
            "forget_auc/original": r.original.forget_auc,
            "forget_auc/unlearned": r.unlearned.forget_auc,
            "forget_auc/retrained": r.retrained.forget_auc,
            "test_accuracy/retrained": r.retrained.test_accuracy,
            "speedup_vs_retraining": r.time_ratio,
        }

    def save(self, path: Path) -> Path:  # noqa: D102
        from mmsafe.engine.cache import atomic_write_json

        r = self._report()
        assert r.head is not None
        out = r.head.save(path)
        self.report_ = r = replace(r, artifact=str(out))
        atomic_write_json(out / "unlearn.json", {**r.to_dict(), "forget_ids": self.ids_})
        return out
