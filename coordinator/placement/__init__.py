"""The pure placement engine: rules compiled into groups, filters then scores, explain,
rule-change validation, failover admission and compliance. No IO, deterministic."""

from hvplace.coordinator.placement import reasons
from hvplace.coordinator.placement.admission import (
    AdmissionResult,
    Stranding,
    check_admission,
)
from hvplace.coordinator.placement.compliance import RuleCompliance, rule_compliance
from hvplace.coordinator.placement.engine import Batch, Plan, explain, place
from hvplace.coordinator.placement.validation import (
    validate_policy_change,
    validate_rule_change,
)

__all__ = [
    "AdmissionResult",
    "Batch",
    "Plan",
    "RuleCompliance",
    "Stranding",
    "check_admission",
    "explain",
    "place",
    "reasons",
    "rule_compliance",
    "validate_policy_change",
    "validate_rule_change",
]
