from __future__ import annotations

import os

import torch

from mmsafe.engine import Engine, TensorCache, atomic_write_json, stable_hash
from mmsafe.tasks import ZeroShotTask


def test_embed_is_cached_in_memory_and_on_disk(toy_model, colour_data, tmp_path):
    engine = Engine(batch_size=16, cache_dir=tmp_path, progress=False)
    first = engine.embed(toy_model, colour_data)
    batches = engine.forward_batches
    assert batches == 2 * -(-len(colour_data) // 16)  # image + text, ceil division
    again = engine.embed(toy_model, colour_data)
    assert engine.forward_batches == batches  # no new forward pass
    fresh = Engine(batch_size=16, cache_dir=tmp_path, progress=False)
    from_disk = fresh.embed(toy_model, colour_data)
    assert fresh.forward_batches == 0
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
    n = engine.forward_batches
    with torch.no_grad():
        toy_model.scale.fill_(2.0)
    toy_model.invalidate_fingerprint()
    engine.embed(toy_model, colour_data, ["image"])
    assert engine.forward_batches > n


def test_outputs_are_computed_once_per_task(toy_model, colour_data):
    engine = Engine(progress=False)
    task = ZeroShotTask(templates=["{}"])
    task.prepare(toy_model, engine, colour_data.classes)
    out1 = engine.outputs(toy_model, task, colour_data)
    n = engine.forward_batches
    out2 = engine.outputs(toy_model, task, colour_data)
    assert out1 is out2 and engine.forward_batches == n
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
