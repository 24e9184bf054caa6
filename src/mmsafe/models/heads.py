"""A small fusion head trained on frozen, precomputed embeddings of several modalities.

``fit_fusion_head`` takes ``{modality: (N, D_m)}`` embeddings (e.g. from
:meth:`~mmsafe.models.base.EncoderModel.encode`) and labels, and trains a :class:`FusionHead`
with AdamW and cross-entropy; the encoders are never touched::

    head = fit_fusion_head({"image": img, "text": txt}, labels, mode="gated")
    logits = head({"image": img_test, "text": txt_test})

Two fusion modes:

* ``"concat"``: concatenate the modalities, then a linear layer (``hidden=None``) or a one
  hidden layer MLP.
* ``"gated"``: project each modality to a common width, weight the projections by a per-sample
  softmax gate over modalities (computed from all inputs), sum, then the classifier.

Each modality is centred on its training mean and scaled to unit RMS inside the head. The
training mean is kept as the modality's *null embedding*: a modality missing from the inputs at
call time is replaced by it (it maps to exactly zero after centring), so a head can still answer
when, say, the text is absent, and a check can measure how much each modality matters.

Heads are saved as ``head.safetensors`` (weights) + ``head.json`` (config) in a directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmsafe.engine.cache import atomic_write, atomic_write_text
from mmsafe.models.base import ModelError

FUSION_MODES = ("concat", "gated")
"""The fusion modes :class:`FusionHead` supports."""
FORMAT_VERSION = 1
"""Version of the ``head.json`` layout."""
WEIGHTS_FILE = "head.safetensors"
CONFIG_FILE = "head.json"


@dataclass(frozen=True)
class FusionConfig:
    """Everything needed to rebuild a :class:`FusionHead`'s architecture.

    Attributes:
        modalities: Modality names, in the order they are fused.
        dims: Embedding width of each modality (same order).
        num_classes: Number of output logits.
        mode: ``"concat"`` or ``"gated"``.
        hidden: Width of the classifier's hidden layer; ``None`` for a linear classifier.
        width: Common projection width of the ``"gated"`` mode (unused by ``"concat"``).
        classes: Optional class names, kept for display.
    """

    modalities: tuple[str, ...]
    dims: tuple[int, ...]
    num_classes: int
    mode: str = "concat"
    hidden: int | None = None
    width: int = 0
    classes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.mode not in FUSION_MODES:
            raise ValueError(f"Unknown fusion mode {self.mode!r}; use one of {FUSION_MODES}.")
        if not self.modalities or len(self.modalities) != len(self.dims):
            raise ValueError("A fusion head needs one embedding width per modality (at least one).")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"Duplicate modality names in {self.modalities}.")
        if any(not m.isidentifier() for m in self.modalities):
            raise ValueError(f"Modality names must be identifiers, got {self.modalities}.")
        if any(d <= 0 for d in self.dims) or self.num_classes < 2:
            raise ValueError(
                f"Need positive widths and at least 2 classes, got dims={self.dims}, "
                f"num_classes={self.num_classes}."
            )
        if self.hidden is not None and self.hidden <= 0:
            raise ValueError(f"hidden must be a positive width or None, got {self.hidden}.")
        if self.mode == "gated" and self.width <= 0:
            raise ValueError(f"The gated mode needs a positive width, got {self.width}.")
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for {self.num_classes} classes.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FusionConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(
            modalities=tuple(data["modalities"]),
            dims=tuple(int(d) for d in data["dims"]),
            num_classes=int(data["num_classes"]),
            mode=str(data.get("mode", "concat")),
            hidden=None if data.get("hidden") is None else int(data["hidden"]),
            width=int(data.get("width", 0)),
            classes=tuple(data.get("classes", ())),
        )


def _classifier(width: int, hidden: int | None, num_classes: int) -> nn.Module:
    if hidden is None:
        return nn.Linear(width, num_classes)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, num_classes))


class FusionHead(nn.Module):
    """Logits ``(B, C)`` from a dict of per-modality embeddings ``(B, D_m)``.

    Missing modalities are replaced by their null embedding (the training mean); see the module
    docstring. Buffers ``null_<modality>`` and ``scale_<modality>`` hold the per-modality centre
    and RMS scale recorded by :func:`fit_fusion_head`.

    Example:
        >>> import torch
        >>> head = FusionHead(FusionConfig(("image", "text"), (4, 3), num_classes=2))
        >>> head({"image": torch.zeros(5, 4), "text": torch.zeros(5, 3)}).shape
        torch.Size([5, 2])
        >>> head({"image": torch.zeros(5, 4)}).shape  # text replaced by its null embedding
        torch.Size([5, 2])
    """

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.cfg = config
        self.fit_info: dict[str, Any] = {}
        for m, d in zip(config.modalities, config.dims, strict=True):
            self.register_buffer(f"null_{m}", torch.zeros(d))
            self.register_buffer(f"scale_{m}", torch.ones(()))
        total = sum(config.dims)
        if config.mode == "concat":
            self.proj = nn.ModuleDict()
            self.gate = None
            self.classifier = _classifier(total, config.hidden, config.num_classes)
        else:
            self.proj = nn.ModuleDict(
                {
                    m: nn.Linear(d, config.width)
                    for m, d in zip(config.modalities, config.dims, strict=True)
                }
            )
            self.gate = nn.Linear(total, len(config.modalities))
            self.classifier = _classifier(config.width, config.hidden, config.num_classes)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names, in fusion order."""
        return self.cfg.modalities

    @property
    def null_embeddings(self) -> dict[str, Tensor]:
        """``{modality: (D_m,)}`` training-mean embeddings, substituted for missing modalities."""
        return {m: getattr(self, f"null_{m}") for m in self.cfg.modalities}

    def set_statistics(self, null: Mapping[str, Tensor], scale: Mapping[str, float]) -> None:
        """Set the per-modality centre (null embedding) and RMS scale."""
        with torch.no_grad():
            for m in self.cfg.modalities:
                getattr(self, f"null_{m}").copy_(null[m].reshape(-1))
                getattr(self, f"scale_{m}").fill_(float(scale[m]))

    def _standardised(self, inputs: Mapping[str, Tensor]) -> list[Tensor]:
        extra = sorted(set(inputs) - set(self.cfg.modalities))
        if extra:
            raise ValueError(
                f"The fusion head was trained on {list(self.cfg.modalities)}, not {extra}."
            )
        present = [inputs[m] for m in self.cfg.modalities if m in inputs]
        if not present:
            raise ValueError(f"Pass at least one of {list(self.cfg.modalities)}.")
        n = present[0].shape[0]
        ref = getattr(self, f"null_{self.cfg.modalities[0]}")
        out = []
        for m, d in zip(self.cfg.modalities, self.cfg.dims, strict=True):
            null = getattr(self, f"null_{m}")
            x = inputs.get(m)
            if x is None:
                x = null.expand(n, d)
            elif x.ndim != 2 or x.shape[1] != d or x.shape[0] != n:
                raise ValueError(f"Embeddings of {m!r} must be ({n}, {d}), got {tuple(x.shape)}.")
            x = x.to(ref.device, ref.dtype)
            out.append((x - null) / getattr(self, f"scale_{m}"))
        return out

    def gates(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Per-sample modality weights ``(B, M)`` (rows sum to 1) of the ``"gated"`` mode."""
        if self.gate is None:
            raise ValueError("Only a 'gated' fusion head has gates.")
        return torch.softmax(self.gate(torch.cat(self._standardised(inputs), dim=-1)), dim=-1)

    def fused(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """The classifier's input ``(B, width)``: concatenated or gated standardised inputs."""
        xs = self._standardised(inputs)
        if self.gate is None:
            return torch.cat(xs, dim=-1)
        weights = torch.softmax(self.gate(torch.cat(xs, dim=-1)), dim=-1)
        mods = self.cfg.modalities
        projected = torch.stack([self.proj[m](x) for m, x in zip(mods, xs, strict=True)], dim=1)
        return (weights.unsqueeze(-1) * projected).sum(dim=1)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Logits ``(B, num_classes)``; missing modalities take their null embedding."""
        return self.classifier(self.fused(inputs))

    def save(self, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``head.safetensors`` and ``head.json`` into directory ``path``, each atomically.

        Args:
            path: Target directory.
            extra: JSON-able metadata stored beside the config (e.g. training settings).

        Returns:
            The directory.
        """
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(
            out / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"})
        )
        meta = {"format_version": FORMAT_VERSION, "config": self.cfg.to_dict()}
        meta["extra"] = dict(extra if extra is not None else self.fit_info)
        atomic_write_text(out / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path) -> FusionHead:
        """Read a head written by :meth:`save`.

        Raises:
            ModelError: The directory or one of its two files is missing or unreadable.
        """
        from safetensors.torch import load_file

        root = Path(path)
        missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if not (root / f).is_file()]
        if missing:
            raise ModelError(
                f"{str(root)!r} is not a saved fusion head: {', '.join(missing)} missing "
                "(FusionHead.save(path) writes both)."
            )
        try:
            meta = json.loads((root / CONFIG_FILE).read_text())
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {meta.get('format_version')!r} is not supported")
            head = cls(FusionConfig.from_dict(meta["config"]))
            head.load_state_dict(load_file(str(root / WEIGHTS_FILE)), strict=True)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
            raise ModelError(f"Could not load the fusion head in {str(root)!r}: {err}") from err
        head.fit_info = dict(meta.get("extra") or {})
        return head.eval()


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class HeadTrainConfig:
    """How :func:`fit_fusion_head` trains a head: the architecture and the optimiser settings.

    Attributes:
        mode: ``"concat"`` or ``"gated"``.
        hidden: Hidden width of the classifier MLP; ``None`` for a linear classifier.
        width: Projection width of the gated mode (default ``hidden`` or the largest ``D_m``).
        num_classes: Number of classes (default ``max(label) + 1``, at least 2).
        classes: Optional class names stored in the config.
        epochs: Passes over the labelled rows.
        lr: Learning rate (AdamW; a trainer's hooks may use another optimiser).
        weight_decay: Weight decay.
        batch_size: Rows per step.
        seed: Seeds initialisation, shuffling and modality dropout.
        modality_dropout: Probability of replacing each modality of a training row by its null
            embedding, so the head learns to answer with a modality missing.
        threads: torch intra-op threads while training (``None`` leaves torch's setting). The
            head's matrices are tiny: on a busy machine an oversubscribed pool made the same fit
            20-100x slower (measured), hence the default of one.
        progress: Show a progress bar over epochs.

    Example:
        >>> HeadTrainConfig(epochs=5).replace(lr=0.1).lr
        0.1
    """

    mode: str = "concat"
    hidden: int | None = None
    width: int | None = None
    num_classes: int | None = None
    classes: tuple[str, ...] = ()
    epochs: int = 60
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 256
    seed: int = 0
    modality_dropout: float = 0.0
    threads: int | None = 1
    progress: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(
                f"Need epochs >= 1, batch_size >= 1, lr > 0; got {self.epochs}, "
                f"{self.batch_size}, {self.lr}."
            )
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}.")

    def replace(self, **changes: Any) -> HeadTrainConfig:
        """A copy with some fields changed (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict[str, Any]:
        """The optimiser settings recorded in a head's ``fit_info`` (what retraining repeats)."""
        keys = ("epochs", "lr", "weight_decay", "seed", "batch_size", "modality_dropout")
        return {k: getattr(self, k) for k in keys}

    @classmethod
    def of(cls, head: FusionHead) -> HeadTrainConfig:
        """The recipe of a trained head: its architecture and the settings in its ``fit_info``."""
        cfg, info = head.cfg, head.fit_info
        base = cls()
        return cls(
            mode=cfg.mode,
            hidden=cfg.hidden,
            width=cfg.width or None,
            num_classes=cfg.num_classes,
            classes=cfg.classes,
            **{k: type(v)(info.get(k, v)) for k, v in base.settings().items()},
        )


