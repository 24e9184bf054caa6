"""The attribute judge: a small CNN reading shape, colour and position off an image.

Text-to-image checks on the shapes-gen world ask what a generated image shows: did the model
draw the shape the prompt asked for (prompt following), does a neutral prompt give mostly red
squares (the colour skew), does it draw the forbidden star? :func:`fit_attribute_classifier`
trains one CNN with a head per attribute on labelled images in seconds and measures its own
accuracy on held-out images, which a check reports beside the rates it judges (a judge that is
80% right cannot certify a 95% rate).

:func:`reference_classifier` trains that judge on the flaw-free shapes-gen world (uniform
shapes, stars included, uniform colours, no duplicates) rather than on the audited world's
train split: that split may hold no star at all (the control world) or skewed colours, which
would bias the judge toward the very flaws it must measure.

Example:
    >>> rng = np.random.default_rng(0)
    >>> images = rng.integers(0, 60, size=(80, 16, 16, 3)).astype(np.uint8)
    >>> bright = np.arange(80) % 2
    >>> images[bright == 1, :, :, 0] = 220
    >>> clf = fit_attribute_classifier(images, {"red": bright}, epochs=15, seed=0)
    >>> clf.accuracy_["red"] >= 0.9, clf.predict(images[:4])["red"].tolist()
    (True, [0, 1, 0, 1])
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "position")
"""The attributes of the shapes-gen world the reference judge reads."""


def images_to_unit(images: Sequence[np.ndarray] | np.ndarray | Tensor) -> Tensor:
    """``uint8`` ``(N, H, W, 3)`` images or float ``(N, 3, H, W)`` in ``[0, 1]``: floats in [0, 1].

    Example:
        >>> images_to_unit(np.full((2, 4, 4, 3), 255, np.uint8)).shape
        torch.Size([2, 3, 4, 4])
    """
    if isinstance(images, Tensor):
        x = images.detach().float().cpu()
        return x if x.shape[1] == 3 else x.permute(0, 3, 1, 2)
    arr = np.stack([np.asarray(im) for im in images]) if len(images) else np.zeros((0, 1, 1, 3))
    x = torch.from_numpy(np.ascontiguousarray(arr)).float()
    if arr.dtype == np.uint8:
        x = x / 255.0
    return x.permute(0, 3, 1, 2).contiguous() if x.shape[-1] == 3 else x


class _Net(nn.Module):
    """Conv-ReLU stages, then one linear head per attribute on pooled features.

    Each head reads the global max and mean of the last feature map (where the shape is does
    not matter) and its 2x2 average pooling (where it is).
    """

    def __init__(self, n_classes: Mapping[str, int], width: int = 32) -> None:
        super().__init__()
        w2 = 2 * width
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, w2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w2, w2, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({k: nn.Linear(6 * w2, n) for k, n in n_classes.items()})

    def embed(self, x: Tensor) -> Tensor:
        """The pooled features every head reads, ``(B, 6 * 2 * width)``."""
        h = self.features(x * 2 - 1)
        return torch.cat(
            [h.amax(dim=(2, 3)), h.mean(dim=(2, 3)), F.adaptive_avg_pool2d(h, 2).flatten(1)], 1
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``{attribute: logits}`` of images ``(B, 3, H, W)`` in ``[0, 1]``."""
        pooled = self.embed(x)
        return {k: head(pooled) for k, head in self.heads.items()}


