"""Outcomes of a step, as values: a step never returns ``None`` for "dropped".

Reasons are short snake_case literals; they double as metric labels and as the ``dlq_reason``
header of dead letters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Ok(Generic[T]):
    value: T
    warnings: tuple["Warn", ...] = ()


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The message is refused: it goes to ``events_dead_letter`` with this reason."""

    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Warn:
    """An ingestion warning (``ingestion_warnings`` topic and table)."""

    type: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Drop:
    """The event is not ingested, on purpose; always paired with a warning saying why."""

    reason: str
    warning: Warn


Outcome = Ok[T] | DeadLetter | Drop
