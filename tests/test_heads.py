"""The fusion head on synthetic embeddings with known structure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.functional import normalize

from mmsafe.models.base import ModelError
from mmsafe.models.heads import (
    FusionConfig,
    FusionHead,
    HeadTrainConfig,
    HeadTrainHooks,
    fit_fusion_head,
)


def clustered(n: int, dim: int, labels: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """Unit-norm embeddings around one random unit centre per class (seeded centres)."""
    g = torch.Generator().manual_seed(seed)
    centres = normalize(torch.randn(int(labels.max()) + 1, dim, generator=g), dim=-1)
    g2 = torch.Generator().manual_seed(seed + 1000 + n)
    return normalize(centres[labels] + noise * torch.randn(n, dim, generator=g2), dim=-1)


def pure_noise(n: int, dim: int, seed: int) -> torch.Tensor:
    return normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def split_data(
    n: int = 2000, classes: int = 3, noise: float = 0.2, text_signal: bool = True, seed: int = 0
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    y = torch.arange(2 * n) % classes
    y = y[torch.randperm(2 * n, generator=torch.Generator().manual_seed(seed))]
    img = clustered(2 * n, 64, y, noise, seed=seed)
    txt = clustered(2 * n, 48, y, noise, seed=seed + 1) if text_signal else pure_noise(2 * n, 48, 7)
    train = {"image": img[:n], "text": txt[:n]}
    test = {"image": img[n:], "text": txt[n:]}
    return train, y[:n], test, y[n:]


def accuracy(head: FusionHead, x: dict[str, torch.Tensor], y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(head(x).argmax(-1).eq(y).float().mean())


@pytest.mark.parametrize("mode", ["concat", "gated"])
@pytest.mark.parametrize("hidden", [None, 32])
def test_separable_high_accuracy(mode: str, hidden: int | None) -> None:
    train, ytr, test, yte = split_data()
    head = fit_fusion_head(train, ytr, mode=mode, hidden=hidden, seed=0)
    assert accuracy(head, test, yte) > 0.95
    assert head.fit_info["train_accuracy"] > 0.95 and head.fit_info["n_train"] == 2000


def test_linear_concat_matches_logistic_regression() -> None:
    """On a hard problem the linear concat head does as well as sklearn's logistic regression."""
    from sklearn.linear_model import LogisticRegression

    train, ytr, test, yte = split_data(n=1500, classes=4, noise=0.9, seed=3)
    head = fit_fusion_head(train, ytr, mode="concat", epochs=60, seed=0)
    ours = accuracy(head, test, yte)
    xtr = torch.cat([train["image"], train["text"]], 1).numpy()
    xte = torch.cat([test["image"], test["text"]], 1).numpy()
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(xtr, ytr.numpy())
    theirs = float(np.mean(ref.predict(xte) == yte.numpy()))
    assert 0.5 < theirs < 0.97  # the problem is neither trivial nor hopeless
    assert ours >= theirs - 0.03


@pytest.mark.parametrize("mode", ["concat", "gated"])
def test_null_embedding_reveals_which_modality_matters(mode: str) -> None:
    train, ytr, test, yte = split_data(classes=2, noise=0.3, text_signal=False)
    head = fit_fusion_head(train, ytr, mode=mode, seed=0)
    full = accuracy(head, test, yte)
    no_text = accuracy(head, {"image": test["image"]}, yte)  # noisy modality nulled
    no_image = accuracy(head, {"text": test["text"]}, yte)  # informative modality nulled
    assert full > 0.95
    assert no_text > 0.95
    assert abs(no_image - 0.5) < 0.06  # chance for 2 balanced classes
    # Leaving a modality out is the same as passing its null embedding explicitly.
    null = head.null_embeddings["image"]
    torch.testing.assert_close(null, train["image"].mean(0))
    explicit = {"image": null.expand(len(yte), -1), "text": test["text"]}
    with torch.no_grad():
        torch.testing.assert_close(head(explicit), head({"text": test["text"]}))


def test_deterministic_by_seed() -> None:
    train, ytr, _, _ = split_data(n=500)
    a = fit_fusion_head(train, ytr, mode="gated", hidden=16, epochs=5, seed=4)
    b = fit_fusion_head(train, ytr, mode="gated", hidden=16, epochs=5, seed=4)
    c = fit_fusion_head(train, ytr, mode="gated", hidden=16, epochs=5, seed=5)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    before = torch.get_rng_state()
    fit_fusion_head(train, ytr, epochs=1, seed=4)
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is left alone


