"""The six KnowEdit tasks: which files they read and how each file becomes EditRecords.

Each task (``zsre``, ``wiki_recent``, ``counterfact``, ``wikibio``, ``convsent``, ``sanitation``) is
a :class:`knowbench.task.Task` built from the declarative spec in ``knowedit.yaml`` (names, kinds,
default file names, metrics, and for every accepted file format the record keys that identify it and
what they mean). Its ``reader(path)`` reads one ``.json`` / ``.jsonl`` file, recognises the format
from the record keys, parses it and returns a :class:`~knowbench.records.LoadReport` with the usable
records and a counted :class:`~knowbench.records.BadRecord` for everything it could not use.

Rules (KnowEdit's reference runner, DESIGN section 3):

* Answers keep only their first alias: ``"a"`` -> a, ``["a", "b"]`` -> a, ``[["a", "b"], ["c"]]``
  (WikiData_recent: answers x aliases) -> a. An item whose first alias of its first answer is empty
  or blank (``[[]]``, ``[]``, ``""``, ``[[], ["c"]]``) is skipped and counted (item-level BadRecord).
* Texts are kept exactly as the file has them (a blank one counts as missing): the reference scores
  the raw strings, and several real targets start with a space (ZsRE ``" Charity River"``). The
  metric protocol's ``strip_whitespace`` fix strips them for a run (:mod:`knowbench.metric_protocol`).
* Records are dropped (and counted) when what the edit itself needs is unusable: not a JSON object,
  empty / non-string prompt or target_new, no subject, or (QA tasks and WikiBio) a subject that does
  not occur in the prompt -- locate-then-edit editors find the subject's last token in the prompt.
  The subject rule holds for every record of both real WikiBio files (``concept`` is always in
  ``text``), so WikiBio applies it too.
* Everything that is only evaluated around the edit (old ground_truth, rephrases, portability /
  locality items) is skipped item by item: the record is kept and a BadRecord with
  ``record_dropped=False`` names the item, e.g. ``locality.Relation_Specificity[3]``. A section that
  is empty (``{}``) or absent is simply empty, not an error; a sub-key present with no usable item
  (``[]``, or all answers blank) is left out. It and an answer list with an empty level (``[]``,
  ``[[], ["c"]]``), which the reference's run script cannot take a first alias of, are named in
  ``EditRecord.reference_stops``: the reference stops on such a record, so the ``knowedit`` metric
  protocol leaves it out of a run (counted); ``skip_empty_keys`` skips the items and keeps it.
* A file that is not JSON, is not a list of records / an object of the expected lists, or whose
  records match no known format raises :class:`TaskDataError` naming the file and what was expected.
  So does a file of another task's format (e.g. ConvSent data given to ``zsre``).

Older formats:

* raw ZsRE / MEND (``src, alt, answers, rephrase, loc, loc_ans``): ``alt`` is the target, the first
  of ``answers`` the old answer. ``loc`` / ``loc_ans`` (a Natural Questions probe, kept verbatim with
  its ``"nq question: "`` prefix as ROME and MEND evaluate it) becomes the single
  ``locality["Relation_Specificity"]`` probe, so that per-key tables line up with KnowEdit ZsRE,
  whose only locality key it is. The GPT-4 portability form ``{"New Question", "New Answer", ...}``
  becomes ``portability["Reasoning"]``. A record without ``subject`` is dropped (the reason says
  so): KnowEdit's runner requires the subject, and a file without subjects is unusable for the
  locate-then-edit editors this harness is about.
* MEND-style CounterFact: ``locality_prompt`` / ``locality_ground_truth`` (a neighbourhood probe)
  becomes ``locality["Relation_Specificity"]``; ``case_id`` is kept in ``extra``.

ConvSent (``blender_*.json``, ``{ent, pos: [...], neg: [...]}``), our construction. EasyEdit's
script draws, with a global seed, the target sentiment, one of 13 opinion-question templates and a
"answer ... positively/negatively" instruction, takes the first reply of that sentiment as the target
and uses the next record's topic (wrapping around) for locality. We keep the structure but make
every choice a pure function of the record's position, so a subset or a re-run gives the same edits:

* target sentiment: ``pos`` for even file index, ``neg`` for odd (balanced, seed-free);
* prompt: ``"What do you think of {ent}? Answer positively."`` (or ``negatively``): one fixed
  question (the subject occurs in it) plus the sentiment instruction;
* target_new: the first non-blank reply of the target sentiment;
* locality topic: the next kept record (wrapping around) whose topic differs from this one
  (``blender_val.json`` lists "The Wire" twice); its replies (pos then neg) are the locality texts.

``extra`` = ``{target_sentiment, target_replies, opposite_replies, locality_topic,
locality_replies, locality_prompt}``; blank or non-string replies are skipped item by item, and a
record left without any pos or any neg reply is dropped.

Sanitation (``trivia_qa_*.json``): each ``success`` / ``K_F`` item is an edit with prompt
``"Question:{q}\\nAnswer:"`` and target ``target_new`` or "I don't know."; the ``locality`` / ``K_R``
questions become ``LoadReport.shared["locality"]`` probes (same prompt form, answer = ground truth).
Their BadRecords carry ``source="<file>#locality"`` and the position in that list.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from knowbench.records import BadRecord, EditRecord, LoadReport, Probe
from knowbench.task import DataNotFound, Task

log = logging.getLogger(__name__)

IDK = "I don't know."
SANITATION_PROMPT = "Question:{question}\nAnswer:"
CONVSENT_QUESTION = "What do you think of {topic}?"
CONVSENT_PROMPT = CONVSENT_QUESTION + " Answer {adverb}."
SENTIMENT_ADVERB = {"pos": "positively", "neg": "negatively"}


class TaskDataError(ValueError):
    """A task file that cannot be read at all (not JSON, wrong shape, unknown schema)."""


# ---------------------------------------------------------------------------------------------
# the declarative spec


@dataclass(frozen=True)
class FormatSpec:
    """One accepted file format (see knowedit.yaml for the meaning of each field)."""

    name: str
    parser: str
    container: str
    keys: tuple[str, ...]
    description: str
    any_keys: tuple[str, ...] = ()
    ground_truth: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    sections: tuple[str, ...] = ()
    locality_pair: dict[str, str] | None = None
    extra: tuple[str, ...] = ()
    lists: dict[str, str] | None = None

    def matches(self, obj: Any) -> bool:
        if not isinstance(obj, dict) or not all(k in obj for k in self.keys):
            return False
        if self.any_keys and not any(k in obj for k in self.any_keys):
            return False
        gt = obj.get("ground_truth")
        if self.ground_truth == "list":
            return isinstance(gt, list)
        if self.ground_truth == "str":
            return isinstance(gt, str)
        if self.ground_truth == "absent":
            return gt is None
        return True


def _load_spec() -> tuple[dict[str, dict[str, Any]], dict[str, FormatSpec]]:
    text = resources.files(__package__).joinpath("knowedit.yaml").read_text(encoding="utf-8")
    spec = yaml.safe_load(text)
    formats = {}
    for name, f in spec["formats"].items():
        formats[name] = FormatSpec(
            name=name,
            parser=f["parser"],
            container=f["container"],
            keys=tuple(f["keys"]),
            description=f["description"],
            any_keys=tuple(f.get("any_keys", ())),
            ground_truth=f.get("ground_truth"),
            fields=dict(f.get("fields", {})),
            sections=tuple(f.get("sections", ())),
            locality_pair=f.get("locality_pair"),
            extra=tuple(f.get("extra", ())),
            lists=f.get("lists"),
        )
    return spec["tasks"], formats


_TASK_SPECS, FORMATS = _load_spec()


# ---------------------------------------------------------------------------------------------
# reading a file


@dataclass(frozen=True)
class _BadLine:
    """A .jsonl line that is not JSON; stands in for its record so indices stay aligned."""

    lineno: int
    error: str


def _read(path: Path) -> Any:
    if path.is_dir():
        raise TaskDataError(f"{path} is a directory; pass a KnowEdit .json/.jsonl file")
    if not path.exists():
        raise DataNotFound(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TaskDataError(f"{path}: not UTF-8 text ({exc}); expected a KnowEdit .json or .jsonl file") from exc
    if path.suffix.lower() == ".jsonl":
        rows: list[Any] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                rows.append(_BadLine(lineno, exc.msg))
        if rows and all(isinstance(r, _BadLine) for r in rows):
            raise TaskDataError(f"{path}: no line is valid JSON (line {rows[0].lineno}: {rows[0].error}); "
                                "expected one JSON record per line")
        return rows
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskDataError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); expected a KnowEdit "
            "file: a JSON list of records (.json), one record per line (.jsonl), or a Sanitation object"
        ) from exc


def _expected(formats: list[FormatSpec]) -> str:
    return "; ".join(f"{f.name}: {f.description}" for f in formats)


def detect(data: Any, path: Path, allowed: list[str] | None = None) -> FormatSpec:
    """The format of parsed file content, by its record keys (majority of records for lists)."""
    candidates = list(FORMATS.values())
    if isinstance(data, dict):
        hit = next((f for f in candidates if f.container == "dict" and f.matches(data)), None)
        if hit is None:
            keys = ", ".join(map(repr, list(data)[:8])) or "none"
            raise TaskDataError(
                f"{path}: a JSON object with keys {keys}, which is no known KnowEdit layout; expected a list of "
                f"records, or one of: {_expected([f for f in candidates if f.container == 'dict'])}"
            )
        return hit
    if not isinstance(data, list):
        raise TaskDataError(f"{path}: top-level JSON is {_describe(data)}; expected a list of records")
    if not data:
        raise TaskDataError(f"{path}: contains no records")
    votes: Counter[str] = Counter()
    list_formats = [f for f in candidates if f.container == "list"]
    for rec in data:
        hit = next((f for f in list_formats if f.matches(rec)), None)
        if hit is not None:
            votes[hit.name] += 1
    if not votes:
        first = data[0]
        seen = f"keys {sorted(first)}" if isinstance(first, dict) else _describe(first)
        wanted = [FORMATS[n] for n in allowed] if allowed else list_formats
        raise TaskDataError(
            f"{path}: no record matches a known format (the first has {seen}); expected {_expected(wanted)}"
        )
    # most votes; ties go to the earlier format in the spec
    order = {f.name: i for i, f in enumerate(list_formats)}
    best = max(votes, key=lambda n: (votes[n], -order[n]))
    return FORMATS[best]


# ---------------------------------------------------------------------------------------------
# field helpers: each returns (value, None) or (None, reason)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _text(obj: dict, key: str) -> tuple[str | None, str | None]:
    if key not in obj or obj[key] is None:
        return None, f"no '{key}'"
    value = obj[key]
    if not isinstance(value, str):
        return None, f"'{key}' is {_describe(value)}, expected a string"
    if not value.strip():
        return None, f"'{key}' is empty"
    return value, None


def first_alias(value: Any) -> tuple[str | None, str | None]:
    """The first alias of the first answer: str | list[str] | list[list[str]] -> str."""
    if isinstance(value, str):
        return (value, None) if value.strip() else (None, "answer is blank")
    if isinstance(value, list):
        if not value:
            return None, "answer list is empty ([])"
        head = value[0]
        if isinstance(head, list):  # answers x aliases (WikiData_recent)
            if not head:
                return None, f"first answer has no alias ({json.dumps(value, ensure_ascii=False)[:40]})"
            head = head[0]
        if isinstance(head, str):
            return (head, None) if head.strip() else (None, "answer is blank")
        return None, f"answer holds {_describe(head)}, expected a string"
    return None, f"answer is {_describe(value)}, expected a string or a list of strings"


# ---------------------------------------------------------------------------------------------
# parsers: raw records -> (records, bad)


class _Collector:
    """BadRecords of one record; item-level ones are kept only if the record survives."""

    def __init__(self, source: str, index: int):
        self.source, self.index = source, index
        self.items: list[BadRecord] = []

    def item(self, item: str, reason: str) -> None:
        self.items.append(BadRecord(self.source, self.index, reason, item=item, record_dropped=False))

    def drop(self, reason: str) -> BadRecord:
        return BadRecord(self.source, self.index, reason)


def _not_object(raw: Any) -> str:
    if isinstance(raw, _BadLine):
        return f"line {raw.lineno} is not valid JSON ({raw.error})"
    return f"record is {_describe(raw)}, expected a JSON object"


def _probes(items: Any, where: str, bad: _Collector, stops: list[str] | None = None) -> list[Probe]:
    if not isinstance(items, list):
        bad.item(where, f"is {_describe(items)}, expected a list of {{prompt, ground_truth}}")
        return []
    probes = (_probe(it, f"{where}[{j}]", bad, stops) for j, it in enumerate(items))
    return [p for p in probes if p is not None]


# first_alias's reasons for an answer list with an empty level: the reference's run script takes
# the first alias with ``while isinstance(a, list): a = a[0]``, which raises IndexError on it
_NO_ALIAS = ("answer list is empty", "first answer has no alias")


def _probe(item: Any, name: str, bad: _Collector, stops: list[str] | None = None) -> Probe | None:
    if not isinstance(item, dict):
        bad.item(name, f"is {_describe(item)}, expected an object {{prompt, ground_truth}}")
        return None
    prompt, why = _text(item, "prompt")
    if not why:
        answer, why = first_alias(item.get("ground_truth"))
        if why and why.startswith(_NO_ALIAS) and stops is not None:
            stops.append(f"{name}: {why}; the reference's run script stops on it (IndexError)")
    if why:
        bad.item(name, why)
        return None
    return Probe(prompt, answer)


def _section(value: Any, name: str, bad: _Collector, stops: list[str]) -> dict[str, list[Probe]]:
    if value is None:
        return {}
    if isinstance(value, dict) and ("New Question" in value or "New Answer" in value):
        # the GPT-4 portability form of the older ZsRE file: one reasoning question
        value = {"Reasoning": [{"prompt": value.get("New Question"), "ground_truth": value.get("New Answer")}]}
    if not isinstance(value, dict):
        bad.item(name, f"is {_describe(value)}, expected an object {{key: [{{prompt, ground_truth}}]}}")
        return {}
    out = {}
    for key, items in value.items():
        probes = _probes(items, f"{name}.{key}", bad, stops)
        if probes:
            out[key] = probes
        elif isinstance(items, list):
            stops.append(f"{name}.{key} has no item with an answer; the reference stops on it "
                         "(max() of an empty sequence)")
    return out


def _rephrases(value: Any, name: str, bad: _Collector) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    out = []
    for j, v in enumerate(values):
        where = f"{name}[{j}]" if isinstance(value, list) else name
        if not isinstance(v, str):
            bad.item(where, f"is {_describe(v)}, expected a string")
        elif not v.strip():
            bad.item(where, "is empty")
        else:
            out.append(v)
    return out


def _parse_qa(spec: FormatSpec, rows: list[Any], source: str) -> tuple[list[EditRecord], list[BadRecord]]:
    f = spec.fields
    records: list[EditRecord] = []
    bad: list[BadRecord] = []
    for i, raw in enumerate(rows):
        col = _Collector(source, i)
        if not isinstance(raw, dict):
            bad.append(col.drop(_not_object(raw)))
            continue
        prompt, why = _text(raw, f["prompt"])
        target, why2 = _text(raw, f["target_new"])
        subject, why3 = _text(raw, f["subject"])
        if why or why2:
            bad.append(col.drop(why or why2))
            continue
        if why3:
            bad.append(col.drop(f"{why3}: the subject must occur in the prompt (KnowEdit's rule; editors locate it)"))
            continue
        if subject not in prompt:
            bad.append(col.drop(f"subject {subject!r} does not occur in prompt {prompt!r}"))
            continue

        ground_truth = None
        gt_key = f.get("ground_truth")
        if gt_key and raw.get(gt_key) is not None:
            ground_truth, why = first_alias(raw[gt_key])
            if why:
                col.item(gt_key, f"{why}; old answer left unset")
        rephrase = _rephrases(raw.get(f["rephrase"]), f["rephrase"], col) if "rephrase" in f else []
        stops: list[str] = []
        sections = {name: _section(raw.get(name), name, col, stops) for name in spec.sections}
        locality = sections.get("locality", {})
        if spec.locality_pair:
            lp = spec.locality_pair
            if raw.get(lp["prompt"]) is not None or raw.get(lp["answer"]) is not None:
                probe = _probe({"prompt": raw.get(lp["prompt"]), "ground_truth": raw.get(lp["answer"])}, lp["prompt"], col)
                if probe is not None:
                    locality.setdefault(lp["key"], []).append(probe)
        records.append(
            EditRecord(
                index=i,
                source=source,
                prompt=prompt,
                target_new=target,
                subject=subject,
                ground_truth=ground_truth,
                rephrase=rephrase,
                portability=sections.get("portability", {}),
                locality=locality,
                extra={k: raw[k] for k in spec.extra if k in raw},
                reference_stops=stops,
            )
        )
        bad.extend(col.items)
    return records, bad


def _replies(raw: dict, key: str, col: _Collector) -> tuple[list[str], str | None]:
    value = raw.get(key)
    if value is None:
        return [], f"no '{key}' replies"
    if not isinstance(value, list):
        return [], f"'{key}' is {_describe(value)}, expected a list of replies"
    out = []
    for j, v in enumerate(value):
        if not isinstance(v, str):
            col.item(f"{key}[{j}]", f"reply is {_describe(v)}, expected a string")
        elif not v.strip():
            col.item(f"{key}[{j}]", "reply is blank")
        else:
            out.append(v)
    return out, None if out else f"no usable '{key}' reply (both sentiments are needed to score an edit)"


def _parse_convsent(spec: FormatSpec, rows: list[Any], source: str) -> tuple[list[EditRecord], list[BadRecord]]:
    kept: list[tuple[EditRecord, dict[str, list[str]], _Collector]] = []
    bad: list[BadRecord] = []
    for i, raw in enumerate(rows):
        col = _Collector(source, i)
        if not isinstance(raw, dict):
            bad.append(col.drop(_not_object(raw)))
            continue
        topic, why = _text(raw, "ent")
        pos, why_pos = _replies(raw, "pos", col)
        neg, why_neg = _replies(raw, "neg", col)
        if why or why_pos or why_neg:
            bad.append(col.drop(why or why_pos or why_neg))
            continue
        sentiment = "pos" if i % 2 == 0 else "neg"
        replies = {"pos": pos, "neg": neg}
        target, opposite = replies[sentiment], replies["neg" if sentiment == "pos" else "pos"]
        rec = EditRecord(
            index=i,
            source=source,
            prompt=CONVSENT_PROMPT.format(topic=topic, adverb=SENTIMENT_ADVERB[sentiment]),
            target_new=target[0],
            subject=topic,
            extra={"target_sentiment": sentiment, "target_replies": target, "opposite_replies": opposite},
        )
        kept.append((rec, replies, col))

    # locality: the next kept record (wrapping around) about a different topic
    records = []
    for k, (rec, _, col) in enumerate(kept):
        other = None
        for step in range(1, len(kept)):
            cand, cand_replies, _ = kept[(k + step) % len(kept)]
            if cand.subject.casefold() != rec.subject.casefold():
                other = (cand, cand_replies)
                break
        if other is None:
            col.item("locality", "no record about another topic in the file to measure locality on")
            rec.extra.update(locality_topic=None, locality_replies=[], locality_prompt=None)
        else:
            cand, cand_replies = other
            rec.extra.update(
                locality_topic=cand.subject,
                locality_replies=cand_replies["pos"] + cand_replies["neg"],
                locality_prompt=CONVSENT_PROMPT.format(
                    topic=cand.subject, adverb=SENTIMENT_ADVERB[rec.extra["target_sentiment"]]
                ),
            )
        records.append(rec)
        bad.extend(col.items)
    bad.sort(key=lambda b: (b.index, b.record_dropped))
    return records, bad


def _parse_sanitation(spec: FormatSpec, data: dict, source: str) -> tuple[list[EditRecord], list[BadRecord], dict]:
    edits_key, loc_key = spec.lists["edits"], spec.lists["locality"]
    for key in (edits_key, loc_key):
        if not isinstance(data[key], list):
            raise TaskDataError(f"{source}: '{key}' is {_describe(data[key])}, expected a list of questions")
    records: list[EditRecord] = []
    bad: list[BadRecord] = []
    src = f"{source}#{edits_key}"
    for i, raw in enumerate(data[edits_key]):
        col = _Collector(src, i)
        if not isinstance(raw, dict):
            bad.append(col.drop(_not_object(raw)))
            continue
        question, why = _text(raw, "question")
        if why:
            bad.append(col.drop(why))
            continue
        target = raw.get("target_new")
        if target is not None and not isinstance(target, str):
            bad.append(col.drop(f"'target_new' is {_describe(target)}, expected a string"))
            continue
        target = target if target and target.strip() else IDK
        ground_truth, why = first_alias(raw.get("ground_truth"))
        if why:
            col.item("ground_truth", f"{why}; old answer left unset")
        subject = raw.get("subject")
        if subject is not None and (not isinstance(subject, str) or not subject.strip()):
            col.item("subject", f"'subject' is {_describe(subject) if not isinstance(subject, str) else 'empty'}; left unset")
            subject = None
        records.append(
            EditRecord(
                index=i,
                source=src,
                prompt=SANITATION_PROMPT.format(question=question),
                target_new=target,
                subject=subject or None,
                ground_truth=ground_truth,
                extra={"sanitation_list": edits_key},
            )
        )
        bad.extend(col.items)
    probes: list[Probe] = []
    loc_src = f"{source}#{loc_key}"
    for j, raw in enumerate(data[loc_key]):
        if not isinstance(raw, dict):
            bad.append(BadRecord(loc_src, j, _not_object(raw), item="locality question", record_dropped=False))
            continue
        question, why = _text(raw, "question")
        field_name = "question"
        if not why:
            answer, why = first_alias(raw.get("ground_truth"))
            field_name = "ground_truth"
        if why:
            bad.append(BadRecord(loc_src, j, why, item=field_name, record_dropped=False))
            continue
        probes.append(Probe(SANITATION_PROMPT.format(question=question), answer))
    shared = {"locality": probes, "locality_source": loc_src, "n_locality_raw": len(data[loc_key])}
    return records, bad, shared


# ---------------------------------------------------------------------------------------------
# the public reader


def read(path: str | Path, formats: list[str] | None = None, task: str | None = None) -> LoadReport:
    """Load one KnowEdit file of any accepted format (or of ``formats`` only)."""
    path = Path(path)
    data = _read(path)
    spec = detect(data, path, formats)
    if formats is not None and spec.name not in formats:
        who = f"task {task!r}" if task else "this reader"
        readers = [name for name, t in _TASK_SPECS.items() if spec.name in t["formats"]]
        hint = f" (task {readers[0]} reads it)" if readers else ""
        raise TaskDataError(
            f"{path}: looks like {spec.name} ({spec.description}){hint}, which {who} does not read; it expects "
            f"{_expected([FORMATS[n] for n in formats])}"
        )
    source = str(path)
    shared: dict[str, Any] = {}
    if spec.parser == "sanitation":
        records, bad, shared = _parse_sanitation(spec, data, source)
        n_raw = len(data[spec.lists["edits"]])
    elif spec.parser == "convsent":
        records, bad = _parse_convsent(spec, data, source)
        n_raw = len(data)
    else:
        records, bad = _parse_qa(spec, data, source)
        n_raw = len(data)
    report = LoadReport(records=records, bad=bad, files=[path], format=spec.name, n_raw=n_raw, shared=shared)
    if bad:  # the runner warns with the full list; direct callers find it in report.bad
        n_items = len(bad) - report.n_dropped
        log.debug(
            "%s (%s): %d of %d records skipped, %d items skipped; first: %s",
            path.name, spec.name, report.n_dropped, n_raw, n_items, bad[0],
        )
    return report


@dataclass(frozen=True)
class TaskReader:
    """``reader(path)`` of one task: ``read`` restricted to the task's formats."""

    task: str
    formats: tuple[str, ...]

    def __call__(self, path: Path) -> LoadReport:
        return read(path, list(self.formats), task=self.task)


