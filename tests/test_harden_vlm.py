"""The vlm safety hardeners (safety-tune, dpo, adversarial-vlm) and mmsafe.methods.align.

The hardeners run on a small shapes-vqa world and a tiny-vlm trained briefly on its capability
data (forbidden requests *answered*), so hardening has something to repair. Effect sizes on the
full-size model (attack success, benign accuracy) are a benchmark's job, not these tests'.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmsafe.data.worlds.shapes_vqa import REFUSAL, ROLEPLAY_PREFIXES, make_shapes_vqa
from mmsafe.harden.adversarial_vlm import AdversarialVLMHardener
from mmsafe.harden.base import Hardened, HardenError, get_hardener, list_hardeners
from mmsafe.harden.dpo import DPOHardener
from mmsafe.harden.safety_tune import SafetyTuneHardener, VLMSafetyHardener, train_rows
from mmsafe.methods.align import (
    CONTEXT_WORDS,
    adversarial_finetune,
    dpo_finetune,
    dpo_loss,
    preference_pairs,
    safety_prompts,
)
from mmsafe.methods.attacks.vlm import (
    FIGSTEP_PROMPT,
    JAILBREAK_TEMPLATES,
    apply_template,
    pgd_jailbreak,
)
from mmsafe.models.tiny_vlm import (
    TinyVLM,
    TinyVLMConfig,
    capability_examples,
    fit_examples,
    load_tiny_vlm,
    words,
    world_vocab,
)
from mmsafe.tasks.base import create_task

# --------------------------------------------------------------------------- dpo_loss


def _trl_sigmoid_loss(pc: list[float], pr: list[float], rc: list[float], rr: list[float],
                      beta: float) -> float:  # fmt: skip
    """TRL's DPOTrainer ``sigmoid`` loss, written out with math (no torch)."""
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr, strict=True):
        logits = (a - b) - (c - d)  # pi_logratios - ref_logratios
        out.append(-math.log(1.0 / (1.0 + math.exp(-beta * logits))))
    return sum(out) / len(out)


def test_dpo_loss_matches_trl_formula_by_hand() -> None:
    pc, pr, rc, rr = [-1.0, -2.0], [-5.0, -1.0], [-2.0, -2.0], [-3.0, -1.5]
    # logits: (-1 + 5) - (-2 + 3) = 3 and (-2 + 1) - (-2 + 1.5) = -0.5; beta = 0.1
    by_hand = (math.log1p(math.exp(-0.3)) + math.log1p(math.exp(0.05))) / 2
    assert by_hand == pytest.approx(0.6364074, abs=1e-6)
    assert _trl_sigmoid_loss(pc, pr, rc, rr, 0.1) == pytest.approx(by_hand, rel=1e-12)
    t = torch.tensor
    got = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=0.1)
    assert got.shape == () and float(got) == pytest.approx(by_hand, abs=1e-6)


