"""Object hallucination in vision-language models: POPE, CHAIR and a co-occurrence test.

A model *hallucinates* an object when it says the object is in an image that does not show it.
Three complementary measurements, all pure functions of plain Python data:

1. **POPE** (Li et al., EMNLP 2023, "Evaluating Object Hallucination in Large Vision-Language
   Models"): ask "is there a {object}?" about objects that are present (answer "yes") and as many
   that are absent (answer "no"), with the absent ones drawn at *random*, among the most
   *popular* objects, or *adversarially* among the objects that co-occur most with the image's
   own (:func:`pope_probes`, :func:`object_statistics`). Free-form answers are turned into
   yes / no / unscorable (:func:`parse_yes_no`) and scored (:func:`pope_metrics`,
   :func:`pope_metrics_bootstrap`).
2. **CHAIR** (Rohrbach et al., EMNLP 2018, "Object Hallucination in Image Captioning"): the
   share of object mentions in generated captions that are not in the image (``CHAIR_i``) and
   the share of captions with at least one such mention (``CHAIR_s``) (:func:`chair`,
   :func:`chair_bootstrap`).
3. **Co-occurrence bias** (:func:`cooccurrence_hallucination`): is the false-"yes" rate for an
   absent object ``b`` higher when the image shows ``a``? A one-sided Fisher exact test per
   ``(a, b)`` pair, Holm-corrected across pairs (:func:`holm`). This is what exposes a model
   that learned "cross implies diamond" from a biased training set.

Proportions get Wilson intervals (:func:`wilson_interval`); the aggregate metrics get percentile
bootstrap intervals from :mod:`mmsafe.metrics.bootstrap` (same resamples for the same seed).

Example:
    >>> probes = pope_probes([["cross"], ["circle", "cross"]], ["circle", "cross", "diamond"],
    ...                      "random", n_neg=1, rng=0)
    >>> [(i, truth) for i, _, truth in probes]
    [(0, 1), (0, 0), (1, 1), (1, 0)]
    >>> answers = ["Yes.", "No, there is not.", "yes", "Yes, I see one."]
    >>> m = pope_metrics([t for *_, t in probes], [parse_yes_no(a) for a in answers])
    >>> m["accuracy"], m["yes_ratio"]
    (0.75, 0.75)
"""

from __future__ import annotations

import math
import numbers
import re
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from scipy import stats

from mmsafe.metrics.arrays import as_numpy as _as_numpy
from mmsafe.metrics.bootstrap import check_options as _check_options
from mmsafe.metrics.bootstrap import percentile_interval as _percentile_interval
from mmsafe.metrics.bootstrap import resample_counts as _resample_counts

__all__ = [
    "SETTINGS",
    "chair",
    "chair_bootstrap",
    "cooccurrence_hallucination",
    "holm",
    "object_statistics",
    "parse_yes_no",
    "pope_metrics",
    "pope_metrics_bootstrap",
    "pope_probes",
    "wilson_interval",
]

Setting = Literal["random", "popular", "adversarial"]
SETTINGS: tuple[str, ...] = ("random", "popular", "adversarial")
"""POPE's three ways of drawing the absent objects."""

YES, NO, UNSCORABLE = 1, 0, -1

_NO_WORDS = frozenset({"no", "not"})
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_SENTENCE_END = re.compile(r"[.!?]")


