"""``knowbench verify RESULT.json``: re-run a seeded sample of a result's records and compare.

A result's integrity hash proves only that nobody forgot to re-seal it: a number edited and
re-sealed with ``knowbench.results.seal`` validates. ``verify`` checks the numbers themselves:

1. the file validates (``knowbench.validate``);
2. its per-record values (the ``records`` block: ``[{"index": i, "pre": {...}, "post": {...}}]``,
   one entry per selected record in selection order, each ``pre`` / ``post`` as the evaluator scored
   the record: metric -> fraction, or metric -> {sub-key: [item fractions]}) are the run's: they
   cover exactly ``task.selection.indices``, and aggregated as the runner aggregates them
   (``evaluation.summarise``) they give ``metrics.pre`` / ``metrics.post``;
3. a re-run of a seeded sample of the records, with the result's own configuration
   (``config``: editor, task, model, data, seed, dtype, device, evaluation batch size, fluency; the
   editor's stored hyper-parameters; diagnostics and the lifelong curve off), gives the same
   per-record values, within ``--tolerance``.

What is re-run, by protocol:

* single / batch: a seeded sample of ``--n`` records (``--sample-seed``), each with the whole
  update it was applied in (``edits[*].records``), so a batch is re-applied as it was;
* sequential, evaluated right after each update: the first ``--n`` edits (rounded up to whole
  updates) as a ``sequential K`` run in the same order: their scores right after their edit depend
  on nothing later;
* sequential evaluated on the final model, ``--full``, or a task whose metric family prepares on
  the whole selection (it overrides ``MetricFamily.prepare``, e.g. Sanitation spreading its locality
  questions over the records): the whole run, compared on every record.

The records are chosen through ``RunConfig.extra["indices"]`` (the records to edit, by index in the
data file, in this order; the runner records selection method ``given``). Pre-edit fluency draws
its samples from a generator seeded by (seed, the record's position among the records evaluated
together), so it is compared only for records at the same position in both runs (always in a
whole or prefix re-run).

Runs repeat exactly for the same torch version and thread count; the result's
``environment`` says which it had, and verify warns when this machine differs. Exit status 0 when
every compared value is within tolerance, 1 when a value (or the file) is not, 2 when the result
cannot be verified (no ``records`` block, a data file not found, ...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger("knowbench")

RECORDS = "records"  # the result's block of per-record values
DEFAULT_N = 5
DEFAULT_TOLERANCE = 1e-6
METRIC_TOLERANCE = 1e-4  # records aggregated vs metrics.pre/post (which are rounded to 4 decimals)
MAX_ROWS = 200  # more compared values than this: the table lists only those that differ
PRE_POSITION_SEEDED = ("fluency",)  # pre-edit values whose sampling seed is the record's position


class VerifyError(ValueError):
    """The result cannot be verified (as opposed to: verified, and its numbers do not reproduce)."""


# -- the claimed values ---------------------------------------------------------------------------
def claimed_records(result: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The result's per-record values by record index; ``VerifyError`` when it carries none."""
    block = result.get(RECORDS)
    if block is None:
        raise VerifyError(
            f"the result carries no per-record values (no {RECORDS!r} block), so there is nothing to compare a "
            "re-run with: re-run it with a knowbench that writes them"
        )
    out: dict[int, dict[str, Any]] = {}
    for i, rec in enumerate(block if isinstance(block, list) else [None]):
        if not (isinstance(rec, dict) and isinstance(rec.get("index"), int) and isinstance(rec.get("pre"), dict)
                and isinstance(rec.get("post"), dict)):
            raise VerifyError(f"{RECORDS}[{i}] is not {{index: int, pre: {{...}}, post: {{...}}}}")
        out[rec["index"]] = rec
    return out


def flatten(values: dict[str, Any]) -> dict[str, float | None]:
    """One record's values as ``name -> number``: ``portability`` {Reasoning: [a, b]} becomes
    ``portability.Reasoning[0]``, ``portability.Reasoning[1]``."""
    out: dict[str, float | None] = {}
    for name, v in values.items():
        if isinstance(v, dict):
            for key, items in v.items():
                items = items if isinstance(items, list) else [items]
                for i, x in enumerate(items):
                    out[f"{name}.{key}[{i}]"] = _num(x)
        else:
            out[name] = _num(v)
    return out


