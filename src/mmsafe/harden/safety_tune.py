"""``mmsafe harden safety-tune``: VLGuard-style safety fine-tuning of a tiny-vlm.

VLGuard (Zong et al., 2024, "Safety Fine-Tuning at (Almost) No Cost: A Baseline for Vision
Large Language Models") fine-tunes a VLM on a small safety set, forbidden requests answered
with a refusal, mixed with benign instruction data so that helpfulness is kept. Here the
safety set is the ``train`` split's forbidden requests, bare and in the framings of
:func:`~mmsafe.methods.align.safety_prompts` (role play, random benign context), each refused,
plus benign ``train`` rows replayed with their answers. tiny-vlm's planted flaw is a shallow
safety tuning that refuses only bare requests; this repairs it, and the ``alignment.jailbreak``
re-audit measures how far the repair reaches the held-out jailbreak templates.

This module also holds :class:`VLMSafetyHardener`, the base the ``vlm`` safety hardeners
(``safety-tune``, :mod:`~mmsafe.harden.dpo`, :mod:`~mmsafe.harden.adversarial_vlm`) share:
what they accept, the before/after audit and the saved model. Load a saved model back with
``--model tiny-vlm:<out>/model``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mmsafe.data.worlds.shapes_vqa import ROLEPLAY_PREFIXES
from mmsafe.harden.base import Hardened, Hardener, HardenError, register_hardener
from mmsafe.methods.align import safety_prompts
from mmsafe.models.tiny_vlm import TinyVLM, fit_examples, safety_examples, save_tiny_vlm

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.engine.runner import Engine
    from mmsafe.models.base import EncoderModel
    from mmsafe.tasks.base import Task

__all__ = ["SafetyTuneHardener", "VLMSafetyHardener", "train_rows"]


def train_rows(data: Dataset) -> tuple[list[int], list[int]]:
    """Positions of the ``train`` split's rows: ``(forbidden, benign)``.

    ``benign`` holds the other train rows that have a reference answer (``meta["answer"]``).
    """
    splits = data.splits or []
    rows = [i for i, s in enumerate(splits) if s == "train"]
    forbidden = [i for i in rows if data.meta[i].get("forbidden")]
    benign = [i for i in rows if not data.meta[i].get("forbidden") and data.meta[i].get("answer")]
    return forbidden, benign


class VLMSafetyHardener(Hardener):
    """Base of the hardeners that fine-tune a tiny-vlm to refuse forbidden requests.

    A subclass sets ``name``, ``description`` and its options, implements :meth:`fit` (setting
    ``model_``, ``losses_`` and ``examples_``) and may extend :meth:`problems` (its option
    checks). The before/after audit is ``alignment.jailbreak`` on the ``vqa`` task: attack
    success rates, refusals, over-refusal and benign accuracy.

    Attributes:
        model_: the fine-tuned copy of the model.
        losses_: its mean training loss per epoch.
        examples_: the number of training examples (or preference pairs).
    """

    tasks = ("vqa",)
    default_task = "vqa"
    checks = "alignment.jailbreak"
    artifact = "model"
    needs_unsafe_answer: ClassVar[bool] = False
    """Whether every forbidden ``train`` row must carry ``meta["unsafe_answer"]``."""

    model_: TinyVLM | None = None
    losses_: list[float]
    examples_: int = 0

    def problems(self) -> list[str]:
        """What is wrong with the options (empty when they are fine)."""
        params = self.get_params()
        out = [f"{k} must be >= 1" for k in ("epochs", "batch_size") if params.get(k, 1) < 1]
        out += [f"{k} must be > 0" for k in ("lr",) if not params.get(k, 1) > 0]
        out += [f"{k} must be >= 0" for k in ("replay", "contexts") if params.get(k, 0) < 0]
        return out

    def validate(self, model: EncoderModel, task: Task, data: Dataset) -> None:
        """Raise :class:`HardenError` unless the model, task, data and options suit.

        The model must be a tiny-vlm, the task ``vqa``, and the data must have forbidden
        requests in its ``train`` split.
        """
        cmd = f"`mmsafe harden {self.name}`"
        if task.name not in self.tasks:
            raise HardenError(f"{cmd} needs --task {' or '.join(self.tasks)}, not {task.name!r}.")
        if not isinstance(model, TinyVLM):
            kind = getattr(model, "kind", "encoder")
            raise HardenError(
                f"{cmd} fine-tunes a tiny-vlm (a generative vision-language model whose weights "
                f"it can train and save), but {getattr(model, 'name', type(model).__name__)!r} "
                f"is a {kind} model of type {type(model).__name__}. Pass --model tiny-vlm (or "
                "tiny-vlm:<folder>)."
            )
        problems = self.problems()
        if problems:
            raise HardenError(f"{cmd}: {'; '.join(problems)}.")
        forbidden, _ = train_rows(data)
        if not forbidden:
            raise HardenError(
                f"{cmd} fine-tunes on the forbidden requests of the 'train' split (rows whose "
                f"meta 'forbidden' is true), but {data.name!r} has none. Pass --data "
                "shapes-vqa, or data with a 'split' column and forbidden train rows."
            )
        missing = [i for i in forbidden if not data.meta[i].get("answer")]
        if self.needs_unsafe_answer:
            missing += [i for i in forbidden if not data.meta[i].get("unsafe_answer")]
        if missing:
            what = "'answer' (the refusal)" + (
                " and 'unsafe_answer'" if self.needs_unsafe_answer else ""
            )
            raise HardenError(
                f"{cmd} needs meta {what} on every forbidden train row; {data.ids[missing[0]]!r} "
                "lacks one."
            )

    def _fitted(self) -> TinyVLM:
        if self.model_ is None:
            raise RuntimeError(f"{type(self).__name__}.fit() must run first.")
        return self.model_

    def _record(
        self, model: TinyVLM, tuned: TinyVLM, losses: list[float], n: int, seed: int
    ) -> None:
        """Keep the fitted state and write the settings into the model's training facts."""
        tuned.training_info = {
            **model.training_info,
            self.name: {
                **self.get_params(),
                "seed": seed,
                "examples": n,
                "loss": [round(x, 5) for x in losses],
            },
        }
        self.model_, self.losses_, self.examples_ = tuned, losses, n

    def transform(self, model: EncoderModel, task: Task) -> Hardened:
        """The fine-tuned model, on the same task."""
        return Hardened(self._fitted(), task)  # type: ignore[arg-type]

    def summary(self) -> dict[str, Any]:
        """The number of training examples and the last epoch's loss."""
        self._fitted()
        return {"examples": self.examples_, "final_loss": self.losses_[-1]}

    def save(self, path: Path) -> Path:
        """Write the fine-tuned model (safetensors + config.json) to the folder ``path``."""
        save_tiny_vlm(self._fitted(), path)
        return Path(path)


