"""``mmsafe harden adversarial-vlm``: adversarial training of a tiny-vlm against visual jailbreaks.

A visual jailbreak (Qi et al., 2023, "Visual Adversarial Examples Jailbreak Aligned Large
Language Models") perturbs the image so the forbidden answer becomes likely. Adversarial
training (Madry et al., 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks")
answers it in kind: in every batch of every epoch, the ``train`` split's forbidden requests get
a fresh PGD image (L-inf ``eps``, a few steps, against the current weights) that maximises the
unsafe answer's likelihood, and the model is trained to refuse on it, mixed with benign
``train`` rows on clean images so it keeps its skills. The science is
:func:`~mmsafe.methods.align.adversarial_finetune`; the saved model loads back with
``--model tiny-vlm:<out>/model``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from mmsafe.harden.base import register_hardener
from mmsafe.harden.safety_tune import VLMSafetyHardener, train_rows
from mmsafe.methods.align import adversarial_finetune, preference_pairs
from mmsafe.models.tiny_vlm import TinyVLM

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.engine.runner import Engine
    from mmsafe.models.base import EncoderModel
    from mmsafe.tasks.base import Task

__all__ = ["AdversarialVLMHardener"]


@register_hardener
class AdversarialVLMHardener(VLMSafetyHardener):
    """``mmsafe harden adversarial-vlm``: PGD adversarial training toward the refusal.

    Each batch, the forbidden ``train`` requests in it get a PGD image (random start, ``steps``
    steps of ``2.5 * eps / steps``) that makes the unsafe answer likely under the current
    weights; the model is trained to give the refusal on it, and the ``replay`` benign rows per
    forbidden one their answers on clean images. Batch norm keeps the original statistics.

    Args:
        eps: PGD training budget (L-inf, in [0, 1] pixels).
        steps: PGD steps per training batch.
        epochs: Passes over the training rows.
        lr: Peak AdamW learning rate.
        batch_size: Rows per step.
        replay: Clean benign rows per forbidden row.

    Attributes:
        model_: the fine-tuned model.
        losses_: the mean loss (negative log-likelihood per row) of each epoch.
        examples_: the number of training rows (forbidden + replayed benign).
    """

    name = "adversarial-vlm"
    description = "Adversarial training of a tiny-vlm to refuse on PGD visual jailbreaks."
    needs_unsafe_answer = True

    def __init__(
        self,
        *,
        eps: float = 16 / 255,
        steps: int = 5,
        epochs: int = 3,
        lr: float = 5e-4,
        batch_size: int = 32,
        replay: float = 4.0,
    ) -> None:
        self.eps = eps
        self.steps = steps
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.replay = replay
        self.model_ = None
        self.losses_ = []
        self.examples_ = 0

    def problems(self) -> list[str]:  # noqa: D102
        out = super().problems()
        if not self.eps > 0:
            out.append("eps must be > 0")
        if self.steps < 1:
            out.append("steps must be >= 1")
        return out

    def fit(  # noqa: D102
        self, model: EncoderModel, task: Task, data: Dataset, engine: Engine, *, seed: int = 0
    ) -> AdversarialVLMHardener:
        self.validate(model, task, data)
        assert isinstance(model, TinyVLM)
        forbidden, benign = train_rows(data)
        rng = np.random.default_rng([seed, 0xAD7])
        n_benign = min(len(benign), math.ceil(self.replay * len(forbidden)))
        replayed = rng.choice(benign, size=n_benign, replace=False).tolist() if n_benign else []
        images, texts = data.modalities["image"], data.modalities["text"]
        clean = [(images[i], str(texts[i]), str(data.meta[i]["answer"])) for i in replayed]
        tuned, losses = adversarial_finetune(
            model,
            preference_pairs(data, forbidden),
            clean,
            eps=self.eps,
            steps=self.steps,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=seed,
        )
        self._record(model, tuned, losses, len(forbidden) + len(clean), seed)
        return self
