"""Validation of result files: schema, provenance, metric ranges and the integrity hash.

A result file (written by ``knowbench run``, DESIGN section 8) is trusted by the leaderboard only
when it passes every check here:

* schema      the schema version is one this knowbench reads (1.0 files are migrated to 1.1 first,
              ``knowbench.schema.migrate``) and the file is a ``knowbench.schema.Result``: every
              required block and key present with the right type, no unknown key in a core block;
* provenance  the editor's hparams hash matches its hparams, the selected record indices agree with
              the data file's counts and with the protocol, the protocol's fields agree with its name;
* metrics     names belong to the task's metric family (``portability.<Key>`` inherits
              ``portability``); each entry's direction is the family's; accuracies lie in [0, 100],
              fluency (entropy ×100) and KL divergences are ≥ 0; a metric that was not measured is
              absent (fluency off ⇒ no fluency entry), never 0 or null;
* integrity   ``integrity.sha256`` equals sha256 of the canonical JSON of everything else in the file
              as written (before migration), so a number edited by hand after the run is detected.

Each failure is a ``Problem`` naming the JSON path and saying why; warnings (a dirty git tree, a
model loaded from a local path) do not make a file invalid. Importing this module imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from .results import content_hash
from .schema import INTEGRITY_ALGORITHM, SCHEMA_VERSION, STANDARD_FAMILIES, Result, migrate

SUPPORTED_MAJOR = SCHEMA_VERSION.split(".")[0]
_BLOCKS = {"task.selection", "task.metric_family", "metrics.pre", "metrics.post"}  # besides top-level keys
_NOUNS = {"protocol.name": "a protocol", "protocol.eval_timing": "an evaluation timing", "editor.kind":
          "an editor kind", "diagnostics.kind": "a diagnostics kind", "integrity.algorithm":
          "an integrity algorithm this knowbench knows", "task.metric_family.metrics[].unit": "a metric unit"}
_WANT = {"int_type": "int", "string_type": "str", "bool_type": "bool", "float_type": "a number",
         "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
         "list_type": "a list"}


@dataclass
class Problem:
    where: str  # JSON path inside the result, e.g. "metrics.post.edit_succ.value"
    message: str
    severity: str = "error"  # "error" makes the file invalid; "warning" does not

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


@dataclass
class Report:
    """The outcome of validating one result (file)."""

    source: str
    problems: list[Problem] = field(default_factory=list)
    result: dict[str, Any] | None = None  # as written (its hash is intact)
    model: Result | None = None  # migrated to the current schema and typed, when it is structurally valid

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return self.result is not None and not self.errors

    def describe(self) -> str:
        """One paragraph for humans: verdict, then one line per problem."""
        if self.ok:
            r = self.result or {}
            head = (
                f"{self.source}: valid — {_get(r, 'editor.name')} on {_get(r, 'task.name')}, model "
                f"{_get(r, 'model.id')}, {_get(r, 'protocol.name')} protocol, "
                f"{_get(r, 'protocol.n_edits')} edits, seed {_get(r, 'protocol.seed')}"
            )
        else:
            n = len(self.errors)
            head = f"{self.source}: INVALID — {n} problem{'s' if n != 1 else ''}"
        lines = [head]
        lines += [f"  error: {p}" for p in self.errors]
        lines += [f"  warning: {p}" for p in self.warnings]
        return "\n".join(lines)


class ValidationError(ValueError):
    """A result that does not validate; ``str()`` lists every problem."""

    def __init__(self, report: Report):
        self.report = report
        super().__init__(report.describe())


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def _typename(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", str: "a string", dict: "an object", list: "a list",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


# -- structure: pydantic's errors as problems ------------------------------------------------------
def _path(loc: tuple[Any, ...], generic: bool = False) -> str:
    out = ""
    for part in loc:
        out += ("[]" if generic else f"[{part}]") if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problem(err: dict[str, Any]) -> Problem:
    loc, kind, x, ctx = err["loc"], err["type"], err.get("input"), err.get("ctx") or {}
    where = _path(loc)
    if kind == "missing":
        return Problem(where, f"required {'block' if len(loc) == 1 or where in _BLOCKS else 'key'} is missing")
    if kind == "extra_forbidden":
        if where == "_records":
            return Problem(where, "the per-record log belongs in its own file (runner.finish() drops it)")
        return Problem(where, f"unknown key: schema {SCHEMA_VERSION} has no such key (written by a newer knowbench?)")
    if kind in _WANT:
        note = (" (an unmeasured metric is absent, never null)"
                if len(loc) == 4 and loc[0] == "metrics" and loc[3] == "value" else "")
        return Problem(where, f"must be {_WANT[kind]}, not {_typename(x)}{note}")
    if kind == "literal_error":
        choices = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
        return Problem(where, f"{x!r} is not {_NOUNS.get(_path(loc, generic=True), 'an accepted value')} "
                       f"(one of {choices})")
    if kind in ("string_too_short", "too_short"):
        return Problem(where, "must not be empty")
    if kind == "greater_than_equal":
        return Problem(where, f"{x}: must be ≥ {ctx.get('ge')}")
    if kind == "finite_number":
        return Problem(where, f"{x} is not a finite number")
    if kind == "string_pattern_mismatch" and "0-9a-f" in str(ctx.get("pattern")):
        return Problem(where, f"{x!r} is not a sha256 hex digest (64 lower-case hex digits)")
    return Problem(where, f"{err['msg']} (got {x!r})" if not isinstance(x, (dict, list)) else err["msg"])


@lru_cache(maxsize=None)
def _adapter(name: str) -> TypeAdapter:
    return TypeAdapter(Result.model_fields[name].annotation)


def _parse(r: dict[str, Any], skip: set[str]) -> tuple[Result | None, dict[str, Any], list[Problem]]:
    """(the model, its blocks, the structural problems); when the whole does not validate, the
    blocks that do on their own, so that their semantic checks still run."""
    try:
        model = Result.model_validate(r)
        return model, {name: getattr(model, name) for name in Result.model_fields}, []
    except PydanticValidationError as exc:
        errs = exc.errors()
    problems = [p for p in map(_problem, errs) if p.where not in skip]
    bad = {e["loc"][0] for e in errs if e["loc"]}
    parts = {name: _adapter(name).validate_python(r[name])
             for name in Result.model_fields if name in r and name not in bad}
    return None, parts, problems


# -- semantics: what a schema cannot say ---------------------------------------------------------------
class _Checker:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def error(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))

    def warn(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message, "warning"))


def validate(result: Any, source: str = "<result>") -> Report:
    """All problems of one result dict (as loaded from its JSON file)."""
    report = Report(source)
    if not isinstance(result, dict):
        report.problems.append(Problem("", f"a result file holds one JSON object, not {_typename(result)}"))
        return report
    report.result = result
    c = _Checker()
    v = result.get("schema_version")
    if v is None:
        c.error("schema_version", "required key is missing (is this a knowbench result file?)")
    elif not isinstance(v, str) or v.split(".")[0] != SUPPORTED_MAJOR:
        c.error("schema_version", f"{v!r} is not a schema this knowbench reads (it reads {SUPPORTED_MAJOR}.x); "
                "upgrade knowbench or re-run with this version")
    if c.problems:  # a file from another schema major would only produce noise below
        report.problems = c.problems
        return report
    skip = set()
    kind = _get(result, "task.kind")
    if v == "1.0" and isinstance(result.get("task"), dict) and kind not in STANDARD_FAMILIES:
        skip.add("task.metric_family")  # migration cannot name the family of an unknown kind
        if isinstance(kind, str):
            c.error("task.kind", f"{kind!r} is not a task kind (one of {', '.join(STANDARD_FAMILIES)})")
    model, parts, problems = _parse(migrate(result), skip)
    c.problems += problems
    _check_integrity(c, result)
    _check_semantics(c, parts)
    report.model = model
    report.problems = c.problems
    return report


def _check_integrity(c: _Checker, r: dict[str, Any]) -> None:
    integ = r.get("integrity")
    if not isinstance(integ, dict) or integ.get("algorithm") != INTEGRITY_ALGORITHM:
        return  # reported by the schema
    stated = integ.get("sha256")
    actual = content_hash(r)
    if isinstance(stated, str) and stated != actual:
        c.error("integrity.sha256", f"content hash mismatch: the file says {stated[:16]}…, its content hashes to "
                f"{actual[:16]}…; the file was changed after the run sealed it (numbers edited by hand?). "
                "Re-run to get a genuine result")


def _check_semantics(c: _Checker, p: dict[str, Any]) -> None:
    kb, ed, m, t, pr, metrics = (p.get(k) for k in ("knowbench", "editor", "model", "task", "protocol", "metrics"))
    if kb is not None and kb.git_commit and kb.git_commit.endswith("-dirty"):
        c.warn("knowbench.git_commit", f"{kb.git_commit}: run from a checkout with uncommitted changes")
    if ed is not None:
        # same recipe as knowbench.editor.hparams_hash, on the stored dict
        h = ed.hparams_hash
        expect = hashlib.sha256(json.dumps(ed.hparams, sort_keys=True, default=str).encode()).hexdigest()[: len(h)]
        if len(h) < 8 or h != expect:
            c.error("editor.hparams_hash", f"{h!r} does not match editor.hparams (their hash is "
                    f"{expect[:16]!r}): the hyper-parameters were changed after the run")
    if m is not None:
        if m.id.startswith("random-") and m.source == "builtin":
            c.warn("model.id", f"{m.id} is a randomly initialised smoke-test model: its metrics say nothing "
                   "about editing quality")
        if m.source == "local":
            c.warn("model.source", "model loaded from a local folder: others need the same files to reproduce")
        elif m.source == "hub" and m.revision is None:
            c.warn("model.revision", "hub model without a resolved revision: the weights may change under its id")
    if t is not None:
        _check_task(c, t)
    if pr is not None:
        _check_protocol(c, pr)
    stopped = pr is not None and getattr(pr, "stopped_at", None) is not None  # --stop-below: a prefix of the selection
    if stopped and t is not None and t.selection.n_selected < pr.n_edits:
        c.error("protocol.n_edits", f"{pr.n_edits} edits but only {t.selection.n_selected} records were selected")
    if not stopped and t is not None and pr is not None and t.selection.n_selected != pr.n_edits:
        c.error("protocol.n_edits", f"{pr.n_edits} edits but task.selection.n_selected is {t.selection.n_selected}")
    if metrics is not None:
        _check_metrics(c, metrics, t, pr)


def _check_task(c: _Checker, t: Any) -> None:
    if t.n_records_usable > t.n_records_in_file:
        c.error("task.n_records_usable", f"{t.n_records_usable} usable records out of {t.n_records_in_file} in "
                "the file is impossible")
    s = t.selection
    if len(set(s.indices)) != len(s.indices):
        c.error("task.selection.indices", "a record index appears twice")
    if s.n_selected != len(s.indices):
        c.error("task.selection.n_selected", f"{s.n_selected} but {len(s.indices)} indices are listed")
    if s.n_selected > s.n_available:
        c.error("task.selection.n_selected", f"{s.n_selected} selected out of {s.n_available} available is impossible")
    if s.n_available != t.n_records_usable:
        c.error("task.selection.n_available", f"{s.n_available} but task.n_records_usable is {t.n_records_usable}")
    fam = t.metric_family
    std = STANDARD_FAMILIES.get(fam.name)
    if std is not None and not fam.same_as(std):
        c.error("task.metric_family", f"differs from knowbench's standard {fam.name!r} family in its metrics, "
                "their directions or units")
    if t.kind in STANDARD_FAMILIES and fam.name != t.kind:
        c.error("task.metric_family.name", f"{fam.name!r}, but a {t.kind} task reports the {t.kind!r} family")
    if len(set(fam.names())) != len(fam.metrics):
        c.error("task.metric_family.metrics", "a metric name appears twice")


def _check_protocol(c: _Checker, p: Any) -> None:
    if p.name == "sequential":
        if p.stopped_at is not None:
            if p.stop_below is None:
                c.error("protocol.stopped_at", f"{p.stopped_at}: set without protocol.stop_below")
            if not p.stopped_at == p.n_edits < p.sequential:
                c.error("protocol.stopped_at", f"{p.stopped_at}: a stopped run records n_edits = stopped_at "
                        f"< sequential (n_edits {p.n_edits}, sequential {p.sequential})")
            return
        if p.sequential != p.n_edits:
            c.error("protocol.sequential", f"{p.sequential!r}: a sequential run records T = n_edits ({p.n_edits})")
        return
    if p.stop_below is not None or p.stopped_at is not None:
        c.error("protocol.stop_below", f"set on a {p.name} run (only sequential runs stop early)")
    if p.sequential is not None:
        c.error("protocol.sequential", f"{p.sequential!r}: set on a {p.name} run (must be null)")
    if p.eval_timing != "each":
        c.error("protocol.eval_timing", f"{p.eval_timing!r}: only sequential runs evaluate on the final model")
    if p.name == "batch" and p.batch_size < 2:
        c.error("protocol.batch_size", f"{p.batch_size}: a batch run edits at least 2 facts per update")
    if p.name == "single" and p.batch_size != 1:
        c.error("protocol.batch_size", f"{p.batch_size}: a single-edit run has batch size 1")


def _check_metrics(c: _Checker, metrics: Any, t: Any, p: Any) -> None:
    fam = t.metric_family if t is not None else None
    for phase in ("pre", "post"):
        entries = getattr(metrics, phase)
        for name, e in entries.items():
            where = f"metrics.{phase}.{name}"
            if e.n < 1:
                c.error(f"{where}.n", f"{e.n}: a reported metric was measured on at least one item")
            spec = fam.spec(name) if fam is not None else None
            if spec is None:
                if fam is not None:
                    subs = [f"{s.name}.<Key>" for s in fam.metrics if s.subkeys]
                    c.error(where, f"unknown metric name {name!r}: a {fam.name} task reports "
                            f"{', '.join(fam.names() + subs)}")
                continue
            if e.higher_is_better != spec.higher_is_better:
                c.error(f"{where}.higher_is_better",
                        f"{t.knowedit_name} {name} is a KL divergence: lower is better" if spec.unit == "kl" else
                        f"{name} is {'higher' if spec.higher_is_better else 'lower'}-is-better for a {fam.name} task")
            if spec.unit == "percent" and not 0 <= e.value <= 100:
                c.error(f"{where}.value", f"{e.value} is outside [0, 100] (KnowEdit's ×100 scale)")
            elif spec.unit != "percent" and e.value < 0:
                what = "fluency (n-gram entropy ×100)" if spec.unit == "entropy" else "a KL divergence"
                c.error(f"{where}.value", f"{e.value} is negative; {what} is ≥ 0")
        if phase == "post" and "edit_succ" not in entries and (fam is None or "edit_succ" in fam.names()):
            c.error("metrics.post.edit_succ", "required metric is missing (every task reports Edit Succ.)")
        if p is not None and not p.fluency and "fluency" in entries:
            c.error(f"metrics.{phase}.fluency", "present although the run had fluency off (protocol.fluency "
                    "is false): an unmeasured metric must be absent")
    if p is not None and p.fluency and "fluency" not in metrics.post:
        c.warn("metrics.post.fluency", "missing although protocol.fluency is true")


# -- files -----------------------------------------------------------------------------------
def load_result(path: str | Path) -> tuple[Any, Report]:
    """Parse one file; a file that is not JSON gets a report with one problem and no result."""
    path = Path(path)
    report = Report(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        report.problems.append(Problem("", "no such file"))
        return None, report
    except (OSError, UnicodeDecodeError) as exc:
        report.problems.append(Problem("", f"cannot be read: {exc}"))
        return None, report
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        report.problems.append(Problem("", f"not valid JSON: {exc}"))
        return None, report
    return data, report


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a result file (a metric must be a finite number)")


def validate_file(path: str | Path) -> Report:
    data, report = load_result(path)
    if report.problems:
        return report
    return validate(data, source=str(path))


def check_file(path: str | Path) -> dict[str, Any]:
    """The result in ``path``; raises ``ValidationError`` listing every problem when it is invalid."""
    report = validate_file(path)
    if not report.ok:
        raise ValidationError(report)
    assert report.result is not None
    return report.result


# -- command line ------------------------------------------------------------------------------
def add_validate(sub: Any) -> None:
    p = sub.add_parser(
        "validate",
        help="check result files: schema, provenance, metric ranges, integrity hash",
        description="Check that result files are complete, consistent and unmodified: required provenance "
        "present, metrics named and in range, and the content hash intact (a number edited by hand is "
        "detected). Exit status 0 when every file is valid, 1 otherwise.",
    )
    p.add_argument("files", nargs="+", metavar="RESULT.json", help="result files written by `knowbench run`")
    p.add_argument("--strict", action="store_true", help="treat warnings (dirty git tree, local model) as errors")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: Any) -> int:
    bad = 0
    for f in args.files:
        report = validate_file(f)
        if args.strict:
            for p in report.warnings:
                p.severity = "error"
        print(report.describe())
        bad += not report.ok
    if len(args.files) > 1:
        print(f"{len(args.files) - bad} of {len(args.files)} files valid")
    return 1 if bad else 0
