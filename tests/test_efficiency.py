"""Efficiency measurements (mmsafe.methods.efficiency) and the efficiency.profile check."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import mmsafe.checks.efficiency.profile  # noqa: F401  (registers efficiency.profile)
from mmsafe.checks import get_check, list_checks
from mmsafe.methods.efficiency import (
    PAPER_WEIGHTS,
    count_flops,
    count_parameters,
    encode_flops_per_sample,
    latency_stats,
    measure_latency,
    minmax_normalise,
    peak_memory,
    tower_parameters,
    tpme,
)
from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
from tests.conftest import ToyEncoder, audit_context

# --------------------------------------------------------------------------- TPME


def test_tpme_matches_hand_computed_example() -> None:
    # Three methods (FFT, IISAN, LoRA): time, trainable params, memory.
    times, params, memory = [10.0, 2.0, 6.0], [100.0, 10.0, 55.0], [8.0, 4.0, 4.0]
    # t_hat = [1, 0, 0.5]; p_hat = [1, 0, 0.5]; m_hat = [1, 0, 0]
    # TPME = 0.45 t + 0.10 p + 0.45 m = [1, 0, 0.45 * 0.5 + 0.10 * 0.5] = [1, 0, 0.275]
    np.testing.assert_allclose(tpme(times, params, memory), [1.0, 0.0, 0.275], atol=1e-12)
    assert PAPER_WEIGHTS == (0.45, 0.10, 0.45)
    # Other weights: only memory counts.
    np.testing.assert_allclose(tpme(times, params, memory, (0, 0, 1)), [1.0, 0.0, 0.0])
    # An axis on which every method ties contributes 0 (not NaN).
    np.testing.assert_allclose(tpme([1.0, 1.0], [5.0, 1.0], [3.0, 3.0]), [0.10, 0.0])
    # Relative to the set: adding a slower method changes the others' scores.
    four = tpme([*times, 18.0], [*params, 100.0], [*memory, 8.0])
    assert four[2] == pytest.approx(0.45 * 0.25 + 0.10 * 0.5)
    with pytest.raises(ValueError, match="summing to 1"):
        tpme(times, params, memory, (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="one value per method"):
        tpme(times, params[:2], memory)


def test_minmax_normalise() -> None:
    assert minmax_normalise([3.0, 1.0, 2.0]).tolist() == [1.0, 0.0, 0.5]
    assert minmax_normalise([7.0]).tolist() == [0.0]
    with pytest.raises(ValueError):
        minmax_normalise([1.0, math.nan])


# --------------------------------------------------------------------------- FLOPs


def test_flops_of_linear_and_conv_match_hand_counts() -> None:
    lin = nn.Linear(10, 5)
    assert count_flops(lambda: lin(torch.randn(3, 10))) == 2 * 3 * 10 * 5
    conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    # 2 * batch * C_out * H_out * W_out * (C_in * k * k)
    assert count_flops(lambda: conv(torch.randn(2, 3, 8, 8))) == 2 * 2 * 4 * 8 * 8 * 3 * 3 * 3
    strided = nn.Conv2d(4, 6, kernel_size=3, stride=2)  # 9x9 -> 4x4
    assert count_flops(lambda: strided(torch.randn(1, 4, 9, 9))) == 2 * 6 * 4 * 4 * 4 * 9
    # Backward doubles the work of a linear layer (grad wrt input and wrt weight).
    x = torch.randn(3, 10, requires_grad=True)
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * (2 * 3 * 10 * 5)


def image_tower_flops(cfg: TinyClipConfig) -> int:
    """Hand count of tiny-clip's image tower: its 3x3 convs and the final projection."""
    flops, side, c_in = 0, cfg.image_size, 3
    for i, c in enumerate(cfg.channels):
        side = side // 2 if i > 0 else side
        for _ in range(cfg.convs_per_stage):
            flops += 2 * side * side * c * c_in * 9
            c_in = c
    return flops + 2 * (2 * c_in) * cfg.embed_dim


@pytest.mark.parametrize("size", ["xs", "m"])
def test_encode_flops_per_sample_of_tiny_clip_image_tower(size: str) -> None:
    model = TinyClip(TinyClipConfig.for_size(size)).eval()
    pixels = torch.rand(4, 3, 32, 32)
    assert encode_flops_per_sample(model, "image", pixels) == image_tower_flops(model.cfg)
    with pytest.raises(ValueError):
        encode_flops_per_sample(model, "image", pixels[:0])