def _num(x: Any) -> float | None:
    return None if x is None else float(x)


def consistency_problems(result: dict[str, Any], records: dict[int, dict[str, Any]]) -> list[str]:
    """Where the records block disagrees with the rest of the result (selection, metrics)."""
    from .evaluation import RecordScores, summarise
    from .schema import metric_family

    problems = []
    indices = result["task"]["selection"]["indices"]
    listed = [r["index"] for r in result[RECORDS]]
    if listed != indices:
        problems.append(f"{RECORDS}: lists records {_short(listed)}, the selection is {_short(indices)}")
        return problems
    spec = metric_family(result)
    for phase in ("pre", "post"):
        got = summarise([RecordScores(i, records[i][phase]) for i in indices], spec)
        claimed = result["metrics"][phase]
        for name in sorted(set(got) | set(claimed)):
            a, b = claimed.get(name), got.get(name)
            if a is None or b is None:
                problems.append(f"metrics.{phase}.{name}: {'absent' if a is None else 'present'} but the records "
                                f"{'have' if a is None else 'have no'} values for it")
            elif abs(a["value"] - b["value"]) > METRIC_TOLERANCE or a["n"] != b["n"]:
                problems.append(f"metrics.{phase}.{name}: {a['value']} (n {a['n']}), but the records give "
                                f"{b['value']} (n {b['n']})")
    return problems


def _short(xs: Sequence[int], k: int = 8) -> str:
    return "[" + ", ".join(map(str, xs[:k])) + (f", … ({len(xs)} in all)]" if len(xs) > k else "]")


# -- what to re-run ---------------------------------------------------------------------------------
@dataclass
class Plan:
    indices: list[int]  # the records the re-run edits, in this order
    sequential: int | None  # T of the re-run (None: single / batch)
    compare: list[int]  # the records whose values are compared
    what: str  # for humans


def _updates(result: dict[str, Any]) -> list[list[int]]:
    """The record indices of each update (apply) of the run, in order."""
    sel = result["task"]["selection"]["indices"]
    chunks = [list(e["records"]) for e in result.get("edits", []) if isinstance(e, dict) and "records" in e]
    if sorted(i for c in chunks for i in c) == sorted(sel):
        return chunks
    b = result["protocol"].get("batch_size") or 1  # an editor's edits block without records: cut as the runner does
    return [sel[i : i + b] for i in range(0, len(sel), b)]


def plan(result: dict[str, Any], n: int = DEFAULT_N, sample_seed: int = 0, full: bool = False,
         whole_selection: bool = False) -> Plan:
    """What to re-run for ``result`` (``whole_selection``: the task's metric family depends on it)."""
    if n < 1:
        raise VerifyError("--n must be at least 1")
    p = result["protocol"]
    sel = list(result["task"]["selection"]["indices"])
    sequential = p["name"] == "sequential"
    if full or whole_selection or (sequential and p["eval_timing"] == "final"):
        why = ("as asked (--full)" if full else
               "its task's metric family prepares on the whole selection" if whole_selection else
               "a sequential run evaluated on the final model: every score depends on all its edits")
        return Plan(sel, len(sel) if sequential else None, sel, f"the whole run ({len(sel)} records): {why}")
    updates = _updates(result)
    if sequential:
        indices: list[int] = []
        for chunk in updates:
            if len(indices) >= n:
                break
            indices += chunk
        return Plan(indices, len(indices), indices,
                    f"the first {len(indices)} of {len(sel)} sequential edits, scored right after each update")
    picked = set(random.Random(sample_seed).sample(sel, min(n, len(sel))))
    chosen = [c for c in updates if picked & set(c)]
    indices = [i for c in chosen for i in c]
    unit = "update" if p.get("batch_size", 1) > 1 else "edit"
    return Plan(indices, None, indices,
                f"a sample of {len(picked)} of {len(sel)} records (seed {sample_seed})"
                + (f", in their {len(chosen)} whole {unit}s of {p['batch_size']}" if unit == "update" else ""))


