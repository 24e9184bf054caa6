"""Adapt a dual encoder to a downstream task, and measure what each method costs.

Objectives (``objective=``):

- ``classification``: fusion classification, image + text -> label (cross-entropy); quality is
  test accuracy.
- ``retrieval``: retrieval fine-tuning on (image, caption) pairs with the symmetric InfoNCE
  (CLIP) loss; quality is recall@1 on the test split, image -> text and text -> image, computed
  exactly as the ``performance`` check of ``mmsafe audit --task retrieval`` computes it.

Methods (``method=``):

- ``full``: full fine-tuning of both towers and a linear head over the concatenated embeddings.
- ``lora``: LoRA (via ``peft``) on every linear and convolution layer of both towers; the towers'
  own weights are frozen.
- ``adapter``: Houlsby-style bottleneck adapters (``x + W_up act(W_down x)``, ``W_up`` zero at
  start) after every block of both towers; the towers' own weights are frozen.
- ``iisan``: decoupled side adaptation after IISAN (Fu et al., SIGIR 2024). The backbones are
  frozen and never see a gradient: an image and a text *intra-modal* side network and an
  *inter-modal* side network read the towers' per-layer hidden states (pooled to one vector per
  layer), with LayerDrop taps (one layer per group of layers, so towers of different depths are
  aligned as IISAN-Versa does) and learnable gates ``sigmoid(w / 0.1)``. Because the backbones
  are frozen and inputs are not augmented, the hidden states are computed **once** and cached
  (in memory, or as memory-mapped ``.npy`` files under a cache directory); training then never
  runs a backbone.
- ``iisan-versa``: IISAN for asymmetric towers after IISAN-Versa (Fu et al., TKDE,
  arXiv 2411.02992): group layer-dropping with an explicit number of groups per tower
  (:func:`group_taps`), per-block projections of both towers to the side width, and, when the
  towers get different numbers of taps, the surplus blocks of the longer tower run first,
  intra-modally only (:class:`IISANVersaHead`). Same cache and training as ``iisan``.
- ``momef``: per-modality side networks fused by a mixture of modality experts, after CROSSAN's
  MOMEF (Fu et al., arXiv 2504.10307). **A reconstruction**: the paper's fusion formula is not
  pinned down (:class:`MOMEFHead`). It takes any number of modalities; :func:`adapt` feeds it
  image and text, :func:`train_side_head` any cached per-modality features. Classification only.

For ``retrieval``, ``full``/``lora``/``adapter`` train the towers (or their LoRA factors or
adapters) with the contrastive loss; ``iisan``/``iisan-versa`` train only the *intra-modal* side
networks plus a projection per modality (:class:`SideRetrievalHead`): the image side network
gives the image embedding, the text side network the text embedding, both from the cached
hidden states. The inter-modal side network fuses the two modalities into one item vector, which
a dual-encoder retrieval objective has no use for, so it is left out (as is MOMEF's fusion).

Every method is trained by the same loop (AdamW, the same batch order for a seed) and reports
training time per epoch, peak training memory (see :func:`mmsafe.methods.efficiency.peak_memory`),
trainable parameters and the objective's quality metric (:attr:`AdaptReport.accuracy`);
:func:`compare_methods` adds TPME across the compared methods. See ``docs/efficiency.md``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmsafe.data.dataset import Dataset
from mmsafe.methods.efficiency import count_parameters, peak_memory, tpme

Method = Literal["full", "lora", "adapter", "iisan", "iisan-versa", "momef"]
METHODS: tuple[str, ...] = ("full", "lora", "adapter", "iisan", "iisan-versa", "momef")
"""The adaptation methods :func:`adapt` implements."""

SIDE_METHODS: tuple[str, ...] = ("iisan", "iisan-versa", "momef")
"""The decoupled methods: frozen backbones, side networks over cached hidden states."""

DEFAULT_LR: dict[str, float] = {
    "full": 3e-4,
    "lora": 2e-3,
    "adapter": 2e-3,
    "iisan": 2e-3,
    "iisan-versa": 2e-3,
    "momef": 2e-3,
}
"""AdamW learning rate per method (when ``lr`` is not given)."""

MODALITIES: tuple[str, str] = ("image", "text")

MAX_SCALE = 100.0  # the largest contrastive temperature, as in CLIP

Objective = Literal["classification", "retrieval"]
OBJECTIVES: tuple[str, ...] = ("classification", "retrieval")
"""The downstream tasks :func:`adapt` trains for."""

RETRIEVAL_METHODS: tuple[str, ...] = ("full", "lora", "adapter", "iisan", "iisan-versa")
"""The methods that support ``objective="retrieval"`` (MOMEF fuses the modalities into one
vector, so it is not a dual encoder)."""

RETRIEVAL_KS: tuple[int, ...] = (1, 5)
"""Recall cut-offs :func:`adapt` reports for ``objective="retrieval"``."""


# --------------------------------------------------------------------------- results


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
            (``(metrics["i2t_R@1"] + metrics["t2i_R@1"]) / 2``) over every test row.
        losses: training loss of every step.
        cache_seconds: seconds spent computing the cached hidden states (side methods; 0 otherwise
            or when they came from a disk cache).
        tpme: TPME among the methods compared together (``nan`` for a lone run).
        extra: method-specific details (taps, ranks, cache).
        objective: ``classification`` or ``retrieval``.
        metrics: every quality number: ``{"accuracy": ...}`` (classification) or
            ``{"i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"}`` (retrieval; :data:`RETRIEVAL_KS`).
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (losses summarised by first and last value)."""
        d = asdict(self)
        d["losses"] = [self.losses[0], self.losses[-1]] if self.losses else []
        d["tpme"] = None if math.isnan(self.tpme) else self.tpme
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


# --------------------------------------------------------------------------- tower layers


