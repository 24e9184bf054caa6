"""``mmsafe harden memorization``: the mitigations by hand, validation, and a retrain on a
reduced world that stops the planted duplicates coming back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mmsafe.data.worlds import load_world
from mmsafe.engine import Engine
from mmsafe.harden.base import HardenError, get_hardener
from mmsafe.harden.flow import harden
from mmsafe.harden.memorization import MemorizationHardener
from mmsafe.methods.generative.memorization import mitigate_training_set
from mmsafe.models.tiny_diffusion import (
    TinyDiffusion,
    TinyDiffusionConfig,
    TinyDiffusionTrainConfig,
    fit_flow,
    world_vocab,
)
from mmsafe.tasks import create_task

REDUCED_WORLD = "shapes-gen:n_images=600,seed=1"
"""A small planted world: 4 duplicated images x 32 copies among ~420 ordinary train rows."""
REDUCED_STEPS = 600


def _image(v: int) -> np.ndarray:
    return np.full((4, 4, 3), v, np.uint8)


def test_dedupe_keeps_the_first_of_each_identical_image() -> None:
    images = [_image(1), _image(2), _image(1), _image(3), _image(2), _image(1)]
    keep, captions = mitigate_training_set(images, list("abcdef"), "dedupe")
    assert keep == [0, 1, 3] and captions == ["a", "b", "d"]
    # same pixels in another shape are another image
    keep, _ = mitigate_training_set([_image(0), np.zeros((2, 8, 3), np.uint8)], ["x", "y"],
                                    "dedupe")  # fmt: skip
    assert keep == [0, 1]


def test_randomise_adds_words_from_the_vocabulary_afresh_per_row() -> None:
    vocab = ["red", "blue", "left", "top"]
    captions = ["a circle by kovo"] * 50
    keep, out = mitigate_training_set([_image(0)] * 50, captions, "randomise",
                                      vocabulary=vocab, words=2, seed=3)  # fmt: skip
    assert keep == list(range(50))
    for text in out:
        words = text.split()
        assert len(words) == 6
        extra = list(words)
        for w in ["a", "circle", "by", "kovo"]:  # the original words, in order
            extra.remove(w)
        assert set(extra) <= set(vocab)
    assert len(set(out)) > 30  # the copies no longer share a caption
    again = mitigate_training_set([_image(0)] * 50, captions, "randomise", vocabulary=vocab,
                                  words=2, seed=3)[1]  # fmt: skip
    assert again == out


def test_mitigations_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="strategy must be one of"):
        mitigate_training_set([_image(0)], ["a"], "shuffle")
    with pytest.raises(ValueError, match="one caption per image"):
        mitigate_training_set([_image(0)], ["a", "b"], "dedupe")
    with pytest.raises(ValueError, match="needs a vocabulary"):
        mitigate_training_set([_image(0)], ["a"], "randomise")


def test_the_hardener_validates_its_options_and_model(shapes_quick) -> None:
    assert get_hardener("memorization") is MemorizationHardener
    world = load_world(REDUCED_WORLD)
    model = TinyDiffusion(TinyDiffusionConfig(vocab=world_vocab(world).tokens, channels=(8, 16)))
    t2i = create_task("t2i")
    with pytest.raises(HardenError, match="strategy must be one of.*words must be >= 1"):
        MemorizationHardener(strategy="x", words=0).validate(model, t2i, world)
    with pytest.raises(HardenError, match="retrains a tiny-diffusion"):
        MemorizationHardener().validate(shapes_quick[1], t2i, world)
    with pytest.raises(HardenError, match="needs --task t2i"):
        MemorizationHardener().validate(model, create_task("zero_shot"), world)


@pytest.mark.slow
def test_dedupe_and_retrain_stops_the_duplicates_coming_back(tmp_path) -> None:
    """On a reduced world (the tests' budget; bench/ runs the full one): the planted duplicates
    are replicated before, and no longer after the copies are dropped and the model retrained."""
    world = load_world(REDUCED_WORLD)
    rows = [i for i, s in enumerate(world.splits) if s == "train"]
    train = TinyDiffusionTrainConfig(steps=REDUCED_STEPS)
    torch.manual_seed(0)
    model = TinyDiffusion(TinyDiffusionConfig(vocab=world_vocab(world).tokens))
    fit_flow(model, [world.modalities["image"][i] for i in rows],
             [world.modalities["text"][i] for i in rows], train)  # fmt: skip
    model.eval().training_info = {"hyperparameters": dataclasses.asdict(train)}
    options = {"n_per_caption": 2, "max_captions": 24, "descriptor_steps": 100}
    hardener = MemorizationHardener(strategy="dedupe")

    class Options(MemorizationHardener):  # the tests' smaller memorisation audit
        def audit_options(self) -> dict:
            return {"generative.memorization": options}

    hardener = Options(strategy="dedupe")
    result = harden(hardener, model, world, out=tmp_path, engine=Engine(progress=False),
                    checks="generative.memorization")  # fmt: skip
    before = result.before.card["checks"]["generative.memorization"]["metrics"]
    after = result.after.card["checks"]["generative.memorization"]["metrics"]
    assert before["recall"]["value"] >= 0.75, before["recall"]
    assert after["recall"]["value"] <= 0.25, after["recall"]
    assert after["replication_rate"]["value"] < before["replication_rate"]["value"]
    assert result.summary["rows_after"] == result.summary["rows_before"] - 4 * 31