# --------------------------------------------------------------------------- parameters


def test_parameter_counts_match_hand_counts() -> None:
    lin = nn.Linear(3, 2)
    lin.bias.requires_grad_(False)
    assert count_parameters(lin).total == 8 and count_parameters(lin).trainable == 6
    shared = nn.Sequential(lin, lin)  # one module twice: counted once
    assert count_parameters(shared).total == 8

    model = TinyClip(TinyClipConfig.for_size("xs"))
    counts = tower_parameters(model)
    # xs image tower: convs without bias + batch-norm affine per stage, then Linear(2*64 -> 64).
    chans = [3, 8, 16, 32, 64]
    image = sum(chans[i] * chans[i + 1] * 9 + 2 * chans[i + 1] for i in range(4))
    image += 2 * 64 * 64 + 64
    assert counts["image"].total == image
    # xs text tower: width 32, 1 block, 259 tokens, 77 positions, final LN, Linear(32 -> 64).
    w = 32
    block = 2 * 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + (w * 4 * w + 4 * w) + (4 * w * w + w)
    text = 259 * w + 77 * w + block + 2 * w + (w * 64 + 64)
    assert counts["text"].total == text
    assert counts["shared"].total == 1  # the log temperature
    assert counts["total"].total == image + text + 1
    for p in model.image.parameters():
        p.requires_grad_(False)
    frozen = tower_parameters(model)
    assert frozen["image"].trainable == 0 and frozen["text"].trainable == text
    assert frozen["total"].trainable == text + 1