def tower_layers(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The blocks of each tower whose outputs are the per-layer hidden states.

    Supports tiny-clip (CNN stages, transformer blocks) and Hugging Face CLIP / SigLIP (encoder
    layers).

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
        >>> {k: len(v) for k, v in tower_layers(TinyClip(TinyClipConfig.for_size("m"))).items()}
        {'image': 4, 'text': 3}
    """
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "vision_model"):
        return {
            "image": list(inner.vision_model.encoder.layers),
            "text": list(inner.text_model.encoder.layers),
        }
    image, text = getattr(model, "image", None), getattr(model, "text", None)
    if hasattr(image, "stages") and hasattr(text, "layers"):
        return {"image": list(image.stages), "text": list(text.layers)}
    raise ValueError(f"Cannot find the tower blocks of a {type(model).__name__}.")


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the linear and convolution layers inside the towers (LoRA targets).

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
        >>> lora_targets(TinyClip(TinyClipConfig.for_size("xs")))[:2]
        ['image.stages.0.0.0', 'image.stages.1.1.0']
    """
    from mmsafe.methods.efficiency import tower_prefixes

    prefixes = tuple(p for ps in tower_prefixes(model).values() for p in ps)
    return [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear | nn.Conv2d) and name.startswith(prefixes)
    ]


# --------------------------------------------------------------------------- pooling, taps


def layerdrop_taps(n_layers: int, n_taps: int) -> list[int]:
    """LayerDrop: tap the last layer of each of ``n_taps`` equal groups of ``n_layers`` layers.

    With 12 layers and 6 taps this is IISAN's default (every other layer); a deeper tower gets
    sparser taps, so two towers of different depths are tapped the same number of times (the
    group layer-dropping of IISAN-Versa).

    Example:
        >>> layerdrop_taps(12, 6)
        [1, 3, 5, 7, 9, 11]
        >>> layerdrop_taps(4, 2), layerdrop_taps(2, 2), layerdrop_taps(3, 3)
        ([1, 3], [0, 1], [0, 1, 2])
    """
    if not 1 <= n_taps <= n_layers:
        raise ValueError(f"Need 1 <= n_taps <= n_layers, got {n_taps} taps of {n_layers} layers.")
    return [math.ceil((k + 1) * n_layers / n_taps) - 1 for k in range(n_taps)]


def group_taps(depths: Mapping[str, int], groups: int | Mapping[str, int]) -> dict[str, list[int]]:
    """Group layer-dropping (IISAN-Versa): the tapped block of each tower.

    Each tower's ``depth`` blocks are split into ``groups`` equal groups (one count for every
    tower, or one per tower) and the **last** block of each group is tapped
    (:func:`layerdrop_taps`). Indices are 0-based block indices, the embedding output excluded:
    block ``i`` is Hugging Face hidden state ``i + 1``. With one count, towers of different
    depths get the same number of taps.

    Example:
        >>> group_taps({"image": 4, "text": 8}, 2)
        {'image': [1, 3], 'text': [3, 7]}
        >>> group_taps({"image": 12, "text": 24}, {"image": 6, "text": 12})["text"][:3]
        [1, 3, 5]
    """
    counts = groups if isinstance(groups, Mapping) else dict.fromkeys(depths, groups)
    missing = set(depths) - set(counts)
    if missing:
        raise ValueError(f"No group count for tower(s) {sorted(missing)}.")
    return {m: layerdrop_taps(d, int(counts[m])) for m, d in depths.items()}


def pool_hidden(modality: str, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """One vector per row from a layer's hidden state.

    CNN maps ``(B, C, H, W)`` are averaged over space; token sequences ``(B, L, D)`` are averaged
    over real tokens for text (``mask``) and read at the first ([CLS]) position for images.

    Example:
        >>> pool_hidden("image", torch.ones(2, 3, 4, 4)).shape
        torch.Size([2, 3])
        >>> x = torch.tensor([[[1.0], [3.0], [100.0]]])
        >>> pool_hidden("text", x, torch.tensor([[1, 1, 0]])).tolist()
        [[2.0]]
    """
    if hidden.ndim == 4:
        return hidden.mean(dim=(2, 3))
    if hidden.ndim != 3:
        raise ValueError(f"Expected a (B, C, H, W) or (B, L, D) hidden state, got {hidden.shape}")
    if modality == "text" and mask is not None:
        m = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return hidden[:, 0]


def _hidden_list(model: Any, modality: str, batch: Any) -> list[Tensor]:
    states = list(model.hidden_states(modality, batch))
    n_blocks = len(tower_layers(model)[modality]) if _has_layers(model) else len(states)
    # Hugging Face prepends the embedding output; tap the blocks only.
    return states[len(states) - n_blocks :]


def _has_layers(model: Any) -> bool:
    try:
        tower_layers(model)
    except ValueError:
        return False
    return True


def tapped_features(model: Any, modality: str, batch: Any, taps: Sequence[int]) -> list[Tensor]:
    """Pooled hidden states ``[(B, D_k)]`` of the tapped layers, without gradient (float32)."""
    with torch.no_grad():
        states = _hidden_list(model, modality, batch)
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        return [pool_hidden(modality, states[t], mask).float() for t in taps]


# --------------------------------------------------------------------------- inputs


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    return {k: v.to(device) for k, v in batch.items()}


def _rows(batch: Any, idx: Tensor) -> Any:
    if isinstance(batch, Tensor):
        return batch[idx]
    return {k: v[idx] for k, v in batch.items()}


def labelled_rows(data: Dataset) -> Dataset:
    """The rows with a label ``>= 0``."""
    keep = np.flatnonzero(np.asarray(data.labels) >= 0)
    return data.subset(keep)


def preprocess_all(model: Any, data: Dataset) -> dict[str, Any]:
    """``{modality: preprocessed batch of every row}`` (CPU)."""
    return {m: model.preprocess(m, list(data.modalities[m])) for m in MODALITIES}


# --------------------------------------------------------------------------- IISAN modules


class SANB(nn.Module):
    """Side-adapter block: ``x + W_up act(W_down x)``, weights ``N(0, 0.01^2)``, biases 0."""

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, std=0.01)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return x + self.up(F.relu(self.down(x)))