def test_thread_count_restored() -> None:
    train, ytr, _, _ = split_data(n=100)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fit_fusion_head(train, ytr, epochs=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_unlabelled_rows_are_ignored() -> None:
    train, ytr, _, _ = split_data(n=400)
    base = fit_fusion_head(train, ytr, mode="concat", hidden=8, epochs=5, seed=1)
    # Far-away junk rows labelled -1 at random positions (labelled rows keep their order):
    # they must change nothing at all, neither the weights nor the null embeddings.
    is_junk = torch.zeros(500, dtype=torch.bool)
    is_junk[torch.randperm(500, generator=torch.Generator().manual_seed(0))[:100]] = True
    mixed = {}
    for m, x in train.items():
        mixed[m] = torch.empty(500, x.shape[1])
        mixed[m][~is_junk] = x
        mixed[m][is_junk] = 50 + torch.randn(100, x.shape[1])
    ymixed = torch.full((500,), -1)
    ymixed[~is_junk] = ytr
    other = fit_fusion_head(mixed, ymixed, mode="concat", hidden=8, epochs=5, seed=1)
    sa, sb = base.state_dict(), other.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert other.fit_info["n_train"] == 400
    # Sanity: the junk rows would have moved the statistics had they been used.
    assert not torch.allclose(mixed["image"].mean(0), other.null_embeddings["image"])


def test_save_load_round_trip(tmp_path: Path) -> None:
    train, ytr, test, _ = split_data(n=300)
    for mode in ("concat", "gated"):
        head = fit_fusion_head(
            train, ytr, mode=mode, hidden=16, epochs=3, classes=("a", "b", "c"), seed=2
        )
        path = head.save(tmp_path / mode)
        assert sorted(p.name for p in path.iterdir()) == ["head.json", "head.safetensors"]
        meta = json.loads((path / "head.json").read_text())
        assert meta["config"]["mode"] == mode and meta["config"]["classes"] == ["a", "b", "c"]
        loaded = FusionHead.load(path)
        assert loaded.cfg == head.cfg and loaded.fit_info == head.fit_info
        with torch.no_grad():
            assert torch.equal(loaded(test), head(test))
            assert torch.equal(loaded({"text": test["text"]}), head({"text": test["text"]}))
        assert not loaded.training


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="head.safetensors"):
        FusionHead.load(tmp_path / "nothing")
    train, ytr, _, _ = split_data(n=100)
    path = fit_fusion_head(train, ytr, epochs=1).save(tmp_path / "h")
    (path / "head.json").write_text("{not json")
    with pytest.raises(ModelError, match="Could not load"):
        FusionHead.load(path)


def test_gates_are_a_distribution() -> None:
    train, ytr, test, _ = split_data(n=300)
    head = fit_fusion_head(train, ytr, mode="gated", epochs=3)
    with torch.no_grad():
        g = head.gates(test)
    assert g.shape == (300, 2) and (g >= 0).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(300))
    with pytest.raises(ValueError, match="gated"):
        fit_fusion_head(train, ytr, epochs=1).gates(test)


def test_bad_inputs() -> None:
    train, ytr, test, _ = split_data(n=100)
    with pytest.raises(ValueError, match="unlabelled"):
        fit_fusion_head(train, torch.full((100,), -1))
    with pytest.raises(ValueError, match="integer"):
        fit_fusion_head(train, ytr.float())
    with pytest.raises(ValueError, match="N = 99"):
        fit_fusion_head(train, ytr[:99])
    with pytest.raises(ValueError, match="fusion mode"):
        fit_fusion_head(train, ytr, mode="sum")
    head = fit_fusion_head(train, ytr, epochs=1)
    with pytest.raises(ValueError, match=r"'text' must be \(100, 48\)"):
        head({"image": test["image"], "text": test["text"][:, :10]})
    with pytest.raises(ValueError, match="audio"):
        head({**test, "audio": test["text"]})
    with pytest.raises(ValueError, match="at least one"):
        head({})


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="identifiers"):
        FusionConfig(("image.x",), (4,), 2)
    with pytest.raises(ValueError, match="width"):
        FusionConfig(("image",), (4,), 2, mode="gated", width=0)
    cfg = FusionConfig(("image", "text"), (4, 3), 3, mode="gated", hidden=5, width=6)
    assert FusionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# --------------------------------------------------------------------------- the one trainer


