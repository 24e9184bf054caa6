"""The check contract, held to every registered check (the registry drives the matrix).

Each check runs on a tiny planted-flaw world (every flaw on, so every check has what it needs)
for every task it declares, through :func:`run_audit`, whose card is validated against the card
schema. A check must be ``ok`` on every task it declares, skipped with its reason on the others,
keep one metric schema whatever the task, and sort its findings by severity.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mmsafe.audit import run_audit
from mmsafe.checks import (
    PILLARS,
    TARGET_KINDS,
    AuditContext,
    check_aliases,
    get_check,
    list_checks,
    resolve_check,
    select_checks,
)
from mmsafe.checks.base import SEVERITY_RANK, expected_metric
from mmsafe.data.worlds import load_world
from mmsafe.engine import Engine
from mmsafe.models.seqrec import SeqRecConfig, SeqRecommender
from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
from mmsafe.models.tiny_diffusion import TinyDiffusion, TinyDiffusionConfig
from mmsafe.models.tiny_diffusion import world_vocab as gen_vocab
from mmsafe.models.tiny_vlm import TinyVLM, TinyVLMConfig, world_vocab
from mmsafe.tasks import create_task

TASKS = ("zero_shot", "fusion", "retrieval", "seqrec", "vqa", "t2i")
KIND_OF_TASK = {"seqrec": "recommender", "vqa": "vlm", "t2i": "generator"}  # else an encoder

# Small budgets: the contract is under test here, not the science (each check's own tests
# and bench/ hold the figures).
CHEAP = {
    "performance.classification": {"n_boot": 50},
    "performance.retrieval": {"n_boot": 50},
    "robustness.adversarial": {"eps": {"linf": [2 / 255], "l2": [0.25]}, "steps": 2,
                               "max_rows": 24, "n_boot": 50},
    "robustness.adversarial_retrieval": {"eps": {"linf": [2 / 255], "l2": [0.25]}, "steps": 2,
                                         "max_rows": 24, "n_boot": 50},
    "robustness.modality": {"n_boot": 50},
    "robustness.shift": {"image_corruptions": ["gaussian_noise", "contrast"],
                         "text_perturbations": ["char_swap"], "severities": [1, 3], "n_boot": 50},
    "robustness.shift_retrieval": {"image_corruptions": ["gaussian_noise", "contrast"],
                                   "text_perturbations": ["char_swap"], "severities": [1, 3],
                                   "n_boot": 50},
    "monitoring.anomaly": {"windows": [12 / 32], "shots": [1], "max_normal": 40, "n_boot": 30,
                           "n_examples": 2},
    "monitoring.calibration": {"n_boot": 50},
    "monitoring.conformal": {"n_boot": 50, "shifts": ["gaussian_noise"]},
    "monitoring.ood": {"n_boot": 50},
    "monitoring.slices": {"n_slices": 4},
    "monitoring.label_noise": {"n_boot": 50, "folds": 3},
    "monitoring.uncertainty": {"n_passes": 2, "n_boot": 50},
    "controllability.explain": {"max_rows": 24, "ig_rows": 2, "ig_steps": 4, "deletion_steps": 4,
                                "random_orders": 1, "gallery": 1, "text_rows": 2, "text_steps": 4,
                                "text_examples": 1, "n_boot": 30},
    "controllability.fairness": {"n_boot": 50, "min_group_size": 5},
    "controllability.privacy": {"n_boot": 50},
    "efficiency.profile": {"batch_sizes": [4], "repeats": 1, "warmup": 0},
    "performance.ranking": {"n_boot": 50, "quick": True},
    "monitoring.cold_start": {"n_boot": 50},
    "robustness.modality_seqrec": {"n_boot": 50},
    "controllability.rec_privacy": {"n_boot": 50},
    "controllability.rec_fairness": {"n_boot": 50, "n_permutations": 1},
    "robustness.shilling": {"shares": [0.05], "n_targets": 1, "n_boot": 50},
    "robustness.item_promotion": {"eps": [2 / 255], "steps": 2, "n_targets": 2, "n_boot": 50},
    "robustness.shift_seqrec": {"image_corruptions": ["gaussian_noise"],
                                "text_perturbations": ["char_swap"], "severities": [3],
                                "n_boot": 50},
    "alignment.jailbreak": {"eps": ["8/255", "unconstrained"], "steps": 2, "max_rows": 6,
                            "gcg_steps": 1, "gcg_rows": 2, "queries": 4, "n_boot": 50},
    "alignment.hallucination": {"max_scenes": 12, "n_boot": 50},
    "alignment.judge": {"max_rows": 6, "templates": ["dan", "prefix_injection"]},
    "generative.bias": {"n_per_prompt": 2, "n_boot": 50},
    "generative.fidelity": {"max_rows": 24, "n_boot": 50},
    "generative.memorization": {"n_per_caption": 1, "max_captions": 6, "descriptor_steps": 2,
                                "k": 5},
    "generative.provenance": {"max_rows": 40, "alpha": 0.2},
    "generative.quality": {"max_rows": 40, "n_boot": 20},
    "generative.safety": {"n_per_prompt": 1, "budget": 4, "n_eval_seeds": 2, "n_boot": 50},
    "generative.watermark": {"methods": ["dwtDctSvd", "treeRing"], "max_rows": 4,
                             "transforms": {"jpeg": [50]}, "n_boot": 20},
}  # fmt: skip


@pytest.fixture(scope="module")
def cards() -> dict[str, dict]:
    """One full audit per task of a random xs tiny-clip on a tiny world with every flaw on (and
    of an untrained recommender over its items, on a small shapes-rec world, for seqrec; of an
    untrained tiny-vlm on a small shapes-vqa world, for vqa)."""
    data = load_world("shapes:n=400,seed=5")
    torch.manual_seed(0)
    model = TinyClip(TinyClipConfig.for_size("xs"))
    rec_data = load_world("shapes-rec:n_users=200,n_items=60,seed=5")
    dims = (model.embed_dim, model.embed_dim)
    recommender = SeqRecommender(SeqRecConfig(60, feature_dims=dims), model).eval()
    vqa_data = load_world("shapes-vqa:n_scenes=60,seed=5")
    vlm = TinyVLM(TinyVLMConfig(vocab=world_vocab(vqa_data).tokens, tower="scratch")).eval()
    gen_data = load_world("shapes-gen:n_images=200,seed=5")
    torch.manual_seed(0)
    generator = TinyDiffusion(TinyDiffusionConfig(vocab=gen_vocab(gen_data).tokens,
                                                  channels=(8, 16), steps=2)).eval()  # fmt: skip
    targets = {"seqrec": (recommender, rec_data), "vqa": (vlm, vqa_data),
               "t2i": (generator, gen_data)}  # fmt: skip
    out = {}
    for task in TASKS:
        target, rows = targets.get(task, (model, data))
        result = run_audit(
            target, rows, task=task, checks="all", engine=Engine(progress=False), options=CHEAP
        )
        out[task] = result.card
    return out


def test_cheap_options_cover_every_check() -> None:
    assert set(CHEAP) == set(list_checks())


def test_every_name_reads_pillar_dot_name_and_declares_its_scope() -> None:
    for name in list_checks():
        cls = get_check(name)
        assert name.split(".")[0] == cls.pillar and cls.pillar in PILLARS, name
        assert cls.kinds and set(cls.kinds) <= set(TARGET_KINDS), name
        assert cls.tasks and set(cls.tasks) <= set(TASKS), name
        assert cls.description, name


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_each_check_runs_on_its_tasks_and_says_why_elsewhere(cards, task) -> None:
    checks = cards[task]["checks"]
    assert set(checks) == set(list_checks())
    for name, entry in checks.items():
        cls = get_check(name)
        kind = KIND_OF_TASK.get(task, "encoder")
        if task in cls.tasks:
            assert entry["status"] == "ok", (task, name, entry["reason"])
            assert entry["metrics"], (task, name)
        elif kind not in cls.kinds:
            assert entry["status"] == "skipped", (task, name)
            assert entry["reason"].startswith(f"not applicable to {kind} models"), entry["reason"]
        else:
            assert entry["status"] == "skipped", (task, name)
            assert entry["reason"].startswith(f"not applicable to task {task!r}"), entry["reason"]


@pytest.mark.slow
def test_one_metric_schema_per_check_whatever_the_task(cards) -> None:
    """A check reports the same metric names on every task it declares, except the ones its
    ``conditional_metrics`` declare (and those appear exactly where their condition holds)."""
    problems = []
    capabilities = {  # the audited model's
        **dict.fromkeys(TASKS, TinyClip(TinyClipConfig.for_size("xs")).capabilities()),
        "vqa": TinyVLM(TinyVLMConfig(vocab=("<pad>",))).capabilities(),
        "t2i": TinyDiffusion(TinyDiffusionConfig(vocab=("<pad>",))).capabilities(),
    }
    for name in list_checks():
        cls = get_check(name)
        tasks = [task for task in TASKS if task in cls.tasks]
        seen = {t: set(cards[t]["checks"][name]["metrics"]) for t in tasks}
        every = set.union(*seen.values())
        for t in tasks:
            mods = create_task(t).modalities
            caps = capabilities[t]
            expected = {m for m in every if expected_metric(cls, m, t, mods, caps)}
            if seen[t] != expected:
                problems.append((name, t, sorted(seen[t] ^ expected)))
    assert not problems, "\n".join(map(str, problems))


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_findings_come_most_severe_first(cards, task) -> None:
    for name, entry in cards[task]["checks"].items():
        ranks = [SEVERITY_RANK[f["severity"]] for f in entry["findings"]]
        assert ranks == sorted(ranks), name


def test_aliases_keep_old_names_working() -> None:
    assert resolve_check("calibration") == ["monitoring.calibration"]
    assert select_checks("performance") == [
        "performance.classification",
        "performance.ranking",
        "performance.retrieval",
    ]
    assert "robustness.adversarial_retrieval" in select_checks("robustness.adversarial")
    for alias, targets in check_aliases().items():
        assert targets and all(alias in get_check(t).aliases for t in targets)


def test_context_is_frozen_and_streams_are_per_check() -> None:
    ctx = AuditContext(None, None, None, None, None, seed=1)  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.seed = 2  # type: ignore[misc]
    a = dataclasses.replace(ctx, check="monitoring.ood")
    b = dataclasses.replace(ctx, check="monitoring.slices")
    draws = {c.check: c.rng().random(4) for c in (a, b)}
    assert not np.allclose(draws["monitoring.ood"], draws["monitoring.slices"])
    assert np.array_equal(a.rng("x").random(4), a.rng("x").random(4))
    assert not np.array_equal(a.rng("x").random(4), a.rng("y").random(4))
    g1, g2 = a.torch_generator("x"), a.torch_generator("x")
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