class Gate(nn.Module):
    """A learnable scalar gate ``sigmoid(w / 0.1)``, ``w = 0`` at start (gate 0.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self) -> Tensor:  # noqa: D102
        return torch.sigmoid(self.w / 0.1)


def tap_projections(dims: Mapping[str, Sequence[int]], width: int) -> nn.ModuleDict:
    """``{modality: [LayerNorm(D_k) + Linear(D_k -> width)]}``, one map per tapped block."""
    return nn.ModuleDict(
        {
            m: nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, width)) for d in ds)
            for m, ds in dims.items()
        }
    )


def side_blocks(
    lengths: Mapping[str, int], width: int, bottleneck: int
) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """``(SANBs, gates)``: ``lengths[k]`` of each per side network ``k``."""
    sanb = nn.ModuleDict(
        {k: nn.ModuleList(SANB(width, bottleneck) for _ in range(n)) for k, n in lengths.items()}
    )
    gates = nn.ModuleDict({k: nn.ModuleList(Gate() for _ in range(n)) for k, n in lengths.items()})
    return sanb, gates


def intra_modal(
    proj: nn.ModuleList, sanb: nn.ModuleList, gates: nn.ModuleList, feats: Sequence[Tensor]
) -> Tensor:
    """IISAN's intra-modal recurrence ``h = SANB_k(g_k * P_k(X_k) + (1 - g_k) * h)``, ``h_0 = 0``.

    Example:
        >>> p, (s, g) = tap_projections({"x": [3, 5]}, 4)["x"], side_blocks({"x": 2}, 4, 2)
        >>> intra_modal(p, s["x"], g["x"], [torch.ones(2, 3), torch.ones(2, 5)]).shape
        torch.Size([2, 4])
    """
    h: Tensor | None = None
    for pk, sk, gk, f in zip(proj, sanb, gates, feats, strict=True):
        g, x = gk(), pk(f)
        h = sk(g * x if h is None else g * x + (1 - g) * h)
    assert h is not None
    return h


class IISANHead(nn.Module):
    """Intra-modal (image, text) and inter-modal side networks over tapped hidden states.

    For tap ``k`` with projected hidden states ``I_k`` and ``T_k`` (a LayerNorm + linear map
    per tap aligns the towers' widths)::

        h_I = SANB_I[k](g_I[k] * I_k + (1 - g_I[k]) * h_I)
        h_T = SANB_T[k](g_T[k] * T_k + (1 - g_T[k]) * h_T)
        h_M = SANB_M[k](h_M + g_M[k] * I_k + (1 - g_M[k]) * T_k)

    starting from zeros; the logits are ``Linear([h_I; h_T; h_M])``.

    Args:
        dims: ``{"image": [D_k], "text": [D_k]}`` widths of the tapped hidden states.
        num_classes: classes.
        width: side-network width.
        bottleneck: SANB bottleneck.

    Example:
        >>> head = IISANHead({"image": [8, 16], "text": [4, 4]}, num_classes=3, width=8)
        >>> image = [torch.zeros(2, 8), torch.zeros(2, 16)]
        >>> head({"image": image, "text": [torch.zeros(2, 4)] * 2}).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        dims: Mapping[str, Sequence[int]],
        num_classes: int,
        width: int = 64,
        bottleneck: int = 32,
    ) -> None:
        super().__init__()
        self._check_taps(dims)
        lengths = {
            "I": len(dims["image"]),
            "T": len(dims["text"]),
            "M": min(len(dims["image"]), len(dims["text"])),
        }
        self.proj = tap_projections(dims, width)
        self.sanb, self.gates = side_blocks(lengths, width, bottleneck)
        self.norm = nn.LayerNorm(3 * width)
        self.classifier = nn.Linear(3 * width, num_classes)
        self.width = width

    @staticmethod
    def _check_taps(dims: Mapping[str, Sequence[int]]) -> None:
        if len(dims["image"]) != len(dims["text"]):
            raise ValueError("Both towers need the same number of taps.")

    def forward(self, feats: Mapping[str, Sequence[Tensor]]) -> Tensor:  # noqa: D102
        b = feats["image"][0].shape[0]
        h_i = h_t = h_m = feats["image"][0].new_zeros(b, self.width)
        for k in range(len(self.proj["image"])):
            x_i = self.proj["image"][k](feats["image"][k])
            x_t = self.proj["text"][k](feats["text"][k])
            g_i, g_t, g_m = (self.gates[s][k]() for s in ("I", "T", "M"))
            h_i = self.sanb["I"][k](g_i * x_i + (1 - g_i) * h_i)
            h_t = self.sanb["T"][k](g_t * x_t + (1 - g_t) * h_t)
            h_m = self.sanb["M"][k](h_m + g_m * x_i + (1 - g_m) * x_t)
        return self.classifier(self.norm(torch.cat([h_i, h_t, h_m], dim=-1)))


