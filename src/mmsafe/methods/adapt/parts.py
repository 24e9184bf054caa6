"""Pieces shared by the adaptation loops: tower copies per method, side heads, sizes, keys.

Both :mod:`~mmsafe.methods.adapt.train` and :mod:`~mmsafe.methods.adapt.seqrec` use them.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mmsafe.methods.adapt.layers import _batch_of, lora_targets
from mmsafe.methods.adapt.modules import add_adapters
from mmsafe.methods.adapt.side import CROSSANHead, IISANHead, IISANVersaHead, MOMEFHead


def weights_mib(module: nn.Module) -> float:
    """MiB of a module's parameters and buffers: its resident weights.

    Example:
        >>> weights_mib(nn.Linear(1024, 256, bias=False))  # 2**18 float32 weights
        1.0
    """
    n = sum(p.numel() * p.element_size() for p in module.parameters())
    n += sum(b.numel() * b.element_size() for b in module.buffers())
    return n / 2**20


def cache_key(*parts: Any) -> str:
    """A short hash of JSON-able parts (cache and report keys)."""
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def tower_module(
    model: Any,
    method: str,
    inputs: Mapping[str, Any],
    dev: torch.device,
    *,
    lora_r: int,
    bottleneck: int,
) -> tuple[Any, nn.ModuleList | None, dict[str, Any]]:
    """``(encoder, adapters, extra)``: a copy of ``model`` for ``full``, ``lora`` or ``adapter``.

    LoRA factors live inside the returned encoder; adapters are returned apart (hooked into the
    encoder's blocks, but not its submodules: register them on the module that trains).
    """
    encoder = copy.deepcopy(model).to(dev)
    extra: dict[str, Any] = {}
    adapters = None
    if method == "full":  # a model may lock its towers (lit-mini): full fine-tuning unlocks them
        encoder.requires_grad_(True)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(encoder)
        cfg = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=targets)
        encoder = get_peft_model(encoder, cfg).base_model.model
        extra = {"lora_r": lora_r, "targets": len(targets)}
    elif method == "adapter":
        for p in encoder.parameters():
            p.requires_grad_(False)
        probe = _batch_of(inputs, torch.arange(2), dev)
        adapters = add_adapters(encoder, bottleneck, probe)
        extra = {"bottleneck": bottleneck, "adapters": len(adapters)}
    return encoder, adapters, extra


def side_head(
    method: str, dims: Mapping[str, Sequence[int]], num_classes: int, width: int, bottleneck: int
) -> IISANHead | MOMEFHead | CROSSANHead:
    """The side head of an IISAN-family method."""
    if method == "crossan":
        return CROSSANHead(dims, num_classes, width=width, bottleneck=bottleneck)
    if method == "iisan":
        return IISANHead(dims, num_classes, width=width, bottleneck=bottleneck)
    if method == "iisan-versa":
        return IISANVersaHead(dims, num_classes, width=width, bottleneck=bottleneck)
    return MOMEFHead(dims, num_classes, width=width, bottleneck=bottleneck)
