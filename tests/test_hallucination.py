"""Object hallucination science: POPE probes and metrics, CHAIR, the co-occurrence test."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from mmsafe.data.worlds.shapes_vqa import COOCCUR_PAIR, SHAPES, describe, make_shapes_vqa
from mmsafe.methods.hallucination import (
    chair,
    chair_bootstrap,
    cooccurrence_hallucination,
    holm,
    object_statistics,
    parse_yes_no,
    pope_metrics,
    pope_metrics_bootstrap,
    pope_probes,
    wilson_interval,
)
from mmsafe.metrics.bootstrap import mean_ci

CROSS, DIAMOND = COOCCUR_PAIR


# ------------------------------------------------------------------------------ parse_yes_no
def _pope_reference(text: str) -> str:
    """POPE's evaluate.py, verbatim in logic (first sentence, no commas, split on spaces)."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    if "No" in words or "not" in words or "no" in words:
        return "no"
    return "yes"


ANSWERS = [
    "Yes",
    "yes.",
    "No",
    "no.",
    "Yes, there is a diamond in the image.",
    "No, there is no diamond.",
    "Yes, there is no diamond.",
    "There is not a diamond.",
    "There is a diamond. There is no circle.",
    "I see a diamond",
    "",
    "NO",
    "Not really",
    "No!",
    "Nothing there, no",
    "notable shapes: yes",
    "There isn't a diamond.",
    "I don't know",
    "Yes! No.",
    "Nobody knows",
    "knot",
]


@pytest.mark.parametrize("answer", ANSWERS)
def test_parse_pope_rule_reproduces_the_official_script(answer: str) -> None:
    expected = 1 if _pope_reference(answer) == "yes" else 0
    assert parse_yes_no(answer, rule="pope") == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes", 1),
        ("yes.", 1),
        ("Yes, there is a diamond in the image.", 1),
        ("No", 0),
        ("No, there is no diamond.", 0),
        ("Yes, there is no diamond.", 0),  # POPE: "no" anywhere in the first sentence wins
        ("There is not a diamond.", 0),
        ("There is a diamond. There is no circle.", -1),  # only the first sentence counts
        ("I see a diamond", -1),  # POPE would count this as yes
        ("", -1),
        ("   ", -1),
        ("NO", 0),  # case-insensitive (POPE: yes)
        ("Not really", 0),  # POPE: yes ("Not" is not in its list)
        ("No!", 0),  # punctuation stripped (POPE: yes)
        ("There isn't a diamond.", 0),  # n't counts as not (POPE: yes)
        ("There isn\u2019t a diamond", 0),  # typographic apostrophe
        ("Yes! No.", 1),  # "!" ends the first sentence
        ("Nobody knows", -1),  # "no" only as a whole word
        ("knot", -1),
        ("YES", 1),
        ("yesterday", -1),
    ],
)
def test_parse_strict_rule(answer: str, expected: int) -> None:
    assert parse_yes_no(answer) == expected