class IISANVersaHead(IISANHead):
    """IISAN's side networks for asymmetric towers (IISAN-Versa).

    The towers may be tapped a different number of times (``n_I != n_T``). Every tap is
    projected to the side width by its own per-block LayerNorm + linear map, whatever the
    tower's width at that block, so the inter-modal network can add the two towers. The
    ``|n_I - n_T|`` surplus taps of the longer tower run first through its intra-modal network
    only; the last ``min(n_I, n_T)`` taps of both then advance in lockstep with inter-modal
    fusion, exactly as in :class:`IISANHead` (to which this reduces, parameter for parameter,
    when ``n_I == n_T``).

    Differences from the paper's draft code: there, intra-modal blocks keep each encoder's
    native width and only the wider modality is projected (``Linear(d_large -> d_small)``)
    inside the inter-modal network. Here both are projected to ``width``, which also covers CNN
    towers whose width changes from block to block (tiny-clip).

    Args:
        dims: ``{"image": [D_k], "text": [D_k]}``; the lists may differ in length.
        num_classes: classes.
        width: side-network width.
        bottleneck: SANB bottleneck.

    Example:
        >>> head = IISANVersaHead({"image": [8, 8], "text": [4, 4, 4, 4]}, 3, width=8)
        >>> [len(head.sanb[s]) for s in ("I", "T", "M")]
        [2, 4, 2]
        >>> head({"image": [torch.zeros(2, 8)] * 2, "text": [torch.zeros(2, 4)] * 4}).shape
        torch.Size([2, 3])
    """

    @staticmethod
    def _check_taps(dims: Mapping[str, Sequence[int]]) -> None:
        if set(dims) != set(MODALITIES) or not all(dims.values()):
            raise ValueError("IISAN-Versa needs at least one tap of each of image and text.")

    def forward(self, feats: Mapping[str, Sequence[Tensor]]) -> Tensor:  # noqa: D102
        x = {m: [p(f) for p, f in zip(self.proj[m], feats[m], strict=True)] for m in MODALITIES}
        n_i, n_t, n = (len(self.sanb[s]) for s in ("I", "T", "M"))
        h_i = h_t = h_m = x["image"][0].new_zeros(x["image"][0].shape[0], self.width)
        for k in range(n_i - n):  # surplus image taps: intra-modal only
            g = self.gates["I"][k]()
            h_i = self.sanb["I"][k](g * x["image"][k] + (1 - g) * h_i)
        for k in range(n_t - n):  # surplus text taps: intra-modal only
            g = self.gates["T"][k]()
            h_t = self.sanb["T"][k](g * x["text"][k] + (1 - g) * h_t)
        for j in range(n):  # lockstep, with inter-modal fusion
            ki, kt = n_i - n + j, n_t - n + j
            g_i, g_t, g_m = self.gates["I"][ki](), self.gates["T"][kt](), self.gates["M"][j]()
            h_i = self.sanb["I"][ki](g_i * x["image"][ki] + (1 - g_i) * h_i)
            h_t = self.sanb["T"][kt](g_t * x["text"][kt] + (1 - g_t) * h_t)
            h_m = self.sanb["M"][j](h_m + g_m * x["image"][ki] + (1 - g_m) * x["text"][kt])
        return self.classifier(self.norm(torch.cat([h_i, h_t, h_m], dim=-1)))


class MOMEFHead(nn.Module):
    r"""Per-modality side networks fused by a mixture of modality experts (**a reconstruction**).

    CROSSAN (Fu et al., arXiv 2504.10307) adapts more than two frozen encoders, each through its
    own decoupled side network, and fuses them with a *Mixture of Modality Expert Fusion*
    (MOMEF). The paper's fusion formula is not pinned down and no code is public, so this is a
    reconstruction: a standard soft-gated mixture of experts. For each modality ``m`` with
    tapped hidden states ``X_m[k]`` (each projected to ``width`` by a LayerNorm + linear map)::

        h_m = SANB_m[k](g_m[k] * X_m[k] + (1 - g_m[k]) * h_m)     IISAN's intra-modal network
        w   = softmax(W_g LayerNorm([h_1; ...; h_M]))              gating network, (B, M)
        e   = sum_m w_m * E_m(h_m)                                 E_m: expert MLP per modality
        logits = Linear(LayerNorm(e))

    ``W_g`` starts at zero, so every modality starts with weight ``1 / M``. CROSSAN's
    cross-modal interaction between the side stacks is not reconstructed; modalities meet only
    in the fusion.

    Args:
        dims: ``{modality: [D_k]}``: any number of modalities, each with any number of taps.
        num_classes: classes.
        width: side-network and expert width.
        bottleneck: SANB bottleneck.

    Example:
        >>> head = MOMEFHead({"image": [8], "text": [4, 4], "audio": [6]}, 3, width=8)
        >>> feats = {"image": [torch.ones(2, 8)], "text": [torch.ones(2, 4)] * 2,
        ...          "audio": [torch.ones(2, 6)]}
        >>> head(feats).shape, [round(w, 4) for w in head.gate_weights(feats)[0].tolist()]
        (torch.Size([2, 3]), [0.3333, 0.3333, 0.3333])
    """

    def __init__(
        self,
        dims: Mapping[str, Sequence[int]],
        num_classes: int,
        width: int = 64,
        bottleneck: int = 32,
    ) -> None:
        super().__init__()
        if not dims or not all(dims.values()):
            raise ValueError("MOMEF needs at least one modality with at least one tap.")
        self.modalities: tuple[str, ...] = tuple(dims)
        self.proj = tap_projections(dims, width)
        self.sanb, self.gates = side_blocks(
            {m: len(ds) for m, ds in dims.items()}, width, bottleneck
        )
        self.experts = nn.ModuleDict(
            {
                m: nn.Sequential(
                    nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)
                )
                for m in dims
            }
        )
        n = len(self.modalities)
        self.router = nn.Sequential(nn.LayerNorm(n * width), nn.Linear(n * width, n))
        nn.init.zeros_(self.router[1].weight)
        nn.init.zeros_(self.router[1].bias)
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_classes)
        self.width = width

    def side_states(self, feats: Mapping[str, Sequence[Tensor]]) -> dict[str, Tensor]:
        """``{modality: (B, width)}``: the output of each modality's side network."""
        return {
            m: intra_modal(self.proj[m], self.sanb[m], self.gates[m], feats[m])
            for m in self.modalities
        }

    def _weights(self, states: Mapping[str, Tensor]) -> Tensor:
        return torch.softmax(self.router(torch.cat([states[m] for m in self.modalities], -1)), -1)

    def gate_weights(self, feats: Mapping[str, Sequence[Tensor]]) -> Tensor:
        """``(B, M)`` expert weights (rows sum to 1), columns in :attr:`modalities` order."""
        return self._weights(self.side_states(feats))

    def forward(self, feats: Mapping[str, Sequence[Tensor]]) -> Tensor:  # noqa: D102
        states = self.side_states(feats)
        w = self._weights(states)
        experts = torch.stack([self.experts[m](states[m]) for m in self.modalities], dim=1)
        return self.classifier(self.norm((w.unsqueeze(-1) * experts).sum(dim=1)))