def test_hf_clip_towers_are_found() -> None:
    from mmsafe.models.hf import HFClip

    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    cfg = transformers.CLIPConfig(
        text_config={**small, "num_attention_heads": 2, "vocab_size": 50},
        vision_config={**small, "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
        projection_dim=8,
    )
    inner = transformers.CLIPModel(cfg)
    model = HFClip(
        inner, tokenizer=None, source="test", image_mean=(0.5,) * 3, image_std=(0.5,) * 3
    )
    counts = tower_parameters(model)
    vision = count_parameters(inner.vision_model).total + inner.visual_projection.weight.numel()
    text = count_parameters(inner.text_model).total + inner.text_projection.weight.numel()
    assert counts["image"].total == vision and counts["text"].total == text
    assert counts["shared"].total == 1  # logit_scale


# --------------------------------------------------------------------------- latency, memory


def test_latency_stats_and_call_counts() -> None:
    st = latency_stats([0.4, 0.1, 0.3, 0.2, 1.0])
    assert (st.p50, st.mean, st.n) == (0.3, 0.4, 5)
    assert st.p95 == pytest.approx(0.4 + 0.8 * (1.0 - 0.4))  # numpy's linear interpolation
    calls = []
    st = measure_latency(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and st.n == 4 and 0 <= st.p50 <= st.p95
    with pytest.raises(ValueError):
        measure_latency(lambda: None, repeats=0)


def test_peak_memory_sees_a_large_temporary_allocation() -> None:
    def big() -> float:
        x = torch.ones(2**24)  # 64 MiB of float32, freed on return
        return float(x.sum())

    out, peak = peak_memory(big)
    assert out == 2**24
    if peak.method == "tracemalloc":
        pytest.skip("no peak-RSS counter here; tracemalloc does not see torch allocations")
    assert peak.method == "rss_hwm"
    assert peak.mib > 48  # a few MiB may already be resident in freed heap pages
    _, idle = peak_memory(lambda: None)
    assert idle.mib < 16


# --------------------------------------------------------------------------- the check


def test_check_is_registered_and_profiles_the_toy_encoder(colour_data) -> None:
    assert "efficiency.profile" in list_checks("efficiency.*")
    cls = get_check("efficiency.profile")
    assert cls.pillar == "efficiency"
    ctx = audit_context(ToyEncoder(), colour_data)
    res = cls(batch_sizes=(1, 8, 1000), repeats=2, warmup=0).run(ctx)
    m = {k: v.value for k, v in res.metrics.items()}
    t = {k: v.value for k, v in res.timings.items()}  # measured: kept apart from the metrics
    assert res.status == "ok"
    assert not any("latency" in k or "throughput" in k or "memory" in k for k in m)
    assert m["params_total"] == 1 and m["params_trainable"] == 1  # the toy's one scale
    assert m["shared/params"] == 1
    # The toy encoder has no matrix product or convolution: 0 FLOPs by construction.
    assert m["image/flops"] == 0 and m["text/flops"] == 0
    for mod in ("image", "text"):
        # batch size 1000 > 40 evaluated rows: skipped
        assert {k for k in t if k.startswith(f"{mod}/bs")} == {
            f"{mod}/bs{b}/latency_p{q}_ms" for b in (1, 8) for q in (50, 95)
        }
        assert t[f"{mod}/bs8/latency_p95_ms"] >= t[f"{mod}/bs8/latency_p50_ms"] > 0
        assert t[f"{mod}/throughput"] > 0 and t[f"{mod}/peak_memory_mib"] >= 0
    table = res.timing_plots["latency"]
    assert table["kind"] == "table" and len(table["rows"]) == 4
    bar = res.timing_plots["throughput"]
    assert bar["kind"] == "bar" and len(bar["values"]) == 4
    assert set(res.plots) == {"parameters"} and res.findings == ()
    assert res.timing_findings[0].severity == "info" and "cpu" in res.timing_findings[0].message
    json.dumps(res.to_dict())
    json.dumps(res.timings_dict())


def test_check_on_tiny_clip_reports_tower_params_and_flops(shapes_quick) -> None:
    world, model = shapes_quick
    ctx = audit_context(model, world)
    res = get_check("efficiency.profile")(batch_sizes=(1, 16), repeats=2, warmup=1).run(ctx)
    m = {k: v.value for k, v in res.metrics.items()}
    assert m["image/params"] == count_parameters(model.image).total
    assert m["text/params"] == count_parameters(model.text).total
    assert m["params_total"] == count_parameters(model).total
    assert m["image/flops"] == image_tower_flops(model.cfg)
    assert m["text/flops"] > 0
    rows = res.plots["parameters"]["rows"]
    assert [r[0] for r in rows] == ["image", "text", "shared", "total"]
    assert rows[0][3] == image_tower_flops(model.cfg)
    json.dumps(res.to_dict())


def test_check_rejects_bad_options() -> None:
    cls = get_check("efficiency.profile")
    with pytest.raises(ValueError):
        cls(batch_sizes=(0,))
    with pytest.raises(ValueError):
        cls(repeats=0)


def test_check_compares_adaptation_methods_with_tpme(shapes_quick) -> None:
    world, model = shapes_quick
    ctx = audit_context(model, world)
    check = get_check("efficiency.profile")(
        batch_sizes=(4,), repeats=1, warmup=0, methods=("full", "iisan"), epochs=1
    )
    assert check.skip_reason(ctx) is None
    res = check.run(ctx)
    m = {k: v.value for k, v in res.metrics.items()}
    t = {k: v.value for k, v in res.timings.items()}
    for method in ("full", "iisan"):
        for key in ("trainable_params", "accuracy"):
            assert f"{method}/{key}" in m
        for key in ("epoch_seconds", "train_peak_memory_mib"):  # measured, so a timing
            assert f"{method}/{key}" in t and f"{method}/{key}" not in m
        assert 0.0 <= t[f"{method}/tpme"] <= 1.0  # derived from timings: a timing too
    # Two methods: each axis normalises to {0, 1}; IISAN trains fewer parameters than FFT.
    assert m["iisan/trainable_params"] < m["full/trainable_params"]
    assert t["full/tpme"] + t["iisan/tpme"] == pytest.approx(1.0)
    table = res.timing_plots["methods"]
    assert table["kind"] == "table" and [r[0] for r in table["rows"]] == ["full", "iisan"]
    bar = res.timing_plots["tpme"]
    assert bar["kind"] == "bar" and bar["values"] == [t["full/tpme"], t["iisan/tpme"]]
    assert any("TPME" in f.message for f in res.timing_findings)
    json.dumps(res.to_dict())
    ctx = dataclasses.replace(ctx, train=None)
    assert "train" in (check.skip_reason(ctx) or "")
