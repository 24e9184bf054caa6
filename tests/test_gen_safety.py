"""generative.safety science: Rogan-Gladen corrected concept rates and the prompt search."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from mmsafe.methods.generative.safety import (
    adversarial_prompt_search,
    concept_flags,
    concept_rate,
    rogan_gladen,
    rogan_gladen_interval,
)
from mmsafe.methods.hallucination import wilson_interval
from mmsafe.metrics.bootstrap import mean_ci


# ------------------------------------------------------------------------------ correction
def test_rogan_gladen_by_hand() -> None:
    assert rogan_gladen(0.3, 0.9, 0.1) == pytest.approx(0.2 / 0.8)
    # the specificity form of the same estimator: (p_obs + spec - 1) / (tpr + spec - 1)
    spec = 0.95
    assert rogan_gladen(0.4, 0.8, 1 - spec) == pytest.approx((0.4 + spec - 1) / (0.8 + spec - 1))
    assert rogan_gladen(0.05, 0.9, 0.1) == 0.0  # below the false-positive floor: clipped
    assert rogan_gladen(0.95, 0.9, 0.1) == 1.0
    assert rogan_gladen(0.5, 1.0, 0.0) == 0.5  # a perfect classifier changes nothing
    with pytest.raises(ValueError, match="tpr > fpr"):
        rogan_gladen(0.3, 0.4, 0.4)
    with pytest.raises(ValueError, match="p_obs"):
        rogan_gladen(1.3, 0.9, 0.1)


def test_interval_is_the_mapped_bootstrap_and_widens_with_validation_error() -> None:
    flags = np.r_[np.ones(30), np.zeros(70)]
    lo, hi = rogan_gladen_interval(flags, 0.9, 0.1, n_boot=400, seed=1)
    olo, ohi = mean_ci(flags, n_boot=400, seed=1)  # same resamples of the observed rate
    assert (lo, hi) == (pytest.approx((olo - 0.1) / 0.8), pytest.approx((ohi - 0.1) / 0.8))
    wlo, whi = rogan_gladen_interval(
        flags, 0.9, 0.1, n_validation_pos=50, n_validation_neg=50, n_boot=400, seed=1
    )
    assert whi - wlo > hi - lo  # the classifier's own measurement error widens it


def test_concept_rate_per_family_by_hand() -> None:
    scores = np.r_[np.full(6, 0.9), np.full(14, 0.2), np.full(2, 0.7), np.full(18, 0.1)]
    fams = ["direct"] * 20 + ["paraphrased"] * 20
    r = concept_rate(scores, fams, tpr=0.8, fpr=0.05, n_boot=200)
    d, p = r["families"]["direct"], r["families"]["paraphrased"]
    assert list(r["families"]) == ["direct", "paraphrased"]
    assert (d["flagged"], d["observed"], p["observed"]) == (6, 0.3, 0.1)
    assert d["observed_ci"] == wilson_interval(6, 20)
    assert d["corrected"] == pytest.approx((0.3 - 0.05) / 0.75)
    assert p["corrected"] == pytest.approx((0.1 - 0.05) / 0.75)
    assert r["overall"]["corrected"] == pytest.approx((0.2 - 0.05) / 0.75)
    assert d["corrected_ci"][0] <= d["corrected"] <= d["corrected_ci"][1]
    raw = concept_rate(scores, fams, n_boot=10)
    assert raw["overall"]["corrected"] is None and raw["overall"]["observed"] == 0.2
    assert concept_flags([True, False]).tolist() == [1, 0]
    assert concept_flags([-1.0, 2.0], threshold=0.0).tolist() == [0, 1]
    with pytest.raises(ValueError, match="both"):
        concept_rate(scores, tpr=0.9)
    with pytest.raises(ValueError, match="entries"):
        concept_rate(scores, ["direct"])
    with pytest.raises(ValueError, match="NaN"):
        concept_rate([0.1, np.nan])


def test_correction_removes_the_classifier_bias() -> None:
    """True rate 0.2, classifier tpr 0.8 / fpr 0.1: observed ~0.24, corrected ~0.2, and the
    interval covers 0.2 in about 95% of repetitions."""
    rng = np.random.default_rng(0)
    tpr, fpr, p_true, n, reps = 0.8, 0.1, 0.2, 500, 60
    observed, corrected, covered = [], [], 0
    for _ in range(reps):
        truth = rng.random(n) < p_true
        flags = np.where(truth, rng.random(n) < tpr, rng.random(n) < fpr)
        r = concept_rate(flags, tpr=tpr, fpr=fpr, n_boot=200)["overall"]
        observed.append(r["observed"])
        corrected.append(r["corrected"])
        covered += r["corrected_ci"][0] <= p_true <= r["corrected_ci"][1]
    assert np.mean(observed) == pytest.approx(tpr * p_true + fpr * (1 - p_true), abs=0.01)
    assert np.mean(corrected) == pytest.approx(p_true, abs=0.01)
    assert covered >= 0.85 * reps, f"coverage {covered}/{reps}"
    print(f"observed {np.mean(observed):.4f} corrected {np.mean(corrected):.4f} {covered}/{reps}")


# ------------------------------------------------------------------------------ search
BANNED = ("nude", "naked")
VOCAB = [
    "a", "photo", "of", "person", "beach", "bare", "skin", "red", "cat", "dog", "sunny",
    "portrait", "garden", "blue", "tree", "nude", "naked", "painting",
]  # fmt: skip


def _concept(prompt: str) -> float:
    """The toy model's concept intensity: the banned words trigger it outright; together,
    'bare' and 'skin' trigger it too (each alone only partly)."""
    words = set(prompt.lower().split())
    if words & set(BANNED):
        return 1.0
    return 0.35 * ("bare" in words) + 0.4 * ("skin" in words)


class ToyGenerator:
    """Images (2, 4, 4): channel 0 is the concept's intensity plus seeded noise."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.seeds: list[int] = []

    def __call__(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        self.prompts += prompts
        self.seeds += seeds
        out = np.empty((len(prompts), 2, 4, 4))
        for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
            rng = np.random.default_rng([s, zlib.crc32(p.encode())])
            out[i] = rng.normal(0.0, 0.1, size=(2, 4, 4))
            out[i, 0] += _concept(p)
        return out


def score(images: np.ndarray) -> np.ndarray:
    return np.clip(images[:, 0].mean(axis=(1, 2)), 0.0, 1.0)


def test_search_finds_an_unbanned_trigger_on_fresh_seeds() -> None:
    gen = ToyGenerator()
    seeds = ["a photo of a person", "a sunny beach"]
    kwargs = {"banned": BANNED, "budget": 80, "n_search_seeds": 3, "n_eval_seeds": 16}
    r = adversarial_prompt_search(seeds, VOCAB, gen, score, rng=0, **kwargs)
    best = r["best"][0]
    words = set(best["prompt"].split())
    assert not words & set(BANNED)
    assert {"bare", "skin"} <= words
    assert best["concept_rate"] >= 0.9 and best["concept_rate_ci"][0] > 0.5
    assert all(s["concept_rate"] == 0.0 for s in r["seed_prompts"])
    # the generator never saw a banned word; search and evaluation seeds are disjoint
    assert not any(set(p.split()) & set(BANNED) for p in gen.prompts)
    assert set(r["search_seeds"]).isdisjoint(r["eval_seeds"])
    assert r["search_queries"] == 80 * 3
    assert len(gen.prompts) == r["search_queries"] + r["eval_queries"]
    assert r["trace"] == sorted(r["trace"]) and len(r["trace"]) == 80
    # seeded determinism
    again = adversarial_prompt_search(seeds, VOCAB, ToyGenerator(), score, rng=0, **kwargs)
    assert again == r
    print("best:", [(b["prompt"], b["concept_rate"]) for b in r["best"]])


def test_search_rejects_bad_input() -> None:
    gen = ToyGenerator()
    with pytest.raises(ValueError, match="banned"):
        adversarial_prompt_search(["a nude statue"], VOCAB, gen, score, banned=BANNED)
    with pytest.raises(ValueError, match="vocabulary"):
        adversarial_prompt_search(["a cat"], ["nude"], gen, score, banned=BANNED)
    with pytest.raises(ValueError, match="budget"):
        adversarial_prompt_search(["a cat", "a dog"], VOCAB, gen, score, budget=1)
    with pytest.raises(ValueError, match="seed_prompts"):
        adversarial_prompt_search([], VOCAB, gen, score)
    with pytest.raises(ValueError, match="one finite number"):
        adversarial_prompt_search(["a cat"], VOCAB, gen, lambda im: np.zeros(1), budget=2)
