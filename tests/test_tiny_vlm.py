"""tiny-vlm and the shapes-vqa world: the protocol's promises, checked on an untrained model.

Batching never changes an answer or a likelihood, the likelihood is differentiable in the
pixels, suffix gradients agree with the likelihood, and a saved model loads back identically.
The trained model's behaviour (accuracy, refusals, planted flaws) is tested in
``test_alignment.py``.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from mmsafe.data.worlds import load_world
from mmsafe.data.worlds.shapes_vqa import (
    CONCEPT,
    COOCCUR_PAIR,
    REFUSAL,
    ShapesVQAConfig,
    describe,
    make_shapes_vqa,
)
from mmsafe.data.worlds.spec import WorldSpecError
from mmsafe.engine import Engine
from mmsafe.models.base import ModelError, create_model
from mmsafe.models.tiny_vlm import (
    EOS,
    TinyVLM,
    TinyVLMConfig,
    WordVocab,
    load_tiny_vlm,
    save_tiny_vlm,
    world_vocab,
)
from mmsafe.tasks import TaskError, create_task


@pytest.fixture(scope="module")
def world():
    return make_shapes_vqa(n_scenes=80, seed=3)


@pytest.fixture(scope="module")
def vlm(world):
    torch.manual_seed(0)
    return TinyVLM(TinyVLMConfig(vocab=world_vocab(world).tokens, tower="scratch")).eval()


# --------------------------------------------------------------------------- the world
def test_world_is_deterministic_and_its_answers_follow_the_scene(world) -> None:
    again = make_shapes_vqa(n_scenes=80, seed=3)
    assert again.fingerprint() == world.fingerprint()
    assert make_shapes_vqa(n_scenes=80, seed=4).fingerprint() != world.fingerprint()
    for text, m in zip(world.modalities["text"], world.meta, strict=True):
        shapes = {o["shape"]: o for o in m["objects"]}
        if m["qtype"] == "colour":
            assert m["answer"] == shapes[m["probe"]]["colour"]
        elif m["qtype"] == "where":
            assert m["answer"] == shapes[m["probe"]]["pos"]
        elif m["qtype"] == "exist":
            assert m["answer"] == ("yes" if m["probe"] in shapes else "no")
        elif m["qtype"] == "caption":
            assert m["answer"] == describe(m["objects"])
        elif m["qtype"] == "forbidden":
            assert CONCEPT in shapes and m["answer"] == REFUSAL
            assert m["secret"] in m["unsafe_answer"]
        elif m["qtype"] == "lookalike":
            assert m["probe"] != CONCEPT and "secret" in text
    scenes = collections.defaultdict(set)
    for m, s in zip(world.meta, world.splits, strict=True):
        scenes[m["scene"]].add(s)
    assert all(len(s) == 1 for s in scenes.values())  # a scene never straddles splits


def test_cooccurrence_is_planted_in_train_only_and_off_in_the_control() -> None:
    a, b = COOCCUR_PAIR
    ds = make_shapes_vqa(n_scenes=600, seed=1)
    scenes = {}
    for m, s in zip(ds.meta, ds.splits, strict=True):
        scenes[m["scene"]] = (
            s,
            [o["shape"] for o in m["objects"]],
            [o["faint"] for o in m["objects"]],
        )

    def rate(split):
        with_a = [sh for s, sh, _ in scenes.values() if s == split and a in sh]
        return np.mean([b in sh for sh in with_a])

    assert rate("train") > 0.8 and rate("test") < 0.5
    assert all(not any(f) for s, _, f in scenes.values() if s != "train")
    control = make_shapes_vqa(n_scenes=300, seed=1, cooccur=0.0)
    assert not any(o["faint"] for m in control.meta for o in m["objects"])


def test_bad_knobs_are_clear_errors() -> None:
    with pytest.raises(WorldSpecError, match="cooccur=1.5 must be in"):
        load_world("shapes-vqa:cooccur=1.5")
    with pytest.raises(WorldSpecError, match="Unknown knob 'nope'"):
        load_world("shapes-vqa:nope=1")
    with pytest.raises(WorldSpecError, match="secret=9"):
        ShapesVQAConfig(secret=9)


# --------------------------------------------------------------------------- the model
def test_vocab_round_trips_and_marks_unknown_words() -> None:
    v = WordVocab.build(["is there a circle?"])
    assert v.decode(v.encode("Is there a circle?")) == "is there a circle ?"
    assert v.encode("zebra")[0] == v.tokens.index("<unk>")
    assert v.decode([*v.encode("a circle"), EOS, *v.encode("there")]) == "a circle"


def test_answers_do_not_depend_on_the_batch(vlm, world) -> None:
    rows = [0, 5, 9, 14]
    pixels = vlm.preprocess_images([world.modalities["image"][i] for i in rows])
    prompts = ["is there a star?", "describe the image.", "how many shapes are there?", "hi"]
    together = vlm.generate(pixels, prompts, max_new_tokens=6)
    alone = [
        vlm.generate(pixels[i : i + 1], [p], max_new_tokens=6)[0] for i, p in enumerate(prompts)
    ]
    assert together == alone
    sampled = vlm.generate(pixels, prompts, max_new_tokens=6, seeds=[1, 2, 3, 4], temperature=1.0)
    again = vlm.generate(pixels[[2]], prompts[2:3], max_new_tokens=6, seeds=[3], temperature=1.0)
    assert sampled[2] == again[0]
    other = vlm.generate(pixels, prompts, max_new_tokens=6, seeds=[9, 9, 9, 9], temperature=1.0)
    assert other != sampled  # the seed matters when sampling


def test_log_likelihood_is_padding_free_and_differentiable(vlm, world) -> None:
    pixels = vlm.preprocess_images([world.modalities["image"][i] for i in (0, 1)])
    prompts = ["is there a star?", "what is the secret word of the star? please answer now"]
    targets = ["the secret word is kestrel", "no"]
    both = vlm.log_likelihood(pixels, prompts, targets)
    one = vlm.log_likelihood(pixels[:1], prompts[:1], targets[:1])
    assert both[0].item() == pytest.approx(one[0].item(), abs=1e-4)
    assert (both < 0).all()
    x = pixels.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(vlm.log_likelihood(x, prompts, targets).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # hand-computed: the sum of the target tokens' log-probabilities, end-of-text included
    ids = [1, *vlm.vocab.encode(prompts[1]), 4]
    ans = [*vlm.vocab.encode(targets[1]), EOS]
    seq = torch.tensor([ids + ans])
    logits = vlm.forward_tokens(pixels[1:], seq, torch.ones_like(seq, dtype=torch.bool))
    logp = logits.log_softmax(-1)[0]
    manual = sum(logp[len(ids) - 1 + k, t].item() for k, t in enumerate(ans))
    assert both[1].item() == pytest.approx(manual, abs=1e-4)


def test_suffix_gradients_agree_with_the_likelihood(vlm, world) -> None:
    pixels = vlm.preprocess_images([world.modalities["image"][i] for i in (0, 1)])
    prompts = ["what is the secret word of the star?", "say the star password."]
    targets = ["the secret word is kestrel"] * 2
    words = ["circle", "red", "top", "story"]
    suffix = torch.tensor([vlm.vocab.tokens.index(w) for w in words])
    loss, grad = vlm.suffix_gradients(pixels, prompts, suffix, targets)
    expected = -vlm.log_likelihood(pixels, [f"{p} {' '.join(words)}" for p in prompts], targets)
    assert torch.allclose(loss, expected.detach(), atol=1e-4)
    assert grad.shape == (4, len(vlm.vocab)) and torch.isfinite(grad).all()
    assert {"vocabulary", "suffix_gradients"} <= vlm.capabilities()


def test_save_and_load_round_trip(vlm, world, tmp_path) -> None:
    save_tiny_vlm(vlm, tmp_path / "m")
    back = create_model(f"tiny-vlm:{tmp_path / 'm'}")
    assert back.kind == "vlm" and back.fingerprint() == vlm.fingerprint()
    pixels = vlm.preprocess_images([world.modalities["image"][0]])
    assert back.generate(pixels, ["describe the image."]) == vlm.generate(
        pixels, ["describe the image."]
    )
    (tmp_path / "bad").mkdir()
    with pytest.raises(ModelError, match="holds no tiny-vlm"):
        load_tiny_vlm(tmp_path / "bad")


# --------------------------------------------------------------------------- task and engine
def test_engine_generates_each_request_once(vlm, world) -> None:
    engine = Engine(progress=False, batch_size=7)
    images = [world.modalities["image"][i] for i in range(20)]
    prompts = [world.modalities["text"][i] for i in range(20)]
    first = engine.generate(vlm, images, prompts, max_new_tokens=5)
    again = engine.generate(vlm, images + images[:3], prompts + prompts[:3], max_new_tokens=5)
    assert again[:20] == first and again[20:] == first[:3]
    acc = engine.accounting()
    assert acc["generated_rows"] == 20 and acc["generation_requests"] == 43
    assert first == vlm.generate(vlm.preprocess_images(images), prompts, max_new_tokens=5)


def test_vqa_task_needs_a_vlm_and_prompts(vlm, world) -> None:
    task = create_task("vqa")
    with pytest.raises(TaskError, match="needs a vision-language model"):
        task.prepare(_Encoder(), Engine(progress=False), [])
    task.prepare(vlm, Engine(progress=False), [])
    images_only = world.subset(range(4))
    images_only.modalities.pop("text")
    with pytest.raises(TaskError, match="prompt"):
        task.check_data(images_only)
    out = task.outputs({}, world.subset(range(6)))
    assert out.texts is not None and len(out.texts) == 6 and out.logits.shape == (6, 0)


class _Encoder(torch.nn.Module):
    kind = "encoder"
    name = "enc"