# ------------------------------------------------------------------------------ answers
def parse_yes_no(answer: str, *, rule: Literal["strict", "pope"] = "strict") -> int:
    """Score a free-form answer to "is there a {object}?" as 1 (yes), 0 (no) or -1 (unscorable).

    POPE's official rule (``evaluate.py`` of the POPE repository, copied by LLaVA's
    ``eval_pope.py``): keep the text before the first ``"."``, drop commas, split on spaces; the
    answer is *no* if a word is exactly ``"No"``, ``"no"`` or ``"not"``, and *yes* otherwise.
    So "no" / "not" anywhere in the first sentence wins ("Yes, there is no diamond" is no), and
    anything else, even an empty or evasive answer, counts as yes. ``rule="pope"`` reproduces
    that exactly.

    ``rule="strict"`` (the default) keeps POPE's "no wins" rule but never guesses yes:

    * the first sentence ends at the first ``.``, ``!`` or ``?``;
    * words are lower-cased and stripped of punctuation, so "NO!" and "Not really" are no;
    * a contraction ending in ``n't`` ("isn't", "don't") counts as "not", hence no;
    * otherwise the answer is yes only if the word "yes" occurs, else unscorable (-1).

    Unscorable answers must count as wrong, never as yes (see :func:`pope_metrics`).

    Args:
        answer: the model's answer.
        rule: ``"strict"`` (yes / no / unscorable) or ``"pope"`` (POPE's yes / no).

    Returns:
        1, 0 or -1 (``"pope"`` never returns -1).

    Raises:
        TypeError: ``answer`` is not a string.
        ValueError: an unknown ``rule``.

    Example:
        >>> [parse_yes_no(a) for a in ["Yes.", "No, there isn't.", "There is a diamond.", ""]]
        [1, 0, -1, -1]
        >>> [parse_yes_no(a, rule="pope") for a in ["There is a diamond.", "NO", "not sure"]]
        [1, 1, 0]
    """
    if not isinstance(answer, str):
        raise TypeError(f"`answer` must be a string, got {type(answer).__name__}.")
    if rule == "pope":
        text = answer.split(".")[0] if "." in answer else answer
        words = text.replace(",", "").split(" ")
        return NO if ("No" in words or "not" in words or "no" in words) else YES
    if rule != "strict":
        raise ValueError(f"`rule` must be 'strict' or 'pope', got {rule!r}.")
    first = _SENTENCE_END.split(answer, maxsplit=1)[0]
    words = _WORD.findall(first.lower().replace("\u2019", "'"))
    if any(w in _NO_WORDS or w.endswith("n't") for w in words):
        return NO
    return YES if "yes" in words else UNSCORABLE


# ------------------------------------------------------------------------------ probes
def _unique(objects: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(objects))


