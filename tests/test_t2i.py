"""The t2i task and the engine's image cache, with a toy generator (no training)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from mmsafe.data.dataset import Dataset
from mmsafe.engine import Engine
from mmsafe.models.generator import ImageGenerator
from mmsafe.tasks import TaskError, TextToImageTask, create_task, row_seed


class ToyGenerator(ImageGenerator):
    """Image = a per-prompt colour plus the seed's noise; counts the rows it draws."""

    name = "toy-generator"

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.1))
        self.drawn = 0

    @property
    def image_size(self) -> int:
        return 4

    def initial_noise(self, seeds: Sequence[int]) -> Tensor:
        out = []
        for s in seeds:
            g = torch.Generator().manual_seed(int(s))
            out.append(torch.randn(3, 4, 4, generator=g))
        return torch.stack(out)

    def generate(self, prompts, seeds=None, *, noise=None, steps=None, guidance=None) -> Tensor:
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        z = self.initial_noise(seeds) if noise is None else noise
        self.drawn += len(prompts)
        colour = torch.tensor([[len(p) % 7 / 7.0, 0.5, 0.2] for p in prompts])
        return (colour[:, :, None, None] + self.scale * z).clamp(0, 1)

    def config(self) -> dict[str, Any]:
        return {"family": "toy"}


def _prompts_data(prompts: list[str]) -> Dataset:
    n = len(prompts)
    return Dataset(
        name="prompts",
        ids=[f"r{i}" for i in range(n)],
        modalities={"text": prompts},
        labels=np.full(n, -1, dtype=np.int64),
        classes=[],
    )


def test_engine_caches_images_per_prompt_and_seed_and_is_batch_invariant() -> None:
    gen = ToyGenerator()
    engine = Engine(progress=False, batch_size=2)
    prompts = ["a red circle", "a blue square", "a red circle"]
    first = engine.generate_images(gen, prompts, seeds=[0, 1, 0])
    assert first.shape == (3, 3, 4, 4) and first.min() >= 0 and first.max() <= 1
    assert gen.drawn == 2  # the repeated (prompt, seed) is drawn once
    assert torch.equal(first[0], first[2])
    again = engine.generate_images(gen, prompts[::-1], seeds=[0, 1, 0])
    assert gen.drawn == 2 and torch.equal(again[1], first[1])
    other = Engine(progress=False, batch_size=1).generate_images(gen, prompts, seeds=[0, 1, 0])
    assert torch.allclose(other, first)  # a row never depends on its batch
    acc = engine.accounting()
    assert (acc["image_requests"], acc["generated_images"]) == (6, 2)
    with pytest.raises(ValueError, match="seeds"):
        engine.generate_images(gen, prompts, seeds=[0])


def test_new_weights_miss_the_cache() -> None:
    gen, engine = ToyGenerator(), Engine(progress=False)
    before = engine.generate_images(gen, ["a star"], seeds=[3])
    with torch.no_grad():
        gen.scale.fill_(0.3)
    gen.invalidate_fingerprint()
    after = engine.generate_images(gen, ["a star"], seeds=[3])
    assert gen.drawn == 2 and not torch.equal(before, after)


def test_t2i_task_draws_one_image_per_row_with_its_row_seed() -> None:
    gen, engine = ToyGenerator(), Engine(progress=False)
    task = create_task("t2i")
    assert isinstance(task, TextToImageTask) and task.kind == "generation"
    data = _prompts_data(["a red circle", "a red circle", "a star"])
    task.prepare(gen, engine, data.classes)
    out = task.outputs({}, data)
    assert out.images is not None and out.images.shape == (3, 3, 4, 4)
    assert not torch.equal(out.images[0], out.images[1])  # same prompt, different rows
    expected = gen.generate(["a red circle"], [row_seed("r1")])
    assert torch.allclose(out.images[1], expected[0])
    assert out.logits.shape == (3, 0)


def test_t2i_task_rejects_other_models_and_data_without_prompts() -> None:
    task = create_task("t2i")
    with pytest.raises(TaskError, match="text-to-image generator"):
        task.prepare(nn.Linear(1, 1), Engine(progress=False), [])
    images = Dataset(
        name="pics",
        ids=["a"],
        modalities={"image": [np.zeros((4, 4, 3), np.uint8)]},
        labels=np.zeros(1, dtype=np.int64),
        classes=["x"],
    )
    with pytest.raises(TaskError, match="prompt"):
        task.check_data(images)
    with pytest.raises(TaskError, match="prepare"):
        task.draw(["a"], [0])


def test_encoder_option_gives_clip_score_and_cmmd_through_the_engine() -> None:
    """With ``encoder=...`` the fidelity check reports CLIPScore (= the formula on the engine's
    embeddings) and the quality check CMMD; an untrained generator keeps this fast."""
    from mmsafe.audit import run_audit
    from mmsafe.checks.generative import judges
    from mmsafe.data.worlds import load_world
    from mmsafe.methods.generative.fidelity import clip_score
    from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
    from mmsafe.models.tiny_diffusion import TinyDiffusion, TinyDiffusionConfig, world_vocab

    world = load_world("shapes-gen:n_images=120,seed=3")
    torch.manual_seed(0)
    gen = TinyDiffusion(TinyDiffusionConfig(vocab=world_vocab(world).tokens, channels=(8, 16),
                                            steps=2)).eval()  # fmt: skip
    encoder = TinyClip(TinyClipConfig.for_size("xs")).eval()
    engine = Engine(progress=False)
    train = world.split("train")
    judges._ENCODERS[("my-encoder", train.fingerprint(), str(engine.cache_dir))] = encoder
    try:
        card = run_audit(gen, world, task="t2i", checks="generative.fidelity,generative.quality",
                         engine=engine, options={
                             "generative.fidelity": {"encoder": "my-encoder", "n_boot": 20},
                             "generative.quality": {"encoder": "my-encoder", "n_boot": 10}},
                         ).card  # fmt: skip
    finally:
        judges._ENCODERS.clear()
    fid = card["checks"]["generative.fidelity"]
    assert fid["status"] == "ok", fid["reason"]
    test = world.split("test")
    images = engine.generate_images(gen, list(test.modalities["text"]),
                                    seeds=[row_seed(i) for i in test.ids])  # fmt: skip
    img = engine.embed_values(encoder, "image", judges.to_uint8(images))
    txt = engine.embed_values(encoder, "text", list(test.modalities["text"]))
    expected = float(np.mean(clip_score(img, txt)))
    assert fid["metrics"]["clip_score"]["value"] == pytest.approx(expected, rel=1e-6)
    quality = card["checks"]["generative.quality"]
    assert quality["status"] == "ok", quality["reason"]
    assert quality["metrics"]["cmmd"]["value"] >= 0
