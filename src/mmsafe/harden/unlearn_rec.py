"""``mmsafe harden unlearn-rec``: forget users' interactions, checked against retraining.

A sequential recommender trained on a user's history can give it away
(``controllability.rec_privacy``). When users ask to be forgotten, the gold standard is to
retrain without them; :func:`unlearn_seqrec` is the cheap alternative, and
:func:`compare_rec_unlearning` measures it against that gold standard on the same data:

* ``"neggrad"`` (NegGrad+, after Kurmanji et al., NeurIPS 2023): a few epochs of next-item
  cross-entropy on the retained users, plus a hinge that raises the forget users' training
  loss to the loss the same model has on items it never trained on (the retained users'
  validation items, re-measured at every step):
  ``L = CE(retained batch) + lam * relu(CE_val - CE(forget users))``. The hinge switches off
  once the forget interactions look like unseen ones, so they are not pushed below them.
* ``"finetune"``: the retained-users epochs alone (no ascent). It forgets little: a baseline.

The comparison reports, for the original, unlearned and retrained models, the forget users'
membership AUC (the loss attack of ``controllability.rec_privacy``: the last item each forget
user's history trained on against their held-out next item) and the retained users' test
NDCG@10 (full ranking, history excluded). Unlearning *matches retraining* when both are within
``tolerance`` (0.05) of the retrained model's::

    from mmsafe.harden.unlearn_rec import compare_rec_unlearning
    report = compare_rec_unlearning(model, data, ["u3", "u17"], recipe=recipe)
    print(report.to_markdown())

The forget list is a text file of user ids, one per line
(:func:`mmsafe.harden.unlearn.read_forget_ids`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mmsafe.harden.base import Hardened, Hardener, HardenError, register_hardener
from mmsafe.harden.unlearn import read_forget_ids
from mmsafe.methods.privacy import membership_auc
from mmsafe.methods.recommend import histories, membership_pairs, user_metrics
from mmsafe.models.seqrec import (
    SeqRecommender,
    SeqRecTrainConfig,
    fit_seqrec,
    pad_histories,
    training_histories,
)
from mmsafe.tasks.seqrec import is_rec_data

if TYPE_CHECKING:
    from typing import Self

    from mmsafe.data.dataset import Dataset
    from mmsafe.engine.runner import Engine
    from mmsafe.tasks.base import Task

__all__ = [
    "METHODS",
    "RecUnlearnReport",
    "RecUnlearnScores",
    "UnlearnRecHardener",
    "compare_rec_unlearning",
    "forget_auc",
    "unlearn_seqrec",
]

METHODS = ("neggrad", "finetune")
"""The unlearning methods :func:`unlearn_seqrec` supports."""


# --------------------------------------------------------------------------- measuring


def forget_auc(model: SeqRecommender, features: Mapping[str, Tensor], forget: Dataset) -> float:
    """Membership AUC of ``forget``'s users: last training item against the held-out one.

    The pairs of ``controllability.rec_privacy`` (:func:`membership_pairs`), on these users
    only. 0.5: their interactions look like items the model never trained on.
    """
    table = model.item_table(features).detach()
    final = model.scores(histories(forget), table)
    member, non_member = membership_pairs(model, features, forget, final)
    ok = np.isfinite(member)
    if not ok.any():
        return float("nan")
    scores = np.r_[member[ok], non_member[ok]]
    return membership_auc(scores, np.r_[np.ones(ok.sum()), np.zeros(ok.sum())])


def _test_ndcg(model: SeqRecommender, features: Mapping[str, Tensor], data: Dataset) -> float:
    table = model.item_table(features).detach()
    return float(user_metrics(model.scores(histories(data), table), data, (10,))["ndcg@10"].mean())


@dataclass(frozen=True)
class RecUnlearnScores:
    """One model's side of the comparison.

    Attributes:
        forget_auc: the forget users' membership AUC (:func:`forget_auc`).
        test_ndcg: the retained users' test NDCG@10.
        seconds: wall time to produce the model (0 for the original).
    """

    forget_auc: float
    test_ndcg: float
    seconds: float = 0.0


@dataclass(frozen=True)
class RecUnlearnReport:
    """Unlearning compared with retraining from scratch without the forget users.

    Attributes:
        method: the unlearning method.
        original: the model as it was.
        unlearned: the unlearned model.
        retrained: the model retrained without the forget users, with the same recipe and
            seed (the reference).
        n_forget: forget users.
        n_retain: retained users.
        tolerance: the largest gap to the retrained model that still *matches* it.
        model: the unlearned model (not part of :meth:`to_dict`).
    """

    method: str
    original: RecUnlearnScores
    unlearned: RecUnlearnScores
    retrained: RecUnlearnScores
    n_forget: int
    n_retain: int
    tolerance: float = 0.05
    model: SeqRecommender | None = field(default=None, repr=False, compare=False)

    @property
    def auc_gap(self) -> float:
        """``unlearned.forget_auc - retrained.forget_auc`` (> 0: still member-like)."""
        return self.unlearned.forget_auc - self.retrained.forget_auc

    @property
    def ndcg_gap(self) -> float:
        """``unlearned.test_ndcg - retrained.test_ndcg``."""
        return self.unlearned.test_ndcg - self.retrained.test_ndcg

    @property
    def matches_retraining(self) -> bool:
        """Both gaps within :attr:`tolerance`.

        Example:
            >>> s, t = RecUnlearnScores(0.52, 0.30), RecUnlearnScores(0.50, 0.33)
            >>> RecUnlearnReport("neggrad", s, s, t, 10, 90).matches_retraining
            True
            >>> RecUnlearnReport("neggrad", s, RecUnlearnScores(0.9, 0.3), t, 10, 90).auc_gap
            0.4
        """
        return abs(self.auc_gap) <= self.tolerance and abs(self.ndcg_gap) <= self.tolerance

    @property
    def time_ratio(self) -> float:
        """``retrained.seconds / unlearned.seconds`` (> 1: unlearning is faster)."""
        return self.retrained.seconds / max(self.unlearned.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (without the model)."""
        d = {k: v for k, v in asdict(self).items() if k != "model"}
        gaps = {"auc_gap": self.auc_gap, "ndcg_gap": self.ndcg_gap}
        return {**d, **gaps, "matches_retraining": self.matches_retraining,
                "time_ratio": self.time_ratio}  # fmt: skip

    def to_markdown(self) -> str:
        """The comparison as a markdown table, one row per model.

        Example:
            >>> s = RecUnlearnScores(0.9, 0.3)
            >>> print(RecUnlearnReport("neggrad", s, s, s, 10, 90).to_markdown().splitlines()[2])
            | original | 0.900 | 0.3000 | - |
        """
        rows = [
            "| model | forget MIA AUC | retained test NDCG@10 | time (s) |",
            "|---|---|---|---|",
        ]
        for name, s in (("original", self.original), (f"unlearned ({self.method})", self.unlearned),
                        ("retrained from scratch", self.retrained)):  # fmt: skip
            t = "-" if s is self.original else f"{s.seconds:.2f}"
            rows.append(f"| {name} | {s.forget_auc:.3f} | {s.test_ndcg:.4f} | {t} |")
        return "\n".join(rows)