def check_inputs(
    embeddings: Mapping[str, Tensor], labels: Tensor
) -> tuple[dict[str, Tensor], Tensor]:
    """Validate shapes and drop rows labelled -1 (returns float CPU embeddings, long labels).

    Raises:
        ValueError: No modality, mismatched row counts, non-integer labels, labels below -1,
            or no labelled row.
    """
    if not embeddings:
        raise ValueError("fit_fusion_head needs at least one modality of embeddings.")
    y = torch.as_tensor(labels)
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got {y.dtype} {tuple(y.shape)}.")
    y = y.long()
    embs = {}
    for m, e in embeddings.items():
        x = torch.as_tensor(e)
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"Embeddings of {m!r} must be (N, D) with N = {y.shape[0]} labels, "
                f"got {tuple(x.shape)}."
            )
        embs[m] = x.detach().float().cpu()
    if (y < -1).any():
        raise ValueError("labels must be class indices >= 0, or -1 for unlabelled rows.")
    keep = y >= 0
    if not keep.any():
        raise ValueError("Every row is unlabelled (-1); a fusion head needs labelled rows.")
    return {m: x[keep] for m, x in embs.items()}, y.cpu()[keep]


def head_config(embs: Mapping[str, Tensor], y: Tensor, config: HeadTrainConfig) -> FusionConfig:
    """The :class:`FusionConfig` for training on ``embs``/``y`` (validates the labels)."""
    n_cls = int(config.num_classes) if config.num_classes is not None else max(int(y.max()) + 1, 2)
    if int(y.max()) >= n_cls:
        raise ValueError(f"Label {int(y.max())} is out of range for {n_cls} classes.")
    mods = tuple(embs)
    dims = tuple(int(embs[m].shape[1]) for m in mods)
    return FusionConfig(
        modalities=mods,
        dims=dims,
        num_classes=n_cls,
        mode=config.mode,
        hidden=config.hidden,
        width=int(config.width or config.hidden or max(dims)) if config.mode == "gated" else 0,
        classes=tuple(config.classes),
    )