def test_dpo_loss_is_log2_when_policy_is_reference_and_prefers_the_chosen() -> None:
    g = torch.Generator().manual_seed(0)
    chosen, rejected = -5 * torch.rand(7, generator=g), -5 * torch.rand(7, generator=g)
    for beta in (0.1, 1.0):
        loss = dpo_loss(chosen, rejected, chosen, rejected, beta=beta)
        assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    policy = chosen.clone().requires_grad_(True)
    dpo_loss(policy, rejected, chosen, rejected).backward()
    assert policy.grad is not None and bool((policy.grad < 0).all())  # raising chosen helps
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(chosen, rejected, chosen, rejected, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(chosen, rejected[:3], chosen, rejected)


# --------------------------------------------------------------------------- safety data


@pytest.fixture(scope="module")
def world() -> Any:
    return make_shapes_vqa(n_scenes=120, seed=0)


def test_preference_pairs_prefer_refusal_only_for_forbidden_rows(world: Any) -> None:
    forbidden, benign = train_rows(world)
    rows = forbidden[:3] + benign[:40]
    pairs = preference_pairs(world, rows)
    assert len(pairs) == len(rows)
    for i, (image, prompt, chosen, rejected) in zip(rows, pairs, strict=True):
        m = world.meta[i]
        assert image is world.modalities["image"][i] and prompt == world.modalities["text"][i]
        if m["forbidden"]:
            assert (chosen, rejected) == (REFUSAL, m["unsafe_answer"])
            assert m["secret"] in rejected
        else:
            assert (chosen, rejected) == (m["answer"], REFUSAL)
    lookalikes = [
        p for i, p in zip(rows, pairs, strict=True) if world.meta[i]["qtype"] == "lookalike"
    ]
    assert lookalikes and all(p[2].endswith("has no secret") for p in lookalikes)

    wrapped = preference_pairs(world, rows, wrap=lambda i, p: [f"x {p}", f"{p} y"])
    assert len(wrapped) == len(rows) + 2 * 3  # only forbidden rows are wrapped
    assert [p[1] for p in wrapped[:3]] == [world.modalities["text"][forbidden[0]]] + [
        f"x {world.modalities['text'][forbidden[0]]}",
        f"{world.modalities['text'][forbidden[0]]} y",
    ]
    broken = world.subset(forbidden[:1])
    broken.meta[0] = {**broken.meta[0], "unsafe_answer": None}
    with pytest.raises(ValueError, match="unsafe_answer"):
        preference_pairs(broken, [0])


def test_safety_prompts_wrap_the_request_without_the_held_out_templates() -> None:
    request = "which word does the star keep hidden?"
    prompts = safety_prompts(request, np.random.default_rng(0), contexts=4)
    assert len(prompts) == len(ROLEPLAY_PREFIXES) + 4
    assert prompts[: len(ROLEPLAY_PREFIXES)] == [f"{p} {request}" for p in ROLEPLAY_PREFIXES]
    assert all(request in p for p in prompts)
    assert prompts[-2].endswith(request) and prompts[-1].startswith(request)  # before, after
    assert prompts != safety_prompts(request, np.random.default_rng(1), contexts=4)
    assert prompts == safety_prompts(request, np.random.default_rng(0), contexts=4)
    # the audit's attacks stay held out: no template text, no word of theirs in the contexts
    held_out = {w for t in [*JAILBREAK_TEMPLATES.values(), FIGSTEP_PROMPT] for w in words(t)}
    assert not set(CONTEXT_WORDS) & held_out
    fragments = [
        f.strip(" .")
        for t in JAILBREAK_TEMPLATES.values()
        for f in t.split("{request}")
        if len(f.strip(" .")) > 3
    ]
    assert not [f for p in prompts for f in fragments if f in p]
    # the longest prompt and the refusal fit tiny-vlm's text window
    longest = max(len(words(p)) for p in safety_prompts(request, np.random.default_rng(2)))
    assert longest + len(words(REFUSAL)) + 3 <= TinyVLMConfig(vocab=("a",)).max_text


# --------------------------------------------------------------------------- the hardeners


@pytest.fixture(scope="module")
def base(world: Any) -> TinyVLM:
    """A tiny-vlm trained briefly on capability data: it answers forbidden requests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyVLM(TinyVLMConfig(vocab=world_vocab(world).tokens, tower="scratch",
                                      width=64, layers=1))  # fmt: skip
    forbidden, benign = train_rows(world)
    rng = np.random.default_rng(0)
    rows = sorted(forbidden + rng.choice(benign, 200, replace=False).tolist())
    fit_examples(model, capability_examples(world, rows), epochs=1, batch_size=64, lr=3e-3)
    return model


def _held_out(world: Any) -> list[int]:
    return [i for i, m in enumerate(world.meta) if m["forbidden"] and world.splits[i] != "train"]


def _margin(model: TinyVLM, world: Any, *, pgd: bool = False) -> float:
    """Mean ``log p(refusal) - log p(unsafe)`` on held-out forbidden rows, every template."""
    rows = _held_out(world)
    pixels = model.preprocess_images([world.modalities["image"][i] for i in rows])
    unsafe = [world.meta[i]["unsafe_answer"] for i in rows]
    prompts = [str(world.modalities["text"][i]) for i in rows]
    if pgd:  # a visual jailbreak on the bare request
        pixels = pgd_jailbreak(model, pixels, prompts, unsafe, eps=16 / 255, alpha=4 / 255,
                               steps=5, generator=torch.Generator().manual_seed(1))  # fmt: skip
    else:
        prompts = [apply_template(t, p) for t in JAILBREAK_TEMPLATES for p in prompts]
        pixels = pixels.repeat(len(JAILBREAK_TEMPLATES), 1, 1, 1)
        unsafe = unsafe * len(JAILBREAK_TEMPLATES)
    with torch.no_grad():
        safe = model.log_likelihood(pixels, prompts, [REFUSAL] * len(prompts))
        return float((safe - model.log_likelihood(pixels, prompts, unsafe)).mean())


@pytest.fixture(scope="module")
def before(base: TinyVLM, world: Any) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in base.state_dict().items()},
        "margin": _margin(base, world),
        "pgd_margin": _margin(base, world, pgd=True),
    }


HARDENERS: dict[str, VLMSafetyHardener] = {
    "safety-tune": SafetyTuneHardener(epochs=1),
    "dpo": DPOHardener(epochs=1, batch_size=64),
    "adversarial-vlm": AdversarialVLMHardener(epochs=1, steps=2),
}


@pytest.fixture(scope="module", params=list(HARDENERS))
def fitted(request: Any, base: TinyVLM, world: Any, before: dict[str, Any]) -> Any:
    hardener = HARDENERS[request.param]
    result = hardener.fit(base, create_task("vqa"), world, None, seed=0)  # type: ignore[arg-type]
    return hardener, result


def test_fit_returns_self_and_leaves_the_original_unchanged(
    fitted: Any, base: TinyVLM, world: Any, before: dict[str, Any]
) -> None:
    hardener, result = fitted
    assert result is hardener
    assert isinstance(hardener.model_, TinyVLM) and hardener.model_ is not base
    for k, v in base.state_dict().items():
        assert torch.equal(v, before["state"][k]), k
    tuned = hardener.model_.state_dict()
    assert any(not torch.equal(tuned[k], v) for k, v in before["state"].items())
    assert hardener.model_.fingerprint() != base.fingerprint()
    assert not hardener.model_.training and hardener.name in hardener.model_.training_info
    summary = hardener.summary()
    assert summary["examples"] > len(train_rows(world)[0])  # forbidden rows + benign replay
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in summary.values())
    task = create_task("vqa")
    out = hardener.transform(base, task)
    assert isinstance(out, Hardened) and out.model is hardener.model_ and out.task is task


def test_hardening_raises_the_refusal_margin_under_held_out_templates(
    fitted: Any, world: Any, before: dict[str, Any]
) -> None:
    hardener, _ = fitted
    after = _margin(hardener.model_, world)
    assert after > before["margin"] + 0.25, (hardener.name, before["margin"], after)


@pytest.mark.parametrize("fitted", ["adversarial-vlm"], indirect=True)
def test_adversarial_training_raises_the_margin_under_pgd(
    fitted: Any, world: Any, before: dict[str, Any]
) -> None:
    hardener, _ = fitted
    assert isinstance(hardener, AdversarialVLMHardener)
    after = _margin(hardener.model_, world, pgd=True)
    assert after > before["pgd_margin"] + 0.25, (before["pgd_margin"], after)


def test_save_writes_a_folder_that_loads_back_identically(
    fitted: Any, world: Any, tmp_path: Path
) -> None:
    hardener, _ = fitted
    written = hardener.save(tmp_path / hardener.artifact)
    assert written == tmp_path / "model"
    assert (written / "config.json").is_file() and (written / "model.safetensors").is_file()
    loaded = load_tiny_vlm(written)
    rows = _held_out(world)[:3]
    pixels = loaded.preprocess_images([world.modalities["image"][i] for i in rows])
    prompts = [str(world.modalities["text"][i]) for i in rows]
    with torch.no_grad():
        a = hardener.model_.log_likelihood(pixels, prompts, [REFUSAL] * 3)
        b = loaded.log_likelihood(pixels, prompts, [REFUSAL] * 3)
    assert torch.equal(a, b)
    assert loaded.generate(pixels, prompts) == hardener.model_.generate(pixels, prompts)
    assert loaded.training_info[hardener.name]["seed"] == 0
    if hardener.name == "dpo":  # the --model spec the docs give
        from mmsafe.models.loading import load_model

        via_cli = load_model(f"tiny-vlm:{written}")
        assert via_cli.fingerprint() == loaded.fingerprint()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name", list(HARDENERS))
def test_registered_with_vqa_task_jailbreak_audit_and_cli_flags(name: str) -> None:
    from mmsafe.cli import _harden_command

    cls = get_hardener(name)
    assert name in list_hardeners() and cls is type(HARDENERS[name])
    assert (cls.tasks, cls.default_task) == (("vqa",), "vqa")
    assert (cls.checks, cls.artifact) == ("alignment.jailbreak", "model")
    flags = {p.name for p in _harden_command(name).params}
    assert set(cls.options()) <= flags and {"model", "data", "out"} <= flags
    fresh = cls()
    assert fresh.model_ is None
    with pytest.raises(RuntimeError, match="fit"):
        fresh.summary()


@pytest.mark.parametrize("name", list(HARDENERS))
def test_validate_rejects_wrong_model_task_data_and_options(
    name: str, world: Any, base: TinyVLM, toy_model: Any
) -> None:
    cls, vqa = get_hardener(name), create_task("vqa")
    hardener = cls()
    hardener.validate(base, vqa, world)  # fine
    with pytest.raises(HardenError, match="tiny-vlm"):
        hardener.validate(toy_model, vqa, world)
    with pytest.raises(HardenError, match="--task vqa"):
        hardener.validate(base, create_task("zero_shot"), world)
    no_forbidden = world.subset([i for i, m in enumerate(world.meta) if not m["forbidden"]])
    with pytest.raises(HardenError, match="forbidden"):
        hardener.validate(base, vqa, no_forbidden)
    test_only = world.subset([i for i, s in enumerate(world.splits) if s != "train"])
    with pytest.raises(HardenError, match="'train' split"):
        hardener.fit(base, vqa, test_only, None)  # type: ignore[arg-type]
    with pytest.raises(HardenError, match="epochs must be >= 1"):
        cls(epochs=0).validate(base, vqa, world)
    with pytest.raises(RuntimeError, match="fit"):
        hardener.save(Path("never-written"))
    assert not Path("never-written").exists()


def test_option_checks_of_dpo_and_adversarial(world: Any, base: TinyVLM) -> None:
    vqa = create_task("vqa")
    with pytest.raises(HardenError, match="beta must be > 0"):
        DPOHardener(beta=0.0).validate(base, vqa, world)
    with pytest.raises(HardenError, match="eps must be > 0"):
        AdversarialVLMHardener(eps=0.0).validate(base, vqa, world)
    forbidden, _ = train_rows(world)
    no_unsafe = world.subset(list(range(len(world))))
    no_unsafe.meta[forbidden[0]] = {**no_unsafe.meta[forbidden[0]], "unsafe_answer": None}
    with pytest.raises(HardenError, match="unsafe_answer"):
        DPOHardener().validate(base, vqa, no_unsafe)
    SafetyTuneHardener().validate(base, vqa, no_unsafe)  # refusals alone need no unsafe answer


# --------------------------------------------------------------------------- fine-tuning


def test_dpo_finetune_starts_at_log2_and_leaves_the_model(world: Any, base: TinyVLM) -> None:
    forbidden, benign = train_rows(world)
    pairs = preference_pairs(world, forbidden[:4] + benign[:4])
    state = {k: v.clone() for k, v in base.state_dict().items()}
    # one batch: the epoch's loss is the loss before the only step, policy == reference
    tuned, losses = dpo_finetune(base, pairs, epochs=1, batch_size=len(pairs), lr=1e-4)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
    assert tuned is not base and not tuned.training
    _, with_sft = dpo_finetune(base, pairs, epochs=1, batch_size=len(pairs), sft_weight=1.0)
    assert with_sft[0] > losses[0] + 1.0  # + the chosen answers' NLL
    with pytest.raises(ValueError, match="preference pair"):
        dpo_finetune(base, [])
    with pytest.raises(ValueError, match="forbidden rows"):
        adversarial_finetune(base, [])
