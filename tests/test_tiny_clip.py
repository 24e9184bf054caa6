"""tiny-clip: training works (zero-shot well above chance), caching, save/load, tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mmsafe.data.dataset import Dataset
from mmsafe.data.worlds import make_shapes
from mmsafe.models import tiny_clip as tc
from mmsafe.models.base import ModelError, create_model, list_models

TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.")


@torch.no_grad()
def zero_shot_accuracy(model, ds: Dataset) -> float:
    """Prompt-ensemble zero-shot accuracy on the labelled test rows (a local reference)."""
    test = ds.split("test")
    test = test.subset(test.labelled)
    class_emb = []
    for name in ds.classes:
        e = model.encode({"text": model.preprocess("text", [t.format(name) for t in TEMPLATES])})
        class_emb.append(F.normalize(e["text"].mean(0), dim=-1))
    img = model.encode({"image": model.preprocess("image", test.modalities["image"])})["image"]
    scores = model.logit_scale * img @ torch.stack(class_emb).T
    return float((scores.argmax(1).numpy() == test.labels).mean())


@pytest.fixture(scope="module")
def world():
    # spurious=0: this file tests that training works, not the planted shortcut
    return make_shapes(n=1200, seed=1, spurious=0.0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mmsafe-cache")


@pytest.fixture(scope="module")
def model(world, cache):
    return tc.build_tiny_clip("s", train_data=world, quick=True, cache_dir=cache, progress=False)


def test_quick_training_is_well_above_chance(model, world):
    acc = zero_shot_accuracy(model, world)
    assert acc > 0.5, acc  # chance is 0.2 with 5 classes
    assert model.training_info["zero_shot_test_accuracy"] == pytest.approx(acc, abs=1e-3)
    assert model.training_info["quick"] is True
    assert model.training_info["final_loss"] < np.log(128)  # below the untrained InfoNCE loss


def test_embeddings_unit_norm_and_shapes(model, world):
    images = world.modalities["image"][:5]
    emb = model.encode(
        {
            "image": model.preprocess("image", images),
            "text": model.preprocess("text", ["a red circle", "ünïcødé ☃ text", "x" * 1000]),
        }
    )
    assert emb["image"].shape == (5, 64) and emb["text"].shape == (3, 64)
    for e in emb.values():
        assert torch.allclose(e.norm(dim=-1), torch.ones(len(e)), atol=1e-5)
    assert 0 < model.logit_scale <= 100 and isinstance(model.logit_scale, float)
    # 64x64 inputs are resized to the tower's 32x32
    big = np.repeat(np.repeat(images[0], 2, axis=0), 2, axis=1)
    assert model.preprocess("image", [big]).shape == (1, 3, 32, 32)


def test_cache_files_and_cache_hit_does_not_retrain(model, world, cache, monkeypatch):
    folders = list((cache / "models").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("tiny-clip-s-")
    assert sorted(p.name for p in folders[0].iterdir()) == ["config.json", "model.safetensors"]
    doc = json.loads((folders[0] / "config.json").read_text())
    assert (
        doc["model"]["size"] == "s" and doc["training"]["data_fingerprint"] == world.fingerprint()
    )
    assert doc["training"]["train_seconds"] > 0

    def boom(*args, **kwargs):
        raise AssertionError("training ran although the model was cached")

    monkeypatch.setattr(tc, "train_tiny_clip", boom)
    again = create_model("tiny-clip", train_data=world, quick=True, cache_dir=cache, progress=False)
    assert again.fingerprint() == model.fingerprint()
    assert again.training_info == model.training_info
    # another seed is another cache entry, so it would train
    with pytest.raises(AssertionError, match="training ran"):
        tc.build_tiny_clip("s", train_data=world, quick=True, seed=1, cache_dir=cache)


def test_save_load_round_trip(model, world, tmp_path):
    model.save_pretrained(tmp_path / "m")
    loaded = tc.TinyClip.from_pretrained(tmp_path / "m")
    batch = {
        "image": model.preprocess("image", world.modalities["image"][:8]),
        "text": model.preprocess("text", world.modalities["text"][:8]),
    }
    a, b = model.encode(batch), loaded.encode(batch)
    for m in ("image", "text"):
        assert torch.equal(a[m], b[m])
    assert loaded.config() == model.config() and loaded.logit_scale == model.logit_scale
    assert loaded.fingerprint() == model.fingerprint()
    with pytest.raises(ModelError, match="config.json and model.safetensors"):
        tc.TinyClip.from_pretrained(tmp_path / "nothing-here")


def test_hidden_states_per_block(model, world):
    cfg = model.cfg
    hs = model.hidden_states("image", model.preprocess("image", world.modalities["image"][:3]))
    assert [tuple(h.shape) for h in hs] == [
        (3, c, 32 >> i, 32 >> i) for i, c in enumerate(cfg.channels)
    ]
    tok = model.preprocess("text", ["a circle", "a much longer caption here"])
    hs = model.hidden_states("text", tok)
    assert len(hs) == cfg.text_layers
    assert all(tuple(h.shape) == (2, tok["input_ids"].shape[1], cfg.text_width) for h in hs)


def test_byte_tokenizer_unicode_and_overlong():
    text = "héllo wörld 🙂 日本"
    tok = tc.tokenize([text, ""])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    n = len(text.encode("utf-8"))
    assert ids[0, 0] == tc.BOS and ids[0, n + 1] == tc.EOS
    assert bytes(ids[0, 1 : n + 1].tolist()) == text.encode("utf-8")
    assert mask[0].sum() == n + 2 and mask[1].sum() == 2 and (ids[1, 2:] == tc.PAD).all()
    long = tc.tokenize(["y" * 500], max_length=77)
    assert long["input_ids"].shape == (1, 77) and long["input_ids"][0, -1] == tc.EOS
    with pytest.raises(ValueError, match="max_length"):
        tc.tokenize(["a"], max_length=2)


def test_text_embedding_ignores_padding_and_bucketing(model):
    texts = ["a", "a photo of a circle.", "a small red square at the top left on a dark background"]
    alone = model.encode({"text": model.preprocess("text", texts[:1])})["text"]
    batch = model.encode({"text": model.preprocess("text", texts)})["text"]
    assert torch.allclose(alone[0], batch[0], atol=1e-5)
    with torch.no_grad():
        bucketed = tc.encode_texts_bucketed(model, [*texts, texts[1]], bucket=2)
        plain = model.encode_modality("text", model.preprocess("text", [*texts, texts[1]]))
    assert torch.allclose(bucketed, plain, atol=1e-5)


def test_training_is_seeded_and_deterministic(world):
    def run(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        m = tc.TinyClip(tc.TinyClipConfig.for_size("xs"))
        stats = tc.train_tiny_clip(
            m, world, tc.TrainConfig(steps=3, batch_size=16, warmup=1), seed=seed, progress=False
        )
        assert stats["steps"] == 3 and np.isfinite(stats["final_loss"])
        return m.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_contrastive_loss_by_hand():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    scale = torch.tensor(2.0)
    logits = scale * img @ txt.T  # [[2, 0], [1.2, 1.6]]
    i2t = -(np.log(np.exp(2) / (np.exp(2) + 1)) + np.log(np.exp(1.6) / (np.exp(1.2) + np.exp(1.6))))
    t2i = -(np.log(np.exp(2) / (np.exp(2) + np.exp(1.2))) + np.log(np.exp(1.6) / (1 + np.exp(1.6))))
    want = (i2t + t2i) / 4
    assert float(tc.contrastive_loss(img, txt, scale, ["a", "b"])) == pytest.approx(want, 1e-5)
    assert torch.allclose(logits, torch.tensor([[2.0, 0.0], [1.2, 1.6]]))
    # identical captions are positives for each other: both columns share the target mass
    same = tc.contrastive_loss(img, txt, scale, ["a", "a"])
    row = -0.5 * (F.log_softmax(logits, 1).sum(1)).mean()
    col = -0.5 * (F.log_softmax(logits.T, 1).sum(1)).mean()
    assert float(same) == pytest.approx(float((row + col) / 2), 1e-5)


def test_logit_scale_is_clamped():
    m = tc.TinyClip(tc.TinyClipConfig.for_size("xs"))
    assert m.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        m.log_logit_scale.fill_(10.0)
    assert m.logit_scale == 100.0


def test_registry_family_and_errors(world):
    assert {"tiny-clip", "tiny-clip-xs", "tiny-clip-m"} <= set(list_models("tiny-clip*"))
    widths = [tc.TinyClipConfig.for_size(s).channels[-1] for s in ("xs", "s", "m")]
    assert widths == sorted(widths) and len(set(widths)) == 3
    assert tc.TinyClip(tc.TinyClipConfig.for_size("m")).name == "tiny-clip-m"
    with pytest.raises(ModelError, match="choose one of xs, s, m"):
        tc.build_tiny_clip("xl")
    no_split = Dataset(
        name="flat",
        ids=["a"],
        modalities={"image": [np.zeros((32, 32, 3), np.uint8)], "text": ["x"]},
        labels=np.array([0]),
        classes=["c"],
    )
    with pytest.raises(ModelError, match="split 'train'"):
        tc.build_tiny_clip("xs", train_data=no_split)
    text_only = Dataset(
        name="t", ids=["a"], modalities={"text": ["x"]}, labels=np.array([0]), classes=["c"],
        splits=["train"],
    )  # fmt: skip
    with pytest.raises(ModelError, match="lacks \\['image'\\]"):
        tc.build_tiny_clip("xs", train_data=text_only)
    with pytest.raises(ModelError, match="no 'audio' tower"):
        tc.TinyClip(tc.TinyClipConfig.for_size("xs")).preprocess("audio", [b""])


def test_random_shift_translates_within_range():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    assert torch.equal(tc._random_shift(x, 0, gen), x)
    out = tc._random_shift(x, 2, gen)
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    for img, pad in zip(out, padded, strict=True):
        crops = [pad[:, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(img, c) for c in crops)