def test_parse_errors() -> None:
    with pytest.raises(TypeError, match="string"):
        parse_yes_no(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rule"):
        parse_yes_no("yes", rule="loose")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ probes
def test_object_statistics_hand_values() -> None:
    freq, co = object_statistics([["a", "b", "a"], ["a", "c"], ["b", "c"], ["a", "b"]])
    assert freq == {"a": 3, "b": 3, "c": 2}  # "a" counts once in the first image
    assert co == {
        ("a", "b"): 2,
        ("b", "a"): 2,
        ("a", "c"): 1,
        ("c", "a"): 1,
        ("b", "c"): 1,
        ("c", "b"): 1,
    }
    assert object_statistics([]) == ({}, {})


def _random_scenes(rng: np.random.Generator, n: int, vocab=SHAPES, p: float = 0.35):
    scenes = []
    while len(scenes) < n:
        present = [o for o in vocab if rng.random() < p]
        if present:
            scenes.append(present)
    return scenes


@pytest.mark.parametrize("setting", ["random", "popular", "adversarial"])
@pytest.mark.parametrize("n_neg", [1, 2, 3, 10])
def test_probes_are_balanced_and_correct(setting: str, n_neg: int) -> None:
    rng = np.random.default_rng(0)
    scenes = _random_scenes(rng, 60) + [list(SHAPES), []]  # full and empty images give none
    probes = pope_probes(scenes, SHAPES, setting, n_neg=n_neg, rng=1)  # type: ignore[arg-type]
    by_image: dict[int, list[tuple[str, int]]] = {}
    for i, obj, truth in probes:
        by_image.setdefault(i, []).append((obj, truth))
    for i, scene in enumerate(scenes):
        k = min(n_neg, len(scene), len(SHAPES) - len(scene))
        got = by_image.get(i, [])
        assert [t for _, t in got] == [1, 0] * k  # alternating, balanced
        objs = [o for o, _ in got]
        assert len(set(objs)) == len(objs)  # no object asked twice about one image
        assert all((o in scene) == bool(t) for o, t in got)
    truths = Counter(t for *_, t in probes)
    assert truths[0] == truths[1] > 0


def test_probes_popular_and_adversarial_pick_the_top_objects() -> None:
    vocab = ["a", "b", "c", "d", "e"]
    freq = {"a": 1, "b": 5, "c": 4, "d": 3}
    probes = pope_probes([["a"], ["b"]], vocab, "popular", n_neg=1, rng=0, frequency=freq)
    assert probes == [(0, "a", 1), (0, "b", 0), (1, "b", 1), (1, "c", 0)]
    # adversarial: total co-occurrence with every present object; "e" never seen ranks last
    co = {("a", "c"): 2, ("b", "c"): 2, ("a", "d"): 3, ("b", "e"): 0}
    probes = pope_probes([["a", "b"]], vocab, "adversarial", n_neg=2, rng=0, cooccurrence=co)
    assert sorted(o for _, o, t in probes if t == 0) == ["c", "d"]  # c: 4, d: 3, e: 0


def test_probes_default_statistics_come_from_the_images_themselves() -> None:
    scenes = [["x", "y"]] * 5 + [["x"], ["z"]]
    vocab = ["x", "y", "z", "w"]
    freq, co = object_statistics(scenes)
    for setting, kw in (("popular", {"frequency": freq}), ("adversarial", {"cooccurrence": co})):
        assert pope_probes(scenes, vocab, setting, n_neg=1, rng=3) == pope_probes(
            scenes, vocab, setting, n_neg=1, rng=3, **kw
        )
    # image ["x"]: "y" co-occurs with "x" five times
    assert pope_probes(scenes, vocab, "adversarial", n_neg=1, rng=0)[-3] == (5, "y", 0)


def test_probes_random_ties_and_reproducibility() -> None:
    scenes = [["circle"]] * 2000
    probes = pope_probes(scenes, SHAPES, "random", n_neg=1, rng=np.random.default_rng(7))
    counts = Counter(o for _, o, t in probes if t == 0)
    assert set(counts) == set(SHAPES) - {"circle"}
    assert max(counts.values()) - min(counts.values()) < 120  # ~400 each (sd ~ 18)
    assert probes == pope_probes(scenes, SHAPES, "random", n_neg=1, rng=7)
    # popular with all-zero frequencies is uniformly random too, not always the first object
    probes = pope_probes(scenes[:200], SHAPES, "popular", n_neg=1, rng=0, frequency={})
    assert len({o for _, o, t in probes if t == 0}) == 5


def test_probes_errors() -> None:
    with pytest.raises(ValueError, match="setting"):
        pope_probes([["a"]], ["a", "b"], "hard", n_neg=1, rng=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_neg"):
        pope_probes([["a"]], ["a", "b"], "random", n_neg=0, rng=0)
    with pytest.raises(ValueError, match="not in `vocabulary`"):
        pope_probes([["a", "q"]], ["a", "b"], "random", n_neg=1, rng=0)
    with pytest.raises(ValueError, match="duplicated"):
        pope_probes([["a"]], ["a", "a", "b"], "random", n_neg=1, rng=0)


@pytest.fixture(scope="module")
def shapes_scenes() -> dict[str, list[list[str]]]:
    ds = make_shapes_vqa(n_scenes=200, seed=0)
    seen: dict[int, tuple[str, list[str]]] = {}
    for meta, split in zip(ds.meta, ds.splits, strict=True):
        seen.setdefault(meta["scene"], (split, [o["shape"] for o in meta["objects"]]))
    out: dict[str, list[list[str]]] = {}
    for split, objects in seen.values():
        out.setdefault(split, []).append(objects)
    return out


def test_probes_on_the_shapes_world(shapes_scenes: dict[str, list[list[str]]]) -> None:
    train, test = shapes_scenes["train"], shapes_scenes["test"]
    freq, co = object_statistics(train)
    # the planted pair dominates the training co-occurrences of the cross
    partners = {b: c for (a, b), c in co.items() if a == CROSS}
    assert max(partners, key=partners.__getitem__) == DIAMOND
    assert freq[DIAMOND] == max(freq.values())

    stats_kw = {"frequency": freq, "cooccurrence": co}
    for setting in ("random", "popular", "adversarial"):
        probes = pope_probes(test, SHAPES, setting, n_neg=3, rng=0, **stats_kw)
        truth = Counter(t for *_, t in probes)
        assert truth[0] == truth[1] == sum(len(s) for s in test)  # <= 3 objects of 6 per scene

    cross_only = [i for i, s in enumerate(test) if CROSS in s and DIAMOND not in s]
    assert len(cross_only) >= 3

    def diamond_negatives(setting: str, seed: int) -> int:
        probes = pope_probes(test, SHAPES, setting, n_neg=1, rng=seed, **stats_kw)
        return sum((i, DIAMOND, 0) in probes for i in cross_only)

    assert diamond_negatives("adversarial", 0) == len(cross_only)  # always asked
    random_rate = np.mean([diamond_negatives("random", s) for s in range(20)]) / len(cross_only)
    assert random_rate < 0.5  # ~1 / #absent objects


# ------------------------------------------------------------------------------ POPE metrics
def _sklearn_pope(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    p, r, f, _ = precision_recall_fscore_support(
        truth, predicted, labels=[1], average="micro", zero_division=np.nan
    )
    return {
        "accuracy": accuracy_score(truth, predicted),
        "precision": p,
        "recall": r,
        "f1": f,
        "yes_ratio": float(np.mean(predicted == 1)),
    }


@pytest.mark.parametrize("seed", range(5))
def test_pope_metrics_match_sklearn_with_unscorable_answers(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, 300)
    predicted = np.where(rng.random(300) < 0.8, truth, 1 - truth)
    predicted[rng.random(300) < 0.1] = -1
    got = pope_metrics(truth, predicted)
    for key, value in _sklearn_pope(truth, predicted).items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["tp"] + got["fp"] + got["tn"] + got["fn"] + got["unscorable"] == got["n"] == 300


def test_pope_metrics_hand_values_and_unscorable_policy() -> None:
    # truth:      1  1  1  0  0  0
    # predicted:  1  0 -1  1  0 -1
    m = pope_metrics([1, 1, 1, 0, 0, 0], [1, 0, -1, 1, 0, -1])
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["unscorable"]) == (1, 1, 1, 1, 2)
    assert m["accuracy"] == pytest.approx(2 / 6)  # unscorable stays in the denominator, wrong
    assert m["yes_ratio"] == pytest.approx(2 / 6)  # ... and never a yes
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    # the same answers scored as yes would look different: -1 is not a hidden yes
    assert pope_metrics([1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 1])["yes_ratio"] == pytest.approx(4 / 6)


def test_pope_metrics_equal_the_official_formulas_without_unscorable() -> None:
    rng = np.random.default_rng(3)
    truth, predicted = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    tp = int(np.sum((predicted == 1) & (truth == 1)))
    fp = int(np.sum((predicted == 1) & (truth == 0)))
    tn = int(np.sum((predicted == 0) & (truth == 0)))
    fn = int(np.sum((predicted == 0) & (truth == 1)))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    m = pope_metrics(truth.tolist(), predicted.astype(bool))
    assert m["precision"] == pytest.approx(precision)
    assert m["recall"] == pytest.approx(recall)
    assert m["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert m["accuracy"] == pytest.approx((tp + tn) / 200)
    assert m["yes_ratio"] == pytest.approx((tp + fp) / 200)


def test_pope_metrics_undefined_rates_and_errors() -> None:
    m = pope_metrics([0, 0, 1], [0, -1, -1])
    assert math.isnan(m["precision"]) and m["recall"] == 0.0 and m["f1"] == 0.0
    m = pope_metrics([0, 0], [0, 0])
    assert math.isnan(m["precision"]) and math.isnan(m["recall"]) and math.isnan(m["f1"])
    with pytest.raises(ValueError, match="same length"):
        pope_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="only hold"):
        pope_metrics([0, 2], [0, 1])
    with pytest.raises(ValueError, match="only hold"):
        pope_metrics([0, 1], [0, 5])
    with pytest.raises(ValueError, match="non-empty"):
        pope_metrics([], [])
    with pytest.raises(ValueError, match="integers"):
        pope_metrics([0.5], [1])


def test_pope_bootstrap_shares_the_metric_resamples() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 150)
    predicted = np.where(rng.random(150) < 0.75, truth, 1 - truth)
    predicted[:10] = -1
    ci = pope_metrics_bootstrap(truth, predicted, n_boot=300, seed=4)
    lo, hi = mean_ci(predicted == truth, n_boot=300, seed=4)
    assert ci["accuracy"] == pytest.approx((lo, hi))
    assert ci["yes_ratio"] == pytest.approx(mean_ci(predicted == 1, n_boot=300, seed=4))
    point = pope_metrics(truth, predicted)
    for key, (lo, hi) in ci.items():
        assert lo <= point[key] <= hi, key
    # one probe per group is the plain bootstrap
    grouped = pope_metrics_bootstrap(truth, predicted, groups=np.arange(150), n_boot=300, seed=4)
    for key, value in ci.items():
        assert grouped[key] == pytest.approx(value), key


def test_pope_bootstrap_cluster_resampling_is_wider_for_correlated_images() -> None:
    rng = np.random.default_rng(1)
    image_correct = rng.random(40) < 0.7  # each image is all right or all wrong
    correct = np.repeat(image_correct, 10)
    truth = np.tile([1, 0], 200)
    predicted = np.where(correct, truth, 1 - truth)
    plain = pope_metrics_bootstrap(truth, predicted, n_boot=400)
    groups = np.repeat(np.arange(40), 10)
    clustered = pope_metrics_bootstrap(truth, predicted, groups=groups, n_boot=400)
    width = {k: v[1] - v[0] for k, v in plain.items()}
    cwidth = {k: v[1] - v[0] for k, v in clustered.items()}
    assert cwidth["accuracy"] > 2 * width["accuracy"]


# ------------------------------------------------------------------------------ CHAIR
VOCAB = ["circle", "square", "cross", "diamond", "star", "baseball bat", "bat"]


def test_chair_hand_computed() -> None:
    captions = [
        "Two circles and a ring.",  # circle, circle (ring): 2 mentions, 0 hallucinated
        "A star and a diamond at the top left.",  # star ok, diamond hallucinated
        "A red square, crosses everywhere, a starfish; we start crossing.",  # square ok, cross x
        "An empty image.",  # no mentions
        "A Baseball   Bat and a bat.",  # "baseball bat" (hallucinated), "bat" ok
    ]
    truth = [["circle"], ["star"], ["square"], [], ["bat"]]
    r = chair(captions, truth, VOCAB, synonyms={"ring": "circle"})
    assert r["mentioned"] == [
        ["circle", "circle"],
        ["star", "diamond"],
        ["square", "cross"],
        [],
        ["baseball bat", "bat"],
    ]
    assert r["hallucinated"] == [[], ["diamond"], ["cross"], [], ["baseball bat"]]
    assert (r["n_mentions"], r["n_hallucinated"], r["n_captions"]) == (8, 3, 5)
    assert r["chair_i"] == pytest.approx(3 / 8)
    assert r["chair_s"] == pytest.approx(3 / 5)


def test_chair_counts_repeats_and_has_no_negation_handling() -> None:
    r = chair(["a cross, a cross and no diamond"], [["cross"]], ["cross", "diamond"])
    assert r["mentioned"] == [["cross", "cross", "diamond"]]
    assert r["chair_i"] == pytest.approx(1 / 3) and r["chair_s"] == 1.0


def test_chair_on_reference_captions_of_the_shapes_world() -> None:
    objects = [
        {"shape": "cross", "colour": "red", "pos": "top left"},
        {"shape": "circle", "colour": "blue", "pos": "bottom right"},
    ]
    truth = [o["shape"] for o in objects]
    faithful = describe(objects)
    hallucinating = describe([*objects, {"shape": DIAMOND, "colour": "green", "pos": "top right"}])
    r = chair([faithful, hallucinating], [truth, truth], SHAPES)
    assert r["hallucinated"] == [[], [DIAMOND]]
    assert r["chair_i"] == pytest.approx(1 / 5) and r["chair_s"] == pytest.approx(1 / 2)
    empty = chair([describe([])], [[]], SHAPES)  # "an empty image": no mention at all
    assert math.isnan(empty["chair_i"]) and empty["chair_s"] == 0.0


def test_chair_errors() -> None:
    with pytest.raises(ValueError, match="not in `vocabulary`"):
        chair(["a ring"], [["circle"]], ["circle"], synonyms={"ring": "hoop"})
    with pytest.raises(ValueError, match="same length"):
        chair(["a"], [], ["circle"])
    with pytest.raises(ValueError, match="empty"):
        chair([], [], ["circle"])
    with pytest.raises(ValueError, match="one string"):
        chair("a circle", [["circle"]], ["circle"])


def test_chair_bootstrap() -> None:
    rng = np.random.default_rng(0)
    captions = [
        rng.choice(["a circle", "a circle and a cross", "a cross and a star"]) for _ in range(80)
    ]
    truth = [["circle", "star"]] * 80
    ci = chair_bootstrap(captions, truth, SHAPES, n_boot=300, seed=2)
    r = chair(captions, truth, SHAPES)
    flags = [bool(h) for h in r["hallucinated"]]
    assert ci["chair_s"] == pytest.approx(mean_ci(flags, n_boot=300, seed=2))
    assert ci["chair_i"][0] <= r["chair_i"] <= ci["chair_i"][1]


# ------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
@pytest.mark.parametrize(("k", "n"), [(0, 1), (0, 10), (3, 10), (5, 10), (10, 10), (17, 250)])
def test_wilson_matches_scipy(k: int, n: int, level: float) -> None:
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    assert wilson_interval(k, n, level) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_wilson_hand_values_and_errors() -> None:
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(1, 10, level=1.0)


def test_holm_hand_values() -> None:
    assert holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]).tolist() == [1.0, 1.0]  # capped
    assert holm([]).size == 0
    p = np.random.default_rng(0).random(20)
    adj = holm(p)
    assert np.all(adj >= p) and np.all(np.diff(adj[np.argsort(p)]) >= 0)