def _family_prepares(task_name: str) -> bool:
    """Whether the task's metric family overrides ``prepare`` (its scores may depend on the selection)."""
    from . import registry
    from .task import MetricFamily

    _, task = registry.load_task(task_name)
    return task.family_class().prepare is not MetricFamily.prepare


def rerun_config(result: dict[str, Any], p: Plan, hparams_file: str, data: str | None = None) -> Any:
    """The ``RunConfig`` of the re-run: the result's own, restricted to ``p.indices``."""
    from .runner import RunConfig

    names = {f.name for f in dataclasses.fields(RunConfig)}
    given = {k: v for k, v in (result.get("config") or {}).items() if k in names}
    given.setdefault("editor", result["editor"]["name"])
    given.setdefault("task", result["task"]["name"])
    cfg = RunConfig(**given)
    cfg.extra = dict(cfg.extra or {})
    cfg.extra["indices"] = list(p.indices)
    cfg.extra.pop("diagnostics", None)
    cfg.seed = result["protocol"]["seed"]
    cfg.limit = None
    cfg.sequential = p.sequential
    cfg.batch_size = result["protocol"].get("batch_size") or None
    cfg.eval_timing = result["protocol"]["eval_timing"]
    cfg.fluency = bool(result["protocol"].get("fluency", cfg.fluency))
    cfg.curve_every = None
    cfg.diagnostics = False
    cfg.output = None
    cfg.log_records = None
    cfg.hparams = hparams_file
    if data is not None:
        cfg.data = data
    return cfg


# -- comparing ---------------------------------------------------------------------------------------
@dataclass
class Comparison:
    index: int
    phase: str  # pre / post
    metric: str  # flattened name, e.g. portability.Reasoning[0]
    claimed: float | None
    recomputed: float | None

    @property
    def diff(self) -> float | None:
        if self.claimed is None or self.recomputed is None:
            return None if self.claimed is self.recomputed else math.inf
        return abs(self.claimed - self.recomputed)

    def ok(self, tolerance: float) -> bool:
        d = self.diff
        return d is None or d <= tolerance

    def describe(self) -> str:
        return (f"record {self.index} {self.phase}.{self.metric}: claimed {_fmt(self.claimed)}, recomputed "
                f"{_fmt(self.recomputed)} (|diff| {_fmt(self.diff)})")


def _fmt(x: float | None) -> str:
    if x is None:
        return "absent"
    if math.isinf(x):
        return "—"
    return f"{x:.6g}"


@dataclass
class Outcome:
    source: str
    what: str = ""
    tolerance: float = DEFAULT_TOLERANCE
    comparisons: list[Comparison] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the file or the re-run disagree beyond single values
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # values not comparable, and why

    @property
    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.ok(self.tolerance)]

    @property
    def ok(self) -> bool:
        return not self.problems and not self.failures and bool(self.comparisons)

    def verdict(self) -> str:
        if self.ok:
            n_rec = len({c.index for c in self.comparisons})
            return (f"{self.source}: verified — {len(self.comparisons)} values of {n_rec} records re-run agree "
                    f"within {self.tolerance:g}")
        lines = [f"{self.source}: NOT verified"]
        lines += [f"  {p}" for p in self.problems]
        bad = self.failures
        lines += [f"  {c.describe()}" for c in bad[:20]]
        if len(bad) > 20:
            lines.append(f"  … and {len(bad) - 20} more values beyond tolerance {self.tolerance:g}")
        return "\n".join(lines)


def compare(claimed: dict[int, dict[str, Any]], recomputed: dict[int, dict[str, Any]], indices: Sequence[int],
            same_position: set[int]) -> tuple[list[Comparison], list[str]]:
    """Every value of every record in ``indices``, claimed against recomputed; and what was skipped."""
    out, skipped = [], []
    for i in indices:
        for phase in ("pre", "post"):
            a, b = flatten(claimed[i][phase]), flatten(recomputed[i][phase])
            for name in list(dict.fromkeys([*a, *b])):
                if phase == "pre" and name.split(".")[0] in PRE_POSITION_SEEDED and i not in same_position:
                    skipped.append(f"record {i} pre.{name}")
                    continue
                out.append(Comparison(i, phase, name, a.get(name), b.get(name)))
    return out, skipped