# --------------------------------------------------------------------------- unlearning


def _windows(data: Dataset, length: int) -> Tensor:
    seqs, _ = training_histories(data)
    return pad_histories([s for s in seqs if len(s) >= 2], length)


def _next_item_ce(model: SeqRecommender, table: Tensor, windows: Tensor) -> Tensor:
    """Mean cross-entropy of every next item in left-padded ``windows`` (full softmax)."""
    windows = windows.to(table.device)
    inputs, targets = windows[:, :-1], windows[:, 1:]
    keep = (inputs >= 0) & (targets >= 0)
    return nn.functional.cross_entropy(model.sasrec(inputs, table)[keep] @ table.T, targets[keep])


def _validation_ce(model: SeqRecommender, table: Tensor, data: Dataset) -> Tensor:
    """Mean cross-entropy of the users' validation items (never a training target)."""
    seqs, targets = training_histories(data)
    ok = [i for i, s in enumerate(seqs) if len(s)]
    padded = pad_histories([seqs[i] for i in ok], model.cfg.max_len).to(table.device)
    logits = model.user_states(padded, table) @ table.T
    return nn.functional.cross_entropy(logits, torch.as_tensor(targets[ok], device=table.device))


def unlearn_seqrec(
    model: SeqRecommender,
    features: Mapping[str, Tensor],
    retained: Dataset,
    forget: Dataset,
    *,
    method: str = "neggrad",
    epochs: int = 3,
    lr: float = 2e-3,
    lam: float = 1.0,
    batch_size: int = 128,
    seed: int = 0,
) -> SeqRecommender:
    """A copy of ``model`` that has forgotten ``forget``'s users (the original is untouched).

    Args:
        model: the trained recommender.
        features: its item features (:meth:`SeqRecommender.item_features`).
        retained: the users it keeps.
        forget: the users it forgets.
        method: ``neggrad`` or ``finetune`` (see the module docstring).
        epochs: passes over the retained users.
        lr: AdamW learning rate (no weight decay; the model's own recipe's in
            :func:`compare_rec_unlearning`).
        lam: weight of the forget hinge (``neggrad``).
        batch_size: retained users per step.
        seed: the batch order.
    """
    if method not in METHODS:
        raise ValueError(f"unknown unlearning method {method!r}; use one of {', '.join(METHODS)}")
    out = copy.deepcopy(model)
    out.training_info = {}
    length = out.cfg.max_len + 1
    kept, gone = _windows(retained, length), _windows(forget, length)
    feats = {m: f.to(out.device) for m, f in features.items()}
    opt = torch.optim.AdamW(out.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(kept), generator=gen)
        for s in range(0, len(order), batch_size):
            out.train()
            table = out.item_table(feats)
            loss = _next_item_ce(out, table, kept[order[s : s + batch_size]])
            if method == "neggrad" and len(gone):
                with torch.no_grad():
                    out.eval()  # the reference without dropout, as an attacker sees it
                    unseen = _validation_ce(out, table.detach(), retained)
                    out.train()
                loss = loss + lam * torch.relu(unseen - _next_item_ce(out, table, gone))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    out.eval()
    out.invalidate_fingerprint()
    return out