def data_statistics(embs: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Per-modality training mean (the null embedding) and RMS distance to it (the scale)."""
    null = {m: x.mean(0) for m, x in embs.items()}
    scale = {
        m: float((x - null[m]).pow(2).sum(1).mean().sqrt().clamp_min(1e-6)) for m, x in embs.items()
    }
    return null, scale


@contextlib.contextmanager
def num_threads(n: int | None = 1) -> Iterator[None]:
    """Run torch on ``n`` intra-op threads (``None``: unchanged), then restore the previous count.

    The head's matrices are tiny: extra threads only add synchronisation, and on a busy
    machine an oversubscribed thread pool made the same fit 20-100x slower (measured).
    """
    previous = torch.get_num_threads()
    if n is None or previous == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class HeadTrainHooks:
    """Where a trainer differs from plain supervised training; each method is the plain default.

    :func:`fit_fusion_head` calls, in order: :meth:`init` (in the seeded RNG, right after the
    head is built), :meth:`statistics`, :meth:`optimise` (which, by default, runs AdamW epochs
    on :meth:`loss` over :meth:`parameters`), then :meth:`finish` (extra ``fit_info``). DP-SGD
    replaces :meth:`optimise` (opacus), the adversarial fairness head adds an adversary in
    :meth:`init`, :meth:`parameters` and :meth:`loss`.
    """

    def init(self, head: FusionHead, config: HeadTrainConfig) -> None:
        """Build extra modules (seeded with the head's RNG); nothing by default."""

    def statistics(
        self, cfg: FusionConfig, embs: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The head's per-modality centre and scale (default: :func:`data_statistics`)."""
        return data_statistics(embs)

    def parameters(self, head: FusionHead) -> list[nn.Parameter]:
        """What the optimiser updates (default: the head's parameters)."""
        return list(head.parameters())

    def loss(self, head: FusionHead, batch: Mapping[str, Tensor], y: Tensor, idx: Tensor) -> Tensor:
        """The loss of one batch (``idx``: its rows among the labelled training rows)."""
        return nn.functional.cross_entropy(head(batch), y)

    def optimise(
        self,
        head: FusionHead,
        embs: dict[str, Tensor],
        y: Tensor,
        config: HeadTrainConfig,
        gen: torch.Generator,
    ) -> FusionHead:
        """Train ``head`` and return the trained head (default: AdamW epochs, in place)."""
        opt = torch.optim.AdamW(
            self.parameters(head), lr=config.lr, weight_decay=config.weight_decay
        )
        null = head.null_embeddings
        n = y.shape[0]
        epoch_iter: Any = range(config.epochs)
        if config.progress and sys.stderr.isatty():  # no carriage-return bars in logs
            from tqdm.auto import tqdm

            epoch_iter = tqdm(epoch_iter, desc="fusion head", unit="epoch")
        head.train()
        for _ in epoch_iter:
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size]
                batch = {m: x[idx] for m, x in embs.items()}
                if config.modality_dropout > 0:
                    for m in embs:
                        drop = torch.rand(len(idx), generator=gen) < config.modality_dropout
                        batch[m] = torch.where(drop[:, None], null[m].expand_as(batch[m]), batch[m])
                loss = self.loss(head, batch, y[idx], idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return head

    def finish(self, head: FusionHead, embs: Mapping[str, Tensor], y: Tensor) -> dict[str, Any]:
        """Extra ``fit_info`` entries of the trained head (in eval mode); none by default."""
        return {}


def fit_fusion_head(
    embeddings: Mapping[str, Tensor],
    labels: Tensor,
    config: HeadTrainConfig | None = None,
    *,
    hooks: HeadTrainHooks | None = None,
    head: FusionHead | None = None,
    **options: Any,
) -> FusionHead:
    """Train a :class:`FusionHead` on frozen embeddings: the one trainer every head goes through.

    Plain training is AdamW on cross-entropy; ``hooks`` change what differs (DP-SGD, an
    adversary, ...). Rows labelled ``-1`` are dropped before anything else (they affect neither
    the weights nor the recorded statistics). Deterministic for a given seed (it uses its own
    generator and leaves the global RNG alone).

    Args:
        embeddings: ``{modality: (N, D_m)}`` precomputed embeddings.
        labels: ``(N,)`` class indices, ``-1`` = unlabelled.
        config: The architecture and optimiser settings (default :class:`HeadTrainConfig()`).
        hooks: Where training differs from the plain recipe (default: nowhere).
        head: Continue training this head (its architecture and statistics are kept; used by
            federated clients for their local epochs) instead of building a new one.
        **options: Fields of :class:`HeadTrainConfig` overriding ``config``'s, e.g.
            ``epochs=20``.

    Returns:
        The trained head in eval mode, with ``fit_info`` (settings, training accuracy and
        whatever ``hooks.finish`` adds).

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(8, 1)
        >>> y = torch.tensor([0, 1]).repeat(8)
        >>> head = fit_fusion_head({"image": x}, y, HeadTrainConfig(epochs=20))
        >>> head({"image": x}).argmax(-1).eq(y).float().mean().item()
        1.0
    """
    config = (config or HeadTrainConfig()).replace(**options)
    hooks = hooks or HeadTrainHooks()
    embs, y = check_inputs(embeddings, labels)
    gen = torch.Generator().manual_seed(config.seed)
    if head is None:
        cfg = head_config(embs, y, config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            head = FusionHead(cfg)
            hooks.init(head, config)
        head.set_statistics(*hooks.statistics(cfg, embs))
    elif int(y.max()) >= head.cfg.num_classes:
        raise ValueError(
            f"Label {int(y.max())} is out of range for {head.cfg.num_classes} classes."
        )
    with num_threads(config.threads):
        head = hooks.optimise(head, embs, y, config, gen)
        head.eval()
        with torch.no_grad():
            train_acc = float(head(embs).argmax(-1).eq(y).float().mean())
        extra = hooks.finish(head, embs, y)
    head.fit_info = {
        **config.settings(),
        "n_train": int(y.shape[0]),
        "train_accuracy": train_acc,
        **extra,
    }
    return head


__all__ = [
    "FUSION_MODES",
    "FusionConfig",
    "FusionHead",
    "HeadTrainConfig",
    "HeadTrainHooks",
    "check_inputs",
    "data_statistics",
    "fit_fusion_head",
    "head_config",
    "num_threads",
]
