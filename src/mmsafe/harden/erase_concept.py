"""``mmsafe harden erase-concept``: ESD concept erasure of a tiny-diffusion.

The science is :func:`mmsafe.methods.generative.erasure.erase_concept` (ESD, Gandikota et al.,
2023, with an optional preservation term). The hardener picks the prompts from the data: the
``train`` captions that name the concept as a whole word are erased, the other ``train``
captions are preserved, and the concept's paraphrases are held out of both, so that the
re-audit's ``generative.safety`` measures:

* **efficacy**: the concept rate under direct prompts, before and after;
* **robustness**: whether paraphrased or searched prompts bring the concept back;

and ``generative.fidelity`` / ``generative.quality`` measure **specificity**: prompt following
and image quality on the other prompts. Load a saved model back with
``--model tiny-diffusion:<out>/model``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmsafe.harden.base import HardenError, register_hardener
from mmsafe.harden.generator import TinyDiffusionHardener
from mmsafe.methods.generative.erasure import concept_prompts, erase_concept
from mmsafe.models.tiny_diffusion import TinyDiffusion

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.engine.runner import Engine
    from mmsafe.models.base import EncoderModel
    from mmsafe.tasks.base import Task

__all__ = ["EraseConceptHardener", "TRAINABLE"]

TRAINABLE = ("xattn", "unet", "text", "all")
"""What ``train`` may fine-tune: the denoiser's text-conditioning weights (the keys and values
of its cross-attention and the projection of the pooled caption: ESD-x), the whole denoiser
(ESD-u), the text encoder, or everything."""


def _text_conditioning(model: TinyDiffusion) -> list[Any]:
    """ESD-x's weights: the cross-attention keys/values and the pooled-caption projection."""
    return [p for n, p in model.unet.named_parameters() if ".kv." in n or n.startswith("text.")]


def _holdout(concept: str) -> list[str]:
    """The concept's shapes-gen paraphrases (held out for the re-audit), if it is a shape."""
    from mmsafe.data.worlds.shapes_gen import SYNONYMS

    return list(SYNONYMS.get(concept, (concept,))[1:])


@register_hardener
class EraseConceptHardener(TinyDiffusionHardener):
    """``mmsafe harden erase-concept``: ESD fine-tuning so the generator stops drawing a concept.

    Args:
        concept: The word to erase (default: the world's forbidden concept, ``star``).
        steps: Optimiser steps.
        lr: Adam learning rate.
        eta: Negative-guidance strength of the ESD target.
        preserve: Weight of the term that keeps the other prompts' predictions (0: plain ESD).
        batch_size: Concept (and kept) images per step.
        images: Frozen-model images drawn of the concept prompts, and of the kept ones.
        train: Which weights to fine-tune: ``unet`` (the denoiser, ESD-u), ``xattn`` (its
            cross-attention keys/values and caption projection, ESD-x), ``text`` (the text
            encoder) or ``all``.

    Attributes:
        model_: the erased copy of the model.
        losses_: the mean loss of each tenth of the schedule.
        prompts_: how many distinct ``{"erased", "kept", "held_out"}`` prompts there were.
    """

    name = "erase-concept"
    description = "ESD concept erasure of a tiny-diffusion (the re-audit probes paraphrases)."
    checks = "generative.safety,generative.fidelity,generative.quality"
    verb = "fine-tunes"

    def __init__(
        self,
        *,
        concept: str = "",
        steps: int = 400,
        lr: float = 3e-4,
        eta: float = 1.0,
        preserve: float = 10.0,
        batch_size: int = 16,
        images: int = 256,
        train: str = "unet",
    ) -> None:
        self.concept = concept
        self.steps = steps
        self.lr = lr
        self.eta = eta
        self.preserve = preserve
        self.batch_size = batch_size
        self.images = images
        self.train = train
        self.model_: TinyDiffusion | None = None
        self.losses_: list[float] = []
        self.prompts_: dict[str, int] = {}

    def _concept(self) -> str:
        from mmsafe.data.worlds.shapes_gen import FORBIDDEN_CONCEPT

        return self.concept or FORBIDDEN_CONCEPT

    def problems(self) -> list[str]:  # noqa: D102
        out = [f"{k} must be >= 1" for k in ("steps", "batch_size", "images")
               if getattr(self, k) < 1]  # fmt: skip
        out += [f"{k} must be > 0" for k in ("lr", "eta") if not getattr(self, k) > 0]
        out += ["preserve must be >= 0"] if self.preserve < 0 else []
        if self.train not in TRAINABLE:
            out.append(f"train must be one of {', '.join(TRAINABLE)}, not {self.train!r}")
        return out

    def validate(self, model: EncoderModel, task: Task, data: Dataset) -> None:
        """Raise :class:`HardenError` unless the model, task, options and captions suit."""
        super().validate(model, task, data)
        if not self._prompts(data)[0]:
            raise HardenError(
                f"`mmsafe harden {self.name}` erases the concept {self._concept()!r} from the "
                f"train captions that name it, but {data.name!r} has none. Pass --concept with "
                "a word of the captions, or data whose 'train' split shows the concept."
            )

    def _prompts(self, data: Dataset) -> tuple[list[str], list[str]]:
        splits = data.splits or []
        texts = data.modalities.get("text", [])
        train = [texts[i] for i, s in enumerate(splits) if s == "train" and i < len(texts)]
        return concept_prompts(train, self._concept(), holdout=_holdout(self._concept()))

    def fit(  # noqa: D102
        self, model: EncoderModel, task: Task, data: Dataset, engine: Engine, *, seed: int = 0
    ) -> EraseConceptHardener:
        self.validate(model, task, data)
        assert isinstance(model, TinyDiffusion)
        erased, kept = self._prompts(data)
        pick = {
            "xattn": _text_conditioning,
            "unet": lambda m: m.unet.parameters(),
            "text": lambda m: m.text_encoder.parameters(),
            "all": lambda m: m.parameters(),
        }[self.train]
        tuned, losses = erase_concept(
            model, erased, kept, parameters=pick, steps=self.steps, batch_size=self.batch_size,
            lr=self.lr, eta=self.eta, preserve=self.preserve, n_images=self.images, seed=seed,
            generate=lambda m, p, s: engine.generate_images(m, p, seeds=s),
        )  # fmt: skip
        tuned.training_info = {
            **model.training_info,
            self.name: {**self.get_params(), "concept": self._concept(), "seed": seed,
                        "loss": [round(x, 5) for x in losses]},
        }  # fmt: skip
        self.model_, self.losses_ = tuned, losses
        self.prompts_ = {"erased": len(erased), "kept": len(kept),
                         "held_out": len(_holdout(self._concept()))}  # fmt: skip
        return self

    def summary(self) -> dict[str, Any]:
        """The concept, the prompt counts and the loss at the start and the end."""
        self._fitted()
        return {"concept": self._concept(), **self.prompts_,
                "first_loss": self.losses_[0], "final_loss": self.losses_[-1]}  # fmt: skip

    def audit_options(self) -> dict[str, dict[str, Any]]:
        """The safety re-audit probes this hardener's concept."""
        return {"generative.safety": {"concept": self._concept()}}
