from __future__ import annotations

import io
import os
from collections.abc import Sequence

import pytest
import torch

from mmsafe.data.dataset import Dataset
from mmsafe.engine import Engine, TensorCache, Variant, atomic_write_json, stable_hash
from mmsafe.tasks import ZeroShotTask
from tests.conftest import audit_context, make_colour_data


def encoded(engine: Engine) -> int:
    return engine.accounting()["rows_encoded"]


def test_embed_is_cached_in_memory_and_on_disk(toy_model, colour_data, tmp_path):
    engine = Engine(batch_size=16, cache_dir=tmp_path, progress=False)
    first = engine.embed(toy_model, colour_data)
    assert encoded(engine) == 2 * len(colour_data)  # image + text
    again = engine.embed(toy_model, colour_data)
    assert encoded(engine) == 2 * len(colour_data)  # no new forward pass
    fresh = Engine(batch_size=16, cache_dir=tmp_path, progress=False)
    from_disk = fresh.embed(toy_model, colour_data)
    assert encoded(fresh) == 0
    for m in ("image", "text"):
        torch.testing.assert_close(first[m], again[m])
        torch.testing.assert_close(first[m], from_disk[m])
        torch.testing.assert_close(first[m].norm(dim=1), torch.ones(len(colour_data)))


def test_batch_size_does_not_change_embeddings(toy_model, colour_data):
    a = Engine(batch_size=7, progress=False).embed(toy_model, colour_data)
    b = Engine(batch_size=64, progress=False).embed(toy_model, colour_data)
    torch.testing.assert_close(a["image"], b["image"])


def test_changed_weights_miss_the_cache(toy_model, colour_data):
    engine = Engine(progress=False)
    engine.embed(toy_model, colour_data, ["image"])
    n = encoded(engine)
    with torch.no_grad():
        toy_model.scale.fill_(2.0)
    toy_model.invalidate_fingerprint()
    engine.embed(toy_model, colour_data, ["image"])
    assert encoded(engine) == n + len(colour_data)


def test_outputs_are_computed_once_per_task(toy_model, colour_data):
    engine = Engine(progress=False)
    task = ZeroShotTask(templates=["{}"])
    task.prepare(toy_model, engine, colour_data.classes)
    out1 = engine.outputs(toy_model, task, colour_data)
    n = encoded(engine)
    out2 = engine.outputs(toy_model, task, colour_data)
    assert out1 is out2 and encoded(engine) == n
    assert (out1.preds == colour_data.labels).mean() > 0.9


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    cache = TensorCache(tmp_path / "t")
    cache.put("k", {"v": torch.arange(3)})
    assert sorted(os.listdir(tmp_path)) == ["a.json", "t"]
    assert os.listdir(tmp_path / "t") == ["k.safetensors"]


