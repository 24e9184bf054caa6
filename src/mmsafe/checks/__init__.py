"""Checks: the contract, the registry and the built-in checks (imported here to register)."""

from mmsafe.checks.adversarial import AdversarialCheck
from mmsafe.checks.anomaly import AnomalyCheck
from mmsafe.checks.base import PILLARS, AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.calibration import CalibrationCheck
from mmsafe.checks.conformal import ConformalCheck
from mmsafe.checks.efficiency import EfficiencyCheck
from mmsafe.checks.explain import ExplainCheck
from mmsafe.checks.fairness import FairnessCheck
from mmsafe.checks.modality import ModalityCheck
from mmsafe.checks.ood import OODCheck
from mmsafe.checks.performance import PerformanceCheck
from mmsafe.checks.privacy import PrivacyCheck
from mmsafe.checks.registry import (
    CheckSelectionError,
    get_check,
    list_checks,
    register_check,
    select_checks,
)
from mmsafe.checks.shift import ShiftCheck
from mmsafe.checks.slices import SlicesCheck
from mmsafe.checks.uncertainty import UncertaintyCheck

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