# ------------------------------------------------------------------------------ co-occurrence
def _exhaustive_probes(scenes: list[list[str]]):
    present, probed = [], []
    for s in scenes:
        for o in SHAPES:
            present.append(set(s))
            probed.append(o)
    return present, probed


def _answers(rng, present, probed, *, fp=0.05, biased: bool) -> np.ndarray:
    yes = np.array([o in s for s, o in zip(present, probed, strict=True)])  # right on positives
    noise = rng.random(len(probed)) < fp
    out = yes | noise
    if biased:
        out |= np.array([o == DIAMOND and CROSS in s for s, o in zip(present, probed, strict=True)])
    return out


def _flagged(rows) -> set[tuple[str, str]]:
    return {(r["a"], r["b"]) for r in rows if r["flagged"]}


def test_cooccurrence_flags_exactly_the_planted_pair() -> None:
    """A cross-implies-diamond answerer: the planted pair is flagged in every world, and any
    other pair (a null one: noise is content-blind) in at most 1 of 20 (Holm: <= 5% each)."""
    extra = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        present, probed = _exhaustive_probes(_random_scenes(rng, 200))
        said = _answers(rng, present, probed, biased=True)
        rows = cooccurrence_hallucination(present, probed, said)
        flagged = _flagged(rows)
        assert (CROSS, DIAMOND) in flagged, seed
        extra += flagged != {(CROSS, DIAMOND)}
        top = rows[0]
        assert (top["a"], top["b"]) == (CROSS, DIAMOND)
        assert top["fp_rate_with"] == 1.0 and top["fp_rate_without"] < 0.15
        assert top["ci_with"][0] > top["ci_without"][1]
    assert extra <= 1


