"""What an adaptation run reports, and how its quality is measured."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mmsafe.data.dataset import Dataset
from mmsafe.methods.adapt.layers import _batch_of, preprocess_all
from mmsafe.methods.adapt.options import MODALITIES, RETRIEVAL_KS


@dataclass(frozen=True)
class AdaptReport:
    """What one adaptation run cost and achieved.

    Attributes:
        method: one of :data:`METHODS`.
        epochs: training epochs.
        epoch_seconds: mean wall-clock seconds per training epoch.
        epoch_times: seconds of each epoch.
        peak_memory_mib: peak memory of training above what was in use before (MiB).
        memory_method: how memory was measured (``rss_hwm``, ``cuda_max_allocated``, ...).
        trainable_params: parameters updated by the optimiser.
        total_params: backbone + adaptation parameters.
        accuracy: the objective's quality metric on the evaluation rows. Classification: accuracy
            on the labelled rows. Retrieval: mean recall@1 of image -> text and text -> image
            (``(metrics["i2t_R@1"] + metrics["t2i_R@1"]) / 2``) over every test row. Seqrec:
            test NDCG@10 (full ranking, history excluded).
        losses: training loss of every step.
        cache_seconds: seconds spent computing the cached hidden states (side methods; 0 otherwise
            or when they came from a disk cache).
        tpme: TPME among the methods compared together (``nan`` for a lone run).
        extra: method-specific details (taps, ranks, cache).
        objective: ``classification``, ``retrieval`` or ``seqrec``.
        metrics: every quality number: ``{"accuracy": ...}`` (classification),
            ``{"i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"}`` (retrieval; :data:`RETRIEVAL_KS`) or
            ``{"ndcg@10", "hr@10", "val_ndcg@10", "val_hr@10"}`` (seqrec: test and validation
            under full ranking; :data:`SEQREC_KS`).
        backbone_memory_mib: the resident weights (parameters + buffers) of the backbone the
            method holds: the trained copy (``full``), the frozen towers with their LoRA factors
            (``lora``) or the frozen towers (``adapter`` without its adapters, side methods).
            ``nan`` when not measured.
        peak_memory_with_backbone_mib: ``peak_memory_mib + backbone_memory_mib``: the peak
            counted with the backbone's weights resident. :attr:`peak_memory_mib` leaves them
            out (they are loaded before the measurement starts). Side methods with a cache do not
            need the backbone while training; it is counted anyway (conservative).
    """

    method: str
    epochs: int
    epoch_seconds: float
    epoch_times: tuple[float, ...]
    peak_memory_mib: float
    memory_method: str
    trainable_params: int
    total_params: int
    accuracy: float
    losses: tuple[float, ...]
    cache_seconds: float = 0.0
    tpme: float = math.nan
    extra: Mapping[str, Any] = field(default_factory=dict)
    objective: str = "classification"
    metrics: Mapping[str, float] = field(default_factory=dict)
    backbone_memory_mib: float = math.nan
    peak_memory_with_backbone_mib: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (losses summarised by first and last value)."""
        d = asdict(self)
        d["losses"] = [self.losses[0], self.losses[-1]] if self.losses else []
        for k in ("tpme", "backbone_memory_mib", "peak_memory_with_backbone_mib"):
            d[k] = None if math.isnan(d[k]) else d[k]
        return d


@dataclass
class Adapted:
    """A trained model and its report.

    Attributes:
        module: the classifier or retrieval encoder (call it with ``{modality: batch}`` for
            full/lora/adapter, or with pooled hidden-state features for the side methods; see
            :meth:`predict` and :meth:`embed`).
        report: costs and quality.
        predict_fn: what :meth:`predict` runs.
        embed_fn: what :meth:`embed` runs (retrieval only).
    """

    module: nn.Module
    report: AdaptReport
    predict_fn: Callable[[Dataset], Tensor] | None = None
    embed_fn: Callable[[Dataset], dict[str, Tensor]] | None = None

    def predict(self, data: Dataset) -> Tensor:
        """Logits ``(N, C)`` (classification) or cosine similarities ``(N, N)`` (retrieval)."""
        assert self.predict_fn is not None
        return self.predict_fn(data)

    def embed(self, data: Dataset) -> dict[str, Tensor]:
        """Retrieval: L2-normalised ``{"image": (N, D), "text": (N, D)}`` embeddings of raw rows.

        Raises:
            ValueError: the model was adapted for classification (it has no embeddings).
        """
        if self.embed_fn is None:
            raise ValueError("Only a model adapted with objective='retrieval' has embeddings.")
        return self.embed_fn(data)


def retrieval_metrics(
    image: Tensor, text: Tensor, captions: Sequence[str], ks: Sequence[int] = RETRIEVAL_KS
) -> dict[str, float]:
    """Recall@k both ways, as ``mmsafe audit --task retrieval`` computes it.

    The similarity is ``image @ text.T`` (the audit multiplies it by the logit scale, which does
    not change a ranking); image ``i`` and caption ``j`` match when the captions of rows ``i``
    and ``j`` are equal (:func:`mmsafe.tasks.retrieval.caption_positives`); ranks follow
    :func:`mmsafe.metrics.retrieval_recalls` (stable tie-break).

    Args:
        image: ``(N, D)`` L2-normalised image embeddings.
        text: ``(N, D)`` L2-normalised text embeddings of the same rows.
        captions: the ``N`` captions (duplicates are positives for each other).
        ks: cut-offs.

    Returns:
        ``{"i2t_R@1": ..., ..., "t2i_R@1": ..., ...}``.

    Example:
        >>> e = torch.eye(3)
        >>> retrieval_metrics(e, e[[0, 2, 1]], ["a", "b", "c"], ks=(1,))
        {'i2t_R@1': 0.3333333333333333, 't2i_R@1': 0.3333333333333333}
    """
    from mmsafe.metrics import retrieval_recalls
    from mmsafe.tasks.retrieval import caption_positives

    sim = (image.float() @ text.float().T).double().cpu().numpy()
    return retrieval_recalls(sim, caption_positives([str(c) for c in captions]), ks=tuple(ks))


def zero_shot_retrieval(
    model: Any, data: Dataset, *, device: str = "cpu", ks: Sequence[int] = RETRIEVAL_KS
) -> dict[str, float]:
    """Recall@k of the frozen ``model`` on every row of ``data`` (the baseline before adapting).

    Example:
        >>> from mmsafe.data.worlds.shapes import make_shapes
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
        >>> _ = torch.manual_seed(0)
        >>> model = TinyClip(TinyClipConfig.for_size("xs"))
        >>> sorted(zero_shot_retrieval(model, make_shapes(n=40, seed=0), ks=(1,)))
        ['i2t_R@1', 't2i_R@1']
    """
    dev = torch.device(device)
    model = model.to(dev).eval()
    xs = preprocess_all(model, data)
    parts: dict[str, list[Tensor]] = {m: [] for m in MODALITIES}
    with torch.inference_mode():
        for idx in torch.arange(len(data)).split(256):
            emb = model.encode(_batch_of(xs, idx, dev))
            for m in MODALITIES:
                parts[m].append(emb[m].float().cpu())
    emb = {m: torch.cat(p) for m, p in parts.items()}
    return retrieval_metrics(emb["image"], emb["text"], list(data.modalities["text"]), ks)