class SideRetrievalHead(nn.Module):
    """Intra-modal side networks + a projection per modality: one embedding per modality.

    The retrieval form of :class:`IISANHead` / :class:`IISANVersaHead`. For each modality ``m``
    with tapped hidden states ``X_m[k]`` (each projected to ``width`` by a LayerNorm + linear
    map), IISAN's intra-modal recurrence from ``h_m = 0``::

        h_m = SANB_m[k](g_m[k] * X_m[k] + (1 - g_m[k]) * h_m)
        e_m = normalize(P_m(LayerNorm(h_m)))                    P_m: Linear(width -> embed_dim)

    The image side network gives the image embedding, the text side network the text
    embedding; there is no inter-modal side network (a dual-encoder retrieval objective scores
    ``<e_image, e_text>`` and has no fused vector to feed it). Each modality may have its own
    number of taps (the group layer-dropping of IISAN-Versa). A learnable temperature
    ``scale = exp(log_scale)`` (at most 100) multiplies the similarities in the loss.

    Args:
        dims: ``{modality: [D_k]}`` widths of the tapped hidden states.
        embed_dim: output embedding width.
        width: side-network width.
        bottleneck: SANB bottleneck.
        logit_scale: initial temperature.

    Example:
        >>> head = SideRetrievalHead({"image": [8, 16], "text": [4]}, embed_dim=5, width=8)
        >>> out = head({"image": [torch.ones(2, 8), torch.ones(2, 16)], "text": [torch.ones(2, 4)]})
        >>> {m: tuple(e.shape) for m, e in out.items()}, round(float(out["text"][0].norm()), 4)
        ({'image': (2, 5), 'text': (2, 5)}, 1.0)
    """

    def __init__(
        self,
        dims: Mapping[str, Sequence[int]],
        embed_dim: int,
        width: int = 64,
        bottleneck: int = 32,
        logit_scale: float = 1 / 0.07,
    ) -> None:
        super().__init__()
        if not dims or not all(dims.values()):
            raise ValueError("SideRetrievalHead needs at least one tap of every modality.")
        self.modalities: tuple[str, ...] = tuple(dims)
        self.proj = tap_projections(dims, width)
        self.sanb, self.gates = side_blocks(
            {m: len(ds) for m, ds in dims.items()}, width, bottleneck
        )
        self.out = nn.ModuleDict(
            {m: nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim)) for m in dims}
        )
        self.log_scale = nn.Parameter(torch.tensor(math.log(min(logit_scale, MAX_SCALE))))
        self.width = width

    def scale(self) -> Tensor:
        """The temperature ``exp(log_scale)``, clamped to at most 100."""
        return self.log_scale.exp().clamp(max=MAX_SCALE)

    def forward(self, feats: Mapping[str, Sequence[Tensor]]) -> dict[str, Tensor]:
        """``{modality: (B, embed_dim)}`` L2-normalised embeddings of the modalities given."""
        return {
            m: F.normalize(
                self.out[m](intra_modal(self.proj[m], self.sanb[m], self.gates[m], fs)), dim=-1
            )
            for m, fs in feats.items()
        }


class FeatureCache:
    """Pooled tapped hidden states of every row, computed once; in memory or memory-mapped.

    Args:
        model: the frozen encoder.
        inputs: ``{modality: preprocessed batch of every row}``.
        taps: ``{modality: tapped block indices}``.
        cache_dir: a folder for ``.npy`` files (opened with ``mmap_mode="r"``); ``None`` keeps
            the features in memory.
        key: a name for this (model, data, taps) combination under ``cache_dir``.
        batch_size: rows per backbone forward pass.
        device: where the backbone runs.

    Attributes:
        seconds: time spent running the backbones (0 when the files already existed).
        features: ``{modality: [array (N, D_k)]}`` (``np.memmap`` with a cache folder).
    """

    def __init__(
        self,
        model: Any,
        inputs: Mapping[str, Any],
        taps: Mapping[str, Sequence[int]],
        *,
        cache_dir: str | Path | None = None,
        key: str = "features",
        batch_size: int = 256,
        device: torch.device | None = None,
    ) -> None:
        self.seconds = 0.0
        folder = None if cache_dir is None else Path(cache_dir) / "iisan" / key
        names = {m: [f"{m}-{t}.npy" for t in taps[m]] for m in taps}
        if folder is not None and all((folder / f).is_file() for fs in names.values() for f in fs):
            self.features = {
                m: [np.load(folder / f, mmap_mode="r") for f in fs] for m, fs in names.items()
            }
            return
        start = time.perf_counter()
        dev = device or torch.device("cpu")
        computed: dict[str, list[np.ndarray]] = {}
        for m, t in taps.items():
            n = _n_rows(inputs[m])
            parts: list[list[Tensor]] = []
            for lo in range(0, n, batch_size):
                idx = torch.arange(lo, min(n, lo + batch_size))
                parts.append(tapped_features(model, m, _to(_rows(inputs[m], idx), dev), t))
            computed[m] = [torch.cat([p[k] for p in parts]).cpu().numpy() for k in range(len(t))]
        self.seconds = time.perf_counter() - start
        if folder is None:
            self.features = computed
            return
        folder.mkdir(parents=True, exist_ok=True)
        for m, fs in names.items():
            for f, arr in zip(fs, computed[m], strict=True):
                tmp = folder / f"{f}.tmp.npy"
                np.save(tmp, arr)
                tmp.replace(folder / f)
        self.features = {
            m: [np.load(folder / f, mmap_mode="r") for f in fs] for m, fs in names.items()
        }

    def batch(self, idx: Tensor, device: torch.device) -> dict[str, list[Tensor]]:
        """Features of rows ``idx`` as tensors on ``device``."""
        rows = idx.cpu().numpy()
        return {
            m: [torch.from_numpy(np.ascontiguousarray(a[rows])).to(device) for a in arrs]
            for m, arrs in self.features.items()
        }


def _n_rows(batch: Any) -> int:
    return int((batch if isinstance(batch, Tensor) else next(iter(batch.values()))).shape[0])


# --------------------------------------------------------------------------- other modules


