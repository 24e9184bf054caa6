"""Ranking metrics (mmsafe.metrics.ranking) against hand-computed values and torchmetrics."""

from __future__ import annotations

import itertools
import math
import tracemalloc

import numpy as np
import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR, RetrievalNormalizedDCG

from mmsafe.metrics import ranking as R

# --- a 3-user, 5-item example, computed by hand --------------------------------------------------
#   user 0: target 3 (0.7), no history: only item 1 (0.9) is higher          -> rank 2
#   user 1: target 2 (0.6), history {4, 0} (0.9, 0.8) excluded: none higher  -> rank 1 (3 without)
#   user 2: target 4 (0.1), history {0, 4}: item 0 excluded, the target kept;
#           items 1, 2, 3 higher                                              -> rank 4 (5 without)
HAND_SCORES = np.array(
    [
        [0.1, 0.9, 0.3, 0.7, 0.5],
        [0.8, 0.2, 0.6, 0.4, 0.9],
        [0.5, 0.4, 0.3, 0.2, 0.1],
    ]
)
HAND_TARGETS = np.array([3, 2, 4])
HAND_HISTORY = [np.array([], dtype=np.int64), np.array([4, 0]), np.array([0, 4])]
LOG2_3, LOG2_5 = math.log2(3), math.log2(5)


def test_hand_ranks_with_and_without_exclusion():
    assert R.target_ranks(HAND_SCORES, HAND_TARGETS).tolist() == [2.0, 3.0, 5.0]
    ranks, ties = R.target_ranks(HAND_SCORES, HAND_TARGETS, HAND_HISTORY, return_ties=True)
    assert ranks.dtype == np.float64 and ties.dtype == np.int64
    assert ranks.tolist() == [2.0, 1.0, 4.0]
    assert ties.tolist() == [0, 0, 0]


def test_target_in_history_is_not_excluded():
    # excluding user 2's target would leave it unranked; it must count as rank 4, not vanish
    ranks = R.target_ranks(HAND_SCORES[2:], HAND_TARGETS[2:], [[4]])
    assert ranks.tolist() == [5.0]
    ranks = R.target_ranks(HAND_SCORES[2:], HAND_TARGETS[2:], [[4, 0, 0, 4]])  # repeats too
    assert ranks.tolist() == [4.0]