# the metric family of each kind (tasks/families.py, imported when a run first scores a task)
FAMILIES = {kind: f"knowbench.tasks.families:{cls}" for kind, cls in (
    ("qa", "QAFamily"), ("wikibio", "WikiBioFamily"), ("convsent", "ConvSentFamily"), ("sanitation", "SanitationFamily"))}


def _make_task(name: str, spec: dict[str, Any]) -> Task:
    unknown = [f for f in spec["formats"] if f not in FORMATS]
    if unknown:
        raise ValueError(f"knowedit.yaml: task {name} names unknown formats {unknown}")
    return Task(
        name=name,
        kind=spec["kind"],
        version=str(spec["version"]),
        knowedit_name=spec["knowedit_name"],
        default_files=tuple(spec["default_files"]),
        reader=TaskReader(name, tuple(spec["formats"])),
        family=FAMILIES[spec["kind"]],
        description=" ".join(spec["description"].split()),
        metrics=tuple(spec["metrics"]),
        train_files=tuple(spec.get("train_files", ())),
    )


TASKS: dict[str, Task] = {name: _make_task(name, spec) for name, spec in _TASK_SPECS.items()}

zsre = TASKS["zsre"]
wiki_recent = TASKS["wiki_recent"]
counterfact = TASKS["counterfact"]
wikibio = TASKS["wikibio"]
convsent = TASKS["convsent"]
sanitation = TASKS["sanitation"]