class EncoderClassifier(nn.Module):
    """A linear head over the concatenated, L2-normalised embeddings of an encoder (scaled)."""

    def __init__(self, encoder: Any, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.scale = math.sqrt(float(encoder.embed_dim))
        self.head = nn.Linear(2 * int(encoder.embed_dim), num_classes)

    def forward(self, inputs: Mapping[str, Any]) -> Tensor:  # noqa: D102
        emb = self.encoder.encode({m: inputs[m] for m in MODALITIES})
        return self.head(torch.cat([emb[m] for m in MODALITIES], dim=-1) * self.scale)


class RetrievalEncoder(nn.Module):
    """An encoder's normalised embeddings and a learnable temperature (retrieval fine-tuning)."""

    def __init__(self, encoder: Any, logit_scale: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.log_scale = nn.Parameter(torch.tensor(math.log(min(logit_scale, MAX_SCALE))))

    def scale(self) -> Tensor:
        """The temperature ``exp(log_scale)``, clamped to at most 100."""
        return self.log_scale.exp().clamp(max=MAX_SCALE)

    def forward(self, inputs: Mapping[str, Any]) -> dict[str, Tensor]:  # noqa: D102
        return self.encoder.encode(dict(inputs))


class BottleneckAdapter(nn.Module):
    """Houlsby adapter ``x + W_up GELU(W_down x)`` over the channel (last, or dim 1 of a map)."""

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if x.ndim == 4:  # (B, C, H, W)
            y = x.permute(0, 2, 3, 1)
            return x + self.up(F.gelu(self.down(y))).permute(0, 3, 1, 2)
        return x + self.up(F.gelu(self.down(x)))


def _width_of(output: Any) -> int:
    x = output[0] if isinstance(output, tuple) else output
    return int(x.shape[1] if x.ndim == 4 else x.shape[-1])


def add_adapters(encoder: Any, bottleneck: int, probe: Mapping[str, Any]) -> nn.ModuleList:
    """Insert a bottleneck adapter after every tower block (forward hooks); returns them."""
    adapters = nn.ModuleList()
    for m, layers in tower_layers(encoder).items():
        states = _hidden_list(encoder, m, probe[m])
        for layer, state in zip(layers, states, strict=True):
            adapter = BottleneckAdapter(_width_of(state), bottleneck).to(state.device)
            adapters.append(adapter)

            def hook(_mod: nn.Module, _args: Any, out: Any, a: nn.Module = adapter) -> Any:
                if isinstance(out, tuple):
                    return (a(out[0]), *out[1:])
                return a(out)

            layer.register_forward_hook(hook)
    return adapters


# --------------------------------------------------------------------------- training loop


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


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


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
            emb = model.encode({m: _to(_rows(xs[m], idx), dev) for m in MODALITIES})
            for m in MODALITIES:
                parts[m].append(emb[m].float().cpu())
    emb = {m: torch.cat(p) for m, p in parts.items()}
    return retrieval_metrics(emb["image"], emb["text"], list(data.modalities["text"]), ks)


def _quality(metrics: Mapping[str, float], objective: str) -> float:
    if objective == "classification":
        return metrics["accuracy"]
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
) -> Adapted:
    """Adapt ``model`` to ``objective`` on ``train`` and evaluate on ``test``.

    ``model`` itself is never modified: ``full``, ``lora`` and ``adapter`` train a deep copy;
    ``iisan``, ``iisan-versa`` and ``momef`` only read the model's hidden states without
    gradient, in eval mode.

    Args:
        model: an :class:`~mmsafe.models.base.EncoderModel` with image and text towers that
            expose ``hidden_states`` (tiny-clip, Hugging Face CLIP).
        train: rows to train on. Classification drops rows labelled ``-1``; retrieval uses
            every (image, caption) pair (it needs no label).
        test: rows to evaluate, filtered the same way. Retrieval ranks every test caption for
            every test image and the reverse, as ``mmsafe audit --task retrieval`` does.
        method: one of :data:`METHODS` (:data:`RETRIEVAL_METHODS` for retrieval).
        objective: ``classification`` (fusion classification, cross-entropy; quality: accuracy)
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
        groups: ``iisan-versa`` and ``momef``: the group layer-dropping count, one for every
            tower or ``{"image": G_I, "text": G_T}`` (:func:`group_taps`); ``None`` uses
            ``min(max_taps, depth of each tower)`` as ``iisan`` does. Other methods ignore it
            (as they ignore ``lora_r``), so :func:`compare_methods` can pass it to all.
        threads: torch intra-op threads while adapting (restored afterwards); ``None`` leaves
            torch's setting. One by default: these small models gain little from more, and on a
            busy CPU an oversubscribed thread pool made the same epoch 5-20x slower (measured).

    Returns:
        The trained classifier (classification) or retrieval encoder (retrieval: see
        :meth:`Adapted.embed`) and its :class:`AdaptReport`.

    Raises:
        ValueError: an unknown method or objective, ``momef`` with retrieval, or no rows.
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
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"Need epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}.")
    with _threads(threads):
        return _adapt(
            model, train, test, method, objective=objective, epochs=epochs,
            batch_size=batch_size, lr=lr, seed=seed, device=device, cache=cache,
            cache_dir=cache_dir, lora_r=lora_r, adapter_bottleneck=adapter_bottleneck,
            side_width=side_width, side_bottleneck=side_bottleneck, max_taps=max_taps,
            groups=groups,
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
) -> Adapted:
    task = _Task.of(objective, train, test)
    lr = DEFAULT_LR[method] if lr is None else lr
    dev = torch.device(device)
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
        encoder = copy.deepcopy(model).to(dev)
        extra: dict[str, Any] = {}
        adapters = None
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            targets = lora_targets(encoder)
            cfg = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=targets)
            encoder = get_peft_model(encoder, cfg).base_model.model
            extra = {"lora_r": lora_r, "targets": len(targets)}
        elif method == "adapter":
            for p in encoder.parameters():
                p.requires_grad_(False)
            probe = {m: _to(_rows(inputs[m], torch.arange(2)), dev) for m in MODALITIES}
            adapters = add_adapters(encoder, adapter_bottleneck, probe)
            extra = {"bottleneck": adapter_bottleneck, "adapters": len(adapters)}
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
        return clf({m: _to(_rows(inputs[m], idx), dev) for m in MODALITIES})

    if isinstance(clf, RetrievalEncoder):
        loss_of = _clip_loss(forward, clf.scale, task.captions(task.train))
    else:
        assert task.y_train is not None
        loss_of = _cross_entropy(forward, task.y_train, dev)
    (times, losses), peak = peak_memory(
        lambda: _train(
            loss_of, params, len(task.train), epochs=epochs, batch_size=batch_size, lr=lr,
            seed=seed, set_train=set_train,
        ),
        dev,
    )  # fmt: skip

    def outputs_of(xs: Mapping[str, Any]) -> Any:
        """Logits ``(N, C)`` (classification) or ``{modality: (N, D)}`` (retrieval), CPU."""
        clf.eval()
        with torch.inference_mode():
            parts = [
                clf({m: _to(_rows(xs[m], idx), dev) for m in MODALITIES})
                for idx in torch.arange(_n_rows(xs["image"])).split(256)
            ]
        if task.retrieval:
            return {m: torch.cat([p[m].float().cpu() for p in parts]) for m in MODALITIES}
        return torch.cat([p.cpu() for p in parts])

    counts = count_parameters(clf)
    report = _report(
        method, task, times, losses, peak, counts.trainable, counts.total,
        task.metrics(outputs_of(test_inputs)), extra=extra,
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


def _side_head(
    method: str, dims: Mapping[str, Sequence[int]], num_classes: int, width: int, bottleneck: int
) -> IISANHead | MOMEFHead:
    if method == "iisan":
        return IISANHead(dims, num_classes, width=width, bottleneck=bottleneck)
    if method == "iisan-versa":
        return IISANVersaHead(dims, num_classes, width=width, bottleneck=bottleneck)
    return MOMEFHead(dims, num_classes, width=width, bottleneck=bottleneck)


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
    probe = {
        m: tapped_features(model, m, _to(_rows(inputs[m], torch.arange(2)), dev), taps[m])
        for m in MODALITIES
    }
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
        return head(
            {m: tapped_features(model, m, _to(_rows(inputs[m], idx), dev), taps[m]) for m in taps}
        )

    if isinstance(head, SideRetrievalHead):
        loss_of = _clip_loss(forward, head.scale, task.captions(task.train))
    else:
        assert task.y_train is not None
        loss_of = _cross_entropy(forward, task.y_train, dev)
    params = list(head.parameters())
    (times, losses), peak = peak_memory(
        lambda: _train(
            loss_of, params, len(task.train), epochs=epochs, batch_size=batch_size, lr=lr,
            seed=seed, set_train=head.train,
        ),
        dev,
    )  # fmt: skip

    def outputs_of(xs: Mapping[str, Any]) -> Any:
        """Logits ``(N, C)`` (classification) or ``{modality: (N, D)}`` (retrieval), CPU."""
        head.eval()
        with torch.inference_mode():
            parts = [
                head(
                    {m: tapped_features(model, m, _to(_rows(xs[m], i), dev), taps[m]) for m in taps}
                )
                for i in torch.arange(_n_rows(xs["image"])).split(256)
            ]
        if task.retrieval:
            return {m: torch.cat([p[m].float().cpu() for p in parts]) for m in MODALITIES}
        return torch.cat(parts).cpu()

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
            w = head.gate_weights(_side_batch(model, test_inputs, taps, dev))
        extra["expert_weights"] = {
            m: round(float(v), 4) for m, v in zip(head.modalities, w.mean(0).tolist(), strict=True)
        }
    if isinstance(head, SideRetrievalHead):
        extra["logit_scale"] = round(float(head.scale().detach()), 4)
    counts = count_parameters(head)
    report = _report(
        method, task, times, losses, peak, counts.trainable, backbone + counts.total, metrics,
        cache_seconds=0.0 if features is None else features.seconds, extra=extra,
    )  # fmt: skip
    return _adapted(head, report, task, lambda data: outputs_of(preprocess_all(model, data)))


def _side_batch(
    model: Any,
    test_inputs: Mapping[str, Any],
    taps: Mapping[str, Sequence[int]],
    dev: torch.device,
) -> dict[str, list[Tensor]]:
    """Tapped features of (at most 256) test rows, for reporting MOMEF's mean expert weights."""
    idx = torch.arange(min(256, _n_rows(test_inputs["image"])))
    return {
        m: tapped_features(model, m, _to(_rows(test_inputs[m], idx), dev), taps[m]) for m in taps
    }


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


# --------------------------------------------------------------------------- comparison


def with_tpme(reports: Sequence[AdaptReport]) -> list[AdaptReport]:
    """The reports with TPME filled in, computed across them (epoch time, params, memory)."""
    scores = tpme(
        [r.epoch_seconds for r in reports],
        [float(r.trainable_params) for r in reports],
        [r.peak_memory_mib for r in reports],
    )
    return [dataclasses.replace(r, tpme=float(s)) for r, s in zip(reports, scores, strict=True)]


def compare_methods(
    model: Any,
    train: Dataset,
    test: Dataset,
    methods: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[AdaptReport]:
    """Run :func:`adapt` for each method (same seed and batch order) and add TPME.

    Args:
        model: the encoder to adapt (not modified).
        train: training rows.
        test: evaluation rows.
        methods: the methods to compare; ``None``: every method of the objective
            (:data:`METHODS`, or :data:`RETRIEVAL_METHODS` for ``objective="retrieval"``).
        **kwargs: passed to :func:`adapt` (``objective``, ``epochs``, ``batch_size``, ...).
    """
    if methods is None:
        methods = RETRIEVAL_METHODS if kwargs.get("objective") == "retrieval" else METHODS
    reports = [adapt(model, train, test, m, **kwargs).report for m in methods]
    return with_tpme(reports)


def _quality_label(reports: Sequence[AdaptReport]) -> str:
    objectives = {r.objective for r in reports}
    if len(objectives) > 1:
        raise ValueError(f"Cannot tabulate reports of different objectives {sorted(objectives)}.")
    return "R@1 (mean i2t, t2i)" if objectives == {"retrieval"} else "accuracy"


def _recall_columns(reports: Sequence[AdaptReport]) -> list[str]:
    if not reports or reports[0].objective != "retrieval":
        return []
    return list(reports[0].metrics)


def comparison_table(reports: Sequence[AdaptReport]) -> dict[str, Any]:
    """A ``table`` plot spec comparing adaptation methods."""
    quality, recalls = _quality_label(reports), _recall_columns(reports)
    return {
        "kind": "table",
        "title": f"Adaptation methods: cost and {quality} (TPME: lower is better)",
        "columns": [
            "method",
            "s / epoch",
            "peak memory (MiB)",
            "trainable params",
            quality,
            *recalls,
            "TPME",
        ],
        "rows": [
            [
                r.method,
                r.epoch_seconds,
                r.peak_memory_mib,
                r.trainable_params,
                r.accuracy,
                *(r.metrics.get(k, math.nan) for k in recalls),
                r.tpme,
            ]
            for r in reports
        ],
    }


def markdown_table(reports: Sequence[AdaptReport]) -> str:
    """The comparison as a Markdown table.

    The quality column is ``accuracy`` (classification) or ``R@1 (mean i2t, t2i)`` followed by
    every recall of :attr:`AdaptReport.metrics` (retrieval).

    Example:
        >>> r = AdaptReport("full", 1, 2.0, (2.0,), 10.0, "rss_hwm", 100, 100, 0.9, (1.0,))
        >>> print(markdown_table([r]).splitlines()[2])
        | full | 2.000 | 10.0 | 100 | 0.900 | - |
    """
    quality, recalls = _quality_label(reports), _recall_columns(reports)
    head = ["s / epoch", "peak memory (MiB)", "trainable params", quality, *recalls, "TPME"]
    lines = [
        "| method | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(head),
    ]
    for r in reports:
        t = "-" if math.isnan(r.tpme) else f"{r.tpme:.3f}"
        rec = "".join(f"{r.metrics.get(k, math.nan):.3f} | " for k in recalls)
        lines.append(
            f"| {r.method} | {r.epoch_seconds:.3f} | {r.peak_memory_mib:.1f} | "
            f"{r.trainable_params} | {r.accuracy:.3f} | {rec}{t} |"
        )
    return "\n".join(lines)


class AdaptError(ValueError):
    """``mmsafe adapt`` cannot run as asked (unknown method, data without splits)."""


def parse_methods(spec: str | Sequence[str], objective: str = "classification") -> list[str]:
    """Methods from a comma-separated string (or a list), validated for ``objective``.

    Example:
        >>> parse_methods("full, iisan")
        ['full', 'iisan']
        >>> parse_methods("iisan,momef", objective="retrieval")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mmsafe.methods.adapt.AdaptError: Method(s) ['momef'] do not support retrieval; ...
    """
    if objective not in OBJECTIVES:
        raise AdaptError(f"Unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}.")
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    methods = [m.strip() for m in items if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise AdaptError(f"Unknown method(s) {bad or methods}; choose from {', '.join(METHODS)}.")
    if objective == "retrieval":
        unsupported = [m for m in methods if m not in RETRIEVAL_METHODS]
        if unsupported:
            raise AdaptError(
                f"Method(s) {unsupported} do not support retrieval; choose from "
                f"{', '.join(RETRIEVAL_METHODS)}."
            )
    return list(dict.fromkeys(methods))


def adapt_command(
    model: str = "tiny-clip",
    data: str = "shapes",
    methods: str | Sequence[str] | None = None,
    *,
    objective: str = "classification",
    epochs: int = 3,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    quick: bool = False,
) -> list[AdaptReport]:
    """What ``mmsafe adapt`` runs: load model and data, compare methods, write the results.

    Trains on the ``train`` split and evaluates on the ``test`` split (its labelled rows for
    classification, every row for retrieval). ``methods=None`` compares every method of the
    objective. The side methods' hidden states are cached (memory-mapped) under
    ``<cache_dir>/iisan/``. With ``out``, writes ``adaptation.json`` and ``adaptation.md`` there.

    Raises:
        AdaptError: an unknown method or objective, a method the objective does not support, or
            data without ``train`` and ``test`` splits.
        DeviceError: the device is not available.
    """
    from mmsafe.data.loading import load_data
    from mmsafe.engine import default_cache_dir, resolve_device
    from mmsafe.engine.cache import atomic_write_text
    from mmsafe.models.loading import load_model

    default = RETRIEVAL_METHODS if objective == "retrieval" else METHODS
    chosen = parse_methods(default if methods is None else methods, objective)
    dev = resolve_device(device)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    ds = load_data(data)
    if not (ds.has_split("train") and ds.has_split("test")):
        raise AdaptError("mmsafe adapt needs data with 'train' and 'test' splits.")
    enc = load_model(
        model, data=ds, quick=quick, seed=seed, device=str(dev), cache_dir=cache, progress=False
    )
    reports = compare_methods(
        enc,
        ds.split("train"),
        ds.split("test"),
        chosen,
        objective=objective,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        device=str(dev),
        cache_dir=cache,
    )
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        doc = {
            "model": model,
            "data": data,
            "objective": objective,
            "device": str(dev),
            "reports": [r.to_dict() for r in reports],
        }
        atomic_write_text(folder / "adaptation.json", json.dumps(doc, indent=2, default=str) + "\n")
        atomic_write_text(folder / "adaptation.md", markdown_table(reports) + "\n")
    return reports


__all__ = [
    "METHODS",
    "OBJECTIVES",
    "RETRIEVAL_KS",
    "RETRIEVAL_METHODS",
    "AdaptError",
    "AdaptReport",
    "Adapted",
    "FeatureCache",
    "IISANHead",
    "IISANVersaHead",
    "MOMEFHead",
    "SIDE_METHODS",
    "SideRetrievalHead",
    "adapt",
    "adapt_command",
    "compare_methods",
    "comparison_table",
    "group_taps",
    "layerdrop_taps",
    "markdown_table",
    "parse_methods",
    "pool_hidden",
    "retrieval_metrics",
    "tower_layers",
    "train_side_head",
    "with_tpme",
    "zero_shot_retrieval",
]
