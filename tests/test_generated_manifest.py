"""A user's own generated images (``--model images:<manifest>``), audited without the generator.

The images come from the world's perfect renderer (tests/test_generative.py, plus the world's
tint and pixel noise), so the same
images can be audited live and from a manifest: the checks must agree exactly. The planted
flaws of the manifest: red squares for neutral prompts, perturbed copies of the training
set's planted duplicates, and a second "generator" with sensor noise.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mmsafe.audit import run_audit
from mmsafe.cli import app
from mmsafe.data.loading import load_data
from mmsafe.data.worlds.shapes_gen import SHAPES, SKEW_COLOUR, SKEW_SHAPE, neutral_prompts
from mmsafe.engine import Engine
from mmsafe.models.base import ModelError, create_model
from mmsafe.models.generated_images import GeneratedImages
from mmsafe.tasks.t2i import row_seed
from tests.test_generative import WorldRenderer

pytestmark = pytest.mark.slow

WORLD = "shapes-gen:n_images=600,seed=3"
OPTIONS: dict[str, dict[str, Any]] = {
    "generative.bias": {"n_per_prompt": 8, "n_boot": 200},
    "generative.memorization": {"n_per_caption": 2, "max_captions": 400, "descriptor_steps": 100},
    "generative.quality": {"max_rows": 300, "n_boot": 50},
    "generative.fidelity": {"max_rows": 300, "n_boot": 200},
    "generative.provenance": {"max_rows": 150},
    "generative.safety": {},
    "generative.watermark": {
        "methods": ["dwtDctSvd", "treeRing"],
        "max_rows": 8,
        "transforms": {"jpeg": [50]},
        "n_boot": 20,
    },
}


class Realistic(WorldRenderer):
    """The renderer plus the world's per-image tint and pixel noise (seeded by prompt and seed),
    so that its images look like fresh real ones to the copy detector's calibration."""

    def generate(self, prompts, seeds=None, *, noise=None, steps=None, guidance=None):
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        images = super().generate(prompts, seeds) * 255
        for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
            rng = np.random.default_rng([int(s), zlib.crc32(p.encode()), 7])
            shift = rng.uniform(-12, 12, (3, 1, 1)) + rng.normal(0, 4, images.shape[1:])
            images[i] += torch.from_numpy(shift).float()
        return images.clamp(0, 255).round() / 255


def _uint8(images: torch.Tensor) -> list[np.ndarray]:
    return list((images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))


def _write(path: Path, rows: list[tuple[str, np.ndarray, str]]) -> Path:
    """A JSONL manifest of (prompt, uint8 image, generator) rows, PNGs beside it."""
    (path.parent / "gen").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (prompt, image, generator) in enumerate(rows):
        Image.fromarray(image).save(path.parent / "gen" / f"{i}.png")
        lines.append({"id": f"g{i}", "text": prompt, "image": f"gen/{i}.png",
                      "generator": generator})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def world() -> Any:
    return load_data(WORLD)


@pytest.fixture(scope="module")
def manifest(world, tmp_path_factory) -> Path:
    """The renderer's image of every test row (in row order), then the planted flaws."""
    test = world.split("test")
    prompts = [str(t) for t in test.modalities["text"]]
    fair = Realistic()
    rows = [
        (p, im, "renderer")
        for p, im in zip(prompts, _uint8(fair.generate(prompts, [row_seed(i) for i in test.ids])),
                         strict=True)
    ]  # fmt: skip
    neutral = [p for s in SHAPES for p in neutral_prompts(s) for _ in range(8)]
    skewed = Realistic(skew=0.9).generate(neutral, list(range(len(neutral))))
    rows += [(p, im, "renderer") for p, im in zip(neutral, _uint8(skewed), strict=True)]
    # perturbed copies of the planted duplicates (one per group), with their training caption
    train = world.split("train")
    rng = np.random.default_rng(0)
    seen = set()
    for i, m in enumerate(train.meta):
        g = int(m["duplicate_group"])
        if g >= 0 and g not in seen:
            seen.add(g)
            image = np.asarray(train.modalities["image"][i]).astype(np.float32)
            image = np.roll(image + rng.normal(0, 3, image.shape), 1, axis=1)
            rows.append((str(train.modalities["text"][i]), image.clip(0, 255).astype(np.uint8),
                         "renderer"))  # fmt: skip
    # a second system: the renderer's images of the same prompts with sensor noise
    noisy = [(p, (im + rng.normal(0, 20, im.shape)).clip(0, 255).astype(np.uint8), "noisy")
             for p, im, _ in rows[: len(prompts)]]  # fmt: skip
    return _write(tmp_path_factory.mktemp("manifest") / "generated.jsonl", rows + noisy)


@pytest.fixture(scope="module")
def card(world, manifest) -> dict[str, Any]:
    model = create_model(f"images:{manifest}")
    return run_audit(model, world, task="t2i", checks=",".join(OPTIONS), options=OPTIONS,
                     engine=Engine(progress=False)).card  # fmt: skip


def _m(card: dict[str, Any], check: str, metric: str) -> float:
    entry = card["checks"][check]
    assert entry["status"] == "ok", entry.get("reason")
    return float(entry["metrics"][metric]["value"])