def _same_weights(a: FusionHead, b: FusionHead) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_config_and_keyword_options_are_the_same_trainer() -> None:
    train, ytr, _, _ = split_data(n=200)
    config = HeadTrainConfig(mode="gated", hidden=8, epochs=3, lr=5e-3, seed=4)
    a = fit_fusion_head(train, ytr, config)
    b = fit_fusion_head(train, ytr, mode="gated", hidden=8, epochs=3, lr=5e-3, seed=4)
    c = fit_fusion_head(train, ytr, config.replace(seed=5))
    assert _same_weights(a, b) and not _same_weights(a, c)
    assert a.fit_info == b.fit_info and a.fit_info["lr"] == 5e-3
    with pytest.raises(TypeError):
        fit_fusion_head(train, ytr, config, no_such_option=1)
    with pytest.raises(ValueError, match="modality_dropout"):
        HeadTrainConfig(modality_dropout=1.0)
    with pytest.raises(ValueError, match="threads"):
        HeadTrainConfig(threads=0)


def test_a_heads_recipe_retrains_it_exactly() -> None:
    """``HeadTrainConfig.of(head)`` is the recipe: the same rows give the same weights."""
    train, ytr, _, _ = split_data(n=200)
    head = fit_fusion_head(
        train, ytr, mode="gated", hidden=6, width=5, epochs=4, batch_size=32, seed=2,
        modality_dropout=0.2, weight_decay=1e-3,
    )  # fmt: skip
    recipe = HeadTrainConfig.of(head)
    assert (recipe.width, recipe.batch_size, recipe.modality_dropout) == (5, 32, 0.2)
    assert _same_weights(fit_fusion_head(train, ytr, recipe), head)


def test_hooks_change_only_what_they_override() -> None:
    """Plain hooks reproduce plain training; a loss hook sees every batch, once per step."""
    train, ytr, _, _ = split_data(n=200)
    plain = fit_fusion_head(train, ytr, epochs=3, batch_size=64)
    assert _same_weights(
        fit_fusion_head(train, ytr, epochs=3, batch_size=64, hooks=HeadTrainHooks()), plain
    )

    class Counting(HeadTrainHooks):
        def __init__(self) -> None:
            self.rows: list[int] = []

        def loss(self, head, batch, y, idx):
            self.rows += idx.tolist()
            return 0.0 * super().loss(head, batch, y, idx)  # no gradient signal at all

        def finish(self, head, embs, y):
            return {"batches": len(self.rows)}

    hooks = Counting()
    frozen = fit_fusion_head(train, ytr, epochs=3, batch_size=64, hooks=hooks)
    # 3 epochs, each a permutation of the 200 rows in batches of 64
    assert sorted(hooks.rows) == sorted(list(range(200)) * 3)
    assert frozen.fit_info["batches"] == 600
    init = fit_fusion_head(train, ytr, epochs=1, lr=1e-12)  # (almost) the initial weights
    for k, v in frozen.state_dict().items():  # a zero loss leaves AdamW only its weight decay
        torch.testing.assert_close(v, init.state_dict()[k], atol=1e-4, rtol=0)


def test_continuing_a_head_keeps_its_statistics() -> None:
    """``head=`` (a federated client's local round) trains on from the given weights."""
    train, ytr, _, _ = split_data(n=200)
    head = fit_fusion_head(train, ytr, epochs=1)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    shifted = {m: x + 1.0 for m, x in train.items()}  # other data: other means, same head
    again = fit_fusion_head(shifted, ytr, epochs=2, seed=9, head=head)
    assert again is head
    for m in train:
        assert torch.equal(head.null_embeddings[m], before[f"null_{m}"])
    assert not torch.equal(head.state_dict()["classifier.weight"], before["classifier.weight"])
    with pytest.raises(ValueError, match="out of range"):
        fit_fusion_head(train, ytr + 3, epochs=1, head=head)
