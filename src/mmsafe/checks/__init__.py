"""Checks: the contract, the registry and the built-in checks (imported here to register).

A check's name leads to its file: ``monitoring.conformal`` is ``checks/monitoring/conformal.py``.
"""

from mmsafe.checks.alignment.hallucination import HallucinationCheck
from mmsafe.checks.alignment.jailbreak import JailbreakCheck
from mmsafe.checks.alignment.judge import JudgeCheck
from mmsafe.checks.base import (
    PILLARS,
    TARGET_KINDS,
    AuditContext,
    Check,
    CheckResult,
    Finding,
    Metric,
)
from mmsafe.checks.controllability.explain import ExplainCheck
from mmsafe.checks.controllability.fairness import FairnessCheck
from mmsafe.checks.controllability.privacy import PrivacyCheck
from mmsafe.checks.controllability.rec_fairness import RecFairnessCheck
from mmsafe.checks.controllability.rec_privacy import RecPrivacyCheck
from mmsafe.checks.efficiency.profile import EfficiencyCheck
from mmsafe.checks.generative.bias import GenerativeBiasCheck
from mmsafe.checks.generative.fidelity import GenerativeFidelityCheck
from mmsafe.checks.generative.memorization import GenerativeMemorizationCheck
from mmsafe.checks.generative.provenance import GenerativeProvenanceCheck
from mmsafe.checks.generative.quality import GenerativeQualityCheck
from mmsafe.checks.generative.safety import GenerativeSafetyCheck
from mmsafe.checks.generative.watermark import GenerativeWatermarkCheck
from mmsafe.checks.monitoring.anomaly import AnomalyCheck
from mmsafe.checks.monitoring.calibration import CalibrationCheck
from mmsafe.checks.monitoring.cold_start import ColdStartCheck
from mmsafe.checks.monitoring.conformal import ConformalCheck
from mmsafe.checks.monitoring.label_noise import LabelNoiseCheck
from mmsafe.checks.monitoring.ood import OODCheck
from mmsafe.checks.monitoring.slices import SlicesCheck
from mmsafe.checks.monitoring.uncertainty import UncertaintyCheck
from mmsafe.checks.performance.classification import PerformanceCheck
from mmsafe.checks.performance.ranking import RankingCheck
from mmsafe.checks.performance.retrieval import RetrievalPerformanceCheck
from mmsafe.checks.registry import (
    CheckSelectionError,
    check_aliases,
    get_check,
    list_checks,
    register_check,
    resolve_check,
    select_checks,
)
from mmsafe.checks.robustness.adversarial.check import AdversarialCheck, AdversarialRetrievalCheck
from mmsafe.checks.robustness.item_promotion import ItemPromotionCheck
from mmsafe.checks.robustness.modality import ModalityCheck, ModalitySeqRecCheck
from mmsafe.checks.robustness.shift import ShiftCheck, ShiftRetrievalCheck, ShiftSeqRecCheck
from mmsafe.checks.robustness.shilling import ShillingCheck

__all__ = [
    "PILLARS",
    "TARGET_KINDS",
    "AdversarialCheck",
    "AdversarialRetrievalCheck",
    "AnomalyCheck",
    "AuditContext",
    "CalibrationCheck",
    "ColdStartCheck",
    "Check",
    "CheckResult",
    "CheckSelectionError",
    "ConformalCheck",
    "EfficiencyCheck",
    "GenerativeBiasCheck",
    "GenerativeFidelityCheck",
    "GenerativeMemorizationCheck",
    "GenerativeProvenanceCheck",
    "GenerativeQualityCheck",
    "GenerativeSafetyCheck",
    "GenerativeWatermarkCheck",
    "ExplainCheck",
    "FairnessCheck",
    "Finding",
    "HallucinationCheck",
    "JailbreakCheck",
    "JudgeCheck",
    "LabelNoiseCheck",
    "Metric",
    "ItemPromotionCheck",
    "ModalityCheck",
    "ModalitySeqRecCheck",
    "OODCheck",
    "PerformanceCheck",
    "RankingCheck",
    "RecFairnessCheck",
    "RecPrivacyCheck",
    "PrivacyCheck",
    "RetrievalPerformanceCheck",
    "ShiftCheck",
    "ShillingCheck",
    "ShiftRetrievalCheck",
    "ShiftSeqRecCheck",
    "SlicesCheck",
    "UncertaintyCheck",
    "check_aliases",
    "get_check",
    "list_checks",
    "register_check",
    "resolve_check",
    "select_checks",
]