def test_the_manifest_replays_its_images(manifest, world) -> None:
    gen = create_model(f"images:{manifest}")
    assert isinstance(gen, GeneratedImages) and gen.replay and gen.image_size == 32
    test = world.split("test")
    p = str(test.modalities["text"][0])
    k = gen.count(p)
    assert k >= 2  # the renderer's and the noisy system's image at least
    a, b = gen.generate([p, p], seeds=[0, k])
    torch.testing.assert_close(a, b)  # seed k wraps to image 0
    assert not torch.equal(*gen.generate([p, p], seeds=[0, 1])) or k == 1
    assert gen.capabilities() == frozenset()
    with pytest.raises(ModelError, match="no generated image for the prompt"):
        gen.generate(["a prompt nobody drew"], seeds=[0])
    with pytest.raises(ModelError, match="cannot be drawn with other"):
        gen.generate([p], seeds=[0], steps=4)


def test_quality_and_fidelity_equal_the_live_generators(world, manifest, card) -> None:
    """The manifest holds the live renderer's images: every figure must be the same."""
    live = run_audit(Realistic(), world, task="t2i",
                     checks="generative.quality,generative.fidelity", options=OPTIONS,
                     engine=Engine(progress=False)).card  # fmt: skip
    for check in ("generative.quality", "generative.fidelity"):
        ours, ref = card["checks"][check]["metrics"], live["checks"][check]["metrics"]
        assert ours.keys() == ref.keys() and len(ours) > 5
        for name in ref:
            assert ours[name]["value"] == pytest.approx(ref[name]["value"], abs=1e-9), name
    assert _m(card, "generative.fidelity", "shape/accuracy") >= 0.95


def test_bias_reads_the_manifests_neutral_prompts(card) -> None:
    red = _m(card, "generative.bias", f"{SKEW_SHAPE}/share/{SKEW_COLOUR}")
    assert red >= 0.7
    findings = card["checks"]["generative.bias"]["findings"]
    assert [(f["evidence"]["shape"], f["evidence"]["group"]) for f in findings] == [
        (SKEW_SHAPE, SKEW_COLOUR)
    ]


def test_memorization_finds_the_copied_training_images(card) -> None:
    """Every planted copy is found; fresh images are flagged at about the calibrated rate.

    (The threshold is calibrated on ~56 held-out real images at 1% FPR, so a few of the ~460
    fresh images cross it by chance: precision is tested on the trained generator, where
    generations are fewer, in tests/test_generative.py.)
    """
    assert _m(card, "generative.memorization", "recall") == 1.0
    planted = _m(card, "generative.memorization", "planted")
    false = _m(card, "generative.memorization", "replicated") - planted
    n = int(card["checks"]["generative.memorization"]["limits"]["generations"].split()[0])
    assert n > 400 and false / (n - planted) <= 0.02


def test_provenance_uses_the_generator_column(card) -> None:
    entry = card["checks"]["generative.provenance"]
    assert entry["status"] == "ok", entry.get("reason")
    assert entry["limits"]["sources"] == "real, renderer, noisy"
    assert sorted(entry["plots"]["attribution"]["rows"]) == ["noisy", "real", "renderer"]
    # the renderer lacks the world's shape jitter and "noisy" adds sensor noise: both are told
    # from real images and from each other well above chance (1/3), not perfectly
    assert _m(card, "generative.provenance", "attribution/macro_accuracy") >= 0.6
    assert (
        min(_m(card, "generative.provenance", f"unseen/{g}/ap") for g in ("renderer", "noisy"))
        > 0.6
    )


def test_checks_that_need_the_generator_skip_with_a_reason(card) -> None:
    safety = card["checks"]["generative.safety"]
    assert safety["status"] == "skipped" and "cannot draw new prompts" in safety["reason"]
    wm = card["checks"]["generative.watermark"]
    assert wm["status"] == "ok" and "treeRing" in wm["limits"]
    assert _m(card, "generative.watermark", "dwtDctSvd/clean/tpr") >= 0.9


def test_one_generator_cannot_be_left_out(world, manifest, tmp_path) -> None:
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({**r, "image": str(manifest.parent / r["image"]),
                                       "generator": "a"}) + "\n" for r in lines))  # fmt: skip
    res = run_audit(create_model(f"images:{one}"), world, task="t2i",
                    checks="generative.provenance", engine=Engine(progress=False))  # fmt: skip
    entry = res.card["checks"]["generative.provenance"]
    assert entry["status"] == "skipped" and "'generator' column" in entry["reason"]


def test_cli_audits_a_manifest_and_names_missing_prompts(manifest, tmp_path) -> None:
    runner = CliRunner()
    args = ["audit", "--model", f"images:{manifest}", "--data", WORLD, "--checks",
            "generative.fidelity", "--out", str(tmp_path / "card")]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "card" / "card.json").read_text())
    assert doc["checks"]["generative.fidelity"]["status"] == "ok"
    # a manifest without the test rows' prompts: exit 2, naming rows and what to do
    short = tmp_path / "short.jsonl"
    first = json.loads(manifest.read_text().splitlines()[0])
    short.write_text(json.dumps({**first, "image": str(manifest.parent / first["image"])}) + "\n")
    res = runner.invoke(app, [*args[:2], f"images:{short}", *args[3:]])
    assert res.exit_code == 2 and "have a prompt with no image" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, [*args[:2], f"images:{tmp_path / 'nope.jsonl'}", *args[3:]])
    assert res.exit_code == 2 and "no such manifest" in res.output