def _environment_warnings(claimed: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = []
    for what, a, b in (
        ("torch", claimed.get("packages", {}).get("torch"), now.get("packages", {}).get("torch")),
        ("transformers", claimed.get("packages", {}).get("transformers"), now.get("packages", {}).get("transformers")),
        ("torch threads", claimed.get("torch_threads"), now.get("torch_threads")),
        ("machine", claimed.get("machine"), now.get("machine")),
        ("GPU", claimed.get("gpu"), now.get("gpu")),
    ):
        if a != b:
            out.append(f"{what}: the run had {a if a is not None else 'none recorded'}, this re-run "
                       f"{b if b is not None else 'none'} (values may differ in the last digits; see --tolerance)")
    return out


def _provenance_problems(claimed: dict[str, Any], rerun: dict[str, Any], p: Plan) -> list[str]:
    """Where the re-run is not the same experiment as the claimed run."""
    out = []
    pairs = (
        ("data file sha256", [f["sha256"] for f in claimed["task"]["data_files"]],
         [f["sha256"] for f in rerun["task"]["data_files"]]),
        ("editor", claimed["editor"]["name"], rerun["editor"]["name"]),
        ("model", claimed["model"]["id"], rerun["model"]["id"]),
        ("model parameter count", claimed["model"]["n_params"], rerun["model"]["n_params"]),
        ("model revision", claimed["model"].get("revision"), rerun["model"].get("revision")),
    )
    for what, a, b in pairs:
        if a != b:
            out.append(f"the re-run's {what} is {b}, the result's {a}: not the same experiment (pass --data for "
                       "the data file the result names)" if what.startswith("data") else
                       f"the re-run's {what} is {b}, the result's {a}: not the same experiment")
    a, b = claimed["editor"]["hparams"], rerun["editor"]["hparams"]
    if a != b:  # by value: the re-run reads them back from JSON, where 25 and 25.0 are one number
        diff = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        out.append(f"the re-run's editor hyper-parameters differ from the result's ({'; '.join(diff)}): not the same "
                   "experiment")
    got = rerun["task"]["selection"]["indices"]
    if got != p.indices:
        out.append(f"the re-run edited records {_short(got)}, not the requested {_short(p.indices)}: this knowbench's "
                   "runner does not honour RunConfig.extra['indices']")
    return out


# -- verifying -------------------------------------------------------------------------------------------
def verify(path: str | Path, n: int = DEFAULT_N, tolerance: float = DEFAULT_TOLERANCE, sample_seed: int = 0,
           full: bool = False, data: str | None = None, run: Callable[[Any], dict[str, Any]] | None = None) -> Outcome:
    """Verify the result file ``path`` (see the module docstring). Raises ``VerifyError`` when it
    cannot be verified; the returned ``Outcome`` says whether its numbers reproduce."""
    from .validate import validate_file

    out = Outcome(str(path), tolerance=tolerance)
    report = validate_file(path)
    if not report.ok:
        out.problems.append("the file does not validate:\n" + report.describe())
        return out
    result = report.result
    assert result is not None
    records = claimed_records(result)
    out.problems += consistency_problems(result, records)
    if out.problems:
        return out
    p = plan(result, n, sample_seed, full, whole_selection=not full and _family_prepares(result["task"]["name"]))
    out.what = p.what
    if run is None:
        from .runner import run
    with tempfile.TemporaryDirectory(prefix="knowbench-verify-") as tmp:
        hp = Path(tmp) / "hparams.json"
        hp.write_text(json.dumps(result["editor"]["hparams"]), encoding="utf-8")
        cfg = rerun_config(result, p, str(hp), data)
        log.info("verify %s: re-running %s", path, p.what)
        rerun = run(cfg)
    out.problems += _provenance_problems(result, rerun, p)
    out.warnings += _environment_warnings(result.get("environment") or {}, rerun.get("environment") or {})
    if out.problems:
        return out
    recomputed = {r["index"]: r for r in rerun["_records"]}
    sel = result["task"]["selection"]["indices"]
    same = {i for pos, i in enumerate(p.indices) if pos < len(sel) and sel[pos] == i}
    out.comparisons, out.skipped = compare(records, recomputed, p.compare, same)
    return out


def submit_check(path: str | Path) -> str:
    """For ``knowbench submit --verify``: "" when ``path`` verifies with the defaults, else why not."""
    try:
        outcome = verify(path)
    except (VerifyError, LookupError, ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        return f"cannot be verified: {exc}"
    return "" if outcome.ok else outcome.verdict().split("\n", 1)[-1].strip()


# -- output and command line ---------------------------------------------------------------------------
def render(outcome: Outcome, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    shown = outcome.comparisons
    if len(shown) > MAX_ROWS:  # a whole long run: the values that differ, and how many agree
        shown = outcome.failures[:MAX_ROWS]
    if shown:
        table = Table(title=f"{outcome.source} · re-ran {outcome.what}", title_justify="left")
        for col, justify in (("record", "right"), ("metric", "left"), ("claimed", "right"),
                             ("recomputed", "right"), ("|diff|", "right"), ("", "left")):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        last = None
        for c in shown:
            ok = c.ok(outcome.tolerance)
            table.add_row(str(c.index) if c.index != last else "", f"{c.phase}.{c.metric}", _fmt(c.claimed),
                          _fmt(c.recomputed), _fmt(c.diff), "ok" if ok else "[bold red]DIFFERS[/]")
            last = c.index
        console.print(table)
    if len(shown) < len(outcome.comparisons):
        console.print(f"{len(outcome.comparisons) - len(shown)} further values not listed "
                      f"({len(outcome.comparisons)} compared; the table lists at most {MAX_ROWS}, those that differ)",
                      highlight=False, soft_wrap=True)
    if outcome.skipped:
        console.print(f"not compared ({len(outcome.skipped)}): pre-edit fluency of records at another position in "
                      f"the re-run (its sampling seed is the position): {', '.join(outcome.skipped[:6])}"
                      + (" …" if len(outcome.skipped) > 6 else ""), highlight=False, soft_wrap=True)
    for w in outcome.warnings:
        log.warning("environment differs: %s", w)
    console.print(outcome.verdict(), highlight=False, markup=False, soft_wrap=True)


def add_verify(sub: Any) -> None:
    p = sub.add_parser(
        "verify",
        help="re-run a seeded sample of a result's records and compare with the values it claims",
        description="Re-run a seeded sample of a result's records with the result's own configuration and "
        "compare every per-record value with what the result claims (its records block), after checking "
        "that the file validates and that its records give its metrics. Single and batch runs: N sampled "
        "records (with their whole batch); sequential runs: the first N edits; a sequential run evaluated "
        "on the final model: the whole run. Exit status 0 when every value agrees within the tolerance, 1 "
        "when one does not, 2 when the result cannot be verified.",
    )
    p.add_argument("file", metavar="RESULT.json", help="a result file written by `knowbench run`")
    p.add_argument("--n", type=int, default=DEFAULT_N, metavar="N",
                   help=f"records to re-run (sequential: the first N edits; default {DEFAULT_N})")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, metavar="T",
                   help=f"largest accepted |claimed - recomputed| per value (fractions; default {DEFAULT_TOLERANCE:g}: "
                   "the same torch version and thread count repeat a run exactly)")
    p.add_argument("--sample-seed", type=int, default=0, metavar="S", help="seed of the sample of records (default 0)")
    p.add_argument("--full", action="store_true", help="re-run the whole run and compare every record")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="the data file on this machine, when the result's path does not exist here (its sha256 "
                   "must be the result's)")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args: Any) -> int:
    try:
        outcome = verify(args.file, n=args.n, tolerance=args.tolerance, sample_seed=args.sample_seed,
                         full=args.full, data=args.data)
    except VerifyError as exc:
        print(f"{args.file}: cannot be verified: {exc}")
        return 2
    render(outcome)
    return 0 if outcome.ok else 1
