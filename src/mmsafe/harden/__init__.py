"""Hardeners: fitted transformations that make a model safer to deploy.

* :class:`~mmsafe.harden.calibration.TemperatureScaler` -- post-hoc temperature scaling of
  logits (fit on a held-out calibration split).
* :func:`~mmsafe.harden.calibration.cml_finetune` -- CML regularisation of a fusion head so that
  removing a modality never raises its confidence.

* :mod:`mmsafe.harden.robust` -- FARE adversarial fine-tuning of the image tower, WiSE-FT.
* :mod:`mmsafe.harden.dp` -- DP-SGD (opacus) training of a fusion head.
* :mod:`mmsafe.harden.unlearn` -- forget training rows of a fusion head (MultiDelete, gradient
  ascent), checked against retraining from scratch.
* :mod:`mmsafe.harden.fairness` -- group norming (pre), an adversarial fusion head (in) and
  fairlearn group thresholds (post), with a before/after fairness table.
* :mod:`mmsafe.harden.federated` -- FedAvg training of a fusion head over simulated non-IID
  clients with missing modalities (flwr; optional extra ``fl``).

Import them explicitly (``from mmsafe.harden.unlearn import unlearn_fusion``): their optional
dependencies load only then. The end-to-end "harden, then re-audit" flows live in
:mod:`mmsafe.harden.flow`.
"""

from mmsafe.harden.calibration import (
    TemperatureScaler,
    cml_finetune,
    cml_loss,
    fit_temperature,
    temperature_nll,
)

__all__ = [
    "TemperatureScaler",
    "cml_finetune",
    "cml_loss",
    "fit_temperature",
    "temperature_nll",
]