def test_hand_metrics():
    ranks = R.target_ranks(HAND_SCORES, HAND_TARGETS, HAND_HISTORY)
    assert R.hit_rate(ranks, 1).tolist() == [0.0, 1.0, 0.0]
    assert R.hit_rate(ranks, 3).tolist() == [1.0, 1.0, 0.0]
    assert R.hit_rate(ranks, 4).tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(R.ndcg(ranks, 3), [1 / LOG2_3, 1.0, 0.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(R.ndcg(ranks, 5), [1 / LOG2_3, 1.0, 1 / LOG2_5], rtol=0, atol=1e-15)
    assert R.reciprocal_rank(ranks).tolist() == [0.5, 1.0, 0.25]
    m = R.ranking_metrics(ranks, ks=(3, 5))
    assert list(m) == ["hr@3", "ndcg@3", "hr@5", "ndcg@5", "mrr"]
    assert m["hr@3"].tolist() == [1.0, 1.0, 0.0]
    np.testing.assert_allclose(m["ndcg@5"], [1 / LOG2_3, 1.0, 1 / LOG2_5], atol=1e-15)
    assert m["mrr"].mean() == pytest.approx((0.5 + 1.0 + 0.25) / 3, abs=1e-15)
    assert list(R.ranking_metrics(ranks)) == ["hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr"]


# --- torchmetrics ------------------------------------------------------------------------------


def random_histories(rng, n: int, n_items: int, max_len: int) -> list[np.ndarray]:
    """Histories with repeats; some contain the user's target (which must stay ranked)."""
    return [rng.integers(0, n_items, rng.integers(0, max_len + 1)) for _ in range(n)]


def torchmetrics_means(scores, targets, exclude, k: int) -> dict[str, float]:
    """Mean HR@k / NDCG@k / MRR by torchmetrics, excluded items dropped from each user's list."""
    preds, rel, idx = [], [], []
    for u in range(scores.shape[0]):
        keep = np.ones(scores.shape[1], dtype=bool)
        if exclude is not None:
            keep[exclude[u]] = False
        keep[targets[u]] = True
        onehot = np.zeros(scores.shape[1], dtype=bool)
        onehot[targets[u]] = True
        preds.append(scores[u, keep])
        rel.append(onehot[keep])
        idx.append(np.full(keep.sum(), u))
    p = torch.from_numpy(np.concatenate(preds))
    t = torch.from_numpy(np.concatenate(rel))
    i = torch.from_numpy(np.concatenate(idx))
    return {
        "hr": float(RetrievalHitRate(top_k=k)(p, t, indexes=i)),
        "ndcg": float(RetrievalNormalizedDCG(top_k=k)(p, t, indexes=i)),
        "mrr": float(RetrievalMRR()(p, t, indexes=i)),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_exclusion", [False, True])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_agrees_with_torchmetrics(seed, with_exclusion, k):
    rng = np.random.default_rng(seed)
    n, n_items = 40, 30
    # continuous, so no ties; strictly positive because torchmetrics' reciprocal rank (1.9)
    # treats an item with a score <= 0 as not relevant (Lightning-AI/torchmetrics#3104)
    scores = rng.uniform(0.01, 1.0, size=(n, n_items))
    targets = rng.integers(0, n_items, n)
    exclude = random_histories(rng, n, n_items, 12) if with_exclusion else None
    ranks, ties = R.target_ranks(scores, targets, exclude, return_ties=True)
    assert not ties.any()
    ref = torchmetrics_means(scores, targets, exclude, k)
    assert R.hit_rate(ranks, k).mean() == pytest.approx(ref["hr"], abs=1e-6)
    assert R.ndcg(ranks, k).mean() == pytest.approx(ref["ndcg"], abs=1e-6)
    assert R.reciprocal_rank(ranks).mean() == pytest.approx(ref["mrr"], abs=1e-6)
    m = R.ranking_metrics(ranks, ks=(k,))
    assert m[f"hr@{k}"].mean() == pytest.approx(ref["hr"], abs=1e-6)
    assert m[f"ndcg@{k}"].mean() == pytest.approx(ref["ndcg"], abs=1e-6)
    assert m["mrr"].mean() == pytest.approx(ref["mrr"], abs=1e-6)


def test_exclusion_matters_for_torchmetrics_reference():
    # guards the exclusion test above: without dropping the history the values differ
    rng = np.random.default_rng(3)
    scores, targets = rng.uniform(0.01, 1.0, size=(40, 30)), rng.integers(0, 30, 40)
    exclude = random_histories(rng, 40, 30, 12)
    full = R.reciprocal_rank(R.target_ranks(scores, targets)).mean()
    assert full == pytest.approx(torchmetrics_means(scores, targets, None, 5)["mrr"], abs=1e-6)
    assert full < R.reciprocal_rank(R.target_ranks(scores, targets, exclude)).mean() - 0.01


# --- ties --------------------------------------------------------------------------------------


def test_all_equal_scores():
    n, n_items = 4, 20
    scores = np.zeros((n, n_items))
    ranks, ties = R.target_ranks(scores, np.arange(n), return_ties=True)
    assert ranks.tolist() == [(n_items + 1) / 2] * n
    assert ties.tolist() == [n_items - 1] * n
    for k in (1, 5, 20, 50):
        np.testing.assert_allclose(R.hit_rate(ranks, k, ties), min(k, n_items) / n_items)
        dcg = sum(1 / math.log2(p + 1) for p in range(1, min(k, n_items) + 1))
        np.testing.assert_allclose(R.ndcg(ranks, k, ties), dcg / n_items, rtol=1e-14)
    harmonic = sum(1 / p for p in range(1, n_items + 1))
    np.testing.assert_allclose(R.reciprocal_rank(ranks, ties), harmonic / n_items, rtol=1e-14)


def test_ties_with_history_counts_only_kept_items():
    # target 0 ties with items 1, 3, 5; item 3 is excluded; item 2 scores higher -> g=1, t=2
    scores = np.array([[0.5, 0.5, 0.9, 0.5, 0.1, 0.5]])
    ranks, ties = R.target_ranks(scores, [0], [[3]], return_ties=True)
    assert ranks.tolist() == [3.0] and ties.tolist() == [2]
    # positions 2, 3, 4 equally likely
    assert R.hit_rate(ranks, 2, ties).tolist() == pytest.approx([1 / 3])
    assert R.reciprocal_rank(ranks, ties).tolist() == pytest.approx([(1 / 2 + 1 / 3 + 1 / 4) / 3])
    # without `ties` the integer-valued rank 3 is scored as an exact position (mid-rank rule):
    # documented, and undetectable, so no warning
    assert R.hit_rate(ranks, 2).tolist() == [0.0]


def test_mid_rank_rule_without_ties_warns_on_fractional_ranks():
    ranks = np.array([1.0, 2.5, 10.5])
    with pytest.warns(UserWarning, match="2 of 3 ranks are tie-averaged"):
        m = R.ranking_metrics(ranks, ks=(2, 10))
    assert m["hr@2"].tolist() == [1.0, 0.0, 0.0]
    assert m["hr@10"].tolist() == [1.0, 1.0, 0.0]
    np.testing.assert_allclose(m["ndcg@10"], [1.0, 1 / math.log2(3.5), 0.0])
    np.testing.assert_allclose(m["mrr"], [1.0, 1 / 2.5, 1 / 10.5])
    for fn in (lambda r: R.hit_rate(r, 3), lambda r: R.ndcg(r, 3), R.reciprocal_rank):
        with pytest.warns(UserWarning, match="ties"):
            fn(ranks)


def test_tie_expectations_match_enumerated_tie_breaks():
    """Average over every tie-break order (all 6! permutations as secondary keys)."""
    rng = np.random.default_rng(5)
    n, n_items = 8, 6
    scores = rng.integers(0, 3, (n, n_items)).astype(float)  # many ties
    targets = rng.integers(0, n_items, n)
    exclude = random_histories(rng, n, n_items, 3)
    ranks, ties = R.target_ranks(scores, targets, exclude, return_ties=True)
    perms = np.array(list(itertools.permutations(range(n_items))))
    for u in range(n):
        keep = np.ones(n_items, dtype=bool)
        keep[exclude[u]] = False
        keep[targets[u]] = True
        positions = []
        for perm in perms:  # lower perm value wins a tie
            order = np.lexsort((perm, -scores[u]))
            order = order[keep[order]]
            positions.append(int(np.flatnonzero(order == targets[u])[0]) + 1)
        pos = np.array(positions, dtype=float)
        assert ranks[u] == pytest.approx(pos.mean(), abs=1e-12)
        for k in (1, 2, 4):
            assert R.hit_rate(ranks[u : u + 1], k, ties[u : u + 1])[0] == pytest.approx(
                np.mean(pos <= k), abs=1e-12
            )
            assert R.ndcg(ranks[u : u + 1], k, ties[u : u + 1])[0] == pytest.approx(
                np.mean(np.where(pos <= k, 1 / np.log2(pos + 1), 0.0)), abs=1e-12
            )
        assert R.reciprocal_rank(ranks[u : u + 1], ties[u : u + 1])[0] == pytest.approx(
            np.mean(1 / pos), abs=1e-12
        )


def test_tie_expectations_for_large_ranks():
    # 2000 items above the target, 5 tied with it; all 3000 tied (harmonic series branch)
    scores = np.r_[np.full(2000, 2.0), np.full(6, 1.0), np.zeros(994)][None, :]
    ranks, ties = R.target_ranks(scores, [2000], return_ties=True)
    assert ranks.tolist() == [2003.5] and ties.tolist() == [5]
    pos = np.arange(2001, 2007, dtype=float)
    assert R.reciprocal_rank(ranks, ties)[0] == pytest.approx(np.mean(1 / pos), rel=1e-13)
    assert R.ndcg(ranks, 2003, ties)[0] == pytest.approx(np.sum(1 / np.log2(pos[:3] + 1)) / 6)
    ranks, ties = R.target_ranks(np.ones((1, 3000)), [7], return_ties=True)
    expected = np.sum(1 / np.arange(1.0, 3001.0)) / 3000
    assert R.reciprocal_rank(ranks, ties)[0] == pytest.approx(expected, rel=1e-13)


def test_infinite_scores_rank_and_tie():
    scores = np.array([[-np.inf, 1.0, -np.inf, np.inf]])
    ranks, ties = R.target_ranks(scores, [0], return_ties=True)
    assert ranks.tolist() == [3.5] and ties.tolist() == [1]


# --- chunking, memory, input types ---------------------------------------------------------------


def test_chunking_gives_identical_results():
    rng = np.random.default_rng(7)
    n, n_items = 23, 17
    scores = rng.integers(0, 5, (n, n_items)).astype(np.float32)  # ties and float32
    targets = rng.integers(0, n_items, n)
    exclude = random_histories(rng, n, n_items, 8)
    ref = R.target_ranks(scores, targets, exclude, return_ties=True)
    for chunk_rows in (1, 7, n, 4096):
        out = R.target_ranks(scores, targets, exclude, chunk_rows=chunk_rows, return_ties=True)
        np.testing.assert_array_equal(out[0], ref[0])
        np.testing.assert_array_equal(out[1], ref[1])
    as_tensor = R.target_ranks(torch.from_numpy(scores), torch.from_numpy(targets), exclude)
    np.testing.assert_array_equal(as_tensor, ref[0])
    as_bf16 = R.target_ranks(torch.zeros(2, 4, dtype=torch.bfloat16), [0, 3])
    assert as_bf16.tolist() == [2.5, 2.5]


def test_score_matrix_is_never_copied():
    # a broadcast view would take 320 MB if materialised; chunks keep temporaries tiny
    pop = np.random.default_rng(0).integers(0, 9, 2000).astype(np.float64)
    scores = np.broadcast_to(pop, (20_000, 2000))
    targets = np.arange(20_000) % 2000
    tracemalloc.start()
    try:
        ranks = R.target_ranks(scores, targets, chunk_rows=512)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16e6
    per_item = (
        1 + (pop[None, :] > pop[:, None]).sum(1) + ((pop[None, :] == pop[:, None]).sum(1) - 1) / 2
    )
    np.testing.assert_array_equal(ranks, per_item[targets])


def test_nan_scores_raise_with_row_count():
    scores = np.random.default_rng(0).normal(size=(10, 6))
    scores[2, 4] = np.nan
    scores[7, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN in 2 of 10 rows \(first: \[2, 7\]\)"):
        R.target_ranks(scores, np.zeros(10, dtype=int), chunk_rows=3)
    with pytest.raises(ValueError, match="NaN in 2 of 10 rows"):
        R.sampled_target_ranks(scores, np.zeros(10, dtype=int), None, 3, rng=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": np.zeros(5)}, "2-D"),
        ({"scores": np.zeros((0, 5))}, "empty"),
        ({"scores": np.zeros((3, 5), dtype=bool)}, "real"),
        ({"targets": [0, 1]}, "one item per user"),
        ({"targets": [0, 1, 5]}, r"item 5, outside \[0, 5\)"),
        ({"targets": [0.0, 1.0, 2.0]}, "integer"),
        ({"exclude": [[1], [2]]}, "one entry per user"),
        ({"exclude": [[1], [-1], []]}, "item -1"),
        ({"exclude": [[1], [0.5], []]}, "integer"),
        ({"chunk_rows": 0}, "chunk_rows"),
    ],
)
def test_target_ranks_validation(kwargs, match):
    args = {"scores": np.zeros((3, 5)), "targets": [0, 1, 2]} | kwargs
    with pytest.raises(ValueError, match=match):
        R.target_ranks(**args)


def test_metric_validation():
    with pytest.raises(ValueError, match="integers >= 1"):
        R.ndcg([1.5], 1, ties=[0])
    with pytest.raises(ValueError, match=">= 1"):
        R.reciprocal_rank([0, 1])
    with pytest.raises(ValueError, match="`k`"):
        R.hit_rate([1, 2], 0)
    with pytest.raises(ValueError, match="ties"):
        R.hit_rate([1, 2], 1, ties=[0])
    with pytest.raises(ValueError, match="`ks` is empty"):
        R.ranking_metrics([1, 2], ks=())
    with pytest.raises(ValueError, match="empty"):
        R.ranking_metrics([])


# --- sampled protocol --------------------------------------------------------------------------


def test_sampled_ranks_equal_full_ranks_when_all_candidates_are_drawn():
    rng = np.random.default_rng(11)
    n, n_items = 30, 25
    scores = rng.integers(0, 6, (n, n_items)).astype(float)
    targets = rng.integers(0, n_items, n)
    exclude = random_histories(rng, n, n_items, 10)
    full, full_ties = R.target_ranks(scores, targets, exclude, return_ties=True)
    max_candidates = max(
        n_items - 1 - len(set(h.tolist()) - {t}) for h, t in zip(exclude, targets, strict=True)
    )
    for n_neg in (max_candidates, n_items - 1, 1000):
        out, out_ties = R.sampled_target_ranks(
            scores, targets, exclude, n_neg, rng=0, return_ties=True
        )
        np.testing.assert_array_equal(out, full)
        np.testing.assert_array_equal(out_ties, full_ties)


def test_sampled_ranks_with_fewer_negatives():
    rng = np.random.default_rng(12)
    n, n_items = 200, 60
    scores = rng.integers(0, 10, (n, n_items)).astype(float)
    targets = rng.integers(0, n_items, n)
    exclude = random_histories(rng, n, n_items, 15)
    full, full_ties = R.target_ranks(scores, targets, exclude, return_ties=True)
    out, out_ties = R.sampled_target_ranks(scores, targets, exclude, 10, rng=3, return_ties=True)
    assert np.all(out <= full) and np.all(out_ties <= full_ties)
    assert np.all((out >= 1) & (out <= 11))
    assert np.any(out < full)
    np.testing.assert_array_equal(out, R.sampled_target_ranks(scores, targets, exclude, 10, 3))
    gen = np.random.default_rng(3)
    np.testing.assert_array_equal(out, R.sampled_target_ranks(scores, targets, exclude, 10, gen))
    R.ranking_metrics(out, ties=out_ties)  # consistent (rank, ties) pairs


def test_sampled_ranks_have_the_sampling_distribution():
    """Same distribution as explicitly sampling negatives without replacement."""
    # one user: target item 0 with score 1; 30 items higher, 10 tied, 59 lower; items 1..5
    # (5 of the higher ones) are in the history -> 25 higher, 10 tied, 59 lower candidates
    row = np.r_[1.0, np.full(30, 2.0), np.full(10, 1.0), np.zeros(59)]
    users, n_neg = 20_000, 20
    scores = np.broadcast_to(row, (users, row.size))
    history = [np.arange(1, 6)] * users
    ranks = R.sampled_target_ranks(scores, np.zeros(users, dtype=int), history, n_neg, rng=0)
    c, g, t = 94, 25, 10
    expected = 1 + n_neg * g / c + 0.5 * n_neg * t / c
    assert ranks.mean() == pytest.approx(expected, abs=4 * ranks.std() / math.sqrt(users))
    # explicit sampling of item ids, a direct implementation of the protocol
    gen = np.random.default_rng(1)
    pool = np.arange(6, row.size)
    draws = np.array([gen.choice(pool, n_neg, replace=False) for _ in range(4000)])
    explicit = 1 + (row[draws] > 1).sum(1) + 0.5 * (row[draws] == 1).sum(1)
    for k in (3, 5, 8):
        se = math.sqrt(0.25 / 4000 + 0.25 / users)
        assert np.mean(ranks <= k) == pytest.approx(np.mean(explicit <= k), abs=4 * se)


def test_sampled_edge_cases():
    scores = np.arange(12.0).reshape(2, 6)
    # everything but the target excluded: the target is alone
    out = R.sampled_target_ranks(scores, [0, 0], [np.arange(6)] * 2, 5, rng=0)
    assert out.tolist() == [1.0, 1.0]
    out = R.sampled_target_ranks(torch.from_numpy(scores), [0, 5], None, 2, rng=0)
    assert out.tolist() == [3.0, 1.0]
    with pytest.raises(ValueError, match="n_negatives"):
        R.sampled_target_ranks(scores, [0, 0], None, 0, rng=0)
    with pytest.raises(ValueError, match="rng"):
        R.sampled_target_ranks(scores, [0, 0], None, 2, rng="seed")


# --- popularity ----------------------------------------------------------------------------------


def test_popularity_scores_and_ranks():
    pop = R.popularity_scores([[0, 2, 2], np.array([2, 3]), [], torch.tensor([0])], n_items=5)
    assert pop.dtype == np.float64 and pop.tolist() == [2.0, 0.0, 3.0, 1.0, 0.0]
    scores = np.broadcast_to(pop, (3, 5))
    ranks, ties = R.target_ranks(scores, [2, 3, 1], [[], [2], []], return_ties=True)
    # user 1: item 2 excluded, item 0 higher -> 2; user 2: tied with item 4 -> 4.5
    assert ranks.tolist() == [1.0, 2.0, 4.5] and ties.tolist() == [0, 0, 1]
    assert R.hit_rate(ranks, 4, ties).tolist() == [1.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="item 5"):
        R.popularity_scores([[5]], n_items=5)
    with pytest.raises(ValueError, match="integer"):
        R.popularity_scores([[0.5]], n_items=5)