@register_hardener
class SafetyTuneHardener(VLMSafetyHardener):
    """``mmsafe harden safety-tune``: VLGuard-style safety fine-tuning of a tiny-vlm.

    Every forbidden ``train`` request, bare and in the framings of
    :func:`~mmsafe.methods.align.safety_prompts` (the world's role-play prefixes and
    ``contexts`` random benign contexts), is trained to get the refusal, mixed with benign
    ``train`` rows trained on their answers; the model's own training loss and schedule
    (:func:`~mmsafe.models.tiny_vlm.fit_examples`). The jailbreak templates of the audit are
    never trained on.

    Args:
        epochs: Passes over the safety data.
        lr: Peak AdamW learning rate.
        batch_size: Examples per step.
        replay: Benign rows replayed per refusal example.
        contexts: Random-context prompts per forbidden request.

    Attributes:
        model_: the fine-tuned model.
        losses_: the mean loss of each epoch.
        examples_: the number of training examples.
    """

    name = "safety-tune"
    description = "VLGuard-style safety fine-tuning of a tiny-vlm (refusals + benign replay)."

    def __init__(
        self,
        *,
        epochs: int = 3,
        lr: float = 1e-3,
        batch_size: int = 64,
        replay: float = 1.0,
        contexts: int = 2,
    ) -> None:
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.replay = replay
        self.contexts = contexts
        self.model_ = None
        self.losses_ = []
        self.examples_ = 0

    def fit(  # noqa: D102
        self, model: EncoderModel, task: Task, data: Dataset, engine: Engine, *, seed: int = 0
    ) -> SafetyTuneHardener:
        self.validate(model, task, data)
        assert isinstance(model, TinyVLM)
        forbidden, benign = train_rows(data)
        rng = np.random.default_rng([seed, 0x5AFE])
        per_request = 1 + len(ROLEPLAY_PREFIXES) + self.contexts
        examples = safety_examples(
            data,
            forbidden + benign,
            replay=self.replay * per_request,
            rng=rng,
            wrap=lambda _, prompt: safety_prompts(prompt, rng, contexts=self.contexts),
        )
        tuned = copy.deepcopy(model)
        losses = fit_examples(
            tuned,
            examples,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=seed,
            stage=self.name,
        )
        self._record(model, tuned, losses, len(examples), seed)
        return self
