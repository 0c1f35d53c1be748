"""The common record every task loader produces, and the report of what a loader could not use."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Probe:
    """One evaluation prompt with its expected answer (first alias, as KnowEdit keeps)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class KeyProbe:
    """A key of original knowledge the diagnostics watch: read at the last token of ``subject`` in
    ``prompt`` (or the prompt's last token when ``subject`` is None). ``record``/``key``/``item``
    name the locality item it stands for (record index, locality sub-key, position), if any."""

    prompt: str
    subject: str | None = None
    record: int | None = None
    key: str | None = None
    item: int | None = None


@dataclass
class EditRecord:
    """One edit and everything that is evaluated around it.

    ``index`` is the record's position in its source file, so a per-record log can name it.
    ``portability`` / ``locality`` map a sub-key (``Reasoning``, ``Relation_Specificity``, ...)
    to its probes. ``extra`` holds task-specific payloads (ConvSent replies, Sanitation kind).
    ``reference_stops`` says why the reference could not score the record (a sub-key present in the
    data with no item left, an answer list it cannot take a first alias of); see
    :mod:`knowbench.metric_protocol`.
    """

    index: int
    source: str
    prompt: str
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrase: list[str] = field(default_factory=list)
    portability: dict[str, list[Probe]] = field(default_factory=dict)
    locality: dict[str, list[Probe]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    reference_stops: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BadRecord:
    """A record (or one item inside it) a loader could not use, and why."""

    source: str
    index: int
    reason: str
    item: str | None = None  # e.g. "portability.Reasoning[2]" when only an item was skipped
    record_dropped: bool = True

    def __str__(self) -> str:
        where = f"{Path(self.source).name} record {self.index}"
        if self.item:
            where += f" {self.item}"
        action = "record skipped" if self.record_dropped else "item skipped"
        return f"{where}: {self.reason} ({action})"


@dataclass
class LoadReport:
    records: list[EditRecord]
    bad: list[BadRecord]
    files: list[Path]
    format: str  # which schema was recognised, e.g. "knowedit-zsre", "raw-zsre"
    n_raw: int  # records in the file(s), before anything was skipped
    shared: dict[str, Any] = field(default_factory=dict)  # task-wide data (Sanitation locality)

    @property
    def n_dropped(self) -> int:
        return sum(1 for b in self.bad if b.record_dropped)
