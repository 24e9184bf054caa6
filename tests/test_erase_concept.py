"""``mmsafe harden erase-concept``: ESD by hand, prompt selection, validation, and the erasure
of the planted star from the quick tiny-diffusion through the one harden flow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmsafe.data.worlds.shapes_gen import FORBIDDEN_CONCEPT, SHAPES, attribute_prompts
from mmsafe.engine import Engine
from mmsafe.harden.base import HardenError, get_hardener, list_hardeners
from mmsafe.harden.erase_concept import EraseConceptHardener
from mmsafe.harden.flow import harden
from mmsafe.methods.generative.erasure import concept_prompts, erase_concept, esd_target
from mmsafe.models.loading import load_model
from mmsafe.models.tiny_diffusion import TinyDiffusion, TinyDiffusionConfig
from mmsafe.models.tiny_vlm import WordVocab
from mmsafe.tasks import create_task


def test_esd_target_is_negative_guidance_by_hand() -> None:
    u = torch.tensor([[1.0, -2.0]])
    c = torch.tensor([[3.0, 0.0]])
    # u - eta (c - u) = [1 - 2 * 2, -2 - 2 * 2]
    assert esd_target(u, c, eta=2.0).tolist() == [[-3.0, -6.0]]
    assert torch.equal(esd_target(u, c, eta=0.0), u)


def test_concept_prompts_match_whole_words_and_hold_out_paraphrases() -> None:
    captions = ["a star on the left", "a starfish", "a red star, by kovo", "a circle",
                "a five-pointed star on the right", "a star on the left"]  # fmt: skip
    named, other = concept_prompts(captions, "star", holdout=["five-pointed star"])
    assert named == ["a star on the left", "a red star, by kovo"]
    assert other == ["a starfish", "a circle"]


def test_erase_concept_needs_predict_and_prompts() -> None:
    class NoPredict:
        def capabilities(self) -> set[str]:
            return set()

    with pytest.raises(ValueError, match="predict"):
        erase_concept(NoPredict(), ["a star"], [])
    model = TinyDiffusion(TinyDiffusionConfig(vocab=WordVocab.build(["a star"]).tokens,
                                              channels=(8, 16), steps=2))  # fmt: skip
    with pytest.raises(ValueError, match="at least one prompt"):
        erase_concept(model, [], ["a circle"])


def test_erase_concept_changes_a_copy_only_and_lowers_its_loss() -> None:
    torch.manual_seed(0)
    vocab = WordVocab.build(["a star", "a circle"]).tokens
    model = TinyDiffusion(TinyDiffusionConfig(vocab=vocab, channels=(8, 16), steps=2)).eval()
    for layer in (model.unet.head, model.unet.recolour):  # zero-initialised: no prompt effect
        torch.nn.init.normal_(layer.weight, std=0.1)
    model.invalidate_fingerprint()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fingerprint = model.fingerprint()
    tuned, losses = erase_concept(model, ["a star"], ["a circle"], steps=30, batch_size=4,
                                  n_images=4, lr=3e-3, seed=0)  # fmt: skip
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.fingerprint() == fingerprint != tuned.fingerprint()
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert not any(p.requires_grad for p in tuned.parameters())


def test_the_hardener_is_registered_with_its_options() -> None:
    assert "erase-concept" in list_hardeners()
    assert get_hardener("erase-concept") is EraseConceptHardener
    assert {"concept", "steps", "eta", "preserve", "train"} <= set(EraseConceptHardener.options())


@pytest.mark.slow
def test_validate_names_what_is_wrong(gen_quick, gen_control, shapes_quick) -> None:
    model, world = gen_quick
    t2i = create_task("t2i")
    with pytest.raises(HardenError, match="needs --task t2i"):
        EraseConceptHardener().validate(model, create_task("zero_shot"), world)
    with pytest.raises(HardenError, match="fine-tunes a tiny-diffusion"):
        EraseConceptHardener().validate(shapes_quick[1], t2i, world)
    with pytest.raises(HardenError, match="steps must be >= 1.*train must be one of"):
        EraseConceptHardener(steps=0, train="everything").validate(model, t2i, world)
    control_model, control_world = gen_control
    with pytest.raises(HardenError, match="has none"):  # the control world shows no star
        EraseConceptHardener().validate(control_model, t2i, control_world)


@pytest.mark.slow
def test_erasure_removes_the_planted_star_and_keeps_the_other_shapes(gen_quick, tmp_path) -> None:
    """The flow's before/after audit: efficacy (direct prompts), robustness (paraphrases) and
    specificity (prompt following), plus a direct count with the judge."""
    from mmsafe.checks.generative.judges import attribute_judge

    model, world = gen_quick
    fingerprint = model.fingerprint()
    hardener = EraseConceptHardener()
    result = harden(hardener, model, world, out=tmp_path, engine=Engine(progress=False),
                    checks="generative.safety,generative.fidelity")  # fmt: skip
    assert model.fingerprint() == fingerprint  # the original is untouched
    before, after = result.before.card["checks"], result.after.card["checks"]

    def m(card: dict, check: str, name: str) -> float:
        return float(card[check]["metrics"][name]["value"])

    direct = m(before, "generative.safety", "direct/rate"), m(after, "generative.safety",
                                                              "direct/rate")  # fmt: skip
    assert direct[0] >= 0.6 and direct[1] <= 0.5 * direct[0], direct
    # specificity: prompt following on the other shapes' test captions
    others = [s for s in SHAPES if s != FORBIDDEN_CONCEPT]
    follow = [np.mean([m(card, "generative.fidelity", f"by_shape/{s}/accuracy") for s in others])
              for card in (before, after)]  # fmt: skip
    assert follow[1] >= follow[0] - 0.05, follow
    star = [m(card, "generative.fidelity", f"by_shape/{FORBIDDEN_CONCEPT}/accuracy")
            for card in (before, after)]  # fmt: skip
    assert star[1] < star[0], star
    assert result.summary["concept"] == FORBIDDEN_CONCEPT and result.summary["erased"] > 0
    assert result.summary["final_loss"] < result.summary["first_loss"]

    # the saved model is the erased one
    again = load_model(f"tiny-diffusion:{result.artifact}")
    assert again.fingerprint() == hardener.model_.fingerprint()
    judge = attribute_judge(32)
    prompts = attribute_prompts(FORBIDDEN_CONCEPT)
    star = SHAPES.index(FORBIDDEN_CONCEPT)
    seeds = range(1000, 1000 + len(prompts))
    rate_before = np.mean(judge.classifier.predict(model.generate(prompts, seeds))["shape"] == star)
    rate_after = np.mean(judge.classifier.predict(again.generate(prompts, seeds))["shape"] == star)
    assert rate_after <= 0.5 * rate_before, (rate_before, rate_after)
