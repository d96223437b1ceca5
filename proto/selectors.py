"""Label selectors and node affinity: which labels, and which hosts, a rule or a VM asks for."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hvplace.proto.records import Host


class Op(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"
    GT = "Gt"
    LT = "Lt"


@dataclass(frozen=True, slots=True)
class LabelExpression:
    key: str
    operator: Op
    values: tuple[str, ...] = ()

    def matches_value(self, value: str | None) -> bool:
        op = self.operator
        if op is Op.IN:
            return value is not None and value in self.values
        if op is Op.NOT_IN:
            return value is None or value not in self.values
        if op is Op.EXISTS:
            return value is not None
        if op is Op.DOES_NOT_EXIST:
            return value is None
        if value is None:
            return False
        try:
            number = int(value)
        except ValueError:
            return False
        bound = int(self.values[0])
        return number > bound if op is Op.GT else number < bound

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.matches_value(labels.get(self.key))

    def __str__(self) -> str:
        if self.operator in (Op.EXISTS, Op.DOES_NOT_EXIST):
            return f"{self.key} {self.operator.value}"
        return f"{self.key} {self.operator.value} ({', '.join(self.values)})"


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """Kubernetes-style selector: all of match_labels and all expressions must hold."""

    match_labels: Mapping[str, str] = field(default_factory=dict)
    match_expressions: tuple[LabelExpression, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        for k, v in self.match_labels.items():
            if labels.get(k) != v:
                return False
        return all(e.matches(labels) for e in self.match_expressions)

    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions


@dataclass(frozen=True, slots=True)
class NodeSelectorTerm:
    """All expressions must hold (AND); a host label key `host` means the host name."""

    match_expressions: tuple[LabelExpression, ...] = ()

    def matches(self, host: Host) -> bool:
        return all(e.matches_value(host.label(e.key)) for e in self.match_expressions)


@dataclass(frozen=True, slots=True)
class PreferredTerm:
    weight: int
    term: NodeSelectorTerm


@dataclass(frozen=True, slots=True)
class NodeAffinity:
    """`required`: at least one term must match (OR). `preferred`: weights summed."""

    required: tuple[NodeSelectorTerm, ...] = ()
    preferred: tuple[PreferredTerm, ...] = ()

    def admits(self, host: Host) -> bool:
        return not self.required or any(t.matches(host) for t in self.required)

    def score(self, host: Host) -> int:
        return sum(p.weight for p in self.preferred if p.term.matches(host))
