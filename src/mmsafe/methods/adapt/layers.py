"""Tower layers, hidden-state pooling, layer taps and model inputs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mmsafe.data.dataset import Dataset
from mmsafe.methods.adapt.options import MODALITIES, AdaptError

# --------------------------------------------------------------------------- tower layers


def tower_layers(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The blocks of each tower whose outputs are the per-layer hidden states.

    A model names them itself with a ``tower_blocks()`` method (``{modality: [block]}``, the
    blocks whose outputs its ``hidden_states`` returns, in order: lit-mini's MobileNetV2 stages
    and MiniLM layers). Otherwise: tiny-clip (CNN stages, transformer blocks) and Hugging Face
    CLIP / SigLIP (encoder layers).

    Raises:
        AdaptError: the model names no tower blocks and has no known layout (a user error:
            ``mmsafe adapt`` exits 2).

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
        >>> {k: len(v) for k, v in tower_layers(TinyClip(TinyClipConfig.for_size("m"))).items()}
        {'image': 4, 'text': 3}
    """
    declared = getattr(model, "tower_blocks", None)
    if callable(declared):
        return {str(m): list(blocks) for m, blocks in declared().items()}
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "vision_model"):
        return {
            "image": list(inner.vision_model.encoder.layers),
            "text": list(inner.text_model.encoder.layers),
        }
    image, text = getattr(model, "image", None), getattr(model, "text", None)
    if hasattr(image, "stages") and hasattr(text, "layers"):
        return {"image": list(image.stages), "text": list(text.layers)}
    raise AdaptError(
        f"Cannot find the tower blocks of a {type(model).__name__} (it has no tower_blocks() "
        "and no known layout), so adapters and side networks cannot reach its layers."
    )


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the linear and dense convolution layers inside the towers (LoRA targets).

    Grouped (depthwise) convolutions are left out: LoRA's low-rank update of a convolution
    needs ``groups == 1`` (``peft`` refuses a rank not divisible by the groups), and a
    depthwise filter has too few weights per channel to need one.

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
        if (isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1))
        and name.startswith(prefixes)
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
    except AdaptError:
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


def _n_rows(batch: Any) -> int:
    return int((batch if isinstance(batch, Tensor) else next(iter(batch.values()))).shape[0])


def _batch_of(inputs: Mapping[str, Any], idx: Tensor, device: torch.device) -> dict[str, Any]:
    """``{modality: rows idx of inputs[modality] on device}`` for image and text."""
    return {m: _to(_rows(inputs[m], idx), device) for m in MODALITIES}


def _tapped_batch(
    model: Any,
    inputs: Mapping[str, Any],
    idx: Tensor,
    taps: Mapping[str, Sequence[int]],
    device: torch.device,
) -> dict[str, list[Tensor]]:
    """``{modality: tapped_features(rows idx)}`` of every tapped modality."""
    return {m: tapped_features(model, m, _to(_rows(inputs[m], idx), device), taps[m]) for m in taps}
