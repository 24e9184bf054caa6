"""The training loop shared by every method, and :func:`adapt`."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmsafe.data.dataset import Dataset
from mmsafe.methods.adapt.layers import (
    _batch_of,
    _n_rows,
    _tapped_batch,
    group_taps,
    labelled_rows,
    preprocess_all,
    tower_layers,
)
from mmsafe.methods.adapt.modules import EncoderClassifier, RetrievalEncoder
from mmsafe.methods.adapt.options import (
    DEFAULT_LR,
    METHODS,
    MODALITIES,
    OBJECTIVES,
    RETRIEVAL_METHODS,
    SEQREC_METHODS,
    SIDE_METHODS,
    AdaptError,
)
from mmsafe.methods.adapt.parts import cache_key as _key
from mmsafe.methods.adapt.parts import side_head as _side_head
from mmsafe.methods.adapt.parts import tower_module as _tower_module
from mmsafe.methods.adapt.parts import weights_mib
from mmsafe.methods.adapt.report import (
    Adapted,
    AdaptReport,
    retrieval_metrics,
)
from mmsafe.methods.adapt.side import (
    FeatureCache,
    MOMEFHead,
    SideRetrievalHead,
)
from mmsafe.methods.efficiency import count_parameters, peak_memory


def _train(
    loss_of: Callable[[Tensor], Tensor],
    params: Sequence[nn.Parameter],
    n: int,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    set_train: Callable[[], None],
) -> tuple[list[float], list[float]]:
    """AdamW over shuffled batches of ``n`` rows: ``(epoch_times, step_losses)``.

    ``loss_of(idx)`` is the loss of the rows ``idx``; the batch order depends on ``seed`` and
    ``n`` only, so every method and objective sees the same batches.
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    times, losses = [], []
    set_train()
    for _ in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            loss = loss_of(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        times.append(time.perf_counter() - start)
    return times, losses


def _cross_entropy(
    forward: Callable[[Tensor], Tensor], labels: Tensor, dev: torch.device
) -> Callable[[Tensor], Tensor]:
    return lambda idx: F.cross_entropy(forward(idx), labels[idx].to(dev))


def _clip_loss(
    forward: Callable[[Tensor], Mapping[str, Tensor]],
    scale: Callable[[], Tensor],
    captions: Sequence[str],
) -> Callable[[Tensor], Tensor]:
    """Symmetric InfoNCE of a batch (identical captions are positives for each other)."""
    from mmsafe.models.tiny_clip import contrastive_loss

    def loss_of(idx: Tensor) -> Tensor:
        emb = forward(idx)
        texts = [captions[i] for i in idx.tolist()]
        return contrastive_loss(emb["image"], emb["text"], scale(), texts)

    return loss_of


def _device_of(params: Sequence[nn.Parameter]) -> torch.device:
    return params[0].device if params else torch.device("cpu")


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(-1).cpu() == labels.cpu()).float().mean())


def _quality(metrics: Mapping[str, float], objective: str) -> float:
    if objective == "classification":
        return metrics["accuracy"]
    if objective == "seqrec":
        return metrics["ndcg@10"]
    return (metrics["i2t_R@1"] + metrics["t2i_R@1"]) / 2


