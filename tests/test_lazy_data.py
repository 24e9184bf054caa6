"""Lazy data: a manifest keeps image paths, not pixels; the engine decodes inside its batches."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsafe.data.columns import Computed, ImageFiles, decode_image, is_lazy
from mmsafe.data.dataset import Dataset
from mmsafe.data.manifest import ManifestError, load_manifest
from mmsafe.engine import Engine
from mmsafe.engine.variants import corruption_variant
from tests.conftest import make_colour_data


def write_colour_manifest(tmp_path: Path, n: int, side: int = 8) -> tuple[Path, Dataset]:
    """The colour world's rows as PNG files plus a JSONL manifest; returns both."""
    ds = make_colour_data(n)
    ds.modalities["image"] = [
        np.ascontiguousarray(np.resize(im, (side, side, 3))) for im in ds.modalities["image"]
    ]
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = []
    for i, (im, text) in enumerate(zip(ds.modalities["image"], ds.modalities["text"], strict=True)):
        name = f"img/{i:04d}.png"
        Image.fromarray(im).save(tmp_path / name)
        label = ds.classes[ds.labels[i]]
        lines.append(json.dumps({"id": ds.ids[i], "image": name, "text": text, "label": label}))
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    (tmp_path / "m.classes.txt").write_text("\n".join(ds.classes) + "\n")
    return path, ds


def test_a_manifest_keeps_paths_not_pixels(tmp_path):
    side, n = 128, 64  # 48 KiB decoded per image: 3 MiB if they were kept
    path, _ = write_colour_manifest(tmp_path, n, side)
    tracemalloc.start()
    ds = load_manifest(path)
    kept, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert is_lazy(ds.modalities["image"])
    assert kept < n * side * side * 3 / 4  # the eager loader kept every decoded image
    assert ds.modalities["image"][5].shape == (side, side, 3)  # decoded on access


def test_lazy_images_decode_to_the_files_pixels(tmp_path):
    path, ds = write_colour_manifest(tmp_path, 20)
    back = load_manifest(path)
    for a, b in zip(back.modalities["image"], ds.modalities["image"], strict=True):
        np.testing.assert_array_equal(a, b)
    sub = back.subset([7, 2, 7])
    assert is_lazy(sub.modalities["image"])
    np.testing.assert_array_equal(sub.modalities["image"][2], ds.modalities["image"][7])


def test_fingerprint_follows_file_bytes_without_decoding(tmp_path, monkeypatch):
    path, ds = write_colour_manifest(tmp_path, 12)
    first = load_manifest(path).fingerprint()
    assert load_manifest(path).fingerprint() == first
    changed = ds.modalities["image"][3].copy()
    changed[0, 0] = 255 - changed[0, 0]
    Image.fromarray(changed).save(tmp_path / "img" / "0003.png")
    again = load_manifest(path)

    def no_decode(_path):
        raise AssertionError("a fingerprint must not decode images")

    monkeypatch.setattr("mmsafe.data.columns.decode_image", no_decode)
    assert again.fingerprint() != first
    assert again.subset([1, 2]).fingerprint() != again.subset([2, 1]).fingerprint()


def test_a_file_that_breaks_after_loading_fails_on_decode(tmp_path):
    path, _ = write_colour_manifest(tmp_path, 4)
    ds = load_manifest(path)
    (tmp_path / "img" / "0002.png").write_bytes(b"not an image any more")
    with pytest.raises(OSError):
        ds.modalities["image"][2]
    with pytest.raises(ManifestError, match="unreadable image"):
        load_manifest(path)  # and validation names it on the next load


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_workers_give_the_in_memory_embeddings(tmp_path, toy_model, workers):
    path, ds = write_colour_manifest(tmp_path, 50)
    lazy = load_manifest(path)
    eager = Engine(batch_size=8, progress=False, workers=0)
    engine = Engine(batch_size=8, progress=False, workers=workers)
    assert engine.workers_for(lazy.modalities["image"]) == workers
    assert engine.workers_for(ds.modalities["image"]) == 0  # in memory: no worker processes
    ref = eager.embed(toy_model, ds, "image")
    torch.testing.assert_close(engine.embed(toy_model, lazy, "image"), ref, rtol=0, atol=0)
    # a values-stage corruption draws per row: the same with workers, on any subset order
    variant = corruption_variant("image", "gaussian_noise", 3, seed=5)
    rows = np.r_[np.arange(49, 10, -3), 3, 17, 3]  # more rows than a batch: workers decode
    want = eager.embed(toy_model, ds, "image", variant=variant, rows=rows)
    got = engine.embed(toy_model, lazy, "image", variant=variant, rows=rows)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_computed_column_views_compose():
    col = Computed(10, lambda rows: [int(r) for r in rows], b"identity")
    view = col.take([9, 8, 7, 6]).take([3, 0])
    assert list(view) == [6, 9] and view[-1] == 9 and view[0:1] == [6]
    with pytest.raises(IndexError):
        view.load([2])


def test_image_files_digest_is_independent_of_path(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    Image.fromarray(pixels).save(a)
    Image.fromarray(pixels).save(b)
    from mmsafe.data.columns import file_digest

    da, db = (np.frombuffer(file_digest(p), np.uint8)[None] for p in (a, b))
    assert ImageFiles([str(a)], da).digest() == ImageFiles([str(b)], db).digest()
    np.testing.assert_array_equal(decode_image(a), pixels)