def test_cooccurrence_control_false_alarm_rate() -> None:
    """A content-blind answerer (5% false yes) is flagged in at most 2 of 40 worlds (<= 5%)."""
    alarms = 0
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        present, probed = _exhaustive_probes(_random_scenes(rng, 120))
        said = _answers(rng, present, probed, biased=False)
        alarms += bool(_flagged(cooccurrence_hallucination(present, probed, said)))
    assert alarms <= 2


def test_cooccurrence_row_values_match_fisher_by_hand() -> None:
    # absent-diamond probes: 4 with a cross (3 yes, one unscorable), 6 without (1 yes)
    present = [{"cross"}] * 4 + [{"circle"}] * 6 + [{"diamond", "cross"}]
    probed = ["diamond"] * 11
    said = [1, 1, 1, -1, 1, 0, 0, 0, 0, 0, 1]  # the last probe is a positive: ignored
    rows = {(r["a"], r["b"]): r for r in cooccurrence_hallucination(present, probed, said)}
    assert set(rows) == {("cross", "diamond"), ("circle", "diamond")}
    r = rows[("cross", "diamond")]
    assert (r["n_with"], r["fp_with"], r["n_without"], r["fp_without"]) == (4, 3, 6, 1)
    assert r["fp_rate_with"] == 0.75 and r["fp_rate_without"] == pytest.approx(1 / 6)
    ref = stats.fisher_exact([[3, 1], [1, 5]], alternative="greater").pvalue
    assert r["p_value"] == pytest.approx(ref)
    assert r["p_adjusted"] == pytest.approx(min(1.0, 2 * ref))  # Holm, smallest of two
    assert r["ci_with"] == pytest.approx(wilson_interval(3, 4))


