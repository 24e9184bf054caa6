"""``mmsafe harden denoise``: GUIDER-style denoising of a recommender's implicit feedback.

:class:`DenoiseHardener` flags the training interactions its content model calls noisy
(:func:`mmsafe.methods.denoise.clean_probabilities`), then retrains the recommender afresh on
the same histories with the flagged interactions imputed (replaced by their topic's most
clicked item; or filtered out, ``flagged="drop"``) and the others weighted by their clean
probability: a weighted full softmax by default, or the denoised BPR loss
(:func:`~mmsafe.methods.denoise.dbpr_loss`, ``loss="dbpr"``), plus an optional OT-guided
distillation term (:func:`~mmsafe.methods.denoise.ot_distillation_loss`, ``ot_weight``). With
``clean_histories`` the after-audit also scores the users' histories with their flagged
interactions imputed or left out, as in training. The defaults are what measured best on
shapes-rec (``docs/denoise.md``)::

    from mmsafe.harden.denoise import DenoiseHardener
    from mmsafe.harden.flow import harden
    result = harden(DenoiseHardener(), model, data, task="seqrec", out="denoised")
    result.summary["flag_f1"]  # on shapes-rec, against the planted misclicks

:func:`noise_recovery` measures it on the planted noise of ``shapes-rec``: precision, recall and
F1 of the flags, and the NDCG@10 of plain, denoised and clean training (``docs/denoise.md``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mmsafe.harden.base import Hardened, Hardener, HardenError, register_hardener
from mmsafe.methods.denoise import (
    clean_probabilities,
    dbpr_loss,
    flag_quality,
    ot_distillation_loss,
)
from mmsafe.tasks.seqrec import SeqRecTask, is_rec_data

if TYPE_CHECKING:
    from typing import Self

    from mmsafe.data.dataset import Dataset
    from mmsafe.engine.runner import Engine
    from mmsafe.models.seqrec import SeqRecommender, SeqRecTrainConfig
    from mmsafe.tasks.base import Task

__all__ = ["DenoiseHardener", "DenoisedHistoryTask", "fit_denoised", "noise_recovery"]


class DenoisedHistoryTask(SeqRecTask):
    """``seqrec`` over histories with the flagged interactions left out (users by id).

    With ``substitutes`` (per user, an item per position), a flagged interaction is replaced
    by its substitute instead of left out. Users the flags do not know are scored on their
    histories as they are.
    """

    def __init__(
        self,
        flagged: Mapping[str, np.ndarray],
        batch_size: int = 512,
        substitutes: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.flagged = {k: np.asarray(v, dtype=bool) for k, v in flagged.items()}
        self.substitutes: dict[str, np.ndarray] | None = None
        if substitutes is not None:
            self.substitutes = {k: np.asarray(v, dtype=np.int64) for k, v in substitutes.items()}

    def params(self) -> dict[str, Any]:  # noqa: D102
        n = int(sum(int(v.sum()) for v in self.flagged.values()))
        return {**super().params(), "denoised_histories": True, "left_out_interactions": n}

    def outputs(self, embeddings: dict[str, Any], data: Dataset) -> Any:  # noqa: D102
        self.check_data(data)
        seqs = _filtered(data, self.flagged, self.substitutes)
        return _score(self, data, seqs)


def _filtered(
    data: Dataset,
    flagged: Mapping[str, np.ndarray],
    substitutes: Mapping[str, np.ndarray] | None = None,
) -> list[np.ndarray]:
    out = []
    for uid, s in zip(data.ids, data.modalities["sequence"], strict=True):
        s = np.asarray(s, dtype=np.int64)
        f = flagged.get(uid)
        sub = None if substitutes is None else substitutes.get(uid)
        if f is None or len(f) != len(s):
            out.append(s)
        elif sub is not None and len(sub) == len(s):
            out.append(np.where(f, sub, s))
        else:
            out.append(s[~f] if (~f).any() else s)
    return out


def _by_user(self: DenoiseHardener) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The flags, and the substitutes when flagged interactions are imputed, by user id."""
    assert self.flagged_ is not None
    flags = dict(zip(self.ids_, self.flagged_, strict=True))
    if self.flagged != "impute" or self.substitutes_ is None:
        return flags, None
    return flags, dict(zip(self.ids_, self.substitutes_, strict=True))


