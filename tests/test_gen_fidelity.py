"""generative.fidelity science: CLIPScore against torchmetrics, attribute prompt following."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmsafe.methods.generative.fidelity import (
    attribute_following,
    clip_score,
    clip_score_summary,
    cosine_similarity,
)
from mmsafe.methods.generative.safety import rogan_gladen
from mmsafe.methods.hallucination import wilson_interval
from mmsafe.metrics.bootstrap import mean_ci

CAPTIONS = ["a cat", "photo", "red sq", "dog", "blue o", "the cat"]  # short: 16 positions


# ------------------------------------------------------------------------------ CLIPScore
def _pooled(out: Any) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture
def tensor_features(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchmetrics 1.9 calls ``.norm`` on get_*_features' result, a tensor only before
    transformers 5: unwrap the pooled output for the duration of the test."""
    import transformers

    clip = transformers.CLIPModel
    image, text = clip.get_image_features, clip.get_text_features
    monkeypatch.setattr(clip, "get_image_features", lambda s, *a, **k: _pooled(image(s, *a, **k)))
    monkeypatch.setattr(clip, "get_text_features", lambda s, *a, **k: _pooled(text(s, *a, **k)))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP + processor saved offline; 'openai' in the name so that torchmetrics
    loads it with CLIPModel / CLIPProcessor.from_pretrained."""
    import transformers

    from tests.test_hf import MAXLEN, tiny_tokenizer

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    text = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "max_position_embeddings": MAXLEN,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    }
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # a shared direction, so the cosines straddle 0 instead of all < 0
        model.visual_projection.weight.copy_(model.text_projection.weight)
        b = torch.randn(32)
        model.vision_model.post_layernorm.bias.copy_(0.3 * b)
        model.text_model.final_layer_norm.bias.copy_(-0.08 * b)
    images = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    folder = tmp_path_factory.mktemp("openai-tiny-clip")
    model.save_pretrained(folder)
    transformers.CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


def _embed(folder: Path, imgs: torch.Tensor, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    import transformers

    model = transformers.CLIPModel.from_pretrained(folder).eval()
    proc = transformers.CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pix = proc(images=list(imgs), return_tensors="pt")["pixel_values"]
        enc = proc(text=texts, return_tensors="pt", padding=True)
        img = _pooled(model.get_image_features(pixel_values=pix))
        txt = _pooled(model.get_text_features(enc["input_ids"], enc["attention_mask"]))
    return img.numpy(), txt.numpy()


@pytest.mark.usefixtures("tensor_features")
def test_clip_score_equals_torchmetrics(clip_folder: Path) -> None:
    from torchmetrics.multimodal.clip_score import CLIPScore

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (len(CAPTIONS), 3, 32, 32), generator=g, dtype=torch.uint8)
    img_emb, txt_emb = _embed(clip_folder, imgs, CAPTIONS)
    cos = cosine_similarity(img_emb, txt_emb)
    assert (cos < 0).any() and (cos > 0).any()  # both branches of the clamp are exercised

    metric = CLIPScore(model_name_or_path=str(clip_folder))
    per_pair = []
    for i in range(len(CAPTIONS)):  # one pair per batch: torchmetrics clamps the batch mean
        metric.reset()
        with torch.no_grad():
            per_pair.append(float(metric(imgs[i : i + 1], CAPTIONS[i : i + 1])))
    ours = clip_score(img_emb, txt_emb)
    np.testing.assert_allclose(ours, per_pair, atol=1e-4)

    metric.reset()
    with torch.no_grad():
        batch = float(metric(imgs, CAPTIONS))
    summary = clip_score_summary(img_emb, txt_emb, n_boot=200)
    assert summary["torchmetrics"] == pytest.approx(batch, abs=1e-4)
    assert summary["clip_score"] == pytest.approx(np.mean(per_pair), abs=1e-4)
    assert summary["clip_score"] > summary["torchmetrics"]  # per-pair clamp drops negatives
    assert summary["ci"] == mean_ci(ours, n_boot=200)
    assert summary["ci"][0] <= summary["clip_score"] <= summary["ci"][1]
    print("max |ours - torchmetrics| per pair:", np.abs(ours - per_pair).max(), summary)


def test_clip_score_by_hand_and_inputs() -> None:
    a = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    b = np.array([[6.0, 8.0], [0.0, 5.0], [0.0, -1.0]])
    assert clip_score(a, b).tolist() == [100.0, 0.0, 0.0]
    assert clip_score(a, b, scale=2.5).tolist() == [2.5, 0.0, 0.0]
    np.testing.assert_allclose(clip_score(torch.tensor(a), torch.tensor(b)), clip_score(a, b))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    ref = 100 * np.maximum(
        (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1), 0
    )
    np.testing.assert_allclose(clip_score(x, y), ref)
    for bad in (np.zeros((2, 2)), np.ones((2, 3)), np.ones(2), np.full((2, 2), np.nan)):
        with pytest.raises(ValueError):
            clip_score(bad, np.ones((2, 2)))
    with pytest.raises(ValueError, match="scale"):
        clip_score(a, b, scale=0)


# ------------------------------------------------------------------------------ attributes
def test_attribute_following_by_hand() -> None:
    requested = [
        {"shape": "circle", "colour": "red", "position": "left"},
        {"shape": "square", "colour": "blue"},
        {"shape": "circle"},
        {},  # asked nothing: left out
        {"colour": "red", "position": None},  # None = not asked
    ]
    predicted = [
        {"shape": "circle", "colour": "red", "position": "right"},
        {"shape": "square", "colour": "blue", "position": "left"},
        {"colour": "red"},  # shape missing: wrong
        {"shape": "circle"},
        {"colour": "red"},
    ]
    r = attribute_following(requested, predicted, n_boot=200)
    shape, colour, position = (r["attributes"][k] for k in ("shape", "colour", "position"))
    assert (shape["n"], shape["correct"], shape["accuracy"]) == (3, 2, 2 / 3)
    assert (colour["n"], colour["accuracy"]) == (3, 1.0)
    assert (position["n"], position["accuracy"]) == (1, 0.0)
    assert shape["ci"] == wilson_interval(2, 3)
    assert r["n"] == 4 and r["n_unrequested"] == 1
    assert r["all_accuracy"] == 0.5  # rows 1 and 4
    shares = np.array([2 / 3, 1.0, 0.0, 1.0])
    assert r["tifa"] == pytest.approx(shares.mean())
    assert r["tifa_ci"] == mean_ci(shares, n_boot=200)
    assert shape["corrected"] is None and shape["judge_accuracy"] is None


def test_judge_correction_by_hand_and_statistically() -> None:
    req = [{"colour": "red"}] * 10
    pred = [{"colour": "red"}] * 7 + [{"colour": "blue"}, {"colour": "green"}, {"colour": "pink"}]
    r = attribute_following(req, pred, judge_accuracy={"colour": 0.85}, n_boot=50)
    c = r["attributes"]["colour"]
    assert c["n_values"] == 4  # red, blue, green, pink seen
    fpr = 0.15 / 3
    assert c["corrected"] == pytest.approx((0.7 - fpr) / (0.85 - fpr))
    lo, hi = wilson_interval(7, 10)
    assert c["corrected_ci"] == (rogan_gladen(lo, 0.85, fpr), rogan_gladen(hi, 0.85, fpr))
    r2 = attribute_following(req, pred, judge_accuracy={"colour": 0.85}, n_values={"colour": 2})
    assert r2["attributes"]["colour"]["corrected"] == pytest.approx((0.7 - 0.15) / (0.85 - 0.15))
    chance = attribute_following(req, pred, judge_accuracy={"colour": 0.25})
    assert chance["attributes"]["colour"]["corrected"] is None  # a = 1 / K: uninformative

    # Simulation: the generator follows the colour 60% of the time; the judge (accuracy 0.8,
    # errors spread evenly over the other 3 colours) lowers the raw figure; the correction
    # recovers 0.6.
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow"]
    n, p_true, acc = 4000, 0.6, 0.8
    req, pred = [], []
    for _ in range(n):
        want = colours[rng.integers(4)]
        others = [c for c in colours if c != want]
        shown = want if rng.random() < p_true else others[rng.integers(3)]
        wrong = [c for c in colours if c != shown]
        seen = shown if rng.random() < acc else wrong[rng.integers(3)]
        req.append({"colour": want})
        pred.append({"colour": seen})
    r = attribute_following(req, pred, judge_accuracy={"colour": acc}, n_boot=50)
    c = r["attributes"]["colour"]
    expected_raw = acc * p_true + (1 - acc) / 3 * (1 - p_true)
    assert c["accuracy"] == pytest.approx(expected_raw, abs=0.03)
    assert c["corrected"] == pytest.approx(p_true, abs=0.03)
    assert c["corrected_ci"][0] <= p_true <= c["corrected_ci"][1]
    print("judge simulation: raw", c["accuracy"], "corrected", c["corrected"], c["corrected_ci"])


def test_attribute_following_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="rows"):
        attribute_following([{"a": 1}], [])
    with pytest.raises(ValueError, match="nothing to score"):
        attribute_following([{}], [{}])
    with pytest.raises(ValueError, match="dict"):
        attribute_following([("a", 1)], [{}])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="judge accuracy"):
        attribute_following([{"a": 1}], [{"a": 1}], judge_accuracy={"a": 1.5})
    with pytest.raises(ValueError, match="n_values"):
        attribute_following([{"a": 1}], [{"a": 1}], judge_accuracy={"a": 0.9}, n_values={"a": 1})
    assert not math.isnan(attribute_following([{"a": 1}], [{"a": 1}])["tifa"])
