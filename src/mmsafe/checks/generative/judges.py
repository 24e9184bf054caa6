"""What the generative checks share: the attribute judge, the probe prompts and their seeds.

A generated image has no label, so the checks read what it shows with a judge of stated
accuracy: the shapes-gen world's :func:`~mmsafe.methods.generative.attributes.reference_classifier`,
trained on the *flaw-free* version of the world (uniform shapes and colours, stars included) so
that it is not biased toward the flaws it measures. It is trained once per image size (about a
minute on two cores), scored on that world's held-out rows, and kept in the cache folder
(``<cache>/judges/``, safetensors + JSON) so later audits load it.

Every check draws its probe images through :meth:`~mmsafe.engine.Engine.generate_images` with
the seeds of :func:`probe_seeds`, so two checks that probe the same prompt share its images (no
prompt is drawn twice with the same seed).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
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


JUDGE_RECIPE = "shapes-gen-attributes/2"
"""Names the judge's training recipe in its cache folder; bump it when the recipe changes."""


@functools.lru_cache(maxsize=4)
def attribute_judge(image_size: int, seed: int = 0, cache_dir: str | None = None) -> Judge:
    """The reference judge for images of ``image_size`` pixels, from the cache or trained.

    Args:
        image_size: side of the judged images.
        seed: seeds the judge's world and training.
        cache_dir: the cache folder (default: ``$MMSAFE_CACHE_DIR`` or the user cache dir).
    """
    from mmsafe.engine.cache import default_cache_dir

    folder = Path(cache_dir or default_cache_dir()) / "judges"
    folder /= f"{JUDGE_RECIPE.replace('/', '-')}-{int(image_size)}px-seed{int(seed)}"
    if (folder / "judge.json").is_file():
        try:
            return _load_judge(folder)
        except (OSError, ValueError, KeyError, RuntimeError):
            pass  # a damaged entry is a miss
    judge = _train_judge(int(image_size), int(seed))
    _save_judge(judge, folder)
    return judge


def judge_for(ctx: AuditContext) -> Judge:
    """The judge for the audited generator's images, cached in the engine's cache folder."""
    cache = ctx.engine.cache_dir
    return attribute_judge(
        int(ctx.model.image_size), cache_dir=None if cache is None else str(cache)
    )


def _train_judge(image_size: int, seed: int) -> Judge:
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


def _save_judge(judge: Judge, folder: Path) -> None:
    """Weights as safetensors, the rest as JSON (``judge.json`` last: it marks a whole entry)."""
    from safetensors.torch import save_file

    from mmsafe.engine.cache import atomic_write, atomic_write_json

    clf = judge.classifier
    state = {k: v.detach().cpu().contiguous() for k, v in clf.net.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, str(tmp)), False)
    atomic_write_json(folder / "judge.json", {
        "recipe": JUDGE_RECIPE, "width": clf.width,
        "classes": {k: list(v) for k, v in judge.classes.items()},
        "accuracy": judge.accuracy,
        "confusion": {k: v.tolist() for k, v in judge.confusion.items()},
        "classifier_accuracy": clf.accuracy_, "n_eval": clf.n_eval_, "info": clf.info,
    }, durable=False)  # fmt: skip


def _load_judge(folder: Path) -> Judge:
    import json

    from safetensors.torch import load_file

    from mmsafe.methods.generative.attributes import AttributeClassifier

    doc = json.loads((folder / "judge.json").read_text(encoding="utf-8"))
    classes = {k: tuple(v) for k, v in doc["classes"].items()}
    clf = AttributeClassifier.from_state(
        load_file(str(folder / "model.safetensors")), classes, int(doc["width"]),
        accuracy_=doc["classifier_accuracy"], n_eval_=int(doc["n_eval"]),
        info={**doc["info"], "cached": str(folder)},
    )  # fmt: skip
    confusion = {k: np.asarray(v, dtype=np.int64) for k, v in doc["confusion"].items()}
    return Judge(clf, dict(doc["accuracy"]), confusion, classes)


def to_uint8(images: Tensor) -> list[np.ndarray]:
    """Float ``(N, 3, S, S)`` images in ``[0, 1]`` -> uint8 ``(S, S, 3)`` arrays."""
    px = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return list(px)


def probe_seeds(prompt: str, n: int, base: int = 0) -> list[int]:
    """The seeds a generative check draws ``prompt`` with: ``n`` in a row from its hash.

    Every prompt gets its own seeds (images of different prompts are independent draws, as
    the checks' statistics assume), and the same prompt gets the same seeds in every check (the
    engine then draws it once).

    Example:
        >>> a = probe_seeds("a circle", 3)
        >>> a[1] - a[0], a == probe_seeds("a circle", 3), a == probe_seeds("a box", 3)
        (1, True, False)
    """
    from mmsafe.tasks.t2i import row_seed

    start = (row_seed(prompt) + 1_000_003 * int(base)) % 2**31
    return [start + k for k in range(int(n))]


def draw(ctx: AuditContext, prompts: Sequence[str], n_per_prompt: int) -> tuple[Tensor, list[str]]:
    """``(images, prompt of each image)``: each prompt drawn with its :func:`probe_seeds`.

    A replaying generator (``images:<manifest>``) gives the images it holds instead: up to
    ``n_per_prompt`` of each prompt, none of a prompt it lacks.
    """
    if getattr(ctx.model, "replay", False):
        rows = [(p, k) for p in prompts for k in range(min(n_per_prompt, ctx.model.count(p)))]
    else:
        rows = [(p, s) for p in prompts for s in probe_seeds(p, n_per_prompt, ctx.seed)]
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