def object_statistics(
    objects_per_image: Sequence[Sequence[str]],
) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Object frequencies and pairwise co-occurrences over a set of images (POPE's statistics).

    Each image counts once per object, however often the object appears in it.

    Args:
        objects_per_image: the objects of each image, e.g. of the *training* scenes.

    Returns:
        ``(frequency, cooccurrence)``: ``frequency[o]`` is the number of images showing ``o``;
        ``cooccurrence[(a, b)]`` (``a != b``) the number showing both. Both orders of a pair are
        stored, so ``cooccurrence[(a, b)] == cooccurrence[(b, a)]``; pairs never seen together
        are left out.

    Example:
        >>> freq, co = object_statistics([["cross", "diamond"], ["cross"], ["circle"]])
        >>> freq["cross"], co[("cross", "diamond")], co[("diamond", "cross")]
        (2, 1, 1)
        >>> ("cross", "circle") in co
        False
    """
    frequency: Counter[str] = Counter()
    cooccurrence: Counter[tuple[str, str]] = Counter()
    for objects in objects_per_image:
        present = _unique(objects)
        frequency.update(present)
        cooccurrence.update((a, b) for a in present for b in present if a != b)
    return dict(frequency), dict(cooccurrence)


def pope_probes(
    objects_per_image: Sequence[Sequence[str]],
    vocabulary: Sequence[str],
    setting: Setting,
    *,
    n_neg: int,
    rng: np.random.Generator | int,
    frequency: Mapping[str, int] | None = None,
    cooccurrence: Mapping[tuple[str, str], int] | None = None,
) -> list[tuple[int, str, int]]:
    """POPE's balanced yes/no probes: present objects (truth 1) and as many absent ones (truth 0).

    Per image, ``k = min(n_neg, #present, #absent)`` present objects are drawn at random as
    positives and ``k`` absent objects of ``vocabulary`` as negatives, so every image (and the
    whole set) has exactly as many "yes" as "no" probes; an image with no present or no absent
    object gives none. The negatives are (Li et al. 2023, Sec. 4):

    * ``"random"``: a uniform random ``k``-subset of the absent objects;
    * ``"popular"``: the ``k`` absent objects with the highest ``frequency`` (images showing them);
    * ``"adversarial"``: the ``k`` absent objects with the highest total co-occurrence
      ``sum_a cooccurrence[(a, b)]`` over the image's present objects ``a``.

    Ties (including objects never seen, score 0) are broken at random, so POPE's fallback "random
    object when the ranking runs out" is built in. The adversarial score follows the paper's
    description ("rank all objects by their co-occurring frequencies with the ground-truth
    objects"); POPE's released code instead pairs each positive with its own top co-occurring
    absent object, which can differ when an image shows several objects.

    Pass ``frequency`` / ``cooccurrence`` from :func:`object_statistics` of the *training*
    images to probe the biases a model may have learned there; left ``None``, they are computed
    from ``objects_per_image`` itself (as POPE does on COCO).

    Args:
        objects_per_image: the objects each image shows (duplicates are ignored).
        vocabulary: every object that may be asked about; must contain all present objects.
        setting: ``"random"``, ``"popular"`` or ``"adversarial"``.
        n_neg: number of negative (and positive) probes per image, at most.
        rng: a ``numpy.random.Generator`` or an integer seed.
        frequency: per-object image counts (``"popular"``).
        cooccurrence: per-pair image counts, keyed ``(a, b)`` (``"adversarial"``).

    Returns:
        ``[(image_index, object, truth), ...]``, per image alternating a positive and a negative.

    Raises:
        ValueError: an unknown ``setting``, ``n_neg < 1``, a duplicated vocabulary entry or a
            present object outside ``vocabulary``.

    Example:
        >>> freq, co = object_statistics([["cross", "diamond"]] * 9 + [["cross", "square"]])
        >>> vocab = ["circle", "square", "cross", "diamond"]
        >>> pope_probes([["cross"]], vocab, "adversarial", n_neg=1, rng=0, cooccurrence=co)
        [(0, 'cross', 1), (0, 'diamond', 0)]
        >>> pope_probes([["circle"]], vocab, "popular", n_neg=1, rng=0, frequency=freq)[1][1]
        'cross'
    """
    if setting not in SETTINGS:
        raise ValueError(f"`setting` must be one of {SETTINGS}, got {setting!r}.")
    if isinstance(n_neg, bool) or not isinstance(n_neg, numbers.Integral) or n_neg < 1:
        raise ValueError(f"`n_neg` must be a positive integer, got {n_neg!r}.")
    vocab = list(vocabulary)
    if len(set(vocab)) != len(vocab):
        raise ValueError("`vocabulary` has duplicated objects.")
    known = set(vocab)
    images = [_unique(objects) for objects in objects_per_image]
    for i, present in enumerate(images):
        unknown = sorted(set(present) - known)
        if unknown:
            raise ValueError(f"image {i} shows {unknown}, which are not in `vocabulary`.")
    freq: Mapping[str, int] = {}
    co: Mapping[tuple[str, str], int] = {}
    if setting == "popular":
        freq = frequency if frequency is not None else object_statistics(images)[0]
    elif setting == "adversarial":
        co = cooccurrence if cooccurrence is not None else object_statistics(images)[1]
    gen = np.random.default_rng(rng)
    probes: list[tuple[int, str, int]] = []
    for i, present in enumerate(images):
        shown = set(present)
        absent = [o for o in vocab if o not in shown]
        k = min(int(n_neg), len(present), len(absent))
        if k == 0:
            continue
        positives = [present[j] for j in gen.permutation(len(present))[:k]]
        # random: every score 0, so the random tie-break alone decides
        score = [freq.get(b, 0) + sum(co.get((a, b), 0) for a in present) for b in absent]
        tiebreak = gen.random(len(absent))
        ranked = sorted(range(len(absent)), key=lambda j: (-score[j], tiebreak[j]))
        for pos, j in zip(positives, ranked[:k], strict=True):
            probes.append((i, pos, 1))
            probes.append((i, absent[j], 0))
    return probes


# ------------------------------------------------------------------------------ POPE metrics
def _int_array(x: Any, name: str, allowed: tuple[int, ...]) -> np.ndarray:
    arr = _as_numpy(x, name)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D array, got shape {arr.shape}.")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(f"`{name}` must hold integers (or bools), got dtype {arr.dtype}.")
    arr = arr.astype(np.int64)
    bad = sorted(set(np.unique(arr).tolist()) - set(allowed))
    if bad:
        raise ValueError(f"`{name}` must only hold {allowed}, got {bad}.")
    return arr


def _pope_design(truth: Any, predicted: Any) -> np.ndarray:
    """Per probe ``[1, correct, said yes, true positive, positive]`` as float columns."""
    t = _int_array(truth, "truth", (0, 1))
    p = _int_array(predicted, "predicted", (-1, 0, 1))
    if t.shape != p.shape:
        raise ValueError(
            f"`truth` and `predicted` must have the same length, got {t.size} and {p.size}."
        )
    yes = p == YES
    return np.column_stack([np.ones(t.size), p == t, yes, yes & (t == 1), t == 1]).astype(
        np.float64
    )


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> Any:
    """``num / den``, NaN where ``den == 0`` (works on scalars and arrays)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _pope_from_sums(s: np.ndarray) -> dict[str, Any]:
    n, correct, yes, tp, pos = (s[..., j] for j in range(5))
    return {
        "accuracy": _ratio(correct, n),
        "precision": _ratio(tp, yes),
        "recall": _ratio(tp, pos),
        "f1": _ratio(2 * tp, yes + pos),  # 2TP / (2TP + FP + FN)
        "yes_ratio": _ratio(yes, n),
    }


def pope_metrics(truth: Any, predicted: Any) -> dict[str, float]:
    """POPE's accuracy, precision, recall, F1 and yes-ratio, with unscorable answers as wrong.

    ``predicted`` holds :func:`parse_yes_no` scores. An unscorable answer (-1) is never a yes:
    it stays in the denominators of accuracy and yes-ratio and is wrong whatever the truth; on a
    positive probe it is a miss (it lowers recall), on a negative one it is not a false alarm
    (precision is over the "yes" answers only). With the counts ``TP`` (yes to a present
    object), ``FP`` (yes to an absent one), ``TN``, ``FN`` (no to a present one) and ``U``
    (unscorable):

    * ``accuracy = (TP + TN) / N``; ``yes_ratio = (TP + FP) / N``;
    * ``precision = TP / (TP + FP)``; ``recall = TP / #positives``;
    * ``f1 = 2 TP / ((TP + FP) + #positives)``, i.e. ``2PR / (P + R)``.

    This equals scikit-learn's ``precision_recall_fscore_support(truth, predicted, labels=[1],
    average="micro")`` with -1 as a third class. Without unscorable answers it is POPE's
    ``evaluate.py``. A ratio with a zero denominator is NaN (e.g. precision when nothing is
    answered yes) rather than POPE's crash.

    Args:
        truth: ``(N,)`` 1 (object present) or 0.
        predicted: ``(N,)`` 1 (yes), 0 (no) or -1 (unscorable); bools are accepted.

    Returns:
        ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio`` (floats) and the counts
        ``n``, ``tp``, ``fp``, ``tn``, ``fn``, ``unscorable`` (ints).

    Raises:
        ValueError: empty or mismatched inputs, or values outside the allowed sets.

    Example:
        >>> m = pope_metrics([1, 1, 0, 0], [1, -1, 0, 1])
        >>> m["accuracy"], m["precision"], m["recall"], m["yes_ratio"], m["unscorable"]
        (0.5, 0.5, 0.5, 0.5, 1)
    """
    design = _pope_design(truth, predicted)
    n, _, yes, tp, _ = design.sum(axis=0)
    p = _int_array(predicted, "predicted", (-1, 0, 1))
    t = design[:, 4].astype(bool)
    out: dict[str, float] = {k: float(v) for k, v in _pope_from_sums(design.sum(axis=0)).items()}
    out.update(
        n=int(n),
        tp=int(tp),
        fp=int(yes - tp),
        tn=int(np.sum(~t & (p == NO))),
        fn=int(np.sum(t & (p == NO))),
        unscorable=int(np.sum(p == UNSCORABLE)),
    )
    return out


def _group_sums(design: np.ndarray, groups: Any) -> np.ndarray:
    g = _as_numpy(groups, "groups")
    if g.shape != (design.shape[0],):
        raise ValueError(f"`groups` must have one entry per probe ({design.shape[0]}).")
    _, inverse = np.unique(g, return_inverse=True)
    sums = np.zeros((int(inverse.max()) + 1, design.shape[1]))
    np.add.at(sums, inverse, design)
    return sums


def pope_metrics_bootstrap(
    truth: Any,
    predicted: Any,
    *,
    groups: Any = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of every rate of :func:`pope_metrics`, vectorised.

    Probes are resampled with replacement (the resamples of :mod:`mmsafe.metrics.bootstrap`, so
    the accuracy interval equals ``mean_ci(predicted == truth)`` for the same seed). Probes of one
    image are correlated; pass ``groups`` (e.g. the image index of each probe) to resample whole
    images instead (a cluster bootstrap, usually wider and more honest). Resamples where a rate is
    undefined (e.g. no "yes" for precision) are ignored for that rate.

    Args:
        truth: ``(N,)`` 1 or 0.
        predicted: ``(N,)`` 1, 0 or -1.
        groups: optional ``(N,)`` cluster label of each probe.
        n_boot: number of resamples.
        level: confidence level in ``(0, 1)``.
        seed: seed of the resamples.

    Returns:
        ``{"accuracy": (lo, hi), "precision": ..., "recall": ..., "f1": ..., "yes_ratio": ...}``.

    Example:
        >>> ci = pope_metrics_bootstrap([1] * 50 + [0] * 50, [1] * 50 + [0] * 50, n_boot=100)
        >>> ci["accuracy"], ci["yes_ratio"][0] < 0.5 < ci["yes_ratio"][1]
        ((1.0, 1.0), True)
    """
    _check_options(n_boot, level, seed)
    design = _pope_design(truth, predicted)
    units = design if groups is None else _group_sums(design, groups)
    per: dict[str, list[np.ndarray]] = {
        k: [] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")
    }
    for counts in _resample_counts(units.shape[0], int(n_boot), seed):
        for k, v in _pope_from_sums(counts @ units).items():
            per[k].append(v)
    return {k: _percentile_interval(np.concatenate(v), level) for k, v in per.items()}


# ------------------------------------------------------------------------------ CHAIR
def _term_pattern(term: str) -> str:
    return r"\s+".join(re.escape(w) for w in term.split())


def _chair_counts(
    captions: Sequence[str],
    truth_objects: Sequence[Collection[str]],
    vocabulary: Sequence[str],
    synonyms: Mapping[str, str] | None,
) -> tuple[list[list[str]], list[list[str]]]:
    """Per caption, the canonical objects mentioned and the hallucinated ones (in order)."""
    if isinstance(captions, str):
        raise ValueError("`captions` must be a sequence of captions, not one string.")
    if len(captions) != len(truth_objects):
        raise ValueError(
            f"`captions` and `truth_objects` must have the same length, got {len(captions)} "
            f"and {len(truth_objects)}."
        )
    if len(captions) == 0:
        raise ValueError("`captions` is empty: CHAIR needs at least one caption.")
    canon = {" ".join(v.lower().split()): " ".join(v.lower().split()) for v in vocabulary}
    for word, obj in (synonyms or {}).items():
        target = " ".join(obj.lower().split())
        if target not in canon:
            raise ValueError(f"synonym {word!r} maps to {obj!r}, which is not in `vocabulary`.")
        canon[" ".join(word.lower().split())] = target
    if not canon:
        raise ValueError("`vocabulary` is empty.")
    terms = sorted(canon, key=len, reverse=True)  # longest first: "baseball bat" before "bat"
    pattern = re.compile(
        r"\b(" + "|".join(_term_pattern(t) for t in terms) + r")(?:es|s)?\b", re.IGNORECASE
    )
    mentioned: list[list[str]] = []
    hallucinated: list[list[str]] = []
    for caption, truth in zip(captions, truth_objects, strict=True):
        present = {canon.get(" ".join(t.lower().split()), t.lower()) for t in truth}
        found = [canon[" ".join(m.group(1).lower().split())] for m in pattern.finditer(caption)]
        mentioned.append(found)
        hallucinated.append([o for o in found if o not in present])
    return mentioned, hallucinated


def chair(
    captions: Sequence[str],
    truth_objects: Sequence[Collection[str]],
    vocabulary: Sequence[str],
    synonyms: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """CHAIR (Rohrbach et al. 2018): the hallucinated share of object mentions and of captions.

    * ``CHAIR_i = #hallucinated object mentions / #object mentions`` (over all captions);
    * ``CHAIR_s = #captions with at least one hallucinated mention / #captions``.

    A *mention* is a vocabulary object or synonym found in the caption as whole words (case-
    insensitive, any whitespace inside multi-word objects), optionally followed by the plural
    ``s`` / ``es`` ("circles", "crosses"); irregular plurals go in ``synonyms``
    (``{"mice": "mouse"}``). Longer terms win over their prefixes ("baseball bat" over "bat").
    As in the reference implementation, every mention counts, repeats included, and a mention is
    hallucinated when its canonical object is not among the caption's ``truth_objects`` (which
    are mapped through ``synonyms`` too). Like CHAIR, no negation handling: "there is no cross"
    mentions a cross.

    Args:
        captions: the generated captions.
        truth_objects: the objects each caption's image really shows.
        vocabulary: the canonical objects to look for.
        synonyms: extra words mapped to a vocabulary object, e.g. ``{"ring": "circle"}``.

    Returns:
        ``chair_i`` (NaN when no caption mentions any object), ``chair_s``, the counts
        ``n_captions``, ``n_mentions``, ``n_hallucinated`` and, per caption, the lists
        ``mentioned`` and ``hallucinated`` of canonical objects in order of appearance.

    Raises:
        ValueError: mismatched or empty inputs, or a synonym of an unknown object.

    Example:
        >>> r = chair(["two circles and a ring", "a star near a cross"], [["circle"], ["star"]],
        ...           ["circle", "star", "cross"], synonyms={"ring": "circle"})
        >>> r["chair_i"], r["chair_s"], r["hallucinated"]
        (0.25, 0.5, [[], ['cross']])
    """
    mentioned, hallucinated = _chair_counts(captions, truth_objects, vocabulary, synonyms)
    n_mentions = sum(map(len, mentioned))
    n_hallucinated = sum(map(len, hallucinated))
    return {
        "chair_i": n_hallucinated / n_mentions if n_mentions else math.nan,
        "chair_s": sum(bool(h) for h in hallucinated) / len(captions),
        "n_captions": len(captions),
        "n_mentions": n_mentions,
        "n_hallucinated": n_hallucinated,
        "mentioned": mentioned,
        "hallucinated": hallucinated,
    }


def chair_bootstrap(
    captions: Sequence[str],
    truth_objects: Sequence[Collection[str]],
    vocabulary: Sequence[str],
    synonyms: Mapping[str, str] | None = None,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of :func:`chair`'s ``chair_i`` and ``chair_s``.

    Whole captions are resampled (the mentions of one caption stay together), so ``CHAIR_i`` is
    a ratio of resampled sums and the ``CHAIR_s`` interval equals :func:`mean_ci
    <mmsafe.metrics.bootstrap.mean_ci>` of the per-caption "has a hallucination" flags.

    Example:
        >>> caps = ["a circle", "a cross"] * 20
        >>> ci = chair_bootstrap(caps, [["circle"]] * 40, ["circle", "cross"], n_boot=200)
        >>> bool(ci["chair_s"][0] < 0.5 < ci["chair_s"][1])
        True
    """
    _check_options(n_boot, level, seed)
    mentioned, hallucinated = _chair_counts(captions, truth_objects, vocabulary, synonyms)
    design = np.array(
        [[len(m), len(h), bool(h)] for m, h in zip(mentioned, hallucinated, strict=True)],
        dtype=np.float64,
    )
    n = design.shape[0]
    chair_i, chair_s = [], []
    for counts in _resample_counts(n, int(n_boot), seed):
        sums = counts @ design
        chair_i.append(_ratio(sums[:, 1], sums[:, 0]))
        chair_s.append(sums[:, 2] / n)
    return {
        "chair_i": _percentile_interval(np.concatenate(chair_i), level),
        "chair_s": _percentile_interval(np.concatenate(chair_s), level),
    }


# ------------------------------------------------------------------------------ statistics
def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n``.

    With ``p = k / n`` and ``z`` the ``(1 + level) / 2`` normal quantile, the interval is
    ``(p + z^2 / 2n -+ z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n)`` (no continuity
    correction; the same as ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``).
    Unlike the Wald interval it stays inside ``[0, 1]`` and is not degenerate at 0 or ``n``.

    Args:
        successes: ``k``, in ``[0, n]``.
        n: number of trials; ``n = 0`` gives ``(nan, nan)``.
        level: confidence level in ``(0, 1)``.

    Raises:
        ValueError: a negative ``n``, ``k`` outside ``[0, n]`` or a bad ``level``.

    Example:
        >>> tuple(round(x, 4) for x in wilson_interval(0, 10))
        (0.0, 0.2775)
    """
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"`level` must be in (0, 1), got {level!r}.")
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}.")
    if n == 0:
        return (math.nan, math.nan)
    z = float(stats.norm.ppf((1.0 + float(level)) / 2.0))
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def holm(p_values: Any) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control, any dependence).

    Sorted ascending, ``p_(j)`` (``j = 1..m``) becomes ``max_{i <= j} (m - i + 1) p_(i)``, capped
    at 1; reject where the adjusted value is ``<= alpha``.

    Example:
        >>> holm([0.01, 0.04, 0.03, 0.005]).round(3).tolist()
        [0.03, 0.06, 0.06, 0.02]
    """
    p = np.asarray(p_values, dtype=np.float64).ravel()
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def _cooccurrence_test(reference: list[set[str]], a: str, b: str) -> tuple[float, float]:
    """``(lift, one-sided Fisher p)`` of ``a`` and ``b`` appearing together in ``reference``."""
    has_a = np.array([a in s for s in reference], dtype=bool)
    has_b = np.array([b in s for s in reference], dtype=bool)
    both = int((has_a & has_b).sum())
    expected = has_a.sum() * has_b.sum() / max(len(reference), 1)
    table = [[both, int((has_a & ~has_b).sum())], [int((~has_a & has_b).sum()),
             int((~has_a & ~has_b).sum())]]  # fmt: skip
    p = float(stats.fisher_exact(table, alternative="greater").pvalue)
    return (both / expected if expected > 0 else 0.0), min(p, 1.0)


def cooccurrence_hallucination(
    present_sets: Sequence[Collection[str]],
    probe_objects: Sequence[str],
    said_yes: Any,
    *,
    alpha: float = 0.05,
    reference: Sequence[Collection[str]] | None = None,
) -> list[dict[str, Any]]:
    """Test every (present ``a``, absent ``b``) pair for co-occurrence-driven false "yes".

    Only probes of an *absent* object count (a "yes" there is a false positive, FP). For each
    probed object ``b`` and each object ``a`` shown on some of the images where ``b`` was probed
    and absent, those probes split in two: ``a`` shown (``n_with`` probes, ``fp_with`` yes) and
    ``a`` not shown (``n_without``, ``fp_without``). A one-sided Fisher exact test
    (``scipy.stats.fisher_exact(..., alternative="greater")``) asks whether the FP rate is higher
    with ``a``; the p-values are Holm-adjusted (:func:`holm`) over all tested pairs, so the
    chance of flagging any pair when no bias exists is at most ``alpha``. Pairs with
    ``n_with = 0`` or ``n_without = 0`` cannot be compared and are left out. Unscorable answers
    (-1) are not yes.

    An excess of false "yes" alone may be a visual confusion (a faint diamond looks like a
    circle) rather than a learnt co-occurrence. With ``reference`` (the objects of each
    *training* image), a second one-sided Fisher test asks whether ``a`` and ``b`` appear
    together in it more often than independence predicts (``lift`` is the observed over the
    expected count); those p-values are Holm-adjusted too (``p_cooccur``), and a pair is
    ``flagged`` only when both tests reject. ``confused`` marks the excess alone.

    Args:
        present_sets: per probe, the objects its image shows.
        probe_objects: per probe, the object asked about.
        said_yes: per probe, the answer: bools, or :func:`parse_yes_no` scores (1 is yes).
        alpha: family-wise significance level of the flags.
        reference: per training image, its objects; without it a pair is flagged on the
            false-"yes" excess alone.

    Returns:
        One dict per tested pair, most significant first (ties by ``a``, ``b``): ``a``, ``b``,
        ``fp_rate_with``, ``fp_rate_without``, ``n_with``, ``n_without``, ``fp_with``,
        ``fp_without``, ``ci_with`` / ``ci_without`` (95% Wilson intervals of the two rates),
        ``p_value``, ``p_adjusted``, ``confused`` (``p_adjusted <= alpha``) and ``flagged``
        (``confused``, and with ``reference`` also ``p_cooccur <= alpha``); with ``reference``
        also ``lift`` and ``p_cooccur``.

    Raises:
        ValueError: mismatched lengths, bad answers or a bad ``alpha``.

    Example:
        >>> present = [{"cross"}] * 20 + [{"circle"}] * 20
        >>> rows = cooccurrence_hallucination(present, ["diamond"] * 40, [1] * 18 + [0] * 22)
        >>> [(r["a"], r["b"], r["fp_rate_with"], r["flagged"]) for r in rows]
        [('cross', 'diamond', 0.9, True), ('circle', 'diamond', 0.0, False)]
    """
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}.")
    if isinstance(probe_objects, str):
        raise ValueError("`probe_objects` must be a sequence of objects, not one string.")
    n = len(probe_objects)
    if len(present_sets) != n:
        raise ValueError(
            f"`present_sets` and `probe_objects` must have the same length, got "
            f"{len(present_sets)} and {n}."
        )
    yes = _int_array(said_yes, "said_yes", (-1, 0, 1)) == YES
    if yes.size != n:
        raise ValueError(f"`said_yes` must have one answer per probe ({n}), got {yes.size}.")
    sets = [set(s) for s in present_sets]
    absent = np.array([probe_objects[i] not in sets[i] for i in range(n)], dtype=bool)
    rows: list[dict[str, Any]] = []
    for b in sorted({probe_objects[i] for i in range(n) if absent[i]}):
        idx = [i for i in range(n) if absent[i] and probe_objects[i] == b]
        fp_b = int(yes[idx].sum())
        for a in sorted(set().union(*(sets[i] for i in idx))):
            with_a = np.array([a in sets[i] for i in idx], dtype=bool)
            n_with, n_without = int(with_a.sum()), len(idx) - int(with_a.sum())
            if n_with == 0 or n_without == 0:
                continue
            fp_with = int(yes[idx][with_a].sum())
            fp_without = fp_b - fp_with
            table = [[fp_with, n_with - fp_with], [fp_without, n_without - fp_without]]
            p = float(stats.fisher_exact(table, alternative="greater").pvalue)
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "fp_rate_with": fp_with / n_with,
                    "fp_rate_without": fp_without / n_without,
                    "n_with": n_with,
                    "n_without": n_without,
                    "fp_with": fp_with,
                    "fp_without": fp_without,
                    "ci_with": wilson_interval(fp_with, n_with),
                    "ci_without": wilson_interval(fp_without, n_without),
                    "p_value": min(p, 1.0),
                }
            )
    adjusted = holm([r["p_value"] for r in rows])
    for r, q in zip(rows, adjusted, strict=True):
        r["p_adjusted"] = float(q)
        r["confused"] = r["flagged"] = bool(q <= alpha)
    if reference is not None and rows:
        ref = [set(s) for s in reference]
        for r in rows:
            r["lift"], r["p_cooccur"] = _cooccurrence_test(ref, r["a"], r["b"])
        for r, q in zip(rows, holm([r["p_cooccur"] for r in rows]), strict=True):
            r["p_cooccur"] = float(q)
            r["flagged"] = bool(r["confused"] and q <= alpha)
    return sorted(rows, key=lambda r: (r["p_value"], r["a"], r["b"]))
