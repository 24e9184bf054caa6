"""Checks: the contract, the registry and the built-in checks (imported here to register)."""

from mmsafe.checks.base import PILLARS, AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.controllability.explain import ExplainCheck
from mmsafe.checks.controllability.fairness import FairnessCheck
from mmsafe.checks.controllability.privacy import PrivacyCheck
from mmsafe.checks.efficiency.profile import EfficiencyCheck
from mmsafe.checks.monitoring.anomaly import AnomalyCheck
from mmsafe.checks.monitoring.calibration import CalibrationCheck
from mmsafe.checks.monitoring.conformal import ConformalCheck
from mmsafe.checks.monitoring.ood import OODCheck
from mmsafe.checks.monitoring.slices import SlicesCheck
from mmsafe.checks.monitoring.uncertainty import UncertaintyCheck
from mmsafe.checks.performance.classification import PerformanceCheck
from mmsafe.checks.registry import (
    CheckSelectionError,
    get_check,
    list_checks,
    register_check,
    select_checks,
)
from mmsafe.checks.robustness.adversarial.check import AdversarialCheck
from mmsafe.checks.robustness.modality import ModalityCheck
from mmsafe.checks.robustness.shift import ShiftCheck

__all__ = [
    "PILLARS",
    "AdversarialCheck",
    "AnomalyCheck",
    "AuditContext",
    "CalibrationCheck",
    "Check",
    "ConformalCheck",
    "EfficiencyCheck",
    "ExplainCheck",
    "FairnessCheck",
    "CheckResult",
    "CheckSelectionError",
    "Finding",
    "Metric",
    "ModalityCheck",
    "OODCheck",
    "PerformanceCheck",
    "PrivacyCheck",
    "ShiftCheck",
    "SlicesCheck",
    "UncertaintyCheck",
    "get_check",
    "list_checks",
    "register_check",
    "select_checks",
]
