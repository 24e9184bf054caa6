"""ID-free multimodal sequential recommenders (MMSR-style), the ``recommender`` target kind.

An item is represented by its content: the frozen embeddings of its image and title from any
encoder target (tiny-clip, lit-mini, ``hf:``), fused by a small learned layer into the item
table. A SASRec-style causal transformer reads a user's history of item representations and
scores every item of the catalogue by a dot product with the last state::

    features = {m: encoder(catalog[m])}             # (I, D) per modality, cached by the engine
    table = fuse(features)                          # (I, H)
    scores = SASRec(table[history])[-1] @ table.T   # (I,) per user

``items="id"`` replaces the content by a learned ID embedding per item: the classic ID-based
SASRec (Kang & McAuley, 2018), the baseline that cannot score an item it never saw in
training. Models train on each user's history less its last item (kept for validation and
early stopping); the held-out label is never seen (leave-one-out, as SASRec and IISAN evaluate).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from mmsafe.models.base import EncoderModel, ModelError, module_fingerprint, register_model

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset

FORMAT = "mmsafe.seqrec/1"
FEATURE_MODALITIES: tuple[str, ...] = ("image_features", "text_features")
"""Catalog columns of precomputed item features (MMRec's ``image_feat.npy``/``text_feat.npy``),
used as they are instead of an encoder's embeddings."""


@dataclass(frozen=True)
class SeqRecConfig:
    """The architecture of a sequential recommender.

    Attributes:
        n_items: the catalogue size (items the model scores).
        items: ``content`` (fused features of the item's modalities) or ``id`` (a learned
            embedding per item).
        modalities: the catalog columns the content representation reads.
        feature_dims: the width of each modality's features (content only).
        hidden: the transformer width.
        layers: transformer blocks.
        heads: attention heads.
        max_len: the most recent interactions read.
        dropout: dropout in the blocks and on the inputs.
    """

    n_items: int
    items: str = "content"
    modalities: tuple[str, ...] = ("image", "text")
    feature_dims: tuple[int, ...] = ()
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 20
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.items not in ("content", "id"):
            raise ModelError(f"items must be 'content' or 'id', got {self.items!r}")
        if self.items == "content" and len(self.feature_dims) != len(self.modalities):
            raise ModelError("a content recommender needs one feature width per modality")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SeqRecConfig:
        """Rebuild from :meth:`to_dict`."""
        d = dict(d)
        d["modalities"] = tuple(d.get("modalities", ()))
        d["feature_dims"] = tuple(d.get("feature_dims", ()))
        return cls(**d)


@dataclass(frozen=True)
class SeqRecTrainConfig:
    """How a recommender trains: full-softmax next-item prediction at every position.

    Attributes:
        epochs: the most passes over the users.
        batch_size: users per step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        patience: epochs without a better validation NDCG@10 before stopping.
        restore_best: end with the weights of the best validation epoch (``False``: the last
            epoch's, e.g. to study an overtrained model).
    """

    epochs: int = 40
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 8
    restore_best: bool = True

    @classmethod
    def preset(cls, quick: bool) -> SeqRecTrainConfig:
        """The full recipe, or a short one for tests (``quick``)."""
        return cls(epochs=20, patience=4) if quick else cls()


def pad_histories(sequences: Sequence[np.ndarray], max_len: int) -> Tensor:
    """Left-padded ``(B, max_len)`` int64 item positions, ``-1`` where padded.

    The most recent ``max_len`` interactions of each history, the newest in the last column.

    Example:
        >>> pad_histories([np.array([1, 2, 3]), np.array([4])], 2).tolist()
        [[2, 3], [-1, 4]]
    """
    out = np.full((len(sequences), max_len), -1, dtype=np.int64)
    for i, s in enumerate(sequences):
        tail = np.asarray(s, dtype=np.int64)[-max_len:]
        if len(tail):
            out[i, max_len - len(tail) :] = tail
    return torch.from_numpy(out)


class SASRec(nn.Module):
    """A causal transformer over a sequence of item representations (Kang & McAuley, 2018)."""

    def __init__(self, hidden: int, layers: int, heads: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.position = nn.Embedding(max_len, hidden)
        nn.init.normal_(self.position.weight, std=0.02)  # small beside the items (GPT-2's init)
        self.drop = nn.Dropout(dropout)
        block = nn.TransformerEncoderLayer(
            hidden, heads, 2 * hidden, dropout, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, items: Tensor, table: Tensor) -> Tensor:
        """``(B, L, H)`` states of left-padded ``items`` (``-1`` = padding) over ``table``."""
        b, length = items.shape
        valid = items >= 0
        x = table[items.clamp(min=0)] * valid[..., None]
        x = self.drop(x + self.position.weight[None, -length:])
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
        allowed = causal[None] & valid[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool, device=items.device)[None]
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~allowed, float("-inf")).repeat_interleave(self.heads, dim=0)
        return self.norm(self.blocks(x, mask=mask))


class SeqRecommender(nn.Module):
    """A sequential recommender over a catalogue: item representations + SASRec.

    The encoder (content models) is held, not owned: its weights are neither trained nor saved
    here, and the engine caches its item embeddings like any other forward pass.
    """

    kind: ClassVar[str] = "recommender"

    def __init__(
        self, config: SeqRecConfig, encoder: EncoderModel | None = None, name: str = "mm-sasrec"
    ) -> None:
        super().__init__()
        self.cfg = config
        self.name = name
        object.__setattr__(self, "encoder", encoder)  # not a submodule: frozen, saved apart
        h = config.hidden
        if config.items == "id":
            self.item_embedding = nn.Embedding(config.n_items, h)
            nn.init.normal_(self.item_embedding.weight, std=0.1)
        else:
            self.fuse = nn.Sequential(
                nn.Linear(sum(config.feature_dims), 2 * h), nn.GELU(), nn.Linear(2 * h, h)
            )
        self.sasrec = SASRec(h, config.layers, config.heads, config.max_len, config.dropout)
        self.training_info: dict[str, Any] = {}

    encoder: EncoderModel | None

    # ------------------------------------------------------------------ the protocol
    def config(self) -> dict[str, Any]:
        """The architecture, and the encoder it reads items with."""
        enc = self.encoder
        return {
            "family": "seqrec",
            **self.cfg.to_dict(),
            "encoder": None
            if enc is None
            else {"name": enc.name, "fingerprint": enc.fingerprint()},
        }

    def capabilities(self) -> frozenset[str]:
        """The optional abilities: ``item_pixels`` (scores differentiable in item pixels).

        Content models whose encoder reads images have it.
        """
        enc = self.encoder
        pixels = enc is not None and "image" in self.cfg.modalities and "image" in enc.modalities
        return frozenset({"item_pixels"} if pixels else ())

    @property
    def device(self) -> torch.device:
        """The device of the first parameter."""
        return next(self.parameters()).device

    def fingerprint(self) -> str:
        """A hash of the config (with the encoder's fingerprint) and every weight."""
        return module_fingerprint(self, self.config())

    def invalidate_fingerprint(self) -> None:
        """Forget the cached fingerprint (after changing weights)."""
        object.__setattr__(self, "_fingerprint_cache", None)

    # ------------------------------------------------------------------ items
    def item_features(self, engine: Any, catalog: Dataset) -> dict[str, Tensor]:
        """``{modality: (I, D)}`` features of every catalog item (``{}`` for an ID model)."""
        if self.cfg.items == "id":
            return {}
        if len(catalog) != self.cfg.n_items:
            raise ModelError(
                f"{self.name} was trained on {self.cfg.n_items} items but the catalog has "
                f"{len(catalog)}; retrain it on this data."
            )
        return catalog_features(engine, catalog, self.cfg.modalities, self.encoder)

    def item_table(self, features: Mapping[str, Tensor]) -> Tensor:
        """``(I, H)`` item representations from :meth:`item_features` (differentiable)."""
        if self.cfg.items == "id":
            return self.item_embedding.weight
        dev = self.device
        x = torch.cat([features[m].to(dev).float() for m in self.cfg.modalities], dim=-1)
        return self.fuse(x)

    # ------------------------------------------------------------------ users
    def user_states(self, histories: Tensor, table: Tensor) -> Tensor:
        """``(B, H)``: the last state of each left-padded history."""
        return self.sasrec(histories.to(table.device), table)[:, -1]

    def scores(
        self, histories: Sequence[np.ndarray], table: Tensor, batch_size: int = 1024
    ) -> Tensor:
        """``(N, I)`` scores of every item for each history (no gradient; CPU float32)."""
        was = self.training
        self.eval()
        out = []
        try:
            with torch.no_grad():
                for s in range(0, len(histories), batch_size):
                    padded = pad_histories(histories[s : s + batch_size], self.cfg.max_len)
                    out.append((self.user_states(padded, table) @ table.T).float().cpu())
        finally:
            self.train(was)
        return torch.cat(out) if out else torch.zeros(0, table.shape[0])


def catalog_features(
    engine: Any, catalog: Dataset, modalities: Sequence[str], encoder: EncoderModel | None
) -> dict[str, Tensor]:
    """``{modality: (I, D)}`` features of every catalog item.

    Encoder modalities go through ``engine.embed`` (batched, cached); precomputed feature
    columns (:data:`FEATURE_MODALITIES`) are stacked as they are.
    """
    out: dict[str, Tensor] = {}
    for m in modalities:
        if m not in catalog.modalities:
            raise ModelError(f"the recommender reads the items' {m!r} column; the catalog has "
                             f"{list(catalog.modality_names)}.")  # fmt: skip
        if m in FEATURE_MODALITIES:
            rows = np.stack([np.asarray(v, dtype=np.float32) for v in catalog.modalities[m]])
            out[m] = torch.from_numpy(rows)
        elif encoder is None:
            raise ModelError(f"the recommender needs an encoder to embed the items' {m!r}")
        else:
            out[m] = engine.embed(encoder, catalog, m, desc=f"items/{m}")
    return out


# --------------------------------------------------------------------------- training


def training_histories(data: Dataset) -> tuple[list[np.ndarray], np.ndarray]:
    """``(train sequences, validation targets)``: each history less its last item, and it."""
    seqs = [np.asarray(s, dtype=np.int64) for s in data.modalities["sequence"]]
    return [s[:-1] for s in seqs], np.array([s[-1] for s in seqs], dtype=np.int64)


def validation_ndcg(
    model: SeqRecommender, table: Tensor, inputs: list[np.ndarray], targets: np.ndarray
) -> float:
    """Mean NDCG@10 of ``targets`` after ``inputs`` (full ranking, the inputs excluded)."""
    from mmsafe.metrics.ranking import ndcg, target_ranks

    scores = model.scores(inputs, table.detach())
    ranks, ties = target_ranks(scores, targets, exclude=inputs, return_ties=True)
    return float(ndcg(ranks, 10, ties=ties).mean())


def fit_seqrec(
    model: SeqRecommender,
    features: Mapping[str, Tensor],
    data: Dataset,
    train: SeqRecTrainConfig,
    *,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``data``'s histories (leave-one-out); restore the best epoch.

    Every position of a training sequence predicts the next item with a softmax over the
    items that occur in the training sequences: an item without interactions is never a
    negative, so its score comes from its content alone (an ID model leaves it at its random
    initialisation). The validation item (each history's last) picks the best epoch by
    NDCG@10; the held-out label is never read.

    Returns:
        Training facts: epochs run, best epoch, validation NDCG@10, seconds per epoch.
    """
    seqs, val_targets = training_histories(data)
    usable = [i for i, s in enumerate(seqs) if len(s) >= 2]
    if not usable:
        raise ModelError("no user has 3 or more interactions to train on")
    length = model.cfg.max_len + 1
    windows = pad_histories([seqs[i] for i in usable], length)
    # the softmax runs over the items seen in training: an item without interactions is left
    # to its content, not pushed down as an eternal negative
    seen = torch.zeros(model.cfg.n_items, dtype=torch.bool)
    seen[torch.from_numpy(np.concatenate(seqs))] = True
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
            batch = windows[order[s : s + train.batch_size]].to(model.device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            keep = (inputs >= 0) & (targets >= 0)
            table = model.item_table(feats)
            states = model.sasrec(inputs, table)
            logits = (states[keep] @ table.T).masked_fill(unseen, float("-inf"))
            loss = nn.functional.cross_entropy(logits, targets[keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epochs = epoch + 1
        with torch.no_grad():
            model.eval()
            score = validation_ndcg(model, model.item_table(feats), seqs, val_targets)
        if progress is not None:
            progress(epochs, score)
        if score > best:
            best, best_epoch, stale = score, epochs, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= train.patience:
                break
    if best_state is not None and train.restore_best:
        model.load_state_dict(best_state)
    model.eval()
    model.invalidate_fingerprint()
    seconds = time.perf_counter() - start
    return {
        "epochs": epochs,
        "best_epoch": best_epoch,
        "validation_ndcg@10": round(best, 4),
        "seconds_per_epoch": round(seconds / max(epochs, 1), 3),
    }


# --------------------------------------------------------------------------- building


def check_rec_data(data: Dataset | None, name: str) -> Dataset:
    """``data`` when it is recommendation data (users with sequences and a catalog)."""
    if data is None or data.catalog is None or "sequence" not in data.modalities:
        raise ModelError(
            f"{name} trains on recommendation data: pass --data shapes-rec (or iisan:<folder>, "
            "mmrec:<folder>)."
        )
    return data


def _cache_key(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_seqrec(
    *,
    items: str = "content",
    encoder: EncoderModel | None = None,
    train_data: Dataset | None = None,
    seed: int = 0,
    quick: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    device: str = "cpu",
    name: str = "mm-sasrec",
    engine: Any = None,
    modalities: Sequence[str] | None = None,
    save: bool = True,
) -> SeqRecommender:
    """Load a trained recommender from the cache, or train one on ``train_data`` (and cache it).

    Args:
        items: ``content`` (read the items through ``encoder``) or ``id``.
        encoder: the encoder target whose embeddings represent the items (content models;
            ``None`` with precomputed feature columns).
        train_data: recommendation data; the model trains on its histories.
        seed: seeds initialisation and training.
        quick: a short schedule (tests).
        cache_dir: where trained models live.
        progress: print one line per epoch.
        device: torch device.
        name: the model's name in the card.
        engine: embeds the items (a quiet CPU engine by default).
        modalities: catalog columns to read (default: image and text where the catalog has
            them, else the precomputed feature columns).
        save: read and write the cache (``False``: train afresh, keep nothing; for baselines
            a check fits).
    """
    from mmsafe.engine.runner import Engine
    from mmsafe.models.tiny_clip import cache_root

    data = check_rec_data(train_data, name)
    catalog = data.catalog
    assert catalog is not None
    engine = engine or Engine(progress=False, device=device)
    if modalities is None:
        present = catalog.modality_names
        modalities = [m for m in ("image", "text") if m in present and encoder is not None]
        modalities = modalities or [m for m in FEATURE_MODALITIES if m in present]
    if items == "content" and not modalities:
        raise ModelError(f"{name}: the catalog has no image, text or feature column to read")
    features = catalog_features(engine, catalog, modalities, encoder) if items == "content" else {}
    cfg = SeqRecConfig(
        len(catalog),
        items=items,
        modalities=tuple(modalities) if items == "content" else (),
        feature_dims=tuple(int(f.shape[1]) for f in features.values()),
    )
    train = SeqRecTrainConfig.preset(quick)
    enc_fp = None if encoder is None or items == "id" else encoder.fingerprint()
    key = _cache_key({"format": FORMAT, "model": cfg.to_dict(), "train": dataclasses.asdict(train),
                      "seed": seed, "data": data.fingerprint(), "encoder": enc_fp,
                      "torch": torch.__version__.split("+")[0]})  # fmt: skip
    folder = cache_root(cache_dir) / "models" / f"seqrec-{items}-{key}"
    model = SeqRecommender(cfg, encoder if items == "content" else None, name=name)
    if save and (folder / "config.json").is_file():
        with contextlib.suppress(ModelError, OSError, RuntimeError):
            return _load_weights(model, folder, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SeqRecommender(cfg, encoder if items == "content" else None, name=name).to(device)

        def say(epoch: int, score: float) -> None:
            if progress:
                print(f"[{name}] epoch {epoch}: validation NDCG@10 {score:.4f}", flush=True)

        stats = fit_seqrec(model, features, data, train, seed=seed, progress=say)
    model.training_info = {"cache_key": key, "seed": seed, "quick": quick,
                           "hyperparameters": dataclasses.asdict(train),
                           "data_fingerprint": data.fingerprint(), **stats}  # fmt: skip
    if save:
        save_weights(model, folder)
    return model


def save_weights(model: SeqRecommender, folder: Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` (with the training facts), atomically."""
    from safetensors.torch import save_file

    from mmsafe.engine.cache import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda p: save_file(state, str(p)))
    doc = {"format": FORMAT, "model": model.cfg.to_dict(), "training": model.training_info}
    text = json.dumps(doc, indent=2, sort_keys=True, default=str)
    atomic_write(folder / "config.json", lambda p: p.write_text(text, encoding="utf-8"))


def _load_weights(model: SeqRecommender, folder: Path, device: str) -> SeqRecommender:
    from safetensors.torch import load_file

    doc = json.loads((folder / "config.json").read_text("utf-8"))
    if doc.get("format") != FORMAT or SeqRecConfig.from_dict(doc["model"]) != model.cfg:
        raise ModelError(f"{folder} holds another recommender")
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    model.training_info = doc.get("training", {})
    model.invalidate_fingerprint()
    return model.to(device).eval()


def _encoder(spec: str, **kwargs: Any) -> EncoderModel:
    from mmsafe.models.loading import load_model

    kw = {k: kwargs[k] for k in ("quick", "seed", "device", "cache_dir", "progress") if k in kwargs}
    enc = load_model(spec, **kw)
    if getattr(enc, "kind", "encoder") != "encoder":
        raise ModelError(f"mm-sasrec reads items with an encoder target; {spec!r} is not one")
    return enc


@register_model("mm-sasrec", kind="recommender")
def mm_sasrec(**kwargs: Any) -> SeqRecommender:
    """ID-free multimodal SASRec over tiny-clip's item embeddings, trained on the data's users."""
    return mm_sasrec_with("tiny-clip", **kwargs)


@register_model(
    "mm-sasrec:", "ID-free multimodal SASRec over another encoder: mm-sasrec:<encoder spec>",
    kind="recommender",
)  # fmt: skip
def mm_sasrec_with(encoder: str, **kwargs: Any) -> SeqRecommender:
    """``mm-sasrec:lit-mini``, ``mm-sasrec:hf:<path>``, ``mm-sasrec:features`` (precomputed)."""
    enc = None if encoder == "features" else _encoder(encoder, **kwargs)
    return build_seqrec(items="content", encoder=enc, name=f"mm-sasrec:{encoder}", **kwargs)


@register_model("sasrec-id", kind="recommender")
def sasrec_id(**kwargs: Any) -> SeqRecommender:
    """ID-based SASRec (a learned embedding per item), trained on the data's users."""
    return build_seqrec(items="id", name="sasrec-id", **kwargs)
