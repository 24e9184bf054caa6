"""``objective="seqrec"``: adapt the towers inside a sequential recommender (IISAN's setting).

The data are recommendation data (users with a ``sequence`` column of item positions, the
held-out next item as the label, the items in ``data.catalog``). Each method gives an **item
representation** of width ``H`` (SASRec's width):

- ``full`` / ``lora`` / ``adapter``: the towers' L2-normalised image and title embeddings of the
  item (scaled by ``sqrt(D)``), concatenated and fused by one linear layer (:class:`ItemTowers`);
  the towers (or their LoRA factors, or adapters) train through it.
- ``iisan`` / ``iisan-versa``: the intra-modal side networks over the item's cached per-layer
  image and text hidden states, fused by the inter-modal side network; the head's final linear
  layer maps ``[h_I; h_T; h_M]`` to ``H`` (IISAN's item representation).
- ``momef``: MOMEF's fused vector, mapped to ``H`` the same way.

The user model is :class:`mmsafe.models.seqrec.SASRec` over the item vectors of a history.
Every position predicts the next item with a softmax over the **unique items of the batch**
(in-batch softmax; the same candidates, loss and batch order for every method: the tower
methods cannot afford the whole catalogue per step, so no method gets it). Training reads each
history less its last item; the last item is the validation target; the label is read only at
test. The evaluation computes every catalogue item's vector once after training (no gradient)
and ranks the whole catalogue for each user, history excluded (:func:`ranking_scores`), with
:mod:`mmsafe.metrics.ranking`. Quality (:attr:`AdaptReport.accuracy`) is the test NDCG@10.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmsafe.data.dataset import Dataset
from mmsafe.methods.adapt.crossan import crossan_extra, crossan_weights
from mmsafe.methods.adapt.layers import (
    _batch_of,
    _tapped_batch,
    group_taps,
    preprocess_all,
    tower_layers,
)
from mmsafe.methods.adapt.options import MODALITIES, SEQREC_KS, SIDE_METHODS
from mmsafe.methods.adapt.report import Adapted, AdaptReport
from mmsafe.models.seqrec import SASRec, SeqRecConfig, SeqRecTrainConfig, pad_histories

SEQREC_LR = SeqRecTrainConfig().lr
"""AdamW learning rate of the user model and the fusion layer (every method)."""


def is_rec_data(data: Any) -> bool:
    """Whether ``data`` is recommendation data (users with sequences and a catalog)."""
    return isinstance(data, Dataset) and data.catalog is not None and "sequence" in data.modalities


class ItemTowers(nn.Module):
    """An item vector from the towers: ``Linear([e_image; e_title] * sqrt(D))``, width ``H``."""

    def __init__(self, encoder: Any, hidden: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.scale = math.sqrt(float(encoder.embed_dim))
        self.fuse = nn.Linear(2 * int(encoder.embed_dim), hidden)

    def forward(self, inputs: Mapping[str, Any]) -> Tensor:  # noqa: D102
        emb = self.encoder.encode({m: inputs[m] for m in MODALITIES})
        return self.fuse(torch.cat([emb[m] for m in MODALITIES], dim=-1) * self.scale)


class SeqRecAdapter(nn.Module):
    """Item representations + SASRec: what ``adapt(..., objective="seqrec")`` trains.

    Args:
        items: the item module (:class:`ItemTowers`, or a side head with ``H`` outputs).
        lookup: ``idx -> items' input`` for catalogue positions ``idx`` (a batch of the
            preprocessed catalogue, or cached hidden states); not a submodule.
        n_items: catalogue size.
        config: SASRec's architecture (``hidden``, ``layers``, ``heads``, ``max_len``,
            ``dropout``).
    """

    def __init__(
        self, items: nn.Module, lookup: Callable[[Tensor], Any], n_items: int, config: SeqRecConfig
    ) -> None:
        super().__init__()
        self.items = items
        self.lookup = lookup
        self.n_items = n_items
        self.cfg = config
        self.sasrec = SASRec(
            config.hidden, config.layers, config.heads, config.max_len, config.dropout
        )

    def vectors(self, idx: Tensor) -> Tensor:
        """``(len(idx), H)`` representations of catalogue items ``idx`` (differentiable)."""
        return self.items(self.lookup(idx))

    def table(self, batch_size: int = 256) -> Tensor:
        """``(I, H)`` every item's vector, in eval mode, without gradient."""
        was = self.training
        self.eval()
        try:
            with torch.inference_mode():
                idx = torch.arange(self.n_items).split(batch_size)
                parts = [self.vectors(i).float() for i in idx]
        finally:
            self.train(was)
        return torch.cat(parts)

    def scores(self, histories: Sequence[np.ndarray], table: Tensor | None = None) -> Tensor:
        """``(N, I)`` scores of every item for each history (no gradient, CPU float32)."""
        table = self.table() if table is None else table
        was = self.training
        self.eval()
        out = []
        try:
            with torch.inference_mode():
                for s in range(0, len(histories), 1024):
                    padded = pad_histories(histories[s : s + 1024], self.cfg.max_len)
                    states = self.sasrec(padded.to(table.device), table)[:, -1]
                    out.append((states @ table.T).float().cpu())
        finally:
            self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.n_items)

    def batch_loss(self, windows: Tensor, device: torch.device) -> Tensor:
        """Next-item cross-entropy at every position, softmax over the batch's unique items.

        ``windows``: ``(B, L + 1)`` left-padded item positions (``-1`` = padding).
        """
        valid = windows >= 0
        items, inverse = torch.unique(windows[valid], return_inverse=True)
        local = torch.full_like(windows, -1)
        local[valid] = inverse
        inputs, targets = local[:, :-1], local[:, 1:]
        keep = (inputs >= 0) & (targets >= 0)
        table = self.vectors(items)
        states = self.sasrec(inputs.to(device), table)
        logits = states[keep.to(device)] @ table.T
        return F.cross_entropy(logits, targets[keep].to(device))


