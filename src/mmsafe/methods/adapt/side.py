"""Decoupled side networks (IISAN, IISAN-Versa, MOMEF, CROSSAN) and the cache of their inputs."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmsafe.methods.adapt.layers import _n_rows, _rows, _to, tapped_features
from mmsafe.methods.adapt.options import MAX_SCALE, MODALITIES


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
    return gated_recurrence(sanb, gates, [pk(f) for pk, f in zip(proj, feats, strict=True)])


def gated_recurrence(sanb: nn.ModuleList, gates: nn.ModuleList, xs: Sequence[Tensor]) -> Tensor:
    """``h = SANB_k(g_k * x_k + (1 - g_k) * h)`` over already projected taps ``xs``, ``h_0 = 0``.

    Example:
        >>> s, g = side_blocks({"x": 3}, 4, 2)
        >>> gated_recurrence(s["x"], g["x"], [torch.ones(2, 4)] * 3).shape
        torch.Size([2, 4])
    """
    h: Tensor | None = None
    for sk, gk, x in zip(sanb, gates, xs, strict=True):
        g = gk()
        h = sk(g * x if h is None else g * x + (1 - g) * h)
    assert h is not None
    return h


def cross_modal(sanb: Sequence[nn.Module], mix: Tensor, xs: Sequence[Sequence[Tensor]]) -> Tensor:
    """CROSSAN's cross-modal side network over ``M`` towers (reconstruction).

    ``h = SANB_k(h + sum_m a_km * X_m[k])`` from ``h = 0``, with ``a_k = softmax(mix[k])`` a
    learnable mixture of the towers at tap ``k``. With two towers this is IISAN's inter-modal
    network (``a_k = (g, 1 - g)``). ``xs[m]`` are tower ``m``'s projected taps, aligned on
    their last ``len(sanb)`` taps.

    Args:
        sanb: one SANB per aligned tap.
        mix: ``(len(sanb), M)`` mixture logits.
        xs: ``M`` lists of ``(B, width)`` projected taps.

    Example:
        >>> blocks = [SANB(4, 2), SANB(4, 2)]
        >>> xs = [[torch.ones(3, 4)] * 2, [torch.zeros(3, 4)] * 3, [torch.ones(3, 4)] * 2]
        >>> cross_modal(blocks, torch.zeros(2, 3), xs).shape
        torch.Size([3, 4])
    """
    n = len(sanb)
    aligned = [list(x)[len(x) - n :] for x in xs]
    weights = torch.softmax(mix, dim=-1)
    h: Tensor | None = None
    for k, block in enumerate(sanb):
        mixed = sum(weights[k, m] * aligned[m][k] for m in range(len(aligned)))
        assert isinstance(mixed, Tensor)
        h = block(mixed if h is None else h + mixed)
    assert h is not None
    return h


def _expert(width: int) -> nn.Module:
    return nn.Sequential(
        nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)
    )


def expert_mixture(
    states: Sequence[Tensor], experts: Sequence[nn.Module], router: nn.Module
) -> tuple[Tensor, Tensor]:
    """MOMEF's fusion: ``(sum_e w_e * E_e(h_e), w)`` with ``w = softmax(router([h_1; ...]))``.

    Example:
        >>> router = nn.Linear(8, 2)
        >>> nn.init.zeros_(router.weight); nn.init.zeros_(router.bias)  # doctest: +ELLIPSIS
        Parameter...
        >>> fused, w = expert_mixture([torch.ones(1, 4), -torch.ones(1, 4)],
        ...                           [nn.Identity(), nn.Identity()], router)
        >>> fused.tolist(), w.tolist()
        ([[0.0, 0.0, 0.0, 0.0]], [[0.5, 0.5]])
    """
    w = torch.softmax(router(torch.cat(list(states), dim=-1)), dim=-1)
    out = torch.stack([e(h) for e, h in zip(experts, states, strict=True)], dim=1)
    return (w.unsqueeze(-1) * out).sum(dim=1), w


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
        self.experts = nn.ModuleDict({m: _expert(width) for m in dims})
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

    def _fuse(self, feats: Mapping[str, Sequence[Tensor]]) -> tuple[Tensor, Tensor]:
        states = self.side_states(feats)
        experts = [self.experts[m] for m in self.modalities]
        return expert_mixture([states[m] for m in self.modalities], experts, self.router)

    def gate_weights(self, feats: Mapping[str, Sequence[Tensor]]) -> Tensor:
        """``(B, M)`` expert weights (rows sum to 1), columns in :attr:`modalities` order."""
        return self._fuse(feats)[1]

    def forward(self, feats: Mapping[str, Sequence[Tensor]]) -> Tensor:  # noqa: D102
        return self.classifier(self.norm(self._fuse(feats)[0]))


class CROSSANHead(nn.Module):
    r"""CROSSAN over any number of frozen towers (**a reconstruction**).

    CROSSAN (Fu et al., arXiv 2504.10307) adapts more than two multimodal foundation models at
    once with fully decoupled side adapters, learns across the modalities in a cross-modal side
    network, and fuses with a Mixture of Modality Expert Fusion (MOMEF). No code is public and
    the paper leaves the exact equations open, so this reconstruction extends IISAN's side
    networks from two towers to ``M`` (each tower's taps projected to ``width`` by a LayerNorm +
    linear map: ``X_m[k]``)::

        h_m = SANB_m[k](g_m[k] * X_m[k] + (1 - g_m[k]) * h_m)      one intra side net per tower
        h_X = SANB_X[k](h_X + sum_m a_km X_m[k]), a_k = softmax(A[k])   cross-modal side net
        w   = softmax(W_g LayerNorm([h_1; ...; h_M; h_X]))          MOMEF gate, M + 1 experts
        out = Linear(LayerNorm(sum_e w_e E_e(h_e)))                 E_e: expert MLP

    The cross-modal network runs over the last ``min_m n_m`` taps of every tower (towers of
    different depths aligned as IISAN-Versa aligns two). ``A`` and ``W_g`` start at zero:
    every tower weighs ``1 / M`` in the cross-modal mixture and every expert ``1 / (M + 1)`` in
    the fusion. With two towers the cross-modal network is IISAN's inter-modal one; what
    CROSSAN adds over :class:`MOMEFHead` is that network as an expert of its own.

    Args:
        dims: ``{tower: [D_k]}``: any number of towers (two or more for cross-modal learning),
            each with any number of taps.
        num_classes: outputs (classes, or the item width ``H`` for seqrec).
        width: side-network and expert width.
        bottleneck: SANB bottleneck.

    Example:
        >>> dims = {"image": [8, 8], "text": [4, 4, 4], "image@lit-mini": [6, 6]}
        >>> head = CROSSANHead(dims, 3, width=8)
        >>> feats = {t: [torch.ones(2, d) for d in ds] for t, ds in dims.items()}
        >>> head(feats).shape, len(head.side_networks()), len(head.cross)
        (torch.Size([2, 3]), 3, 2)
        >>> [round(w, 4) for w in head.gate_weights(feats)[0].tolist()]
        [0.25, 0.25, 0.25, 0.25]
    """

    CROSS = "cross-modal"
    """The name of the cross-modal expert in :attr:`experts_order`."""

    def __init__(
        self,
        dims: Mapping[str, Sequence[int]],
        num_classes: int,
        width: int = 64,
        bottleneck: int = 32,
    ) -> None:
        super().__init__()
        if len(dims) < 2 or not all(dims.values()):
            raise ValueError("CROSSAN needs two or more towers, each with at least one tap.")
        if self.CROSS in dims:
            raise ValueError(f"{self.CROSS!r} names CROSSAN's cross-modal expert, not a tower.")
        self.towers: tuple[str, ...] = tuple(dims)
        self.experts_order: tuple[str, ...] = (*self.towers, self.CROSS)
        self.proj = tap_projections(dims, width)
        self.sanb, self.gates = side_blocks(
            {m: len(ds) for m, ds in dims.items()}, width, bottleneck
        )
        n = min(len(ds) for ds in dims.values())
        self.cross = nn.ModuleList(SANB(width, bottleneck) for _ in range(n))
        self.mix = nn.Parameter(torch.zeros(n, len(self.towers)))
        self.experts = nn.ModuleList(_expert(width) for _ in self.experts_order)
        e = len(self.experts_order)
        self.router = nn.Sequential(nn.LayerNorm(e * width), nn.Linear(e * width, e))
        nn.init.zeros_(self.router[1].weight)
        nn.init.zeros_(self.router[1].bias)
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_classes)
        self.width = width

    def side_networks(self) -> dict[str, nn.ModuleList]:
        """``{tower: its intra side network's SANBs}`` (one decoupled side network per tower)."""
        return {m: self.sanb[m] for m in self.towers}

    def states(self, feats: Mapping[str, Sequence[Tensor]]) -> list[Tensor]:
        """``[h_1, ..., h_M, h_X]``: every tower's side state, then the cross-modal state."""
        x = {m: [p(f) for p, f in zip(self.proj[m], feats[m], strict=True)] for m in self.towers}
        own = [gated_recurrence(self.sanb[m], self.gates[m], x[m]) for m in self.towers]
        return [*own, cross_modal(self.cross, self.mix, [x[m] for m in self.towers])]

    def gate_weights(self, feats: Mapping[str, Sequence[Tensor]]) -> Tensor:
        """``(B, M + 1)`` MOMEF expert weights, columns in :attr:`experts_order`."""
        return expert_mixture(self.states(feats), list(self.experts), self.router)[1]

    def tower_mixture(self) -> Tensor:
        """``(n, M)`` the cross-modal network's tower weights per aligned tap (rows sum to 1)."""
        return torch.softmax(self.mix, dim=-1)

    def forward(self, feats: Mapping[str, Sequence[Tensor]]) -> Tensor:  # noqa: D102
        fused, _ = expert_mixture(self.states(feats), list(self.experts), self.router)
        return self.classifier(self.norm(fused))


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


def _pooled_rows(
    model: Any,
    modality: str,
    batch: Any,
    taps: Sequence[int],
    batch_size: int,
    device: torch.device,
) -> list[np.ndarray]:
    """``[array (N, D_k)]``: :func:`tapped_features` of every row, ``batch_size`` rows at a time."""
    n = _n_rows(batch)
    parts: list[list[Tensor]] = []
    for lo in range(0, n, batch_size):
        idx = torch.arange(lo, min(n, lo + batch_size))
        parts.append(tapped_features(model, modality, _to(_rows(batch, idx), device), taps))
    return [torch.cat([p[k] for p in parts]).cpu().numpy() for k in range(len(taps))]


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
        if folder is None or not all((folder / f).is_file() for fs in names.values() for f in fs):
            start = time.perf_counter()
            dev = device or torch.device("cpu")
            computed = {
                m: _pooled_rows(model, m, inputs[m], t, batch_size, dev) for m, t in taps.items()
            }
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