def _retrain(
    model: SeqRecommender, features: Mapping[str, Tensor], retained: Dataset,
    recipe: SeqRecTrainConfig, seed: int,
) -> SeqRecommender:  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = SeqRecommender(model.cfg, model.encoder, name=model.name).to(model.device)
        fit_seqrec(fresh, features, retained, recipe, seed=seed)
    return fresh


def recipe_of(model: SeqRecommender) -> SeqRecTrainConfig:
    """The recipe ``model`` was trained with (its ``training_info``), else the default."""
    hp = model.training_info.get("hyperparameters") or {}
    fields = SeqRecTrainConfig.__dataclass_fields__
    return SeqRecTrainConfig(**{k: v for k, v in hp.items() if k in fields})


def compare_rec_unlearning(
    model: SeqRecommender,
    data: Dataset,
    forget_ids: Sequence[str],
    *,
    method: str = "neggrad",
    epochs: int = 3,
    engine: Engine | None = None,
    recipe: SeqRecTrainConfig | None = None,
    seed: int = 0,
    tolerance: float = 0.05,
) -> RecUnlearnReport:
    """Unlearn ``forget_ids``'s users from ``model``, retrain without them, and compare.

    Args:
        model: the trained recommender.
        data: the recommendation data it trained on (users as rows).
        forget_ids: user ids to forget.
        method: ``neggrad`` or ``finetune``.
        epochs: unlearning epochs over the retained users.
        engine: embeds the items (a quiet CPU engine by default).
        recipe: the retraining recipe (default: the model's own, :func:`recipe_of`).
        seed: unlearning's batch order and the retraining's initialisation.
        tolerance: the gap that still matches retraining.
    """
    from mmsafe.engine.runner import Engine

    assert data.catalog is not None
    engine = engine or Engine(progress=False)
    row = {u: i for i, u in enumerate(data.ids)}
    gone = np.array(sorted({row[u] for u in forget_ids}), dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(data)), gone)
    forget, retained = data.subset(gone), data.subset(kept)
    features = model.item_features(engine, data.catalog)

    def scores(m: SeqRecommender, seconds: float = 0.0) -> RecUnlearnScores:
        return RecUnlearnScores(forget_auc(m, features, forget),
                                _test_ndcg(m, features, retained), seconds)  # fmt: skip

    recipe = recipe or recipe_of(model)
    start = time.perf_counter()
    unlearned = unlearn_seqrec(model, features, retained, forget, method=method, epochs=epochs,
                               lr=recipe.lr, seed=seed)  # fmt: skip
    t_unlearn = time.perf_counter() - start
    start = time.perf_counter()
    retrained = _retrain(model, features, retained, recipe, seed)
    t_retrain = time.perf_counter() - start
    return RecUnlearnReport(method, scores(model), scores(unlearned, t_unlearn),
                            scores(retrained, t_retrain), len(gone), len(kept), tolerance,
                            model=unlearned)  # fmt: skip