def sequences_of(data: Dataset) -> list[np.ndarray]:
    """Each user's ``sequence`` (item positions, oldest first) as int64 arrays."""
    return [np.asarray(s, dtype=np.int64) for s in data.modalities["sequence"]]


def ranking_scores(
    scores: Tensor | np.ndarray,
    histories: Sequence[np.ndarray],
    targets: Sequence[int] | np.ndarray,
    ks: Sequence[int] = SEQREC_KS,
) -> dict[str, float]:
    """Mean ``ndcg@k`` and ``hr@k`` under full ranking, each user's history excluded.

    The rank counts a random tie-break's expectation (:func:`mmsafe.metrics.ranking.target_ranks`
    with ``return_ties=True``); the target itself is never excluded.
    """
    from mmsafe.metrics.ranking import hit_rate, ndcg, target_ranks

    ranks, ties = target_ranks(
        scores, np.asarray(targets, dtype=np.int64), exclude=list(histories), return_ties=True
    )
    out: dict[str, float] = {}
    for k in ks:
        out[f"ndcg@{k}"] = float(ndcg(ranks, k, ties=ties).mean())
        out[f"hr@{k}"] = float(hit_rate(ranks, k, ties=ties).mean())
    return out


def _train_windows(data: Dataset, max_len: int) -> tuple[Tensor, list[np.ndarray], np.ndarray]:
    """``(windows, train histories, validation targets)``: each history less its last item."""
    seqs = sequences_of(data)
    train = [s[:-1] for s in seqs]
    val = np.array([s[-1] for s in seqs], dtype=np.int64)
    usable = [s for s in train if len(s) >= 2]
    if not usable:
        raise ValueError("seqrec needs users with 3 or more interactions to train on.")
    return pad_histories(usable, max_len + 1), train, val


