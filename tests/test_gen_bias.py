"""generative.bias science: group shares, chi-square, TVD, per-prompt Holm flags."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from mmsafe.methods.generative.bias import (
    group_distribution,
    group_distribution_by_prompt,
    reference_distribution,
)
from mmsafe.methods.hallucination import holm, wilson_interval
from mmsafe.metrics.bootstrap import bootstrap_ci

COLOURS = ["red", "green", "blue", "yellow"]


def test_group_distribution_matches_scipy_and_hand() -> None:
    groups = ["red"] * 30 + ["green"] * 10 + ["blue"] * 15 + ["yellow"] * 5
    ref = {"red": 2, "green": 1, "blue": 1, "yellow": 0.5, "purple": 0.5}  # weights, normalised
    r = group_distribution(groups, ref, n_boot=300, seed=3)
    p = np.array([2, 1, 1, 0.5, 0.5]) / 5
    counts = np.array([30, 10, 15, 5, 0])
    assert r["categories"] == ["red", "green", "blue", "yellow", "purple"]
    assert list(r["counts"].values()) == counts.tolist()
    assert r["reference"] == pytest.approx(dict(zip(r["categories"], p, strict=True)))
    chi2, pv = stats.chisquare(counts, 60 * p)
    assert (r["chi2"], r["p_value"], r["dof"]) == (pytest.approx(chi2), pytest.approx(pv), 4)
    shares = counts / 60
    assert r["tvd"] == pytest.approx(0.5 * np.abs(shares - p).sum())
    assert r["share_ci"]["blue"] == wilson_interval(15, 60)
    gaps = shares - p
    assert r["max_gap_group"] == r["categories"][int(np.argmax(np.abs(gaps)))]
    assert r["max_gap"] == pytest.approx(gaps[np.argmax(np.abs(gaps))])

    # the TVD interval is the plain percentile bootstrap over generations (same resamples)
    codes = np.array([r["categories"].index(g) for g in groups])

    def tvd(c: np.ndarray) -> float:
        return 0.5 * np.abs(np.bincount(c, minlength=5) / c.size - p).sum()

    lo, hi = bootstrap_ci(tvd, codes, n_boot=300, seed=3)
    assert r["tvd_ci"] == (pytest.approx(lo), pytest.approx(hi))
    assert lo <= r["tvd"] <= hi


def test_uniform_default_and_zero_reference_groups() -> None:
    r = group_distribution(["a", "b", "b", "a"], n_boot=20)
    assert r["reference"] == {"a": 0.5, "b": 0.5} and r["p_value"] == pytest.approx(1.0)
    r = group_distribution(["a", "b", "b"], {"a": 1, "b": 1, "c": 0}, n_boot=20)
    assert r["dof"] == 1 and r["counts"]["c"] == 0  # unobserved zero-share group: not tested
    single = group_distribution(["a", "a"], n_boot=20)
    assert (single["chi2"], single["p_value"], single["tvd"]) == (0.0, 1.0, 0.0)
    assert reference_distribution({"x": 1, "y": 3}) == {"x": 0.25, "y": 0.75}


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="not in `reference`"):
        group_distribution(["red", "pink"], {"red": 1})
    with pytest.raises(ValueError, match="share 0"):
        group_distribution(["red", "pink"], {"red": 1, "pink": 0})
    with pytest.raises(ValueError, match="empty"):
        group_distribution([])
    with pytest.raises(ValueError, match="non-negative"):
        group_distribution(["a"], {"a": -1, "b": 2})
    with pytest.raises(ValueError, match="alpha"):
        group_distribution_by_prompt(["p"], ["a"], alpha=1.5)
    with pytest.raises(ValueError, match="entries"):
        group_distribution_by_prompt(["p", "q"], ["a"])


def _generations(rng: np.random.Generator, skew: dict[str, float], n: int) -> tuple[list, list]:
    prompts, groups = [], []
    for shape in ("square", "circle", "triangle"):
        p = np.full(4, 0.25)
        if shape in skew:  # the planted skew: this share of the first colour, rest even
            p = np.r_[skew[shape], np.full(3, (1 - skew[shape]) / 3)]
        prompts += [shape] * n
        groups += [COLOURS[i] for i in rng.choice(4, size=n, p=p)]
    return prompts, groups


def test_planted_skew_is_flagged() -> None:
    rng = np.random.default_rng(0)
    prompts, groups = _generations(rng, {"square": 0.9}, 100)
    r = group_distribution_by_prompt(prompts, groups, dict.fromkeys(COLOURS, 1), n_boot=100)
    assert r["flagged"] == ["square"]
    square = r["prompts"][0]
    assert square["prompt"] == "square" and square["max_gap_group"] == "red"
    assert square["max_gap"] > 0.5 and square["tvd_ci"][0] > 0.5
    raw = [row["p_value"] for row in r["prompts"]]
    assert [row["p_adjusted"] for row in r["prompts"]] == pytest.approx(holm(raw).tolist())


def test_uniform_control_false_flags_at_most_alpha() -> None:
    """Holm keeps the family-wise error at alpha = 0.05: over 40 seeded repetitions of three
    uniform prompts we expect about 2 repetitions with a false flag; 6 or more would happen
    with probability 1.4% if the true rate were exactly 5% (binomial tail), so allow 5."""
    reps, any_flag, prompt_flags = 40, 0, 0
    for seed in range(reps):
        prompts, groups = _generations(np.random.default_rng(100 + seed), {}, 120)
        r = group_distribution_by_prompt(prompts, groups, None, n_boot=20)
        any_flag += bool(r["flagged"])
        prompt_flags += len(r["flagged"])
    assert any_flag <= 5, f"{any_flag}/{reps} uniform repetitions flagged"
    assert stats.binom(reps, 0.05).sf(any_flag - 1) > 0.01  # not implausible at 5%
    print(f"uniform control: {any_flag}/{reps} repetitions, {prompt_flags}/{3 * reps} prompts")
