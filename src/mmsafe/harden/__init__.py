"""Hardeners: fitted transformations that make a model safer to deploy.

Every hardener is a :class:`~mmsafe.harden.base.Hardener` (``fit`` / ``transform`` /
``summary`` / ``save``), registered by name (:func:`~mmsafe.harden.base.get_hardener`,
:func:`~mmsafe.harden.base.list_hardeners`), and run by the one flow
:func:`mmsafe.harden.flow.harden` (audit before, fit, transform, audit after, delta), which
``mmsafe harden <name>`` calls:

* ``calibration`` -- :class:`~mmsafe.harden.calibration.TemperatureHardener`: post-hoc
  temperature scaling of logits (:class:`~mmsafe.harden.calibration.TemperatureScaler`).
* ``conformal`` -- :class:`~mmsafe.harden.conformal.ConformalHardener`: an exported conformal
  predictor.
* ``adversarial`` -- :mod:`mmsafe.harden.robust`: FARE adversarial fine-tuning of the image
  tower, WiSE-FT.
* ``dp`` -- :mod:`mmsafe.harden.dp`: DP-SGD (opacus) training of a fusion head.
* ``dp-clip`` -- :mod:`mmsafe.harden.dp_clip`: DP-CLIP contrastive fine-tuning of tiny-clip.
* ``unlearn`` -- :mod:`mmsafe.harden.unlearn`: forget training rows of a fusion head
  (MultiDelete, gradient ascent), checked against retraining from scratch.
* ``unlearn-rec`` -- :mod:`mmsafe.harden.unlearn_rec`: forget users' interactions in a sequential
  recommender (NegGrad+), checked against retraining from scratch.
* ``fairness`` -- :mod:`mmsafe.harden.fairness`: group norming (pre), an adversarial fusion
  head (in) and fairlearn group thresholds (post), with a before/after fairness table.
* ``denoise`` -- :mod:`mmsafe.harden.denoise`: GUIDER-style denoising of a recommender's
  implicit feedback (content re-calibration, DBPR, OT-guided distillation; ``docs/denoise.md``).
* ``safety-tune``, ``dpo``, ``adversarial-vlm`` -- :mod:`mmsafe.harden.safety_tune`,
  :mod:`mmsafe.harden.dpo`, :mod:`mmsafe.harden.adversarial_vlm`: a vision-language model's
  VLGuard-style safety fine-tuning, direct preference optimisation, and adversarial training
  against visual jailbreaks (``docs/alignment.md``).
* ``erase-concept``, ``memorization`` -- :mod:`mmsafe.harden.erase_concept`,
  :mod:`mmsafe.harden.memorization` (on :class:`~mmsafe.harden.generator.TinyDiffusionHardener`):
  ESD concept erasure and dedupe/randomise-then-retrain of a tiny-diffusion
  (``docs/generative.md``).

Without a command: :func:`~mmsafe.harden.calibration.cml_finetune` (CML regularisation of a
fusion head) and :mod:`mmsafe.harden.federated` (FedAvg training of a fusion head over
simulated non-IID clients with missing modalities; flwr, optional extra ``fl``).

Import them explicitly (``from mmsafe.harden.unlearn import unlearn_fusion``): their optional
dependencies load only then.
"""

from mmsafe.harden.base import (
    Hardened,
    Hardener,
    HardenError,
    HardenResult,
    get_hardener,
    list_hardeners,
    register_hardener,
)
from mmsafe.harden.calibration import (
    TemperatureHardener,
    TemperatureScaler,
    cml_finetune,
    cml_loss,
    fit_temperature,
    temperature_nll,
)

__all__ = [
    "HardenError",
    "HardenResult",
    "Hardened",
    "Hardener",
    "TemperatureHardener",
    "TemperatureScaler",
    "cml_finetune",
    "cml_loss",
    "fit_temperature",
    "get_hardener",
    "list_hardeners",
    "register_hardener",
    "temperature_nll",
]