def adapt_seqrec(
    model: Any,
    train: Dataset,
    test: Dataset | None,
    method: str,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    dev: torch.device,
    cache: bool,
    cache_dir: str | Path | None,
    lora_r: int,
    adapter_bottleneck: int,
    side_width: int,
    side_bottleneck: int,
    max_taps: int,
    groups: int | Mapping[str, int] | None,
    report: Callable[..., AdaptReport],
    config: SeqRecConfig | None = None,
    towers: Mapping[str, tuple[Any, str]] | None = None,
) -> Adapted:
    """Train ``method``'s item representation and a SASRec on ``train``'s users; rank the test.

    ``test`` (``None``: ``train``) holds the users to evaluate: each one's whole ``sequence`` is
    the history, its label the target. ``report`` builds the :class:`AdaptReport` (the caller's,
    so every objective reports alike). ``towers``: crossan's ``{name: (encoder, modality)}``
    (default: ``model``'s image and text towers).
    """
    from mmsafe.methods.adapt.parts import cache_key, tower_module, weights_mib
    from mmsafe.methods.efficiency import count_parameters, peak_memory

    test = train if test is None else test
    if not is_rec_data(train) or not is_rec_data(test):
        raise ValueError(
            "objective 'seqrec' needs recommendation data (users with a 'sequence' column and "
            "a catalog), e.g. --data shapes-rec."
        )
    catalog = train.catalog
    assert catalog is not None and test.catalog is not None
    if len(test.catalog) != len(catalog):
        raise ValueError("seqrec: the test users must rank the same catalogue as the train users.")
    n_items = len(catalog)
    cfg = config or SeqRecConfig(n_items, items="id")  # SASRec's shape; the items are ours
    windows, train_hist, val_targets = _train_windows(train, cfg.max_len)
    item_inputs = preprocess_all(model, catalog)
    extra: dict[str, Any] = {"candidates": "in-batch unique items", "sasrec": cfg.to_dict()}
    features = None
    backbone_ids: set[int] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if method == "crossan":
            from mmsafe.methods.adapt.crossan import (
                TowerFeatures,
                check_towers,
                crossan_taps,
                own_towers,
            )
            from mmsafe.methods.adapt.parts import side_head

            spec = dict(towers) if towers else own_towers(model)
            check_towers(spec)
            taps = crossan_taps(spec, max_taps, groups)
            tower_feats = TowerFeatures(
                spec, catalog, taps, cache=cache, cache_dir=cache_dir, device=dev
            )
            backbone = nn.ModuleList(tower_feats.encoders)
            items = side_head(method, tower_feats.dims(), cfg.hidden, side_width, side_bottleneck)
            lookup = tower_feats.batch
            extra.update(taps=taps, cached=cache, side_width=side_width, towers=crossan_extra(spec),
                         cache_dir=None if cache_dir is None else str(cache_dir),
                         cache_hit=tower_feats.cache_hit)  # fmt: skip
        elif method in SIDE_METHODS:
            from mmsafe.methods.adapt.parts import side_head
            from mmsafe.methods.adapt.side import FeatureCache

            backbone = model.to(dev).eval()
            depth = {m: len(layers) for m, layers in tower_layers(backbone).items()}
            default = min(max_taps, *depth.values())
            n_groups = default if groups is None or method == "iisan" else groups
            taps = group_taps({m: depth[m] for m in MODALITIES}, n_groups)
            probe = _tapped_batch(backbone, item_inputs, torch.arange(2), taps, dev)
            dims = {m: [int(f.shape[1]) for f in probe[m]] for m in MODALITIES}
            items: nn.Module = side_head(method, dims, cfg.hidden, side_width, side_bottleneck)
            if cache:
                key = cache_key(backbone.fingerprint(), catalog.fingerprint(), taps, "pool/v1")
                features = FeatureCache(
                    backbone, item_inputs, taps, cache_dir=cache_dir, key=key, device=dev
                )
                feats = features

                def lookup(idx: Tensor) -> Any:
                    return feats.batch(idx, dev)
            else:

                def lookup(idx: Tensor) -> Any:
                    return _tapped_batch(backbone, item_inputs, idx, taps, dev)

            extra.update(taps=taps, cached=cache, side_width=side_width,
                         cache_dir=None if cache_dir is None else str(cache_dir),
                         cache_hit=features is not None and features.seconds == 0.0)  # fmt: skip
        else:
            encoder, adapters, tower_extra = tower_module(
                model, method, item_inputs, dev, lora_r=lora_r, bottleneck=adapter_bottleneck
            )
            backbone = encoder
            extra.update(tower_extra)
            items = ItemTowers(encoder, cfg.hidden)
            if adapters is not None:
                items.adapters = adapters
            backbone_ids = {id(p) for p in encoder.parameters()}
            backbone_ids |= {id(p) for p in (adapters or nn.ModuleList()).parameters()}

            def lookup(idx: Tensor) -> Any:
                return _batch_of(item_inputs, idx, dev)

        net = SeqRecAdapter(items, lookup, n_items, cfg).to(dev)
    # the adaptation parameters (backbone, LoRA, adapters, side networks) at the method's lr;
    # the fusion layer to H and the user model at SEQREC_LR, for every method
    if method in SIDE_METHODS:
        fusion = {id(p) for p in _fusion_layer(items).parameters()}
        adapt_ids = {id(p) for p in items.parameters()} - fusion
    else:
        adapt_ids = backbone_ids
    trainable = [p for p in net.parameters() if p.requires_grad]
    groups_ = [
        {"params": [p for p in trainable if id(p) in adapt_ids], "lr": lr},
        {"params": [p for p in trainable if id(p) not in adapt_ids], "lr": SEQREC_LR},
    ]
    opt = torch.optim.AdamW([g for g in groups_ if g["params"]], weight_decay=1e-4)

    def set_train() -> None:
        net.train()
        if method in ("lora", "adapter"):  # frozen backbone: keep batch-norm statistics
            getattr(net.items, "encoder", net.items).eval()

    def run() -> tuple[list[float], list[float]]:
        with torch.random.fork_rng(devices=[]):  # SASRec's dropout: the same for a seed
            torch.manual_seed(seed)
            return epochs_of()

    def epochs_of() -> tuple[list[float], list[float]]:
        gen = torch.Generator().manual_seed(seed)
        times, losses = [], []
        set_train()
        for _ in range(epochs):
            start = time.perf_counter()
            order = torch.randperm(len(windows), generator=gen)
            for lo in range(0, len(order), batch_size):
                loss = net.batch_loss(windows[order[lo : lo + batch_size]], dev)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            times.append(time.perf_counter() - start)
        return times, losses

    (times, losses), peak = peak_memory(run, dev)
    table = net.table()
    val = ranking_scores(net.scores(train_hist, table), train_hist, val_targets)
    test_hist = sequences_of(test)
    metrics = ranking_scores(net.scores(test_hist, table), test_hist, np.asarray(test.labels))
    metrics.update({f"val_{k}": v for k, v in val.items()})
    counts = count_parameters(net)
    extra["item_trainable_params"] = count_parameters(items).trainable
    extra["user_model_params"] = count_parameters(net.sasrec).total
    total = counts.total
    cache_seconds = 0.0 if features is None else features.seconds
    if method in SIDE_METHODS:
        total += count_parameters(backbone).total
        gates = getattr(items, "gates", {})
        extra["gates"] = {s: [round(float(g().detach()), 4) for g in gs] for s, gs in gates.items()}
    if method == "crossan":
        cache_seconds = tower_feats.seconds
        extra.update(crossan_weights(items, lookup, n_items))
    rep = report(
        method, times, losses, peak, counts.trainable, total, metrics,
        cache_seconds=cache_seconds, extra=extra,
        backbone_mib=weights_mib(backbone),
    )  # fmt: skip
    return Adapted(net, rep, lambda data: net.scores(sequences_of(data), table))


def _fusion_layer(head: nn.Module) -> nn.Module:
    """The side head's output layer (its map to ``H``)."""
    return head.classifier  # type: ignore[return-value]
