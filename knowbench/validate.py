"""Validation of result files: schema, provenance, metric ranges and the integrity hash.

A result file (written by ``knowbench run``, DESIGN section 8) is trusted by the leaderboard only
when it passes every check here:

* schema      the schema version is one this knowbench reads, and every required block and key is
              present with the right type (editor, model, task, protocol, metrics, environment, ...);
* provenance  what reproduces the run is recorded: knowbench version, editor distribution and full
              hparams (whose hash must match them), model id and size, task data files with their
              sha256, the selected record indices, the protocol and its seed;
* metrics     names are KnowEdit's (``edit_succ``, ``rephrase``, ``portability[.Key]``,
              ``locality[.Key]``, ``fluency``); accuracies lie in [0, 100]; fluency (entropy ×100)
              and ConvSent's KL locality are ≥ 0 and only the latter is lower-is-better; a metric
              that was not measured is absent (fluency off ⇒ no fluency entry), never 0;
* integrity   ``integrity.sha256`` equals sha256 of the canonical JSON of everything else, so a
              number edited by hand after the run is detected.

Each failure is a ``Problem`` naming the JSON path and saying why; warnings (a dirty git tree, a
model loaded from a local path) do not make a file invalid. Importing this module imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .results import SCHEMA_VERSION, content_hash

SUPPORTED_MAJOR = SCHEMA_VERSION.split(".")[0]
INTEGRITY_ALGORITHM = "sha256-canonical-json"
MAIN_METRICS = ("edit_succ", "rephrase", "portability", "locality", "fluency")
WITH_SUBKEYS = ("portability", "locality")  # aggregated over sub-keys, each also reported alone
TASK_KINDS = ("qa", "wikibio", "convsent", "sanitation")
PROTOCOLS = ("single", "batch", "sequential")
EVAL_TIMINGS = ("each", "final")
KNOWN_TOP_LEVEL = {
    "schema_version", "knowbench", "editor", "model", "task", "protocol", "metrics", "curve", "edits",
    "timings", "environment", "config", "integrity", "diagnostics",
}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_METRIC_NAME = re.compile(r"^(?P<main>[a-z_]+)(?:\.(?P<sub>[A-Za-z0-9_\- ]+))?$")


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
    result: dict[str, Any] | None = None

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


# -- the checks ------------------------------------------------------------------------------
class _Checker:
    """Collects problems while walking a result; each ``need_*`` helper checks one key."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def error(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))

    def warn(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message, "warning"))

    def block(self, parent: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
        path = f"{where}.{key}" if where else key
        if key not in parent:
            self.error(path, "required block is missing")
            return None
        value = parent[key]
        if not isinstance(value, dict):
            self.error(path, f"must be an object, not {_typename(value)}")
            return None
        return value

    def need(self, parent: dict[str, Any] | None, key: str, where: str, types: tuple[type, ...],
             *, nullable: bool = False, nonempty: bool = False) -> Any:
        """``parent[key]`` when present and of one of ``types``; records a problem otherwise."""
        if parent is None:
            return None
        path = f"{where}.{key}"
        if key not in parent:
            self.error(path, "required key is missing")
            return None
        value = parent[key]
        if value is None:
            if not nullable:
                self.error(path, "must not be null")
            return None
        # bool is an int subclass: never accept it where a number is asked for
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            self.error(path, f"must be {names}, not {_typename(value)}")
            return None
        if nonempty and not value and value != 0:
            self.error(path, "must not be empty")
            return None
        return value


def _typename(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", str: "a string", dict: "an object", list: "a list",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate(result: Any, source: str = "<result>") -> Report:
    """All problems of one result dict (as loaded from its JSON file)."""
    report = Report(source)
    if not isinstance(result, dict):
        report.problems.append(Problem("", f"a result file holds one JSON object, not {_typename(result)}"))
        return report
    report.result = result
    c = _Checker()
    _check_schema_version(c, result)
    if not c.problems:  # a file from another schema major would only produce noise below
        _check_knowbench(c, result)
        editor = _check_editor(c, result)
        _check_model(c, result)
        kind = _check_task(c, result)
        protocol = _check_protocol(c, result)
        _check_selection_vs_protocol(c, result, protocol)
        _check_metrics(c, result, kind, protocol, editor)
        _check_other_blocks(c, result)
        _check_integrity(c, result)
    report.problems = c.problems
    return report


def _check_schema_version(c: _Checker, r: dict[str, Any]) -> None:
    v = r.get("schema_version")
    if v is None:
        c.error("schema_version", "required key is missing (is this a knowbench result file?)")
    elif not isinstance(v, str) or v.split(".")[0] != SUPPORTED_MAJOR:
        c.error("schema_version", f"{v!r} is not a schema this knowbench reads (it reads {SUPPORTED_MAJOR}.x); "
                "upgrade knowbench or re-run with this version")


def _check_knowbench(c: _Checker, r: dict[str, Any]) -> None:
    kb = c.block(r, "knowbench", "")
    c.need(kb, "version", "knowbench", (str,), nonempty=True)
    commit = c.need(kb, "git_commit", "knowbench", (str,), nullable=True)
    if isinstance(commit, str) and commit.endswith("-dirty"):
        c.warn("knowbench.git_commit", f"{commit}: run from a checkout with uncommitted changes")


def _check_editor(c: _Checker, r: dict[str, Any]) -> dict[str, Any] | None:
    ed = c.block(r, "editor", "")
    c.need(ed, "name", "editor", (str,), nonempty=True)
    c.need(ed, "distribution", "editor", (str,), nonempty=True)
    c.need(ed, "version", "editor", (str,), nonempty=True)
    hp = c.need(ed, "hparams", "editor", (dict,))
    h = c.need(ed, "hparams_hash", "editor", (str,), nonempty=True)
    c.need(ed, "hparams_file", "editor", (str,), nullable=True)
    if isinstance(hp, dict) and isinstance(h, str):
        # same recipe as knowbench.editor.hparams_hash, on the stored dict
        expect = hashlib.sha256(json.dumps(hp, sort_keys=True, default=str).encode()).hexdigest()[: len(h)]
        if len(h) < 8 or h != expect:
            c.error("editor.hparams_hash", f"{h!r} does not match editor.hparams (their hash is "
                    f"{expect[:16]!r}): the hyper-parameters were changed after the run")
    return ed


def _check_model(c: _Checker, r: dict[str, Any]) -> None:
    m = c.block(r, "model", "")
    c.need(m, "id", "model", (str,), nonempty=True)
    source = c.need(m, "source", "model", (str,), nonempty=True)
    c.need(m, "revision", "model", (str,), nullable=True)
    c.need(m, "model_type", "model", (str,), nonempty=True)
    c.need(m, "dtype", "model", (str,), nonempty=True)
    c.need(m, "device", "model", (str,), nonempty=True)
    n = c.need(m, "n_params", "model", (int,))
    if isinstance(n, int) and n <= 0:
        c.error("model.n_params", f"{n} is not a parameter count (must be > 0)")
    if isinstance(_get(m, "id"), str) and m["id"].startswith("random-") and source == "builtin":
        c.warn("model.id", f"{m['id']} is a randomly initialised smoke-test model: its metrics say nothing "
               "about editing quality")
    if source == "local":
        c.warn("model.source", "model loaded from a local folder: others need the same files to reproduce")
    elif source == "hub" and m is not None and m.get("revision") is None:
        c.warn("model.revision", "hub model without a resolved revision: the weights may change under its id")


def _check_task(c: _Checker, r: dict[str, Any]) -> str | None:
    t = c.block(r, "task", "")
    c.need(t, "name", "task", (str,), nonempty=True)
    c.need(t, "knowedit_name", "task", (str,), nonempty=True)
    c.need(t, "version", "task", (str,), nonempty=True)
    c.need(t, "distribution", "task", (str,), nonempty=True)
    c.need(t, "format", "task", (str,), nullable=True)
    kind = c.need(t, "kind", "task", (str,))
    if kind is not None and kind not in TASK_KINDS:
        c.error("task.kind", f"{kind!r} is not a task kind (one of {', '.join(TASK_KINDS)})")
        kind = None
    files = c.need(t, "data_files", "task", (list,))
    if files is not None:
        if not files:
            c.error("task.data_files", "no data file recorded: the records cannot be traced to a file")
        for i, f in enumerate(files):
            where = f"task.data_files[{i}]"
            if not isinstance(f, dict):
                c.error(where, f"must be an object {{path, sha256}}, not {_typename(f)}")
                continue
            c.need(f, "path", where, (str,), nonempty=True)
            sha = c.need(f, "sha256", where, (str,))
            if isinstance(sha, str) and not _HEX64.match(sha):
                c.error(f"{where}.sha256", f"{sha!r} is not a sha256 hex digest (64 lower-case hex digits)")
    c.need(t, "default_data", "task", (bool,))
    n_file = c.need(t, "n_records_in_file", "task", (int,))
    n_use = c.need(t, "n_records_usable", "task", (int,))
    if isinstance(n_file, int) and isinstance(n_use, int) and not 0 <= n_use <= n_file:
        c.error("task.n_records_usable", f"{n_use} usable records out of {n_file} in the file is impossible")
    c.need(t, "bad_records", "task", (list,))
    sel = c.block(t, "selection", "task") if t is not None else None
    if sel is not None:
        c.need(sel, "method", "task.selection", (str,), nonempty=True)
        c.need(sel, "seed", "task.selection", (int,))
        n_av = c.need(sel, "n_available", "task.selection", (int,))
        n_sel = c.need(sel, "n_selected", "task.selection", (int,))
        idx = c.need(sel, "indices", "task.selection", (list,))
        if isinstance(idx, list):
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in idx):
                c.error("task.selection.indices", "must be a list of record indices (integers ≥ 0)")
            elif len(set(idx)) != len(idx):
                c.error("task.selection.indices", "a record index appears twice")
            if isinstance(n_sel, int) and n_sel != len(idx):
                c.error("task.selection.n_selected", f"{n_sel} but {len(idx)} indices are listed")
        if isinstance(n_av, int) and isinstance(n_sel, int) and n_sel > n_av:
            c.error("task.selection.n_selected", f"{n_sel} selected out of {n_av} available is impossible")
        if isinstance(n_av, int) and isinstance(n_use, int) and n_av != n_use:
            c.error("task.selection.n_available", f"{n_av} but task.n_records_usable is {n_use}")
    return kind


def _check_protocol(c: _Checker, r: dict[str, Any]) -> dict[str, Any] | None:
    p = c.block(r, "protocol", "")
    if p is None:
        return None
    name = c.need(p, "name", "protocol", (str,))
    if name is not None and name not in PROTOCOLS:
        c.error("protocol.name", f"{name!r} is not a protocol (one of {', '.join(PROTOCOLS)})")
    n = c.need(p, "n_edits", "protocol", (int,))
    if isinstance(n, int) and n < 1:
        c.error("protocol.n_edits", f"{n}: a run makes at least one edit")
    seq = c.need(p, "sequential", "protocol", (int,), nullable=True)
    timing = c.need(p, "eval_timing", "protocol", (str,))
    if timing is not None and timing not in EVAL_TIMINGS:
        c.error("protocol.eval_timing", f"{timing!r} is not an evaluation timing (each or final)")
    b = c.need(p, "batch_size", "protocol", (int,))
    if isinstance(b, int) and b < 1:
        c.error("protocol.batch_size", f"{b}: must be ≥ 1")
    c.need(p, "seed", "protocol", (int,))
    c.need(p, "fluency", "protocol", (bool,))
    c.need(p, "curve_every", "protocol", (int,), nullable=True)
    c.need(p, "curve_probes", "protocol", (int,))
    if name == "sequential":
        if seq is None or (isinstance(n, int) and seq != n):
            c.error("protocol.sequential", f"{seq!r}: a sequential run records T = n_edits ({n})")
    elif name in ("single", "batch"):
        if seq is not None:
            c.error("protocol.sequential", f"{seq!r}: set on a {name} run (must be null)")
        if timing not in (None, "each"):
            c.error("protocol.eval_timing", f"{timing!r}: only sequential runs evaluate on the final model")
        if name == "batch" and isinstance(b, int) and b < 2:
            c.error("protocol.batch_size", f"{b}: a batch run edits at least 2 facts per update")
        if name == "single" and isinstance(b, int) and b != 1:
            c.error("protocol.batch_size", f"{b}: a single-edit run has batch size 1")
    return p


def _check_selection_vs_protocol(c: _Checker, r: dict[str, Any], p: dict[str, Any] | None) -> None:
    n_sel = _get(r, "task.selection.n_selected")
    n = p.get("n_edits") if p else None
    if _is_number(n_sel) and _is_number(n) and n_sel != n:
        c.error("protocol.n_edits", f"{n} edits but task.selection.n_selected is {n_sel}")


def _check_metrics(c: _Checker, r: dict[str, Any], kind: str | None, p: dict[str, Any] | None,
                   editor: dict[str, Any] | None) -> None:
    m = c.block(r, "metrics", "")
    if m is None:
        return
    for phase in ("pre", "post"):
        entries = c.block(m, phase, "metrics")
        if entries is None:
            continue
        for name, entry in entries.items():
            _check_metric(c, f"metrics.{phase}.{name}", name, entry, kind)
        if phase == "post" and "edit_succ" not in entries:
            c.error("metrics.post.edit_succ", "required metric is missing (every task reports Edit Succ.)")
        if p is not None and p.get("fluency") is False and "fluency" in entries:
            c.error(f"metrics.{phase}.fluency", "present although the run had fluency off (protocol.fluency "
                    "is false): an unmeasured metric must be absent")
    if p is not None and p.get("fluency") is True and isinstance(m.get("post"), dict) and "fluency" not in m["post"]:
        c.warn("metrics.post.fluency", "missing although protocol.fluency is true")
    extra = set(m) - {"pre", "post"}
    if extra:
        c.warn("metrics", f"unexpected keys {', '.join(sorted(extra))} (ignored)")


def _check_metric(c: _Checker, where: str, name: str, entry: Any, kind: str | None) -> None:
    match = _METRIC_NAME.match(name)
    main = match.group("main") if match else None
    if main not in MAIN_METRICS or (match.group("sub") and main not in WITH_SUBKEYS):
        c.warn(where, f"unknown metric name {name!r} (KnowEdit's are {', '.join(MAIN_METRICS)}, "
               f"and {'.<Key>, '.join(WITH_SUBKEYS)}.<Key>); the leaderboard ignores it")
    if not isinstance(entry, dict):
        c.error(where, f"must be an object {{value, n, higher_is_better}}, not {_typename(entry)}")
        return
    value = entry.get("value")
    if "value" not in entry:
        c.error(f"{where}.value", "required key is missing")
    elif not _is_number(value):
        c.error(f"{where}.value", f"must be a number, not {_typename(value)} (an unmeasured metric is "
                "absent, never null)")
        value = None
    elif not math.isfinite(value):
        c.error(f"{where}.value", f"{value} is not a finite number")
        value = None
    n = c.need(entry, "n", where, (int,))
    if isinstance(n, int) and n < 1:
        c.error(f"{where}.n", f"{n}: a reported metric was measured on at least one item")
    hib = c.need(entry, "higher_is_better", where, (bool,))
    divergence = kind == "convsent" and main == "locality"
    if hib is not None and main in MAIN_METRICS:
        if divergence and hib:
            c.error(f"{where}.higher_is_better", "ConvSent locality is a KL divergence: lower is better")
        elif not divergence and not hib:
            c.error(f"{where}.higher_is_better", f"{name} is higher-is-better for a {kind or '?'} task")
    if value is None or main not in MAIN_METRICS:
        return
    if main == "fluency" or divergence:
        what = "fluency (n-gram entropy ×100)" if main == "fluency" else "a KL divergence"
        if value < 0:
            c.error(f"{where}.value", f"{value} is negative; {what} is ≥ 0")
    elif not 0 <= value <= 100:
        c.error(f"{where}.value", f"{value} is outside [0, 100] (KnowEdit's ×100 scale)")


def _check_other_blocks(c: _Checker, r: dict[str, Any]) -> None:
    for key, typ in (("curve", list), ("edits", list), ("timings", dict), ("environment", dict), ("config", dict)):
        if key not in r:
            c.error(key, "required block is missing")
        elif not isinstance(r[key], typ):
            c.error(key, f"must be {_typename(typ())}, not {_typename(r[key])}")
    env = r.get("environment")
    if isinstance(env, dict):
        c.need(env, "python", "environment", (str,), nonempty=True)
        c.need(env, "packages", "environment", (dict,))
    t = r.get("timings")
    if isinstance(t, dict):
        for k, v in t.items():
            if not _is_number(v) or not math.isfinite(v) or v < 0:
                c.error(f"timings.{k}", f"{v!r} is not a duration/size ≥ 0")
    if "_records" in r:
        c.error("_records", "the per-record log belongs in its own file (runner.finish() drops it)")
    for key in sorted(set(r) - KNOWN_TOP_LEVEL - {"_records"}):
        c.warn(key, "unknown top-level key (kept, not checked)")


def _check_integrity(c: _Checker, r: dict[str, Any]) -> None:
    integ = c.block(r, "integrity", "")
    if integ is None:
        return
    algo = c.need(integ, "algorithm", "integrity", (str,))
    if algo is not None and algo != INTEGRITY_ALGORITHM:
        c.error("integrity.algorithm", f"{algo!r} is unknown (expected {INTEGRITY_ALGORITHM!r})")
        return
    stated = c.need(integ, "sha256", "integrity", (str,))
    if stated is None:
        return
    actual = content_hash(r)
    if stated != actual:
        c.error("integrity.sha256", f"content hash mismatch: the file says {stated[:16]}…, its content hashes to "
                f"{actual[:16]}…; the file was changed after the run sealed it (numbers edited by hand?). "
                "Re-run to get a genuine result")


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