def test_atomic_write_gives_the_permissions_a_plain_write_would(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        (tmp_path / "b.json").write_text("{}")
    finally:
        os.umask(old)
    mode = (tmp_path / "a.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644


def test_corrupt_cache_entry_is_a_miss(tmp_path):
    cache = TensorCache(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    assert cache.get("bad") is None


def test_stable_hash_depends_on_content():
    assert stable_hash("a", 1) != stable_hash("a", 2)
    assert stable_hash({"x": [1, 2]}) == stable_hash({"x": [1, 2]})


# --------------------------------------------------------------------------- variants


def test_variant_key_is_stable_and_checked():
    a = Variant.of("corrupt/fog", seed=1, severity=2)
    assert a.key == Variant.of("corrupt/fog", severity=2, seed=1).key
    assert a.key != Variant.of("corrupt/fog", seed=2, severity=2).key
    assert a.key != Variant.of("corrupt/fog", seed=1, severity=3).key
    assert len(a.key) == 16 and int(a.key, 16) >= 0  # a 16-hex digest
    with pytest.raises(ValueError, match="unknown variant kind"):
        Variant.of("blur/fog")
    with pytest.raises(ValueError, match="JSON-able"):
        Variant.of("corrupt/fog", severity=object())


@pytest.mark.parametrize(
    "variant",
    [
        *(
            Variant.of(f"corrupt/{name}", seed=3, severity=4)
            for name in ("gaussian_noise", "shot_noise", "motion_blur", "fog", "elastic_transform")
        ),
        Variant.of("tta", seed=5, max_shift=2, brightness=0.2, flip=True),
    ],
    ids=lambda v: v.name,
)
def test_corrupted_embeddings_do_not_depend_on_batch_size(toy_model, colour_data, variant):
    v = variant
    small = Engine(batch_size=7, progress=False).embed(toy_model, colour_data, "image", variant=v)
    big = Engine(batch_size=256, progress=False).embed(toy_model, colour_data, "image", variant=v)
    assert torch.equal(small, big)
    clean = Engine(progress=False).embed(toy_model, colour_data, "image")
    assert not torch.equal(small, clean)  # the variant really changed the inputs
    # a row's draw follows its id, not its position: the same rows of a subset match
    sub = colour_data.subset([9, 4, 50])
    part = Engine(batch_size=2, progress=False).embed(toy_model, sub, "image", variant=v)
    torch.testing.assert_close(part, big[[9, 4, 50]], atol=1e-6, rtol=0)


def test_rows_are_encoded_once_and_returned_in_the_asked_order(toy_model, colour_data):
    engine = Engine(batch_size=4, progress=False)
    v = Variant.of("corrupt/gaussian_noise", seed=0, severity=3)
    a = engine.embed(toy_model, colour_data, "image", variant=v, rows=[5, 2, 2])
    assert encoded(engine) == 2  # rows 2 and 5
    b = engine.embed(toy_model, colour_data, "image", variant=v, rows=[2, 7, 5])
    assert encoded(engine) == 3  # only row 7 is new
    torch.testing.assert_close(a[0], b[2]) and torch.testing.assert_close(a[1], b[0])
    whole = Engine(progress=False).embed(toy_model, colour_data, "image", variant=v)
    torch.testing.assert_close(b, whole[[2, 7, 5]], atol=1e-6, rtol=0)


def rebuilt(data: Dataset, rows: Sequence[int]) -> Dataset:
    """The rows of ``data`` as a new dataset (not a ``subset``: no link to ``data``)."""
    sub = data.subset(rows)
    return Dataset(
        name=sub.name,
        ids=list(sub.ids),
        modalities={k: list(v) for k, v in sub.modalities.items()},
        labels=sub.labels.copy(),
        classes=list(sub.classes),
        source=sub.source,
    )


def test_subsets_share_their_parents_cache_entry(toy_model, colour_data):
    engine = Engine(batch_size=8, progress=False)
    test = colour_data.split("test")
    v = Variant.of("corrupt/fog", seed=0, severity=2)
    a = engine.embed(toy_model, test, "image", variant=v, rows=[0, 3])
    n = encoded(engine)
    assert n == 2
    # the same two rows asked through the parent and through a subset of the subset: hits
    parent_rows = [colour_data.ids.index(test.ids[i]) for i in (0, 3)]
    b = engine.embed(toy_model, colour_data, "image", variant=v, rows=parent_rows)
    c = engine.embed(toy_model, test.subset([3, 0]), "image", variant=v)
    assert encoded(engine) == n
    assert torch.equal(a, b) and torch.equal(a, c.flip(0))
    # a rebuilt dataset of the same rows misses (but draws the same corruption: same ids)
    d = engine.embed(toy_model, rebuilt(test, [0, 3]), "image", variant=v)
    assert encoded(engine) == n + 2
    torch.testing.assert_close(a, d, atol=1e-6, rtol=0)


def test_accounting_counts_match_hand_counts(toy_model, colour_data):
    engine = Engine(batch_size=8, progress=False)
    n = len(colour_data)
    engine.embed(toy_model, colour_data, ["image"])  # n clean image rows
    v = Variant.of("corrupt/contrast", seed=0, severity=1)
    engine.embed(toy_model, colour_data, "image", variant=v, rows=[0, 1, 2])  # 3 new pairs
    engine.embed(toy_model, colour_data, "image", variant=v, rows=[1, 2, 3, 3])  # 1 new pair
    prompts = ["red", "green", "blue"]
    engine.embed_values(toy_model, "text", prompts)  # 3 text values
    engine.embed_values(toy_model, "text", prompts)  # cached: nothing new
    # a subset's rows are its parent's: a cache hit
    engine.embed(toy_model, colour_data.subset(range(5)), ["image"])
    # the same rows in a dataset built anew (another fingerprint) miss: 5 duplicated pairs
    engine.embed(toy_model, rebuilt(colour_data, range(5)), ["image"])
    engine.count("attack_iterations", 10)
    engine.count("gradient_passes", 4)
    engine.count("training_passes", 2)
    acc = engine.accounting()
    assert acc["modalities"]["image"] == {
        "rows_encoded": n + 3 + 1 + 5,
        "distinct_row_variants": n + 4,
        "variants": 2,
        "duplication": round((n + 9) / (n + 4), 4),
    }
    assert acc["modalities"]["text"] == {
        "rows_encoded": 3,
        "distinct_row_variants": 3,
        "variants": 1,
        "duplication": 1.0,
    }
    assert (acc["rows_encoded"], acc["distinct_row_variants"]) == (n + 12, n + 7)
    assert acc["duplication"] == round((n + 12) / (n + 7), 4)
    assert (acc["attack_iterations"], acc["gradient_passes"], acc["training_passes"]) == (10, 4, 2)
    with pytest.raises(ValueError, match="unknown pass counter"):
        engine.count("forward_batches")


def test_shift_and_conformal_share_corrupted_embeddings(toy_model):
    from mmsafe.checks.monitoring.conformal import SHIFTS, ConformalCheck
    from mmsafe.checks.robustness.shift import ShiftCheck

    ctx = audit_context(toy_model, make_colour_data(240))
    ctx.engine.outputs(ctx.model, ctx.task, ctx.calibration)  # conformal's clean calibration rows
    ShiftCheck(image_corruptions=SHIFTS, severities=(1, 3), n_boot=20).run(ctx)
    before = ctx.engine.accounting()["modalities"]["image"]
    assert before["variants"] == 1 + 2 * len(SHIFTS)  # clean + every cell
    res = ConformalCheck(shifts=SHIFTS, shift_severity=3, n_boot=20).run(ctx)
    after = ctx.engine.accounting()["modalities"]["image"]
    assert after == before  # conformal encoded zero new rows: every shifted pass was a hit
    assert set(SHIFTS) <= {k.split("/")[1] for k in res.metrics if k.startswith("shift/")}
    # and the other order: conformal first, then shift encodes only the severity-1 cells
    ctx2 = audit_context(toy_model, make_colour_data(240))
    ConformalCheck(shifts=SHIFTS, shift_severity=3, n_boot=20).run(ctx2)
    mid = ctx2.engine.accounting()["modalities"]["image"]["rows_encoded"]
    ShiftCheck(image_corruptions=SHIFTS, severities=(1, 3), n_boot=20).run(ctx2)
    rows = int((ctx2.outputs.labels >= 0).sum())
    assert (
        ctx2.engine.accounting()["modalities"]["image"]["rows_encoded"] == mid + len(SHIFTS) * rows
    )


# --------------------------------------------------------------------------- progress


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_on_a_pipe_is_one_line_per_stage(toy_model, colour_data):
    out = _Pipe()
    engine = Engine(batch_size=4, progress=True, stream=out)
    engine.embed(toy_model, colour_data, ["image"])
    v = Variant.of("corrupt/gaussian_noise", seed=0, severity=3)
    engine.embed(toy_model, colour_data, "image", variant=v, rows=range(10))
    engine.embed(toy_model, colour_data, "image", variant=v, rows=range(10))  # cached: silent
    text = out.getvalue()
    assert "\r" not in text
    assert text.splitlines() == [
        f"embed image [colours]: {len(colour_data)} rows",
        "embed image (corrupt/gaussian_noise severity=3 seed=0) [colours]: 10 rows",
    ]


def test_progress_off_writes_nothing(toy_model, colour_data):
    out = _Pipe()
    Engine(batch_size=4, progress=False, stream=out).embed(toy_model, colour_data)
    assert out.getvalue() == ""


# --------------------------------------------------------------------------- the card


def test_card_records_the_engine_accounting(toy_model, colour_data, tmp_path):
    import json

    from mmsafe.audit import evaluation_splits, run_audit

    engine = Engine(progress=False)
    checks = "performance,robustness.shift"
    opts = {
        "robustness.shift": {"image_corruptions": ["contrast"], "severities": [2], "n_boot": 20}
    }
    result = run_audit(
        toy_model, colour_data, checks=checks, engine=engine, out=tmp_path, options=opts
    )
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["engine"] == engine.accounting() == result.card["engine"]
    evaluated, _, _ = evaluation_splits(colour_data)
    image = card["engine"]["modalities"]["image"]
    # clean evaluated rows, then the one contrast cell on the same (labelled) rows
    assert image["rows_encoded"] == image["distinct_row_variants"] == 2 * len(evaluated)
    assert image["duplication"] == 1.0 and card["engine"]["attack_iterations"] == 0


def test_pooled_hidden_states_are_their_own_cached_entry(tmp_path):
    from mmsafe.data.worlds import make_shapes
    from mmsafe.methods.ood import pool_states
    from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig

    torch.manual_seed(0)
    model = TinyClip(TinyClipConfig.for_size("xs")).eval()
    world = make_shapes(n=40, seed=1, duplicates=0)
    engine = Engine(batch_size=16, cache_dir=tmp_path, progress=False)
    maps = engine.hidden_states(model, world, "image", (0, 2))
    assert [m.ndim for m in maps] == [4, 4]
    # the unpooled entry keeps the key it always had (no "pool" part)
    parts = ("hidden", model.fingerprint(), world.fingerprint(), "image", [0, 2])
    assert engine.cache.get(f"{stable_hash('embed', *parts, 0)}-0000") is not None
    pooled = engine.hidden_states(model, world, "image", (0, 2), pool=True)
    for got, full in zip(pooled, maps, strict=True):
        assert got.shape == full.shape[:2]
        torch.testing.assert_close(got, pool_states(full), rtol=1e-5, atol=1e-6)
    acc = engine.accounting()["modalities"]["image"]
    assert (acc["rows_encoded"], acc["variants"], acc["duplication"]) == (80, 2, 1.0)
    # cached: a second call, or a fresh engine on the same folder, encodes nothing
    again = engine.hidden_states(model, world.subset([5, 1]), "image", (0, 2), pool=True)
    assert torch.equal(again[1], pooled[1][[5, 1]])
    fresh = Engine(batch_size=16, cache_dir=tmp_path, progress=False)
    from_disk = fresh.hidden_states(model, world, "image", (0, 2), pool=True)
    assert torch.equal(from_disk[0], pooled[0]) and encoded(fresh) == 0
    assert encoded(engine) == 80
    # layers=None: every layer the model returns, pooled, under a key ("all") of its own
    every = engine.hidden_states(model, world, "image", None, pool=True)
    assert [e.shape[1] for e in every] == list(model.cfg.channels)  # one per CNN stage
    torch.testing.assert_close(every[2], pooled[1])
    assert encoded(engine) == 120
    assert engine.hidden_states(model, world, "image", None, pool=True)[0].shape == every[0].shape
    assert encoded(engine) == 120
    with pytest.raises(ValueError, match="at least one layer"):
        engine.hidden_states(model, world, "image", (), pool=True)


# ---------------------------------------------------------------------------- shards


def test_shards_hold_the_same_embeddings_and_resume_after_a_crash(toy_model, tmp_path, monkeypatch):
    data = make_colour_data(50)
    whole = Engine(batch_size=8, progress=False).embed(toy_model, data, "image")
    monkeypatch.setattr("mmsafe.engine.runner.SHARD_ROWS", 16)
    cache = tmp_path / "cache"
    calls = {"n": 0}
    inner = toy_model.encode

    def crash_on_third_shard(batch, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # batch size 16 = one batch per shard: shards 0 and 1 are done
            raise RuntimeError("killed")
        return inner(batch, *a, **k)

    monkeypatch.setattr(toy_model, "encode", crash_on_third_shard)
    with pytest.raises(RuntimeError, match="killed"):
        Engine(batch_size=16, cache_dir=cache, progress=False).embed(toy_model, data, "image")
    assert len(list((cache / "embeddings").glob("*.safetensors"))) == 2
    monkeypatch.setattr(toy_model, "encode", inner)
    resumed = Engine(batch_size=5, cache_dir=cache, progress=False)  # another batch size
    got = resumed.embed(toy_model, data, "image")
    assert encoded(resumed) == 50 - 32  # only the shards that were lost
    torch.testing.assert_close(got, whole, rtol=0, atol=0)
    names = sorted(p.name[-17:] for p in (cache / "embeddings").glob("*.safetensors"))
    assert names == [f"-{s:04d}.safetensors" for s in range(4)]
    rows = [40, 3, 3, 49, 0]
    torch.testing.assert_close(resumed.embed(toy_model, data, "image", rows=rows), whole[rows])
    assert encoded(resumed) == 18


def test_a_multi_shard_sweep_logs_one_line(toy_model, monkeypatch):
    monkeypatch.setattr("mmsafe.engine.runner.SHARD_ROWS", 16)
    log = io.StringIO()
    Engine(batch_size=8, stream=log).embed(toy_model, make_colour_data(50), "image")
    assert log.getvalue().splitlines() == ["embed image [colours]: 50 rows in 4 shards"]


def test_a_rooted_cache_keeps_a_bounded_memory(tmp_path):
    cache = TensorCache(tmp_path, memory_bytes=3 * 400)
    for i in range(10):
        cache.put(f"k{i}", {"x": torch.full((100,), float(i))})  # 400 bytes each
    assert len(cache._memory) == 3
    assert cache.get("k0")["x"][0].item() == 0.0  # read back from disk
    assert len(cache._memory) == 3


# ---------------------------------------------------------------------------- precision


def test_mixed_precision_is_cached_apart_and_recorded(tmp_path):
    from mmsafe.data.worlds.shapes import make_shapes
    from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig

    torch.manual_seed(0)
    model = TinyClip(TinyClipConfig(embed_dim=32)).eval()
    data = make_shapes(n=120, seed=1)
    full = Engine(batch_size=64, cache_dir=tmp_path, progress=False)
    mixed = Engine(batch_size=64, cache_dir=tmp_path, progress=False, precision="bf16")
    a = full.embed(model, data, "image")
    b = mixed.embed(model, data, "image")
    assert encoded(mixed) == len(data)  # not served from the fp32 entry on the same disk
    assert not torch.equal(a, b)  # bfloat16 arithmetic really ran
    cos = torch.nn.functional.cosine_similarity(a, b)
    assert cos.min() > 0.98, cos.min()  # and stays close to full precision
    assert mixed.accounting()["precision"] == "bf16" and "precision" not in full.accounting()
    again = Engine(batch_size=64, cache_dir=tmp_path, progress=False, precision="bf16")
    torch.testing.assert_close(again.embed(model, data, "image"), b, rtol=0, atol=0)
    assert encoded(again) == 0
    with pytest.raises(ValueError, match="--precision .int8.: choose fp32"):
        Engine(precision="int8")
