"""Hardeners: fitted transformations that make a model safer to deploy.

* :class:`~mmsafe.harden.calibration.TemperatureScaler` -- post-hoc temperature scaling of
  logits (fit on a held-out calibration split).
* :func:`~mmsafe.harden.calibration.cml_finetune` -- CML regularisation of a fusion head so that
  removing a modality never raises its confidence.

The end-to-end "harden, then re-audit" flows live in :mod:`mmsafe.hardening`.
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