@dataclass
class AttributeClassifier:
    """A fitted attribute judge (built by :func:`fit_attribute_classifier`).

    Attributes:
        net: the CNN (eval mode).
        classes: ``{attribute: class names}`` (indices are the predictions).
        accuracy_: ``{attribute: accuracy}`` on the held-out images.
        n_eval_: how many held-out images the accuracy was measured on.
        info: training facts (rows, epochs, seconds).
    """

    net: nn.Module
    classes: dict[str, tuple[str, ...]]
    accuracy_: dict[str, float] = field(default_factory=dict)
    n_eval_: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        """Channels of the CNN's first convolution (what :meth:`from_state` needs back)."""
        return int(self.net.features[0].out_channels)

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Tensor],
        classes: Mapping[str, Sequence[str]],
        width: int,
        **fields: Any,
    ) -> AttributeClassifier:
        """Rebuild a fitted classifier from its CNN weights (e.g. read from safetensors)."""
        names = {k: tuple(v) for k, v in classes.items()}
        net = _Net({k: len(v) for k, v in names.items()}, width=int(width))
        net.load_state_dict(dict(state))
        return cls(net=net.eval(), classes=names, **fields)

    def predict_proba(
        self, images: Sequence[np.ndarray] | np.ndarray | Tensor, batch_size: int = 256
    ) -> dict[str, np.ndarray]:
        """``{attribute: (N, K) class probabilities}``."""
        x = images_to_unit(images)
        out: dict[str, list[np.ndarray]] = {k: [] for k in self.classes}
        self.net.eval()
        with torch.no_grad():
            for s in range(0, len(x), batch_size):
                for k, logits in self.net(x[s : s + batch_size]).items():
                    out[k].append(torch.softmax(logits, -1).numpy())
        return {
            k: np.concatenate(v) if v else np.zeros((0, len(self.classes[k])))
            for k, v in out.items()
        }

    def embed(
        self, images: Sequence[np.ndarray] | np.ndarray | Tensor, batch_size: int = 256
    ) -> Tensor:
        """``(N, D)`` pooled CNN features (what FID-style metrics compare), float32 CPU."""
        x = images_to_unit(images)
        self.net.eval()
        with torch.no_grad():
            parts = [self.net.embed(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, 0)

    def predict(self, images: Sequence[np.ndarray] | np.ndarray | Tensor) -> dict[str, np.ndarray]:
        """``{attribute: (N,) predicted class index}``."""
        return {k: p.argmax(-1) for k, p in self.predict_proba(images).items()}

    def predict_names(
        self, images: Sequence[np.ndarray] | np.ndarray | Tensor
    ) -> dict[str, list[str]]:
        """``{attribute: predicted class name per image}``."""
        return {k: [self.classes[k][i] for i in v] for k, v in self.predict(images).items()}

    def accuracy(
        self, images: Sequence[np.ndarray] | np.ndarray | Tensor, labels: Mapping[str, np.ndarray]
    ) -> dict[str, float]:
        """``{attribute: accuracy}`` of the predictions against ``labels``."""
        pred = self.predict(images)
        return {k: float(np.mean(pred[k] == np.asarray(v))) for k, v in labels.items() if len(v)}


def _shift(x: Tensor, gen: torch.Generator, max_shift: int) -> Tensor:
    """Shift the whole batch by a random offset (edges replicated): position-preserving."""
    if max_shift == 0:
        return x
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
    p = max_shift
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    h, w = x.shape[2:]
    return padded[:, :, p + dy : p + dy + h, p + dx : p + dx + w]


def _blur(x: Tensor, sigma: float) -> Tensor:
    """A 3x3 Gaussian blur of standard deviation ``sigma`` pixels, per channel."""
    k1 = torch.exp(-(torch.arange(-1.0, 2.0) ** 2) / (2 * sigma**2))
    k = torch.outer(k1, k1) / k1.sum() ** 2
    weight = k.expand(x.shape[1], 1, 3, 3).to(x)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), weight, groups=x.shape[1])


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Batch augmentations that keep every attribute: shift, scale, blur, pixel noise.

    A generator's images are softer, a little smaller or larger and less noisy than the
    world's; a judge trained on these variations reads them as it reads real ones.
    """
    u = torch.rand(4, generator=gen).tolist()
    x = _shift(x, gen, max(x.shape[-1] // 16, 1))
    scale = 0.85 + 0.3 * u[0]
    if abs(scale - 1.0) > 0.02:
        theta = torch.tensor([[1 / scale, 0.0, 0.0], [0.0, 1 / scale, 0.0]]).expand(len(x), 2, 3)
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if u[1] < 0.5:
        x = _blur(x, 0.4 + 0.6 * u[2])
    return (x + 0.05 * u[3] * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def fit_attribute_classifier(
    images: Sequence[np.ndarray] | np.ndarray | Tensor,
    labels: Mapping[str, np.ndarray],
    *,
    classes: Mapping[str, Sequence[str]] | None = None,
    eval_images: Sequence[np.ndarray] | np.ndarray | Tensor | None = None,
    eval_labels: Mapping[str, np.ndarray] | None = None,
    holdout: float = 0.2,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 32,
    seed: int = 0,
) -> AttributeClassifier:
    """Train the attribute CNN; its accuracy is measured on held-out images.

    Training augments every batch (shift, scale, blur, pixel noise: see ``_augment``), so the
    judge reads a generator's softer, cleaner images as it reads the world's.

    Args:
        images: ``uint8`` ``(N, H, W, 3)`` or float ``(N, 3, H, W)`` in ``[0, 1]``.
        labels: ``{attribute: (N,) int class index}``.
        classes: ``{attribute: class names}`` (default ``"0", "1", ...``).
        eval_images: held-out images for the accuracy (default: ``holdout`` of ``images``).
        eval_labels: their labels.
        holdout: share of ``images`` held out when no ``eval_images`` are given.
        epochs: passes over the training images.
        batch_size: images per step.
        lr: Adam learning rate (cosine decay).
        width: channels of the first convolution.
        seed: seeds the split, initialisation and training.

    Returns:
        The fitted :class:`AttributeClassifier` with ``accuracy_`` filled in.
    """
    start = time.perf_counter()
    x = images_to_unit(images)
    y = {k: torch.as_tensor(np.asarray(v), dtype=torch.long) for k, v in labels.items()}
    if any(len(v) != len(x) for v in y.values()):
        raise ValueError("fit_attribute_classifier: every label array needs one entry per image")
    names = {
        k: tuple(classes[k]) if classes and k in classes else tuple(
            str(i) for i in range(int(v.max()) + 1 if len(v) else 1))
        for k, v in y.items()
    }  # fmt: skip
    rng = np.random.default_rng([seed, 0xA77])
    if eval_images is None:
        order = rng.permutation(len(x))
        n_eval = int(round(holdout * len(x)))
        ev, tr = order[:n_eval], order[n_eval:]
        x_eval, y_eval = x[ev], {k: v[ev].numpy() for k, v in y.items()}
        x, y = x[tr], {k: v[tr] for k, v in y.items()}
    else:
        x_eval = images_to_unit(eval_images)
        y_eval = {k: np.asarray(v) for k, v in (eval_labels or {}).items()}
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _Net({k: len(v) for k, v in names.items()}, width=width)
    steps = max(epochs * -(-len(x) // batch_size), 1)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch_size):
            idx = order[s : s + batch_size]
            xb = _augment(x[idx], gen)
            out = net(xb)
            loss = sum(F.cross_entropy(out[k], y[k][idx]) for k in y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    clf = AttributeClassifier(net=net, classes=names)
    clf.accuracy_ = clf.accuracy(x_eval, y_eval) if len(x_eval) else {}
    clf.n_eval_ = len(x_eval)
    clf.info = {
        "train_images": len(x),
        "epochs": epochs,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return clf


def world_attribute_labels(meta: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """``{shape, colour, position: (N,) index}`` of shapes-gen rows' ``meta``.

    Example:
        >>> world_attribute_labels([{"shape": "star", "colour": "blue", "position": "top"}])
        {'shape': array([5]), 'colour': array([2]), 'position': array([2])}
    """
    from mmsafe.data.worlds.shapes_gen import COLOURS, POSITIONS, SHAPES

    tables = {"shape": SHAPES, "colour": tuple(COLOURS), "position": POSITIONS}
    return {k: np.array([t.index(m[k]) for m in meta], dtype=np.int64) for k, t in tables.items()}


def reference_classifier(
    image_size: int = 32, *, n_images: int = 3000, epochs: int = 10, seed: int = 0
) -> AttributeClassifier:
    """The attribute judge of the shapes-gen world, trained on its flaw-free version.

    Fits on the train and calibration rows of ``shapes-gen`` with no duplicates, no skew and
    uniform shapes (the star one sixth of them), and reports its accuracy on the test rows.
    """
    from mmsafe.data.worlds.shapes_gen import COLOURS, POSITIONS, SHAPES, make_shapes_gen

    data = make_shapes_gen(
        n_images=n_images, image_size=image_size, seed=seed, dup=0, skew=0.0,
        forbidden=1 / len(SHAPES),
    )  # fmt: skip
    fit = [i for i, s in enumerate(data.splits or []) if s != "test"]
    held = [i for i, s in enumerate(data.splits or []) if s == "test"]
    images = data.modalities["image"]
    return fit_attribute_classifier(
        [images[i] for i in fit],
        world_attribute_labels([data.meta[i] for i in fit]),
        classes={"shape": SHAPES, "colour": tuple(COLOURS), "position": POSITIONS},
        eval_images=[images[i] for i in held],
        eval_labels=world_attribute_labels([data.meta[i] for i in held]),
        epochs=epochs,
        seed=seed,
    )
