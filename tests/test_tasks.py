from __future__ import annotations

import numpy as np
import pytest
import torch

from mmsafe.engine import Engine
from mmsafe.tasks import (
    RetrievalTask,
    TaskError,
    ZeroShotTask,
    build_prompts,
    caption_positives,
    create_task,
)
from mmsafe.tasks.zero_shot import class_embeddings
from tests.conftest import make_colour_data


def test_class_embeddings_average_then_renormalise():
    # two classes x two templates; hand-computed means of unit vectors
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    ce = class_embeddings(e, 2)
    s = float(1 / np.sqrt(2))
    torch.testing.assert_close(ce, torch.tensor([[s, s], [1.0, 0.0]]))


def test_zero_shot_logits_match_hand_computation(toy_model, colour_data):
    engine = Engine(progress=False)
    task = ZeroShotTask(templates=["{}"])
    task.prepare(toy_model, engine, colour_data.classes)
    emb = engine.embed(toy_model, colour_data, ["image"])
    prompts = engine.embed_values(toy_model, "text", build_prompts(colour_data.classes, ["{}"]))
    expected = toy_model.logit_scale * emb["image"] @ prompts.T
    torch.testing.assert_close(task.logits(emb), expected)


def test_retrieval_positives_and_logits(toy_model, colour_data):
    engine = Engine(progress=False)
    task = RetrievalTask()
    task.prepare(toy_model, engine, colour_data.classes)
    out = engine.outputs(toy_model, task, colour_data)
    n = len(colour_data)
    assert out.logits.shape == (n, n)
    assert out.positives is not None and out.positives.diagonal().all()
    texts = np.array(colour_data.modalities["text"])
    assert (out.positives == (texts[:, None] == texts[None, :])).all()
    # every image's best caption names its colour
    best = out.logits.argmax(1).numpy()
    assert (out.positives[np.arange(n), best]).mean() > 0.9


def test_fusion_task_fits_head_on_train_split(toy_model):
    data = make_colour_data(n=300)
    engine = Engine(progress=False)
    task = create_task("fusion", epochs=40)
    train = data.split("train")
    task.prepare(toy_model, engine, data.classes, fit_data=train)
    test = data.split("test")
    out = engine.outputs(toy_model, task, test)
    assert out.logits.shape == (len(test), 3)
    assert (out.preds == test.labels).mean() > 0.9


def test_fusion_needs_a_train_split(toy_model, colour_data):
    with pytest.raises(TaskError, match="train"):
        create_task("fusion").prepare(toy_model, Engine(progress=False), ["a"], fit_data=None)


def test_task_errors_name_what_is_missing(colour_data):
    text_only = colour_data.subset(range(10))
    text_only.modalities.pop("image")
    with pytest.raises(TaskError, match="missing"):
        ZeroShotTask().check_data(text_only)
    with pytest.raises(TaskError, match="Unknown task"):
        create_task("nope")


def test_caption_positives_groups_equal_captions():
    p = caption_positives(["x", "y", "x", "z"])
    assert p.sum() == 6 and p[0, 2] and not p[0, 1]


def test_temperature_scaled_task_divides_logits(toy_model, colour_data):
    from mmsafe.tasks import TemperatureScaledTask

    engine = Engine(progress=False)
    inner = ZeroShotTask(templates=["{}"])
    inner.prepare(toy_model, engine, colour_data.classes)
    scaled = TemperatureScaledTask(inner, 2.0)
    base = engine.outputs(toy_model, inner, colour_data)
    out = engine.outputs(toy_model, scaled, colour_data)
    torch.testing.assert_close(out.logits, base.logits / 2.0)
    assert scaled.name == "zero_shot" and scaled.fingerprint() != inner.fingerprint()
    assert (out.preds == base.preds).all()  # temperature never changes the arg-max
    with pytest.raises(ValueError):
        TemperatureScaledTask(inner, 0.0)