def adapt(
    model: Any,
    train: Dataset,
    test: Dataset,
    method: str = "iisan",
    *,
    objective: str = "classification",
    epochs: int = 3,
    batch_size: int = 64,
    lr: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    cache: bool = True,
    cache_dir: str | Path | None = None,
    lora_r: int = 8,
    adapter_bottleneck: int = 16,
    side_width: int = 64,
    side_bottleneck: int = 32,
    max_taps: int = 6,
    groups: int | Mapping[str, int] | None = None,
    threads: int | None = 1,
    towers: Mapping[str, tuple[Any, str]] | None = None,
) -> Adapted:
    """Adapt ``model`` to ``objective`` on ``train`` and evaluate on ``test``.

    ``model`` itself is never modified: ``full``, ``lora`` and ``adapter`` train a deep copy;
    ``iisan``, ``iisan-versa``, ``momef`` and ``crossan`` only read the model's hidden states
    without gradient, in eval mode.

    Args:
        model: an :class:`~mmsafe.models.base.EncoderModel` with image and text towers that
            expose ``hidden_states`` (tiny-clip, lit-mini, Hugging Face CLIP; another model
            names its blocks with ``tower_blocks()``).
        train: rows to train on. Classification drops rows labelled ``-1``; retrieval uses
            every (image, caption) pair (it needs no label).
        test: rows to evaluate, filtered the same way. Retrieval ranks every test caption for
            every test image and the reverse, as ``mmsafe audit --task retrieval`` does.
        method: one of :data:`METHODS` (:data:`RETRIEVAL_METHODS` for retrieval).
        objective: ``classification`` (fusion classification, cross-entropy; quality: accuracy),
            ``seqrec`` (``train`` is recommendation data, ``test`` the users to rank, ``None``
            for the same; a SASRec over the method's item representation, in-batch softmax;
            quality: test NDCG@10 under full ranking; see :mod:`~mmsafe.methods.adapt.seqrec`)
            or ``retrieval`` (symmetric InfoNCE with a learnable temperature initialised to the
            model's logit scale; quality: mean R@1 of image -> text and text -> image, every
            recall in :attr:`AdaptReport.metrics`).
        epochs: training epochs.
        batch_size: rows per step (for retrieval also the number of in-batch negatives + 1).
        lr: AdamW learning rate (default :data:`DEFAULT_LR` of the method).
        seed: seeds initialisation and batch order (the order is the same for every method).
        device: ``cpu``, ``cuda``, ...
        cache: side methods (``iisan``, ``iisan-versa``, ``momef``): compute the hidden states
            once before training (``False`` runs the frozen backbones on every batch: same
            result, backbone cost in every epoch).
        cache_dir: side methods with ``cache``: a folder for memory-mapped ``.npy`` features;
            ``None`` keeps them in memory.
        lora_r: LoRA rank (alpha is ``2 * r``).
        adapter_bottleneck: Houlsby adapter bottleneck width.
        side_width: side-network width (and MOMEF expert width).
        side_bottleneck: SANB bottleneck.
        max_taps: side methods: at most this many tapped layers per tower (the default group
            count, capped by the shallower tower's depth).
        groups: ``iisan-versa``, ``momef`` and ``crossan``: the group layer-dropping count, one
            for every tower or ``{"image": G_I, "text": G_T}`` (crossan: ``{tower: G}``;
            :func:`group_taps`); ``None`` uses
            ``min(max_taps, depth of each tower)`` as ``iisan`` does. Other methods ignore it
            (as they ignore ``lora_r``), so :func:`compare_methods` can pass it to all.
        threads: torch intra-op threads while adapting (restored afterwards); ``None`` leaves
            torch's setting. One by default: these small models gain little from more, and on a
            busy CPU an oversubscribed thread pool made the same epoch 5-20x slower (measured).
        towers: ``crossan`` only: ``{name: (encoder, modality)}``, the frozen towers to adapt,
            from ``model`` and other encoders (:mod:`~mmsafe.methods.adapt.crossan`); ``None``:
            ``model``'s image and text towers. Classification reads the towers' features of the
            same rows of ``train`` and ``test``, so every encoder must take those rows.

    Returns:
        The trained classifier (classification) or retrieval encoder (retrieval: see
        :meth:`Adapted.embed`) and its :class:`AdaptReport`.

    Raises:
        ValueError: an unknown method or objective, ``momef`` with retrieval, or no rows.
        AdaptError: ``towers`` with a method other than ``crossan``, or a model whose tower
            blocks a method cannot reach (a :class:`ValueError` too).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}.")
    if objective == "retrieval" and method not in RETRIEVAL_METHODS:
        raise ValueError(
            f"method {method!r} does not support retrieval (it fuses the modalities into one "
            f"vector); choose from {', '.join(RETRIEVAL_METHODS)}."
        )
    if objective == "seqrec" and method not in SEQREC_METHODS:
        raise ValueError(f"method {method!r} does not support seqrec.")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"Need epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}.")
    if towers is not None and method != "crossan":
        raise AdaptError(f"towers are crossan's; method {method!r} adapts the model's own.")
    with _threads(threads):
        return _adapt(
            model, train, test, method, objective=objective, epochs=epochs,
            batch_size=batch_size, lr=lr, seed=seed, device=device, cache=cache,
            cache_dir=cache_dir, lora_r=lora_r, adapter_bottleneck=adapter_bottleneck,
            side_width=side_width, side_bottleneck=side_bottleneck, max_taps=max_taps,
            groups=groups, towers=towers,
        )  # fmt: skip


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class _Task:
    """What the training loop and the evaluation need to know about the objective."""

    objective: str
    train: Dataset
    test: Dataset
    y_train: Tensor | None
    y_test: Tensor | None
    num_classes: int

    @classmethod
    def of(cls, objective: str, train: Dataset, test: Dataset) -> _Task:
        if objective == "retrieval":
            if len(train) < 2 or len(test) == 0:
                raise ValueError("adapt needs at least 2 train rows and 1 test row for retrieval.")
            return cls(objective, train, test, None, None, 0)
        train, test = labelled_rows(train), labelled_rows(test)
        if len(train) == 0 or len(test) == 0:
            raise ValueError("adapt needs labelled train and test rows.")
        y_train = torch.as_tensor(np.asarray(train.labels), dtype=torch.long)
        y_test = torch.as_tensor(np.asarray(test.labels), dtype=torch.long)
        num_classes = max(len(train.classes), int(np.max(train.labels)) + 1)
        return cls(objective, train, test, y_train, y_test, num_classes)

    @classmethod
    def seqrec(cls) -> _Task:
        """A placeholder for the report of ``objective="seqrec"`` (its own loop and data)."""
        return cls("seqrec", None, None, None, None, 0)  # type: ignore[arg-type]

    @property
    def retrieval(self) -> bool:
        return self.objective == "retrieval"

    def captions(self, data: Dataset) -> list[str]:
        return [str(t) for t in data.modalities["text"]]

    def metrics(self, out: Tensor | Mapping[str, Tensor]) -> dict[str, float]:
        """Quality on the test rows from logits (classification) or embeddings (retrieval)."""
        if isinstance(out, Mapping):
            return retrieval_metrics(out["image"], out["text"], self.captions(self.test))
        assert self.y_test is not None
        return {"accuracy": _accuracy(out, self.y_test)}

    def loss(
        self, forward: Callable[[Tensor], Any], module: nn.Module, dev: torch.device
    ) -> Callable[[Tensor], Tensor]:
        """The loss of the train rows ``idx``: InfoNCE at ``module.scale()`` or cross-entropy."""
        if self.retrieval:
            return _clip_loss(forward, module.scale, self.captions(self.train))
        assert self.y_train is not None
        return _cross_entropy(forward, self.y_train, dev)

    def outputs(self, module: nn.Module, run: Callable[[Tensor], Any], n: int) -> Any:
        """``run`` over batches of ``n`` rows in eval mode, without gradient, on the CPU.

        Logits ``(N, C)`` (classification) or ``{modality: (N, D)}`` (retrieval).
        """
        module.eval()
        with torch.inference_mode():
            parts = [run(idx) for idx in torch.arange(n).split(256)]
        if self.retrieval:
            return {m: torch.cat([p[m].float().cpu() for p in parts]) for m in MODALITIES}
        return torch.cat([p.cpu() for p in parts])


def _report(
    method: str,
    task: _Task,
    times: Sequence[float],
    losses: Sequence[float],
    peak: Any,
    trainable: int,
    total: int,
    metrics: Mapping[str, float],
    *,
    cache_seconds: float = 0.0,
    extra: Mapping[str, Any] | None = None,
    backbone_mib: float = math.nan,
) -> AdaptReport:
    return AdaptReport(
        method=method,
        epochs=len(times),
        epoch_seconds=float(np.mean(times)),
        epoch_times=tuple(times),
        peak_memory_mib=peak.mib,
        memory_method=peak.method,
        trainable_params=trainable,
        total_params=total,
        accuracy=_quality(metrics, task.objective),
        losses=tuple(losses),
        cache_seconds=cache_seconds,
        extra=dict(extra or {}),
        objective=task.objective,
        metrics=dict(metrics),
        backbone_memory_mib=backbone_mib,
        peak_memory_with_backbone_mib=peak.mib + backbone_mib,
    )


def _adapt(
    model: Any,
    train: Dataset,
    test: Dataset,
    method: str,
    *,
    objective: str,
    epochs: int,
    batch_size: int,
    lr: float | None,
    seed: int,
    device: str,
    cache: bool,
    cache_dir: str | Path | None,
    lora_r: int,
    adapter_bottleneck: int,
    side_width: int,
    side_bottleneck: int,
    max_taps: int,
    groups: int | Mapping[str, int] | None,
    towers: Mapping[str, tuple[Any, str]] | None = None,
) -> Adapted:
    lr = DEFAULT_LR[method] if lr is None else lr
    dev = torch.device(device)
    if objective == "seqrec":
        from mmsafe.methods.adapt.seqrec import adapt_seqrec

        def seqrec_report(*args: Any, **kwargs: Any) -> AdaptReport:
            return _report(args[0], _Task.seqrec(), *args[1:], **kwargs)

        return adapt_seqrec(
            model, train, test, method, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
            dev=dev, cache=cache, cache_dir=cache_dir, lora_r=lora_r,
            adapter_bottleneck=adapter_bottleneck, side_width=side_width,
            side_bottleneck=side_bottleneck, max_taps=max_taps, groups=groups,
            report=seqrec_report, towers=towers,
        )  # fmt: skip
    task = _Task.of(objective, train, test)
    if method == "crossan":
        return _adapt_crossan(
            model, task, towers, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
            dev=dev, cache=cache, cache_dir=cache_dir, width=side_width,
            bottleneck=side_bottleneck, max_taps=max_taps, groups=groups,
        )  # fmt: skip
    inputs = preprocess_all(model, task.train)
    test_inputs = preprocess_all(model, task.test)
    if method in SIDE_METHODS:
        return _adapt_side(
            model, task, inputs, test_inputs, method,
            epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, dev=dev, cache=cache,
            cache_dir=cache_dir, width=side_width, bottleneck=side_bottleneck,
            max_taps=max_taps, groups=groups,
        )  # fmt: skip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder, adapters, extra = _tower_module(
            model, method, inputs, dev, lora_r=lora_r, bottleneck=adapter_bottleneck
        )
        clf: EncoderClassifier | RetrievalEncoder
        if task.retrieval:
            clf = RetrievalEncoder(encoder, float(getattr(model, "logit_scale", 1 / 0.07)))
        else:
            clf = EncoderClassifier(encoder, task.num_classes)
        clf = clf.to(dev)
        if adapters is not None:
            clf.adapters = adapters
    params = [p for p in clf.parameters() if p.requires_grad]

    def set_train() -> None:
        clf.train()
        if method != "full":  # frozen backbone: keep batch-norm statistics fixed
            clf.encoder.eval()

    def forward(idx: Tensor) -> Any:
        return clf(_batch_of(inputs, idx, dev))

    loss_of = task.loss(forward, clf, dev)
    (times, losses), peak = peak_memory(
        lambda: _train(
            loss_of, params, len(task.train), epochs=epochs, batch_size=batch_size, lr=lr,
            seed=seed, set_train=set_train,
        ),
        dev,
    )  # fmt: skip

    def outputs_of(xs: Mapping[str, Any]) -> Any:
        return task.outputs(clf, lambda idx: clf(_batch_of(xs, idx, dev)), _n_rows(xs["image"]))

    counts = count_parameters(clf)
    report = _report(
        method, task, times, losses, peak, counts.trainable, counts.total,
        task.metrics(outputs_of(test_inputs)), extra=extra, backbone_mib=weights_mib(encoder),
    )  # fmt: skip
    return _adapted(clf, report, task, lambda data: outputs_of(preprocess_all(model, data)))


def _adapted(
    module: nn.Module, report: AdaptReport, task: _Task, outputs: Callable[[Dataset], Any]
) -> Adapted:
    """Wrap ``outputs(data)`` (logits, or retrieval embeddings) as predict / embed functions."""
    if not task.retrieval:
        return Adapted(module, report, outputs)

    def similarity(data: Dataset) -> Tensor:
        emb = outputs(data)
        return emb["image"] @ emb["text"].T

    return Adapted(module, report, similarity, outputs)


def _adapt_side(
    model: Any,
    task: _Task,
    inputs: Mapping[str, Any],
    test_inputs: Mapping[str, Any],
    method: str,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    dev: torch.device,
    cache: bool,
    cache_dir: str | Path | None,
    width: int,
    bottleneck: int,
    max_taps: int,
    groups: int | Mapping[str, int] | None,
) -> Adapted:
    model = model.to(dev).eval()
    depth = {m: len(layers) for m, layers in tower_layers(model).items()}
    default = min(max_taps, *depth.values())
    n_groups = default if groups is None or method == "iisan" else groups
    taps = group_taps({m: depth[m] for m in MODALITIES}, n_groups)
    probe = _tapped_batch(model, inputs, torch.arange(2), taps, dev)
    dims = {m: [int(f.shape[1]) for f in probe[m]] for m in MODALITIES}
    head: nn.Module
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if task.retrieval:
            embed_dim = int(getattr(model, "embed_dim", width))
            scale = float(getattr(model, "logit_scale", 1 / 0.07))
            head = SideRetrievalHead(dims, embed_dim, width, bottleneck, logit_scale=scale)
        else:
            head = _side_head(method, dims, task.num_classes, width, bottleneck)
        head = head.to(dev)

    features: FeatureCache | None = None
    if cache:
        key = _key(model.fingerprint(), task.train.fingerprint(), taps, "pool/v1")
        features = FeatureCache(model, inputs, taps, cache_dir=cache_dir, key=key, device=dev)

    def forward(idx: Tensor) -> Any:
        if features is not None:
            return head(features.batch(idx, dev))
        return head(_tapped_batch(model, inputs, idx, taps, dev))

    loss_of = task.loss(forward, head, dev)
    params = list(head.parameters())
    (times, losses), peak = peak_memory(
        lambda: _train(
            loss_of, params, len(task.train), epochs=epochs, batch_size=batch_size, lr=lr,
            seed=seed, set_train=head.train,
        ),
        dev,
    )  # fmt: skip

    def outputs_of(xs: Mapping[str, Any]) -> Any:
        return task.outputs(
            head, lambda idx: head(_tapped_batch(model, xs, idx, taps, dev)), _n_rows(xs["image"])
        )

    metrics = task.metrics(outputs_of(test_inputs))
    backbone = count_parameters(model).total
    gates = {s: [round(float(g().detach()), 4) for g in gs] for s, gs in head.gates.items()}
    extra: dict[str, Any] = {
        "taps": taps,
        "cached": cache,
        "cache_dir": None if cache_dir is None else str(cache_dir),
        "side_width": width,
        "gates": gates,
    }
    if isinstance(head, MOMEFHead):
        with torch.inference_mode():
            idx = torch.arange(min(256, _n_rows(test_inputs["image"])))  # rows for the report
            w = head.gate_weights(_tapped_batch(model, test_inputs, idx, taps, dev))
        extra["expert_weights"] = {
            m: round(float(v), 4) for m, v in zip(head.modalities, w.mean(0).tolist(), strict=True)
        }
    if isinstance(head, SideRetrievalHead):
        extra["logit_scale"] = round(float(head.scale().detach()), 4)
    counts = count_parameters(head)
    report = _report(
        method, task, times, losses, peak, counts.trainable, backbone + counts.total, metrics,
        cache_seconds=0.0 if features is None else features.seconds, extra=extra,
        backbone_mib=weights_mib(model),
    )  # fmt: skip
    return _adapted(head, report, task, lambda data: outputs_of(preprocess_all(model, data)))


def _adapt_crossan(
    model: Any,
    task: _Task,
    towers: Mapping[str, tuple[Any, str]] | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    dev: torch.device,
    cache: bool,
    cache_dir: str | Path | None,
    width: int,
    bottleneck: int,
    max_taps: int,
    groups: int | Mapping[str, int] | None,
) -> Adapted:
    """CROSSAN for classification: the towers' features of the train rows (cached) and test."""
    from mmsafe.methods.adapt.crossan import (
        TowerFeatures,
        check_towers,
        crossan_extra,
        crossan_taps,
        crossan_weights,
        own_towers,
    )

    if task.retrieval:
        raise AdaptError("crossan fuses the towers into one vector: it does not do retrieval.")
    spec = dict(towers) if towers else own_towers(model)
    check_towers(spec)
    taps = crossan_taps(spec, max_taps, groups)
    train_feats = TowerFeatures(
        spec, task.train, taps, cache=cache, cache_dir=cache_dir, device=dev
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = _side_head("crossan", train_feats.dims(), task.num_classes, width, bottleneck)
        head = head.to(dev)

    def forward(idx: Tensor) -> Any:
        return head(train_feats.batch(idx))

    params = list(head.parameters())
    (times, losses), peak = peak_memory(
        lambda: _train(
            task.loss(forward, head, dev), params, len(task.train), epochs=epochs,
            batch_size=batch_size, lr=lr, seed=seed, set_train=head.train,
        ),
        dev,
    )  # fmt: skip

    def outputs_of(data: Dataset) -> Tensor:
        feats = TowerFeatures(spec, data, taps, cache=True, cache_dir=None, device=dev)
        return task.outputs(head, lambda idx: head(feats.batch(idx)), len(data))

    test_feats = TowerFeatures(spec, task.test, taps, cache=True, cache_dir=None, device=dev)
    metrics = task.metrics(task.outputs(head, lambda i: head(test_feats.batch(i)), len(task.test)))
    backbone = nn.ModuleList(train_feats.encoders)
    extra: dict[str, Any] = {
        "taps": taps,
        "towers": crossan_extra(spec),
        "cached": cache,
        "cache_dir": None if cache_dir is None else str(cache_dir),
        "side_width": width,
        "gates": {s: [round(float(g().detach()), 4) for g in gs] for s, gs in head.gates.items()},
        **crossan_weights(head, test_feats.batch, len(task.test)),
    }
    counts = count_parameters(head)
    report = _report(
        "crossan", task, times, losses, peak, counts.trainable,
        count_parameters(backbone).total + counts.total, metrics,
        cache_seconds=train_feats.seconds, extra=extra, backbone_mib=weights_mib(backbone),
    )  # fmt: skip
    return _adapted(head, report, task, outputs_of)


def train_side_head(
    head: nn.Module,
    features: Mapping[str, Sequence[Tensor | np.ndarray]],
    labels: Tensor | np.ndarray,
    *,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """Train a side head on cached per-modality features (any modalities); the step losses.

    This is the training :func:`adapt` runs for the side methods, without a backbone: use it
    for modalities an encoder in mmsafe does not produce (audio, video, a third encoder), with
    features cached by any means. Same optimiser, loss and batch order as :func:`adapt`.

    Args:
        head: an :class:`IISANHead`, :class:`IISANVersaHead` or :class:`MOMEFHead` (trained in
            place, on the device of its parameters).
        features: ``{modality: [array (N, D_k) per tap]}``, float.
        labels: ``(N,)`` class indices.
        epochs: training epochs.
        batch_size: rows per step.
        lr: AdamW learning rate.
        seed: batch order.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> head = MOMEFHead({"a": [2], "b": [3], "c": [1]}, num_classes=2, width=4)
        >>> feats = {"a": [torch.randn(8, 2)], "b": [torch.randn(8, 3)], "c": [torch.randn(8, 1)]}
        >>> len(train_side_head(head, feats, torch.arange(8) % 2, epochs=2, batch_size=4))
        4
    """
    params = [p for p in head.parameters() if p.requires_grad]
    dev = _device_of(params)
    cols = {
        m: [torch.as_tensor(np.asarray(a), dtype=torch.float32) for a in fs]
        for m, fs in features.items()
    }
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def forward(idx: Tensor) -> Tensor:
        return head({m: [a[idx].to(dev) for a in fs] for m, fs in cols.items()})

    _, losses = _train(
        _cross_entropy(forward, y, dev), params, len(y), epochs=epochs, batch_size=batch_size,
        lr=lr, seed=seed, set_train=head.train,
    )  # fmt: skip
    return losses
