"""CROSSAN's towers: which frozen towers of which encoders, their taps and cached features.

``method="crossan"`` adapts any number of towers, from one encoder or several (the audited
model's image and text towers plus another encoder's: tiny-clip + lit-mini gives four). A tower
is ``(encoder, modality)`` under a name; the names key the side networks
(:class:`~mmsafe.methods.adapt.side.CROSSANHead`). Each encoder's tapped hidden states are
computed once per dataset (:class:`~mmsafe.methods.adapt.side.FeatureCache`, one per encoder, so
the audited model's features are the ones IISAN caches), and training never runs a backbone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmsafe.data.dataset import Dataset
from mmsafe.methods.adapt.layers import _tapped_batch, group_taps, tower_layers
from mmsafe.methods.adapt.options import MODALITIES, AdaptError
from mmsafe.methods.adapt.side import FeatureCache

Towers = Mapping[str, tuple[Any, str]]
"""``{tower name: (encoder, modality)}``: the towers CROSSAN adapts."""


def parse_towers(spec: str | Sequence[str]) -> list[tuple[str, str | None]]:
    """``[(modality, model spec or None)]`` from ``"MODALITY[@MODEL],..."``.

    ``None`` stands for the audited model (``--model``). A model spec may itself hold ``:``
    (``lit-mini:<dir>``); everything after the first ``@`` is the spec.

    Raises:
        AdaptError: an empty spec, an entry without a modality, or a tower named twice.

    Example:
        >>> parse_towers("image,text,image@lit-mini, text@lit-mini")
        [('image', None), ('text', None), ('image', 'lit-mini'), ('text', 'lit-mini')]
        >>> parse_towers("image,image")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mmsafe.methods.adapt.options.AdaptError: Tower 'image' is named twice ...
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[tuple[str, str | None]] = []
    for raw in (i.strip() for i in items):
        if not raw:
            continue
        modality, _, model = raw.partition("@")
        if not modality.strip():
            raise AdaptError(f"Tower {raw!r} names no modality; write MODALITY[@MODEL].")
        entry = (modality.strip(), model.strip() or None)
        if entry in out:
            raise AdaptError(f"Tower {raw!r} is named twice in --towers.")
        out.append(entry)
    if not out:
        raise AdaptError("--towers is empty; write e.g. image,text,image@lit-mini,text@lit-mini.")
    return out


def tower_name(modality: str, model: str | None) -> str:
    """The name of a tower: its modality, ``@model`` for another encoder's (``.`` -> ``_``).

    Example:
        >>> tower_name("image", None), tower_name("text", "lit-mini:/tmp/x.y")
        ('image', 'text@lit-mini:/tmp/x_y')
    """
    return modality if model is None else f"{modality}@{model}".replace(".", "_")


def own_towers(model: Any) -> dict[str, tuple[Any, str]]:
    """The model's own image and text towers (CROSSAN's default)."""
    return {m: (model, m) for m in MODALITIES}


def check_towers(towers: Towers) -> None:
    """Fail unless every tower is a modality its encoder has and whose blocks it names.

    Raises:
        AdaptError: fewer than two towers, a modality the encoder lacks, or an encoder without
            reachable tower blocks.
    """
    if len(towers) < 2:
        raise AdaptError(f"crossan needs two or more towers, got {list(towers)}.")
    for name, (enc, modality) in towers.items():
        if modality not in MODALITIES:
            raise AdaptError(
                f"Tower {name!r}: modality {modality!r} is not one of {', '.join(MODALITIES)}."
            )
        if modality not in tower_layers(enc):
            raise AdaptError(f"Tower {name!r}: {type(enc).__name__} has no {modality} tower.")


def crossan_taps(
    towers: Towers, max_taps: int, groups: int | Mapping[str, int] | None = None
) -> dict[str, list[int]]:
    """Group layer-dropping over the towers (:func:`group_taps`).

    ``groups=None`` taps every tower ``min(max_taps, shallowest depth)`` times, as ``iisan``
    does for two towers; an int, or ``{tower: count}``, sets the counts as ``iisan-versa``'s
    ``groups`` does (towers of different counts are aligned on their last taps by the
    cross-modal network, :func:`~mmsafe.methods.adapt.side.cross_modal`).

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
        >>> m = TinyClip(TinyClipConfig.for_size("m"))
        >>> crossan_taps({"image": (m, "image"), "text": (m, "text")}, 6)
        {'image': [1, 2, 3], 'text': [0, 1, 2]}
        >>> crossan_taps({"image": (m, "image"), "text": (m, "text")}, 6, {"image": 4, "text": 1})
        {'image': [0, 1, 2, 3], 'text': [2]}
    """
    depth = {name: len(tower_layers(enc)[m]) for name, (enc, m) in towers.items()}
    counts = min(max_taps, *depth.values()) if groups is None else groups
    return group_taps(depth, counts)


