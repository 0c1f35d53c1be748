"""How a run's metrics are computed: KnowEdit's reference definitions, or named fixes of its artefacts.

A *metric protocol* is a name and a set of fixes. ``knowedit`` (the default) has none: every metric
is computed the way the reference implementation (EasyEdit, which produced KnowEdit's published
tables) computes it, artefacts included, so a knowbench number can be put beside a published one.
Each fix changes one such artefact, is named, and is recorded in the result
(``protocol.metrics``); ``knowbench`` is the preset with every fix. Results under different metric
protocols are different experiments: the leaderboard never ranks them together.

The core declares the fixes of what it computes itself (texts, teacher-forced scoring, Fluency,
sections of a record); a task plugin's metric family declares those of its own metrics
(``MetricFamily.fixes``). ``knowbench metric-protocols`` prints them all: what the reference does,
what the fix does, and why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .records import EditRecord, Probe

KNOWEDIT = "knowedit"
ALL_FIXES = "knowbench"


@dataclass(frozen=True)
class Fix:
    """One deliberate deviation from the reference: what the reference does, what the fix does, why."""

    name: str
    reference: str
    fix: str
    why: str


# Fixes of what the core computes. Task plugins add theirs through MetricFamily.fixes.
STRIP_WHITESPACE = Fix(
    "strip_whitespace",
    reference="Texts are scored as they are in the data file and joined as prompt + \" \" + target: a "
    "target that starts with a space gets a second one, which becomes a target token of its own.",
    fix="Surrounding whitespace is stripped from every text (prompts, targets, answers, replies) "
    "before editing and scoring, and prompt and target are joined by exactly one space.",
    why="A space token is not part of the answer: in ZsRE 10 targets start with a space and 68 of "
    "WikiBio's 306 prompts end with one; the reference scores e.g. ZsRE record 18 33.33 where the "
    "answer's own tokens score 50.00.",
)
PADDING_SAFE = Fix(
    "padding_safe",
    reference="Each list of prompts (a record's rephrases, one portability or locality sub-key) is one "
    "left-padded batch run with an attention mask but without position ids, so a shorter prompt "
    "starts at a later position; the target is what follows the prompt's own token count.",
    fix="Prompts are batched by length across records with explicit position ids (every sequence "
    "sees the positions it would see alone), and the target starts at the first token whose "
    "characters lie after the prompt.",
    why="With absolute position embeddings (GPT-2, GPT-J) a padded prompt is scored at the wrong "
    "positions, so an item's score depends on the other items of its sub-key; a token merging "
    "across the prompt/target boundary shifts the reference's target span.",
)
FLUENCY_CONTINUATION = Fix(
    "fluency_continuation",
    reference="Fluency samples (top-k 5) until prompt + continuation reach 100 tokens, keeps sampling "
    "after an end-of-sequence token, and scores the whole text, prompt included.",
    fix="Fluency samples 100 new tokens, stops at end-of-sequence, and scores the continuation alone.",
    why="The prompt's own n-grams count towards the reference's score, and its length decides how "
    "much is generated; what the model says after the prompt is what an edit can damage.",
)
SKIP_EMPTY_KEYS = Fix(
    "skip_empty_keys",
    reference="A portability or locality sub-key whose items all have blank answers is passed on "
    "as an empty list and the reference stops with an error (max() of an empty sequence); an answer "
    "list with an empty level ([[], [\"b\"]]) stops its run script (IndexError). knowbench leaves such "
    "a record out of the run, counted, with the reason.",
    fix="The empty sub-key or the item is skipped and the record is kept.",
    why="The record's edit and its other items are fine; only one item or sub-key has nothing to score.",
)
CORE_FIXES: tuple[Fix, ...] = (STRIP_WHITESPACE, PADDING_SAFE, FLUENCY_CONTINUATION, SKIP_EMPTY_KEYS)


class MetricProtocolError(ValueError):
    """An unknown preset or fix name."""


@dataclass(frozen=True)
class MetricProtocol:
    """The fixes a run applies. ``name`` is ``knowedit`` (none), ``knowbench`` (all the fixes known
    for the task) or ``knowedit+<fix>+...``."""

    fixes: frozenset[str] = frozenset()
    known: tuple[str, ...] = tuple(f.name for f in CORE_FIXES)

    @property
    def name(self) -> str:
        if not self.fixes:
            return KNOWEDIT
        if set(self.fixes) == set(self.known):
            return ALL_FIXES
        return "+".join([KNOWEDIT, *sorted(self.fixes)])

    def has(self, fix: Fix | str) -> bool:
        return (fix.name if isinstance(fix, Fix) else fix) in self.fixes

    def info(self) -> dict[str, Any]:
        """The result's ``protocol.metrics`` block."""
        return {"name": self.name, "fixes": sorted(self.fixes)}

    @classmethod
    def build(cls, preset: str = KNOWEDIT, fixes: Iterable[str] = (), known: Iterable[Fix] = CORE_FIXES) -> "MetricProtocol":
        """``preset`` (knowedit | knowbench) plus the named ``fixes``; ``known`` are the fixes the
        task's metrics understand (the core's and its family's)."""
        names = tuple(f.name for f in known)
        if preset not in (KNOWEDIT, ALL_FIXES):
            raise MetricProtocolError(f"--metrics {preset!r}: expected {KNOWEDIT} (the reference's "
                                      f"definitions) or {ALL_FIXES} (every fix)")
        chosen = set(names) if preset == ALL_FIXES else set()
        for f in fixes:
            if f not in names:
                raise MetricProtocolError(f"--metric-fix {f!r}: not a fix of this task's metrics; "
                                          f"known: {', '.join(names)}")
            chosen.add(f)
        return cls(frozenset(chosen), names)

    # -- what the protocol does to records --------------------------------------------------------
    def prepare(self, record: EditRecord) -> EditRecord:
        """The record as this protocol edits and scores it: stripped texts under strip_whitespace,
        as read otherwise."""
        if not self.has(STRIP_WHITESPACE):
            return record
        return dataclasses.replace(
            record,
            prompt=record.prompt.strip(),
            target_new=record.target_new.strip(),
            subject=record.subject.strip() if record.subject else record.subject,
            ground_truth=record.ground_truth.strip() if record.ground_truth else record.ground_truth,
            rephrase=[p.strip() for p in record.rephrase],
            portability={k: [_strip_probe(p) for p in v] for k, v in record.portability.items()},
            locality={k: [_strip_probe(p) for p in v] for k, v in record.locality.items()},
            extra={k: _strip_texts(v) for k, v in record.extra.items()},
        )

    def refusal(self, record: EditRecord) -> str | None:
        """Why the reference could not score ``record`` under this protocol (None: it can)."""
        if record.reference_stops and not self.has(SKIP_EMPTY_KEYS):
            return (f"{'; '.join(record.reference_stops)} (add --metric-fix {SKIP_EMPTY_KEYS.name} "
                    "to skip what it stops on and keep the record)")
        return None

    def shared(self, shared: Mapping[str, Any]) -> dict[str, Any]:
        """A task's shared data (e.g. task-wide probes) with this protocol's texts."""
        if not self.has(STRIP_WHITESPACE):
            return dict(shared)
        return {k: _strip_texts(v) for k, v in shared.items()}


