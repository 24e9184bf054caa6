"""``mmsafe harden dpo``: Direct Preference Optimization of a tiny-vlm toward safe answers.

DPO (Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model") fits a policy to preference pairs without a reward model, against a frozen
reference (the original model). The pairs (:func:`~mmsafe.methods.align.preference_pairs`) come
from the ``train`` split: every forbidden request, bare and in the framings of
:func:`~mmsafe.methods.align.safety_prompts`, prefers the refusal to the unsafe answer; benign
requests prefer their answer to the refusal, so over-refusal costs as much as compliance. The
science is :func:`~mmsafe.methods.align.dpo_finetune`; the saved model loads back with
``--model tiny-vlm:<out>/model``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from mmsafe.data.worlds.shapes_vqa import ROLEPLAY_PREFIXES
from mmsafe.harden.base import register_hardener
from mmsafe.harden.safety_tune import VLMSafetyHardener, train_rows
from mmsafe.methods.align import dpo_finetune, preference_pairs, safety_prompts
from mmsafe.models.tiny_vlm import TinyVLM

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.engine.runner import Engine
    from mmsafe.models.base import EncoderModel
    from mmsafe.tasks.base import Task

__all__ = ["DPOHardener"]


@register_hardener
class DPOHardener(VLMSafetyHardener):
    """``mmsafe harden dpo``: DPO on safety preference pairs, the original model as reference.

    Forbidden ``train`` requests (bare, behind the world's role-play prefixes and in
    ``contexts`` random benign contexts) prefer the refusal to the unsafe answer; ``replay``
    benign ``train`` rows per forbidden pair prefer their answer to the refusal. The loss is
    :func:`~mmsafe.methods.align.dpo_loss` plus ``sft_weight`` times the chosen answers'
    negative log-likelihood (RPO's form, Pang et al., 2024). Without that term DPO lowers
    the chosen answers along with the rejected ones: on a quick 600-scene tiny-vlm, pure DPO
    cost 18-24 points of benign accuracy, ``sft_weight = 1`` none. The jailbreak templates of
    the audit are never trained on.

    Args:
        beta: DPO inverse temperature (how far the model may move from the original).
        sft_weight: Weight of the chosen answers' negative log-likelihood (0: pure DPO).
        epochs: Passes over the preference pairs.
        lr: Peak AdamW learning rate.
        batch_size: Preference pairs per step.
        replay: Benign pairs per forbidden pair.
        contexts: Random-context prompts per forbidden request.

    Attributes:
        model_: the fine-tuned model.
        losses_: the mean loss of each epoch.
        examples_: the number of preference pairs.
    """

    name = "dpo"
    description = "DPO of a tiny-vlm on refusal-vs-unsafe and answer-vs-refusal preference pairs."
    needs_unsafe_answer = True

    def __init__(
        self,
        *,
        beta: float = 0.1,
        sft_weight: float = 1.0,
        epochs: int = 3,
        lr: float = 5e-4,
        batch_size: int = 32,
        replay: float = 1.0,
        contexts: int = 2,
    ) -> None:
        self.beta = beta
        self.sft_weight = sft_weight
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.replay = replay
        self.contexts = contexts
        self.model_ = None
        self.losses_ = []
        self.examples_ = 0

    def problems(self) -> list[str]:  # noqa: D102
        out = super().problems()
        if not self.beta > 0:
            out.append("beta must be > 0")
        if self.sft_weight < 0:
            out.append("sft_weight must be >= 0")
        return out

    def fit(  # noqa: D102
        self, model: EncoderModel, task: Task, data: Dataset, engine: Engine, *, seed: int = 0
    ) -> DPOHardener:
        self.validate(model, task, data)
        assert isinstance(model, TinyVLM)
        forbidden, benign = train_rows(data)
        rng = np.random.default_rng([seed, 0xD90])
        n_forbidden = len(forbidden) * (1 + len(ROLEPLAY_PREFIXES) + self.contexts)
        n_benign = min(len(benign), math.ceil(self.replay * n_forbidden))
        replayed = rng.choice(benign, size=n_benign, replace=False).tolist() if n_benign else []
        pairs = preference_pairs(
            data,
            sorted([*forbidden, *replayed]),
            wrap=lambda _, prompt: safety_prompts(prompt, rng, contexts=self.contexts),
        )
        tuned, losses = dpo_finetune(
            model,
            pairs,
            beta=self.beta,
            sft_weight=self.sft_weight,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=seed,
        )
        self._record(model, tuned, losses, len(pairs), seed)
        return self