def test_cooccurrence_reference_separates_learnt_pairs_from_confusions() -> None:
    """The same biased answers are flagged only where the training scenes pair cross with
    diamond; with independent training scenes the excess is a confusion, not a flag."""
    rng = np.random.default_rng(7)
    present, probed = _exhaustive_probes(_random_scenes(rng, 200))
    said = _answers(rng, present, probed, biased=True)
    independent = [set(s) for s in _random_scenes(np.random.default_rng(8), 400)]
    paired = [s | {DIAMOND} if CROSS in s else s for s in independent]
    control = {
        (r["a"], r["b"]): r
        for r in cooccurrence_hallucination(present, probed, said, reference=independent)
    }
    planted = {(r["a"], r["b"]): r for r in
               cooccurrence_hallucination(present, probed, said, reference=paired)}  # fmt: skip
    assert control[(CROSS, DIAMOND)]["confused"] and not control[(CROSS, DIAMOND)]["flagged"]
    assert planted[(CROSS, DIAMOND)]["flagged"] and planted[(CROSS, DIAMOND)]["lift"] > 1.5
    # the lift and its test by hand
    has_a = np.array([CROSS in s for s in paired])
    has_b = np.array([DIAMOND in s for s in paired])
    both = int((has_a & has_b).sum())
    assert planted[(CROSS, DIAMOND)]["lift"] == pytest.approx(
        both * len(paired) / (has_a.sum() * has_b.sum())
    )
    table = [[both, int((has_a & ~has_b).sum())], [int((~has_a & has_b).sum()),
             int((~has_a & ~has_b).sum())]]  # fmt: skip
    p = stats.fisher_exact(table, alternative="greater").pvalue
    assert planted[(CROSS, DIAMOND)]["p_cooccur"] >= p - 1e-12  # Holm never lowers a p-value
    assert not any(r["flagged"] for r in control.values())


def test_cooccurrence_skips_uncomparable_pairs_and_validates() -> None:
    # every absent-diamond probe shows a cross: nothing to compare against
    assert cooccurrence_hallucination([{"cross"}] * 3, ["diamond"] * 3, [1, 1, 0]) == []
    with pytest.raises(ValueError, match="same length"):
        cooccurrence_hallucination([{"cross"}], ["diamond", "star"], [1, 1])
    with pytest.raises(ValueError, match="one answer per probe"):
        cooccurrence_hallucination([{"cross"}], ["diamond"], [1, 0])
    with pytest.raises(ValueError, match="alpha"):
        cooccurrence_hallucination([{"cross"}], ["diamond"], [1], alpha=0)