def _strip_probe(p: Probe) -> Probe:
    return dataclasses.replace(p, prompt=p.prompt.strip(), answer=p.answer.strip())


def _strip_texts(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, Probe):
        return _strip_probe(value)
    if isinstance(value, list):
        return [_strip_texts(v) for v in value]
    return value


# -- `knowbench metric-protocols` ------------------------------------------------------------------
def known_fixes(task: str | None = None) -> list[tuple[Fix, str]]:
    """(fix, where it applies) for the core and the metric family of every installed task (or of
    ``task``), each fix once."""
    from . import registry

    out: list[tuple[Fix, str]] = [(f, "every task") for f in CORE_FIXES]
    names = [task] if task else [info.name for info, _ in registry.group_aliases(registry.discover(registry.TASK_GROUP))]
    seen = {f.name for f in CORE_FIXES}
    for name in names:
        _, t = registry.load_task(name)
        for f in t.family_class().fixes:
            if f.name not in seen:
                seen.add(f.name)
                out.append((f, f"{t.kind} metrics"))
    return out


def cmd_metric_protocols(args: Any) -> int:
    from . import registry

    try:
        fixes = known_fixes(args.task)
    except registry.PluginError as exc:
        raise SystemExit(f"--task {args.task}: {exc}")
    if args.markdown:
        from tabulate import tabulate

        rows = [(f"`{f.name}`", where, f.reference, f.fix, f.why) for f, where in fixes]
        print(tabulate(rows, headers=("fix", "applies to", "the reference (knowedit)", "the fix", "why"),
                       tablefmt="github"))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Metric protocols: knowedit = none of these fixes (the default); knowbench = all; "
                  "add one with --metric-fix NAME", title_justify="left", show_lines=True)
    for col in ("fix", "applies to", "the reference (knowedit)", "the fix", "why"):
        table.add_column(col)
    for f, where in fixes:
        table.add_row(f.name, where, f.reference, f.fix, f.why)
    Console().print(table)
    return 0


def add_metric_protocols(sub: Any) -> None:
    p = sub.add_parser("metric-protocols", help="list the fixes of the reference's metric artefacts",
                       description="The metric protocols a run can use (--metrics, --metric-fix): what the "
                       "reference does, what each fix does, and why.")
    p.add_argument("--task", default=None, help="only the fixes this task's metrics know")
    p.add_argument("--markdown", action="store_true", help="a Markdown table (as in the README)")
    p.set_defaults(func=cmd_metric_protocols)
