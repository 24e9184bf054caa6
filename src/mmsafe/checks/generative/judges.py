"""What the generative checks share: the attribute judge, the probe prompts and their seeds.

A generated image has no label, so the checks read what it shows with a judge of stated
accuracy: the shapes-gen world's :func:`~mmsafe.methods.generative.attributes.reference_classifier`,
trained on the *flaw-free* version of the world (uniform shapes and colours, stars included) so
that it is not biased toward the flaws it measures. It is trained once per process and image
size (seconds) and scored on that world's held-out rows.

Every check draws its probe images through :meth:`~mmsafe.engine.Engine.generate_images` with
the seeds of :func:`probe_seeds`, so two checks that probe the same prompt share its images (no
prompt is drawn twice with the same seed).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from mmsafe.checks.base import AuditContext

WORLD = "shapes-gen"


def is_shapes_gen(data: Any) -> bool:
    """Whether ``data`` comes from the shapes-gen world (its ground truth is then known)."""
    return str(getattr(data, "source", "") or getattr(data, "name", "")).startswith(WORLD)


@dataclass(frozen=True)
class Judge:
    """The attribute classifier and its measured quality on held-out real images.

    Attributes:
        classifier: the :class:`~mmsafe.methods.generative.attributes.AttributeClassifier`.
        accuracy: ``{attribute: accuracy}`` on the held-out rows.
        confusion: ``{attribute: (K, K) counts}``, rows true, columns predicted.
        classes: ``{attribute: class names}``.
    """

    classifier: Any
    accuracy: dict[str, float]
    confusion: dict[str, np.ndarray]
    classes: dict[str, tuple[str, ...]]

    def rates(self, attribute: str, value: str) -> tuple[float, float, int, int]:
        """``(tpr, fpr, n_pos, n_neg)`` of "shows ``value``" on the held-out rows."""
        k = self.classes[attribute].index(value)
        cm = self.confusion[attribute]
        pos, neg = cm[k].sum(), cm.sum() - cm[k].sum()
        tpr = cm[k, k] / max(pos, 1)
        fpr = (cm[:, k].sum() - cm[k, k]) / max(neg, 1)
        return float(tpr), float(fpr), int(pos), int(neg)

    def names(self, images: Tensor | np.ndarray) -> dict[str, list[str]]:
        """``{attribute: predicted name per image}``."""
        return self.classifier.predict_names(images)

    def features(self, images: Tensor | np.ndarray) -> np.ndarray:
        """``(N, D)`` the judge's pooled CNN features (its "Inception pool" for FID)."""
        return self.classifier.embed(images).numpy()

    def proba(self, images: Tensor | np.ndarray, attribute: str, value: str) -> np.ndarray:
        """``(N,)`` the judge's probability that each image shows ``value``."""
        k = self.classes[attribute].index(value)
        return self.classifier.predict_proba(images)[attribute][:, k]


@functools.lru_cache(maxsize=4)
def attribute_judge(image_size: int, seed: int = 0) -> Judge:
    """The reference judge for images of ``image_size`` pixels (trained once per process)."""
    from mmsafe.data.worlds.shapes_gen import SHAPES, make_shapes_gen
    from mmsafe.methods.generative.attributes import reference_classifier, world_attribute_labels

    clf = reference_classifier(image_size, seed=seed)
    # the held-out rows reference_classifier scored itself on, for per-class rates
    data = make_shapes_gen(n_images=3000, image_size=image_size, seed=seed, dup=0, skew=0.0,
                           forbidden=1 / len(SHAPES))  # fmt: skip
    held = [i for i, s in enumerate(data.splits or []) if s == "test"]
    labels = world_attribute_labels([data.meta[i] for i in held])
    pred = clf.predict([data.modalities["image"][i] for i in held])
    confusion = {}
    for k, names in clf.classes.items():
        cm = np.zeros((len(names), len(names)), dtype=np.int64)
        np.add.at(cm, (labels[k], pred[k]), 1)
        confusion[k] = cm
    accuracy = {k: float(np.trace(cm) / max(cm.sum(), 1)) for k, cm in confusion.items()}
    return Judge(clf, accuracy, confusion, dict(clf.classes))


def to_uint8(images: Tensor) -> list[np.ndarray]:
    """Float ``(N, 3, S, S)`` images in ``[0, 1]`` -> uint8 ``(S, S, 3)`` arrays."""
    px = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return list(px)


def probe_seeds(n: int, base: int = 0) -> list[int]:
    """The seeds every generative check draws a probe prompt with: ``base, ..., base + n - 1``."""
    return list(range(int(base), int(base) + int(n)))


def draw(ctx: AuditContext, prompts: Sequence[str], n_per_prompt: int) -> tuple[Tensor, list[str]]:
    """``(images, prompt of each image)``: each prompt drawn with :func:`probe_seeds`."""
    seeds = probe_seeds(n_per_prompt, ctx.seed)
    rows = [(p, s) for p in prompts for s in seeds]
    images = ctx.engine.generate_images(
        ctx.model, [p for p, _ in rows], seeds=[s for _, s in rows],
        steps=getattr(ctx.task, "steps", None), guidance=getattr(ctx.task, "guidance", None),
    )  # fmt: skip
    return images, [p for p, _ in rows]


def gallery(images: Tensor, captions: Sequence[str], title: str, limit: int = 8) -> dict[str, Any]:
    """A card gallery of up to ``limit`` images ``(N, 3, S, S)`` in ``[0, 1]``."""
    from mmsafe.report.plots import thumbnail_png

    items = [
        {"png": thumbnail_png(px), "caption": str(cap)}
        for px, cap in zip(to_uint8(images[:limit]), captions, strict=False)
    ]
    return {"kind": "images", "title": title, "items": items}


_ENCODERS: dict[tuple[str, str, str], Any] = {}


def encoder_target(ctx: AuditContext, spec: str) -> Any:
    """The encoder target ``spec``, trained on the audited data's train split where it must be.

    Loaded once per process and (spec, train data, cache folder), so the checks that ask for it
    share one model (and the engine's cached embeddings).
    """
    from mmsafe.models.loading import load_model

    key = (spec, "" if ctx.train is None else ctx.train.fingerprint(), str(ctx.engine.cache_dir))
    if key not in _ENCODERS:
        _ENCODERS[key] = load_model(spec, data=ctx.train, quick=False, progress=False,
                                    cache_dir=ctx.engine.cache_dir)  # fmt: skip
    return _ENCODERS[key]