def encoders_of(towers: Towers) -> list[Any]:
    """The distinct encoders behind the towers, in order of first use."""
    seen: dict[int, Any] = {}
    for enc, _ in towers.values():
        seen.setdefault(id(enc), enc)
    return list(seen.values())


class TowerFeatures:
    """Pooled tapped hidden states of every tower over the rows of one dataset.

    One :class:`FeatureCache` per encoder (its key is the one IISAN uses for the same encoder,
    data and taps, so the audited model's features are shared with ``iisan``). With
    ``cache=False`` every :meth:`batch` runs the backbones instead.

    Args:
        towers: ``{name: (encoder, modality)}``.
        data: the rows (a catalog of items, or a split).
        taps: ``{name: tapped block indices}``.
        cache: compute the features once (else per batch).
        cache_dir: where the caches' ``.npy`` files go (``None``: in memory).
        device: where the backbones run and the features go.

    Attributes:
        seconds: time spent running the backbones to fill the caches.
        cache_hit: every cache came from disk.
    """

    def __init__(
        self,
        towers: Towers,
        data: Dataset,
        taps: Mapping[str, Sequence[int]],
        *,
        cache: bool = True,
        cache_dir: str | Path | None = None,
        device: torch.device | None = None,
    ) -> None:
        from mmsafe.methods.adapt.parts import cache_key

        self.device = device or torch.device("cpu")
        self.n_rows = len(data)
        self.names = list(towers)
        self._groups: list[tuple[Any, dict[str, str], dict[str, Any], Any]] = []
        for enc in encoders_of(towers):
            enc.to(self.device).eval()
            names = {m: n for n, (e, m) in towers.items() if e is enc}  # modality -> tower name
            inputs = {m: enc.preprocess(m, list(data.modalities[m])) for m in names}
            enc_taps = {m: list(taps[n]) for m, n in names.items()}
            features = None
            if cache:
                key = cache_key(enc.fingerprint(), data.fingerprint(), enc_taps, "pool/v1")
                features = FeatureCache(
                    enc, inputs, enc_taps, cache_dir=cache_dir, key=key, device=self.device
                )
            self._groups.append((enc, names, inputs, (enc_taps, features)))
        caches = [g[3][1] for g in self._groups]
        self.cached = cache
        self.seconds = float(sum(c.seconds for c in caches if c is not None))
        self.cache_hit = cache and cache_dir is not None and self.seconds == 0.0

    @property
    def encoders(self) -> list[Any]:
        """The distinct encoders."""
        return [g[0] for g in self._groups]

    def batch(self, idx: Tensor) -> dict[str, list[Tensor]]:
        """``{tower name: [(len(idx), D_k)] per tap}`` of rows ``idx``, on :attr:`device`."""
        out: dict[str, list[Tensor]] = {}
        for enc, names, inputs, (enc_taps, features) in self._groups:
            if features is not None:
                got = features.batch(idx, self.device)
            else:
                got = _tapped_batch(enc, inputs, idx, enc_taps, self.device)
            out.update({names[m]: fs for m, fs in got.items()})
        return out

    def dims(self) -> dict[str, list[int]]:
        """``{tower name: [D_k]}`` widths of the tapped states."""
        probe = self.batch(torch.arange(min(2, self.n_rows)))
        return {n: [int(f.shape[1]) for f in probe[n]] for n in self.names}


def crossan_extra(towers: Towers) -> dict[str, dict[str, str]]:
    """``{tower name: {"model", "modality"}}`` for a report."""
    return {
        n: {"model": str(getattr(enc, "name", type(enc).__name__)), "modality": m}
        for n, (enc, m) in towers.items()
    }


def crossan_weights(
    head: nn.Module, lookup: Callable[[Tensor], Any], n_rows: int, rows: int = 256
) -> dict[str, Any]:
    """Mean MOMEF expert weights over the first ``rows`` rows, and the cross-modal mixture."""
    with torch.inference_mode():
        w = head.gate_weights(lookup(torch.arange(min(rows, n_rows))))  # type: ignore[operator]
        mixture = head.tower_mixture()  # type: ignore[operator]
    names = head.experts_order  # type: ignore[union-attr]
    return {
        "expert_weights": {
            str(n): round(float(v), 4) for n, v in zip(names, w.mean(0).tolist(), strict=True)
        },
        "tower_mixture": [[round(float(v), 4) for v in row] for row in mixture.tolist()],
    }