def _score(task: SeqRecTask, data: Dataset, seqs: list[np.ndarray]) -> Any:
    from mmsafe.tasks.base import Outputs

    assert data.catalog is not None and task.engine_ is not None
    task.histories_ = seqs
    features = task.model_.item_features(task.engine_, data.catalog)
    with torch.inference_mode():
        logits = task.logits(features).float().cpu()
    return Outputs(embeddings=features, logits=logits, labels=data.labels.copy(),
                   groups=None if data.groups is None else list(data.groups))  # fmt: skip


# --------------------------------------------------------------------------- training


def fit_denoised(
    model: SeqRecommender,
    features: Mapping[str, Tensor],
    sequences: Sequence[np.ndarray],
    clean: Sequence[np.ndarray],
    train: SeqRecTrainConfig,
    *,
    seed: int = 0,
    threshold: float = 0.9,
    loss: str = "dbpr",
    negatives: int = 64,
    ot_weight: float = 0.1,
    ot_sample: int = 256,
    flagged: str = "drop",
    substitutes: Sequence[np.ndarray] | None = None,
    imputed_weight: float = 1.0,
) -> dict[str, Any]:
    """Train ``model`` on the full ``sequences`` less their last item, denoised by ``clean``.

    Interactions whose clean probability is below ``threshold`` are, by ``flagged``: ``drop``,
    filtered out of the training sequences (as inputs and as targets); ``weight``, kept and
    weighted like the others; ``impute``, replaced by their ``substitutes`` (the item a misclick
    most likely replaced), weighing ``imputed_weight`` as targets (0: inputs only). The others
    weigh their clean probability in the loss: ``dbpr`` (:func:`~mmsafe.methods.denoise.dbpr_loss`,
    ``negatives`` uniformly sampled items that occur in training) or ``softmax`` (the weighted
    full softmax of :func:`mmsafe.models.seqrec.fit_seqrec`), plus ``ot_weight`` times the OT
    distillation term between the states and their targets' content representations (on
    ``ot_sample`` positions of each batch: mini-batch OT). Each history's last item is the
    validation target (after the denoised history) and picks the best epoch by NDCG@10, as in
    :func:`~mmsafe.models.seqrec.fit_seqrec`.
    """
    from mmsafe.models.seqrec import ModelError, pad_histories, validation_ndcg

    if loss not in ("dbpr", "softmax"):
        raise HardenError(f"--loss must be dbpr or softmax, not {loss!r}")
    if flagged not in ("drop", "weight", "impute"):
        raise HardenError(f"--flagged must be drop, weight or impute, not {flagged!r}")
    if flagged == "impute" and substitutes is None:
        raise HardenError("--flagged impute needs substitutes (the topic HMM's: --states > 0)")
    seqs, weights, val_targets = [], [], []
    for i, (s, p) in enumerate(zip(sequences, clean, strict=True)):
        s, p = np.asarray(s, dtype=np.int64), np.asarray(p, dtype=np.float64)
        low = p[:-1] < threshold
        if flagged == "drop":
            seqs.append(s[:-1][~low])
            weights.append(p[:-1][~low])
        elif flagged == "weight":
            seqs.append(s[:-1])
            weights.append(p[:-1])
        else:
            assert substitutes is not None
            seqs.append(np.where(low, np.asarray(substitutes[i])[:-1], s[:-1]))
            weights.append(np.where(low, imputed_weight, p[:-1]))
        val_targets.append(s[-1])
    val = np.asarray(val_targets, dtype=np.int64)
    usable = [i for i, s in enumerate(seqs) if len(s) >= 2]
    if not usable:
        raise ModelError("no user keeps 3 or more interactions to train on")
    length = model.cfg.max_len + 1
    windows = pad_histories([seqs[i] for i in usable], length)
    wins_w = _pad_weights([weights[i] for i in usable], length)
    seen = torch.zeros(model.cfg.n_items, dtype=torch.bool)
    seen[torch.from_numpy(np.concatenate(seqs))] = True
    seen_items = torch.nonzero(seen).flatten().to(model.device)
    unseen = (~seen).to(model.device)
    gen = torch.Generator().manual_seed(seed)
    feats = {m: f.to(model.device) for m, f in features.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    best, best_state, best_epoch, stale, epochs = -1.0, None, 0, 0, 0
    start = time.perf_counter()
    for epoch in range(train.epochs):
        model.train()
        order = torch.randperm(len(windows), generator=gen)
        for s in range(0, len(order), train.batch_size):
            idx = order[s : s + train.batch_size]
            batch, w = windows[idx].to(model.device), wins_w[idx].to(model.device)
            inputs, targets, w = batch[:, :-1], batch[:, 1:], w[:, 1:]
            keep = (inputs >= 0) & (targets >= 0)
            table = model.item_table(feats)
            states = model.sasrec(inputs, table)[keep]
            tgt, wk = targets[keep], w[keep].float()
            if loss == "dbpr":
                pos = (states * table[tgt]).sum(-1)
                pick = torch.randint(len(seen_items), (len(tgt), negatives), generator=gen)
                neg_items = seen_items[pick.to(seen_items.device)]
                neg = torch.einsum("nh,njh->nj", states, table[neg_items])
                neg = neg.masked_fill(neg_items == tgt[:, None], float("-inf"))
                objective = dbpr_loss(pos, neg, wk, threshold=0.0)
            else:
                logits = (states @ table.T).masked_fill(unseen, float("-inf"))
                ce = nn.functional.cross_entropy(logits, tgt, reduction="none")
                objective = (wk * ce).sum() / wk.sum().clamp_min(1e-12)
            if ot_weight > 0:  # mini-batch OT on at most ot_sample positions
                sub = torch.randperm(len(tgt), generator=gen)[:ot_sample].to(tgt.device)
                distil = ot_distillation_loss(states[sub], table[tgt[sub]], wk[sub])
                objective = objective + ot_weight * distil
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
        epochs = epoch + 1
        with torch.no_grad():
            model.eval()
            score = validation_ndcg(model, model.item_table(feats), seqs, val)
        if score > best:
            best, best_epoch, stale = score, epochs, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= train.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    model.invalidate_fingerprint()
    return {
        "epochs": epochs,
        "best_epoch": best_epoch,
        "validation_ndcg@10": round(best, 4),
        "seconds_per_epoch": round((time.perf_counter() - start) / max(epochs, 1), 3),
    }


def _pad_weights(weights: Sequence[np.ndarray], length: int) -> Tensor:
    out = np.zeros((len(weights), length), dtype=np.float32)
    for i, w in enumerate(weights):
        tail = np.asarray(w, dtype=np.float32)[-length:]
        if len(tail):
            out[i, length - len(tail) :] = tail
    return torch.from_numpy(out)


def _recipe(model: SeqRecommender) -> SeqRecTrainConfig:
    """The recipe the model was trained with (the full one when it does not say)."""
    from mmsafe.models.seqrec import SeqRecTrainConfig

    hp = model.training_info.get("hyperparameters") if model.training_info else None
    if isinstance(hp, Mapping):
        names = {f.name for f in dataclasses.fields(SeqRecTrainConfig)}
        return SeqRecTrainConfig(**{k: v for k, v in hp.items() if k in names})
    return SeqRecTrainConfig()


# --------------------------------------------------------------------------- the hardener


@register_hardener
class DenoiseHardener(Hardener):
    """GUIDER-style denoising: flag misclicks from item content, retrain on the rest.

    Each interaction of each user's history gets a clean probability from the items' content
    (re-calibration: the item similarity is re-calibrated by co-occurrence and by the items'
    sequence neighbours; an item-level transition model and a topic HMM each weigh a clean
    click against a uniform misclick, their noise shares fitted by EM); those below the
    threshold are flagged and filtered out, the rest weighted, and the recommender is retrained
    from scratch on the same histories with the flags as weights (optionally DBPR and
    OT-guided distillation).

    Args:
        threshold: interactions whose clean probability is below it are flagged noisy; 0 (the
            default) takes the threshold that maximises the F1 expected under the posteriors
            themselves (:func:`~mmsafe.methods.denoise.expected_f1_threshold`), no label read.
        k: content neighbours pooled per item (about a topic's size).
        follow: weight of the content transition against the user's taste in the clean model.
        calibrate: weight of the co-occurrence similarity in the re-calibrated item similarity.
        transitions: weight of the sequence-neighbour profiles in the item similarity.
        states: topics of the HMM (0 switches it off: the item-level model alone).
        flagged: what retraining does with a flagged interaction: impute (the default: replace
            it by the most clicked item of the topic the HMM puts it in), drop (filter it out)
            or weight (keep it, weighted by its clean probability like the others).
        imputed_weight: the weight of an imputed click as a next-item target (0: an input only).
        loss: softmax (weighted full softmax, the default: it measured better) or dbpr
            (denoised BPR over sampled negatives).
        negatives: sampled negatives per interaction (dbpr).
        ot_weight: weight of the OT distillation term (0, the default, switches it off).
        clean_histories: score the users' histories without their flagged interactions too.

    Attributes:
        clean_: per user, each interaction's clean probability.
        flagged_: per user, the interactions flagged noisy (``clean_ < threshold_``).
        threshold_: the threshold used (``threshold``, or the expected-F1 one when 0).
        model_: the retrained recommender.
        quality_: precision, recall and F1 of ``flagged_`` against the data's planted noise
            (``meta[u]["noisy"]``), when the data has it.
    """

    name = "denoise"
    description = "GUIDER-style denoising of a recommender's feedback: flag misclicks, retrain."
    tasks = ("seqrec",)
    default_task = "seqrec"
    checks = "performance.ranking"
    artifact = "denoised"

    def audit_options(self) -> dict[str, dict[str, Any]]:  # noqa: D102
        # the before/after delta is the recommender's own; no ID baseline to train twice
        return {"performance.ranking": {"id_baseline": False}}

    def __init__(
        self,
        *,
        threshold: float = 0.0,
        k: int = 5,
        follow: float = 0.8,
        calibrate: float = 0.5,
        transitions: float = 0.5,
        states: int = 30,
        flagged: str = "impute",
        imputed_weight: float = 1.0,
        loss: str = "softmax",
        negatives: int = 64,
        ot_weight: float = 0.0,
        clean_histories: bool = False,
    ) -> None:
        self.threshold = threshold
        self.k = k
        self.follow = follow
        self.calibrate = calibrate
        self.transitions = transitions
        self.states = states
        self.flagged = flagged
        self.imputed_weight = imputed_weight
        self.loss = loss
        self.negatives = negatives
        self.ot_weight = ot_weight
        self.clean_histories = clean_histories
        self.clean_: list[np.ndarray] | None = None
        self.flagged_: list[np.ndarray] | None = None
        self.ids_: list[str] = []
        self.model_: SeqRecommender | None = None
        self.quality_: dict[str, float] | None = None
        self.noise_share_: float | None = None
        self.threshold_: float | None = None
        self.substitutes_: list[np.ndarray] | None = None
        self.training_: dict[str, Any] = {}

    def validate(self, model: Any, task: Task, data: Dataset) -> None:  # noqa: D102
        super().validate(model, task, data)
        if getattr(model, "kind", "encoder") != "recommender":
            raise HardenError("`mmsafe harden denoise` retrains a recommender: pass --model "
                              "mm-sasrec (or mm-sasrec:<encoder>).")  # fmt: skip
        if getattr(model.cfg, "items", "") != "content":
            raise HardenError("`mmsafe harden denoise` reads the items' content; an ID model "
                              f"({model.name}) has none: pass --model mm-sasrec.")  # fmt: skip
        if not is_rec_data(data):
            raise HardenError("`mmsafe harden denoise` needs recommendation data: pass --data "
                              "shapes-rec (or iisan:<folder>, mmrec:<folder>).")  # fmt: skip
        if self.loss not in ("dbpr", "softmax"):
            raise HardenError(f"--loss must be dbpr or softmax, not {self.loss!r}.")
        if not 0 <= self.threshold < 1:
            raise HardenError(f"--threshold must be in [0, 1) (0: automatic), not "
                              f"{self.threshold}.")  # fmt: skip
        if not 0 <= self.transitions <= 1 or not 0 <= self.calibrate <= 1:
            raise HardenError("--transitions and --calibrate must be in [0, 1].")
        if self.states < 0:
            raise HardenError(f"--states must be >= 0, not {self.states}.")
        if self.flagged not in ("drop", "weight", "impute"):
            raise HardenError(f"--flagged must be drop, weight or impute, not {self.flagged!r}.")
        if not 0 <= self.imputed_weight <= 1:
            raise HardenError(f"--imputed-weight must be in [0, 1], not {self.imputed_weight}.")
        if self.flagged == "impute" and self.states == 0:
            raise HardenError("--flagged impute needs the topic HMM: --states > 0.")

    def flag(self, model: SeqRecommender, data: Dataset, engine: Engine) -> list[np.ndarray]:
        """Fit the clean probabilities (``clean_``) and flags (``flagged_``) only."""
        assert data.catalog is not None
        features = model.item_features(engine, data.catalog)
        seqs = [np.asarray(s, dtype=np.int64) for s in data.modalities["sequence"]]
        feats = [f.detach().cpu().numpy() for f in features.values()]
        clean, info = clean_probabilities(seqs, feats, k=self.k, follow=self.follow,
                                          calibrate=self.calibrate, transitions=self.transitions,
                                          states=self.states)  # fmt: skip
        self.threshold_ = float(self.threshold or info["threshold"])
        self.substitutes_ = info.get("substitutes")
        self.clean_ = clean
        self.flagged_ = [p < self.threshold_ for p in clean]
        self.ids_ = list(data.ids)
        self.noise_share_ = float(info["noise_share"])
        truth = [m.get("noisy") if isinstance(m, Mapping) else None for m in (data.meta or [])]
        pairs = zip(truth, seqs, strict=True)
        if truth and all(t is not None and len(t) == len(s) for t, s in pairs):
            self.quality_ = flag_quality(self.flagged_, truth)  # type: ignore[arg-type]
        return self.flagged_

    def fit(  # noqa: D102
        self, model: Any, task: Task, data: Dataset, engine: Engine, *, seed: int = 0
    ) -> Self:
        from mmsafe.models.seqrec import SeqRecommender

        self.flag(model, data, engine)
        assert data.catalog is not None and self.clean_ is not None
        features = model.item_features(engine, data.catalog)
        seqs = [np.asarray(s, dtype=np.int64) for s in data.modalities["sequence"]]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            student = SeqRecommender(model.cfg, model.encoder, name=f"{model.name}+denoise")
            student = student.to(model.device)
            recipe = _recipe(model)
            stats = fit_denoised(student, features, seqs, self.clean_, recipe, seed=seed,
                                 threshold=float(self.threshold_ or 0.0), loss=self.loss,
                                 negatives=self.negatives, ot_weight=self.ot_weight,
                                 flagged=self.flagged, substitutes=self.substitutes_,
                                 imputed_weight=self.imputed_weight)  # fmt: skip
        student.training_info = {
            "seed": seed,
            "denoise": self.get_params(),
            "hyperparameters": dataclasses.asdict(recipe),
            **stats,
        }
        self.model_ = student
        self.training_ = stats
        return self

    def _fitted(self) -> SeqRecommender:
        if self.model_ is None or self.flagged_ is None:
            raise RuntimeError("DenoiseHardener.fit() must run first.")
        return self.model_

    def transform(self, model: Any, task: Task) -> Hardened:  # noqa: D102
        student = self._fitted()
        assert self.flagged_ is not None
        if self.clean_histories:
            flags, subs = _by_user(self)
            return Hardened(student, DenoisedHistoryTask(flags, substitutes=subs))
        return Hardened(student, SeqRecTask())

    def summary(self) -> dict[str, Any]:  # noqa: D102
        self._fitted()
        assert self.flagged_ is not None
        flat = np.concatenate(self.flagged_) if self.flagged_ else np.zeros(0, bool)
        out: dict[str, Any] = {
            "flagged": int(flat.sum()),
            "flagged_share": float(flat.mean()) if len(flat) else 0.0,
            "estimated_noise_share": float(self.noise_share_ or 0.0),
            "threshold": float(self.threshold_ or 0.0),
            "validation_ndcg@10": float(self.training_.get("validation_ndcg@10", 0.0)),
        }
        if self.quality_ is not None:
            for k in ("precision", "recall", "f1"):
                out[f"flag_{k}"] = float(self.quality_[k])
        return out

    def save(self, path: Path) -> Path:  # noqa: D102
        from mmsafe.engine.cache import atomic_write_json
        from mmsafe.models.seqrec import save_weights

        student = self._fitted()
        path = Path(path)
        save_weights(student, path)
        assert self.flagged_ is not None and self.clean_ is not None
        doc = {
            "hardener": self.name,
            "params": self.get_params(),
            "summary": self.summary(),
            "quality": self.quality_,
            "users": {uid: {"clean": [round(float(x), 4) for x in c],
                            "flagged": [bool(x) for x in f]}
                      for uid, c, f in zip(self.ids_, self.clean_, self.flagged_, strict=True)},
        }  # fmt: skip
        atomic_write_json(path / "flags.json", doc)
        return path


# --------------------------------------------------------------------------- measuring


def _ndcg10(model: SeqRecommender, engine: Engine, data: Dataset, seqs: list[np.ndarray]) -> float:
    from mmsafe.metrics.ranking import ndcg, target_ranks

    assert data.catalog is not None
    table = model.item_table(model.item_features(engine, data.catalog)).detach()
    scores = model.scores(seqs, table)
    raw = [np.asarray(s, dtype=np.int64) for s in data.modalities["sequence"]]
    ranks, ties = target_ranks(scores, data.labels, exclude=raw, return_ties=True)
    return float(ndcg(ranks, 10, ties=ties).mean())


def noise_recovery(
    encoder: Any,
    spec: str = "shapes-rec",
    *,
    quick: bool = False,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    engine: Engine | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The denoiser on ``shapes-rec``'s planted misclicks, against plain and clean training.

    Trains mm-sasrec over ``encoder`` on the ``spec`` world (``a``, plain training on the noisy
    histories), the denoised model (``b``), and mm-sasrec on the same world with ``misclick=0``
    (``c``, the same users, clean histories, the same labels). NDCG@10 is each model's on its
    own world's test protocol (``b`` on the histories without their flagged interactions when
    ``clean_histories``); ``recovered_share = (b - a) / (c - a)``.

    Returns:
        The flags' ``precision``/``recall``/``f1``, ``ndcg_plain``/``ndcg_denoised``/
        ``ndcg_clean``, ``recovered_share`` and the hardener's summary.
    """
    from mmsafe.data.worlds import load_world
    from mmsafe.engine.runner import Engine
    from mmsafe.models.seqrec import build_seqrec

    engine = engine or Engine(progress=False)
    noisy = load_world(spec)
    clean_spec = spec + ("," if ":" in spec else ":") + "misclick=0"
    clean = load_world(clean_spec)
    kw = {"encoder": encoder, "quick": quick, "cache_dir": cache_dir, "progress": False,
          "seed": seed, "engine": engine}  # fmt: skip
    plain = build_seqrec(train_data=noisy, **kw)
    oracle = build_seqrec(train_data=clean, **kw)
    hardener = DenoiseHardener(**options).fit(plain, SeqRecTask(), noisy, engine, seed=seed)
    assert hardener.flagged_ is not None and hardener.model_ is not None
    raw = [np.asarray(s, dtype=np.int64) for s in noisy.modalities["sequence"]]
    denoised = (_filtered(noisy, *_by_user(hardener))
                if hardener.clean_histories else raw)  # fmt: skip
    a = _ndcg10(plain, engine, noisy, raw)
    b = _ndcg10(hardener.model_, engine, noisy, denoised)
    c = _ndcg10(oracle, engine, clean, [np.asarray(s) for s in clean.modalities["sequence"]])
    quality = hardener.quality_ or {}
    return {
        **{k: quality.get(k) for k in ("precision", "recall", "f1")},
        "ndcg_plain": a,
        "ndcg_denoised": b,
        "ndcg_clean": c,
        "recovered_share": (b - a) / (c - a) if c != a else float("nan"),
        "summary": hardener.summary(),
        "hardener": hardener,
        "plain_model": plain,
    }
