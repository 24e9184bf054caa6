"""The modules full fine-tuning, LoRA and adapters train: heads over an encoder, adapters."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmsafe.methods.adapt.layers import _hidden_list, tower_layers
from mmsafe.methods.adapt.options import MAX_SCALE, MODALITIES


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
