"""IISAN-Versa (asymmetric towers) and MOMEF (mixture of modality experts, a reconstruction).

The asymmetric backbone is a randomly initialised Hugging Face CLIP whose text tower is twice as
deep and 1.5x as wide as its vision tower (8 x 48 vs 4 x 32), saved to ``tmp_path`` and loaded
through mmsafe's ``hf:`` adapter (no network). The accuracy-vs-full-fine-tuning check runs on
the trained tiny-clip in ``tests/test_adapt.py`` (its shared ``shapes_quick`` fixture).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from mmsafe.data.worlds.shapes import make_shapes
from mmsafe.methods.adapt import (
    IISANHead,
    IISANVersaHead,
    MOMEFHead,
    adapt,
    group_taps,
    parse_methods,
    tower_layers,
    train_side_head,
)
from mmsafe.methods.efficiency import count_parameters

IMAGE_LAYERS, IMAGE_WIDTH, TEXT_LAYERS, TEXT_WIDTH = 4, 32, 8, 48


# --------------------------------------------------------------------------- group layer-dropping


def test_group_taps_for_hand_computed_depths() -> None:
    # Convention: 0-based block indices (embedding output excluded), the last block of each of
    # G equal groups. 4 image blocks, 8 text blocks, G = 2: groups {0,1},{2,3} and {0..3},{4..7}.
    assert group_taps({"image": 4, "text": 8}, 2) == {"image": [1, 3], "text": [3, 7]}
    assert group_taps({"image": 4, "text": 8}, 4) == {"image": [0, 1, 2, 3], "text": [1, 3, 5, 7]}
    # IISAN-Versa's scripts: ViT-base (12) every other layer, BERT-large (24) every fourth.
    assert group_taps({"image": 12, "text": 24}, 6) == {
        "image": [1, 3, 5, 7, 9, 11],
        "text": [3, 7, 11, 15, 19, 23],
    }
    # One count per tower (the longer tower gets surplus taps).
    assert group_taps({"image": 4, "text": 2}, {"image": 4, "text": 2}) == {
        "image": [0, 1, 2, 3],
        "text": [0, 1],
    }
    with pytest.raises(ValueError, match="n_taps"):
        group_taps({"image": 4, "text": 8}, 5)  # more groups than image blocks
    with pytest.raises(ValueError, match="No group count"):
        group_taps({"image": 4, "text": 8}, {"image": 2})


# --------------------------------------------------------------------------- heads


def test_versa_projections_output_side_width_and_surplus_taps_run_first() -> None:
    torch.manual_seed(0)
    dims = {"image": [IMAGE_WIDTH] * 2, "text": [TEXT_WIDTH] * 4}
    head = IISANVersaHead(dims, num_classes=3, width=16, bottleneck=4)
    for m, widths in dims.items():
        for proj, d in zip(head.proj[m], widths, strict=True):
            assert proj(torch.randn(5, d)).shape == (5, 16)  # aligned to the side width
    assert [len(head.sanb[s]) for s in ("I", "T", "M")] == [2, 4, 2]
    feats = {"image": [torch.randn(5, IMAGE_WIDTH)] * 2, "text": [torch.randn(5, TEXT_WIDTH)] * 4}
    out = head(feats)
    assert out.shape == (5, 3)
    # The surplus text taps (0 and 1) feed the intra-modal text network only: the output moves,
    # but the inter-modal network never reads them (its SANBs see taps 2 and 3).
    moved = dict(feats, text=[torch.randn(5, TEXT_WIDTH), *feats["text"][1:]])
    assert not torch.allclose(head(moved), out)
    with pytest.raises(ValueError, match="at least one tap"):
        IISANVersaHead({"image": [], "text": [4]}, num_classes=2)


def test_versa_head_reduces_to_iisan_with_equal_taps() -> None:
    dims = {"image": [8, 16], "text": [12, 12]}
    torch.manual_seed(1)
    iisan = IISANHead(dims, num_classes=4, width=8, bottleneck=2)
    torch.manual_seed(1)
    versa = IISANVersaHead(dims, num_classes=4, width=8, bottleneck=2)
    a, b = iisan.state_dict(), versa.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    feats = {"image": [torch.randn(3, 8), torch.randn(3, 16)], "text": [torch.randn(3, 12)] * 2}
    assert torch.equal(iisan(feats), versa(feats))


def _three_modalities(n: int, seed: int) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
    """Cached features of 3 modalities; only ``audio`` carries the label (2 taps, 6-d)."""
    centres = torch.randn(3, 6, generator=torch.Generator().manual_seed(99)) * 3  # fixed
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    audio = [centres[y] + torch.randn(n, 6, generator=gen) for _ in range(2)]
    feats = {
        "image": [torch.randn(n, 8, generator=gen), torch.randn(n, 16, generator=gen)],
        "text": [torch.randn(n, 12, generator=gen)],
        "audio": audio,
    }
    return feats, y


def test_momef_gate_weights_sum_to_one_and_three_modalities_train() -> None:
    torch.manual_seed(0)
    feats, y = _three_modalities(384, seed=0)
    dims = {m: [int(f.shape[1]) for f in fs] for m, fs in feats.items()}
    head = MOMEFHead(dims, num_classes=3, width=16, bottleneck=8)
    assert head.modalities == ("image", "text", "audio")
    w0 = head.gate_weights(feats)
    assert w0.shape == (384, 3)
    torch.testing.assert_close(w0, torch.full_like(w0, 1 / 3))  # zero-initialised router
    losses = train_side_head(head, feats, y, epochs=6, batch_size=32, lr=3e-3, seed=0)
    assert len(losses) == 6 * math.ceil(384 / 32) and np.isfinite(losses).all()
    test_feats, y_test = _three_modalities(300, seed=1)
    head.eval()
    with torch.no_grad():
        w = head.gate_weights(test_feats)
        acc = float((head(test_feats).argmax(-1) == y_test).float().mean())
    torch.testing.assert_close(w.sum(-1), torch.ones(300))  # a distribution per row
    assert (w >= 0).all()
    # Only audio is informative: the model learns it, and its side network is what fused.
    assert acc > 0.9  # chance is 1/3
    # The gating network routes to it: mean weight measured 0.66-0.73 (seeds 0-3), from 1/3.
    assert float(w[:, 2].mean()) > 0.5
    # Dropping audio's side network (its expert output zeroed) costs the prediction.
    with torch.no_grad():
        last = head.experts["audio"][-1]
        last.weight.zero_()
        last.bias.zero_()
        ablated = float((head(test_feats).argmax(-1) == y_test).float().mean())
    assert ablated < acc - 0.3


# --------------------------------------------------------------------------- asymmetric HF CLIP


@pytest.fixture(scope="module")
def asym_clip(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A random CLIP with an 8 x 48 text tower and a 4 x 32 vision tower, via ``hf:``."""
    from mmsafe.models.base import create_model
    from mmsafe.models.hf import PREPROCESSOR_FILE, default_preprocessor_config
    from tests.test_hf import tiny_tokenizer

    tok = tiny_tokenizer()
    text = {
        "vocab_size": len(tok),
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 2 * TEXT_WIDTH,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": 4,
        "max_position_embeddings": 32,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    vision = {
        "hidden_size": IMAGE_WIDTH,
        "intermediate_size": 2 * IMAGE_WIDTH,
        "num_hidden_layers": IMAGE_LAYERS,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    }
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    torch.manual_seed(0)
    path: Path = tmp_path_factory.mktemp("asym-clip")
    transformers.CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    # CLIP's standard pipeline: on the shapes world's 32-pixel images an identity resize
    pipeline = default_preprocessor_config("clip", 32)
    (path / PREPROCESSOR_FILE).write_text(json.dumps(pipeline))
    return create_model("hf:" + str(path))


@pytest.fixture(scope="module")
def world() -> Any:
    return make_shapes(n=240, seed=2)


@pytest.mark.parametrize("method", ["iisan-versa", "momef"])
def test_backbone_gets_no_gradient_and_stays_bit_identical(
    asym_clip: Any, world: Any, method: str
) -> None:
    model = asym_clip
    assert {k: len(v) for k, v in tower_layers(model).items()} == {"image": 4, "text": 8}
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert all(p.requires_grad for p in model.parameters())  # left trainable on purpose
    train, test = world.split("train"), world.split("test")
    # cache=False: the frozen backbones run in every step, so a leak would reach them.
    run = adapt(model, train, test, method, epochs=2, batch_size=32, cache=False, groups=2)
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    rep = run.report
    assert rep.method == method
    assert rep.extra["taps"] == {"image": [1, 3], "text": [3, 7]}
    assert rep.trainable_params == count_parameters(run.module).trainable
    assert rep.total_params == count_parameters(model).total + rep.trainable_params
    assert np.isfinite(rep.losses).all() and 0 <= rep.accuracy <= 1
    if method == "momef":
        weights = rep.extra["expert_weights"]
        assert set(weights) == {"image", "text"} and sum(weights.values()) == pytest.approx(1, 1e-3)
    else:  # both towers projected to the side width at every tap
        widths = {m: [p[1].in_features for p in run.module.proj[m]] for m in ("image", "text")}
        assert widths == {"image": [IMAGE_WIDTH] * 2, "text": [TEXT_WIDTH] * 2}
        assert {p[1].out_features for m in ("image", "text") for p in run.module.proj[m]} == {64}
    assert run.predict(test).shape == (len(test), len(world.classes))


def test_versa_cached_matches_uncached_and_accepts_surplus(
    asym_clip: Any, world: Any, tmp_path: Path
) -> None:
    train, test = world.split("train"), world.split("test")
    kw: dict[str, Any] = {"epochs": 2, "batch_size": 32, "seed": 1}
    cached = adapt(asym_clip, train, test, "iisan-versa", cache_dir=tmp_path, groups=2, **kw)
    uncached = adapt(asym_clip, train, test, "iisan-versa", cache=False, groups=2, **kw)
    np.testing.assert_allclose(cached.report.losses, uncached.report.losses, rtol=1e-4, atol=1e-5)
    assert cached.report.cache_seconds > 0
    surplus = adapt(asym_clip, train, test, "iisan-versa", groups={"image": 2, "text": 4}, **kw)
    assert surplus.report.extra["taps"] == {"image": [1, 3], "text": [1, 3, 5, 7]}
    assert (
        len(surplus.report.extra["gates"]["T"]) == 4
        and len(surplus.report.extra["gates"]["M"]) == 2
    )
    # iisan ignores groups (so compare_methods can pass it to every method): min(6, 4, 8) taps.
    iisan = adapt(asym_clip, train, test, "iisan", groups=2, **kw)
    assert iisan.report.extra["taps"] == {"image": [0, 1, 2, 3], "text": [1, 3, 5, 7]}


def test_parse_methods_accepts_the_new_methods() -> None:
    assert parse_methods("iisan-versa, momef") == ["iisan-versa", "momef"]