# --------------------------------------------------------------------------- the hardener


@register_hardener
class UnlearnRecHardener(Hardener):
    """``mmsafe harden unlearn-rec``: forget users' interactions; compare with retraining.

    Every forget id must be a user of the data. The recommender is unlearned with ``method``
    and compared with a model retrained without those users (:func:`compare_rec_unlearning`);
    :meth:`save` writes the unlearned model and ``unlearn.json`` (the comparison and the ids).

    Args:
        forget: text file of user ids to forget, one per line.
        method: neggrad or finetune.
        epochs: unlearning epochs over the retained users.

    Attributes:
        ids_: the forgotten user ids.
        report_: the :class:`RecUnlearnReport` (its ``model`` is the unlearned recommender).
    """

    name = "unlearn-rec"
    description = "Unlearn users from a recommender; compare with retraining from scratch."
    tasks = ("seqrec",)
    default_task = "seqrec"
    checks = "performance.ranking,controllability.rec_privacy"
    artifact = "unlearned"

    def audit_options(self) -> dict[str, dict[str, Any]]:  # noqa: D102
        return {"performance.ranking": {"id_baseline": False}}

    def __init__(self, *, forget: Path, method: str = "neggrad", epochs: int = 3) -> None:
        self.forget = forget
        self.method = method
        self.epochs = epochs
        self.ids_: list[str] = []
        self.report_: RecUnlearnReport | None = None

    def validate(self, model: Any, task: Task, data: Dataset) -> None:  # noqa: D102
        if self.method not in METHODS:
            raise HardenError(f"Unknown unlearning method {self.method!r}; use one of "
                              f"{', '.join(METHODS)}.")  # fmt: skip
        if self.epochs < 1:
            raise HardenError(f"--epochs must be at least 1, not {self.epochs}.")
        super().validate(model, task, data)
        if getattr(model, "kind", "encoder") != "recommender":
            raise HardenError("`mmsafe harden unlearn-rec` unlearns a recommender: pass --model "
                              "mm-sasrec or sasrec-id (for an encoder's fusion head, use "
                              "`mmsafe harden unlearn`).")  # fmt: skip
        if not is_rec_data(data):
            raise HardenError("`mmsafe harden unlearn-rec` needs recommendation data: pass "
                              "--data shapes-rec (or iisan:<folder>, mmrec:<folder>).")  # fmt: skip
        if isinstance(self.forget, str | Path):
            read_forget_ids(self.forget, data, split=None)  # bad lines fail before any audit

    def fit(  # noqa: D102
        self, model: Any, task: Task, data: Dataset, engine: Engine, *, seed: int = 0
    ) -> Self:
        forget = self.forget
        ids = (
            read_forget_ids(forget, data, split=None) if isinstance(forget, str | Path) else forget
        )
        self.ids_ = list(ids)
        if len(self.ids_) >= len(data):
            raise HardenError("The forget list names every user; nothing would be left to keep.")
        self.report_ = compare_rec_unlearning(
            model, data, self.ids_, method=self.method, epochs=self.epochs, engine=engine,
            seed=seed,
        )  # fmt: skip
        return self

    def _report(self) -> RecUnlearnReport:
        if self.report_ is None or self.report_.model is None:
            raise RuntimeError("UnlearnRecHardener.fit() must run first.")
        return self.report_

    def transform(self, model: Any, task: Task) -> Hardened:  # noqa: D102
        unlearned = self._report().model
        assert unlearned is not None
        return Hardened(unlearned, task)

    def summary(self) -> dict[str, Any]:  # noqa: D102
        r = self._report()
        return {
            "forget_users": r.n_forget,
            "forget_auc/original": r.original.forget_auc,
            "forget_auc/unlearned": r.unlearned.forget_auc,
            "forget_auc/retrained": r.retrained.forget_auc,
            "test_ndcg@10/unlearned": r.unlearned.test_ndcg,
            "test_ndcg@10/retrained": r.retrained.test_ndcg,
            "matches_retraining": r.matches_retraining,
            "speedup_vs_retraining": r.time_ratio,
        }

    def save(self, path: Path) -> Path:  # noqa: D102
        from mmsafe.engine.cache import atomic_write_json
        from mmsafe.models.seqrec import save_weights

        r = self._report()
        assert r.model is not None
        path = Path(path)
        save_weights(r.model, path)
        atomic_write_json(path / "unlearn.json", {**r.to_dict(), "forget_ids": self.ids_})
        return path
