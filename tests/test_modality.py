"""The robustness.modality check: drop / swap / noise one modality, flag over-reliance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mmsafe.checks.robustness.modality  # noqa: F401  (registers the check)
from mmsafe.checks.registry import list_checks
from mmsafe.checks.robustness.modality import (
    ModalityCheck,
    embedding_noise,
    mismatched_partners,
    reliance_shares,
)
from tests.conftest import QUICK_WORLD_SPEC, ToyEncoder, audit_context, make_colour_data


def test_registered_and_skips_single_modality_tasks(colour_data) -> None:
    assert "robustness.modality" in list_checks("robustness.*")
    ctx = audit_context(ToyEncoder(), colour_data)  # zero-shot
    assert "not applicable" in ModalityCheck().skip_reason(ctx)
    with pytest.raises(ValueError, match="drop"):
        ModalityCheck(drop="median")  # type: ignore[arg-type]


def test_mismatched_partners_and_shares() -> None:
    y = np.array([0, 0, 0, 1, 2, 2])
    p = mismatched_partners(y, seed=1)
    assert (y[p] != y).all() and np.array_equal(p, mismatched_partners(y, seed=1))
    same = mismatched_partners(np.zeros(4, dtype=int), seed=0)  # no other label: any other row
    assert (same != np.arange(4)).all()
    with pytest.raises(ValueError):
        mismatched_partners(np.zeros(1, dtype=int), 0)
    assert reliance_shares({"image": 0.1, "text": 0.3}) == {
        "image": pytest.approx(0.25),
        "text": pytest.approx(0.75),
    }
    assert reliance_shares({"image": -0.05, "text": 0.2})["text"] == 1.0
    assert all(math.isnan(v) for v in reliance_shares({"image": 0.0, "text": -0.1}).values())


def test_embedding_noise_norm_and_determinism() -> None:
    x = torch.nn.functional.normalize(torch.randn(500, 64, generator=torch.Generator()), dim=-1)
    y = embedding_noise(x, 1.0, seed=3)
    assert torch.equal(y, embedding_noise(x, 1.0, seed=3))
    assert torch.allclose(y.norm(dim=-1), torch.ones(500), atol=1e-5)
    # noise of norm ~1 on a unit vector: cosine ~ 1 / sqrt(2)
    assert float((x * y).sum(-1).mean()) == pytest.approx(1 / math.sqrt(2), abs=0.05)
    assert torch.allclose(embedding_noise(x, 0.0, seed=0), x, atol=1e-6)


def test_toy_fusion_metrics_match_direct_head_calls() -> None:
    data = make_colour_data(n=150)
    ctx = audit_context(ToyEncoder(), data, task="fusion")
    res = ModalityCheck(drop="zeros", n_boot=100).run(ctx)
    m = {k: v.value for k, v in res.metrics.items()}
    keep = ctx.outputs.labels >= 0
    y = ctx.outputs.labels[keep]
    emb = {k: v[torch.as_tensor(keep)] for k, v in ctx.outputs.embeddings.items()}
    with torch.no_grad():
        no_text = ctx.task.logits({**emb, "text": torch.zeros_like(emb["text"])}).argmax(-1)
    assert m["accuracy/drop/text"] == pytest.approx(np.mean(no_text.numpy() == y))
    assert m["accuracy_drop/drop/text"] == pytest.approx(
        m["clean_accuracy"] - m["accuracy/drop/text"]
    )
    for key, p in (("reliance", "swap"), ("drop_share", "drop")):
        shares = reliance_shares({k: m[f"accuracy_drop/{p}/{k}"] for k in ("image", "text")})
        for k in ("image", "text"):
            if math.isnan(shares[k]):
                assert math.isnan(m[f"{key}/{k}"])
            else:
                assert m[f"{key}/{k}"] == pytest.approx(shares[k])
    partners = mismatched_partners(y, ctx.seed)
    with torch.no_grad():
        swapped = ctx.task.logits({**emb, "image": emb["image"][partners]}).argmax(-1).numpy()
    assert m["accuracy/swap/image"] == pytest.approx(np.mean(swapped == y))
    assert m["follow_rate/image"] == pytest.approx(np.mean(swapped == y[partners]))
    heat = res.plots["modality_accuracy"]
    assert heat["rows"] == ["image", "text"] and heat["columns"] == [
        "clean",
        "drop",
        "swap",
        "noise",
    ]
    res.to_dict()


def test_caption_that_names_the_colour_is_flagged_on_toy() -> None:
    """Toy world: the text names the label, the image is made uninformative -> text reliance."""
    data = make_colour_data(n=240)
    grey = [np.full_like(img, 100) for img in data.modalities["image"]]
    data.modalities["image"] = grey
    ctx = audit_context(ToyEncoder(), data, task="fusion")
    res = ModalityCheck(n_boot=100).run(ctx)
    assert res.metrics["reliance/text"].value == pytest.approx(1.0)
    assert any("Over-reliance on text" in f.message for f in res.findings)


# --------------------------------------------------------------------------- tiny-clip worlds


def _shapes_ctx(shapes_quick, spec: str):
    from mmsafe.data.loading import load_data

    _, model = shapes_quick
    return audit_context(model, load_data(spec), task="fusion")


def test_text_over_reliance_flagged_when_caption_leaks_label(shapes_quick) -> None:
    # Measured (162 test rows): swap cost image 0.228 / text 0.648 -> text share 0.74; a swapped
    # caption is followed on 65% of rows, a swapped image on 22%; removing the text costs 0.32,
    # removing the image -0.07 (text alone: 0.98 accuracy).
    ctx = _shapes_ctx(shapes_quick, QUICK_WORLD_SPEC + ",caption_label=1.0")  # same images
    res = ModalityCheck(n_boot=200).run(ctx)
    m = {k: v.value for k, v in res.metrics.items()}
    flagged = [f for f in res.findings if f.message.startswith("Over-reliance on text")]
    assert flagged and flagged[0].severity in ("medium", "high"), (m, res.findings)
    assert m["reliance/text"] >= 0.65 and m["accuracy_drop/swap/text"] >= 0.1
    assert m["follow_rate/text"] > 0.5 > m["follow_rate/image"]
    assert m["accuracy_drop/drop/text"] > 0.1 and m["accuracy_drop/drop/image"] <= 0.02
    assert not any(f.message.startswith("Over-reliance on image") for f in res.findings)


def test_no_over_reliance_flag_on_normal_world(shapes_quick) -> None:
    # Measured (caption_label=0.8): swap cost image 0.420 / text 0.401 -> text share 0.49.
    # Removing the image costs nothing here (the captions repeat it): an info finding, no flag.
    ctx = _shapes_ctx(shapes_quick, QUICK_WORLD_SPEC)
    res = ModalityCheck(n_boot=200).run(ctx)
    assert not any(f.message.startswith("Over-reliance") for f in res.findings)
    assert 0.25 < res.metrics["reliance/text"].value < 0.65
    assert res.metrics["accuracy_drop/swap/image"].value > 0.1  # the image is not ignored
