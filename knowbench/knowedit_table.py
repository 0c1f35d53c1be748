"""``knowbench knowedit-table``: result files laid out as KnowEdit's results table.

KnowEdit's table (EasyEdit examples/KnowEdit.md; EDITORS.md 10.1) is one table per model: a block
of rows per task, in KnowEdit's task order (WikiData_recent, ZsRE, WikiBio, WikiData_counterfact,
ConvSent, Sanitation; ``schema.KNOWEDIT_TASK_ORDER``), each block with the rows Edit Succ.,
Portability, Locality and Fluency — WikiBio, ConvSent and Sanitation have no Portability (the
task's metric family says which rows it has) — and a column per editor, in KnowEdit's order
SERAC, ICE, AdaLoRA, MEND, ROME, MEMIT, FT-L, FT-M, then any other editor alphabetically by name.
Rephrase, which KnowEdit's table omits, is left out here too (the leaderboard shows it).

Inputs. Result files, or folders (every ``*.json`` below them), each validated by
``knowbench.validate`` and read migrated to the current schema; a file that is not a valid result
is an error naming it (the table is built only when every input is valid). KnowEdit's table is
single edits: results of other protocols (batch, sequential) are skipped, and so are results of
a model or metric protocol that ``--model`` / ``--metric-protocol`` leave out; each skipped file
is named on stderr with the reason. Identical copies of one result (same integrity hash) count once.

Tables. One per (model, model revision, metric protocol): results of different models, weights
or metric definitions are never put side by side. ``--format csv`` writes one table and asks for
``--model`` / ``--metric-protocol`` when the inputs make several.

Cells. The post-edit value (``metrics.post``) of the (task, editor) result, formatted as the
result tables show it (``knowbench.report``): accuracies (×100) and Fluency (n-gram entropy ×100,
as it is) with two decimals, a KL divergence (ConvSent's Locality, lower is better) with four.
``–`` marks a cell without a result, or a metric the result did not measure (never 0).

Duplicates. Two or more results for one cell (another seed, number of edits or data file) are an
error by default, naming the files. ``--duplicates mean`` follows the leaderboard instead: the
seeds of one experiment (same data, same number of edits) are averaged, and of several
experiments the one on the task's default data with the most edits is shown, the others named in
the footnote. "The newest result" is deliberately not a choice: a result file records no creation
time, and a file's modification time changes with every copy or checkout, so the table would
depend on how the files were copied.

Footnote (below each table): model and revision, metric protocol, protocol, records (edits) per
cell, the data files, and, for an editor whose result says its locality is measured against a
no-context baseline (ICE, IKE: ``editor.provenance.locality_baseline``), that note.

Importing this module imports no torch.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from tabulate import tabulate

from .leaderboard import _data_id, _md_escape, _task_sort, data_hash
from .report import _fmt as _fmt_entry
from .schema import KNOWEDIT_METRICS, KNOWEDIT_METRICS_NAME, MetricSpec, metric_family, migrate, protocol_label
from .validate import validate_file

# KnowEdit's rows, in its order (Rephrase is not one of them)
ROWS: tuple[str, ...] = ("edit_succ", "portability", "locality", "fluency")
# KnowEdit's column headers, in its order (its vocabulary, as schema.KNOWEDIT_TASK_ORDER is for
# tasks): a result's editor.name matches one case-insensitively; any other editor follows,
# alphabetically by name
KNOWEDIT_EDITORS: tuple[str, ...] = ("SERAC", "ICE", "AdaLoRA", "MEND", "ROME", "MEMIT", "FT-L", "FT-M")
# how the literature spells other editors' names; an editor not listed shows as its name
OTHER_SPELLINGS: tuple[str, ...] = ("AlphaEdit", "IKE", "LoRA", "GRACE", "WISE", "UltraEdit", "r-ROME", "PMET",
                                    "EMMET", "MALMEN", "RLEdit", "NSE", "PRUNE", "RECT", "MELO")
_SPELLING = {s.lower(): s for s in KNOWEDIT_EDITORS + OTHER_SPELLINGS}
_KNOWEDIT_ORDER = [s.lower() for s in KNOWEDIT_EDITORS]
MISSING = "–"  # a cell without a result, or a metric the result did not measure
DUPLICATES = ("error", "mean")
FORMATS = ("text", "markdown", "html", "csv")


class KnowEditTableError(ValueError):
    pass


def display_name(editor: str) -> str:
    return _SPELLING.get(editor.lower(), editor)


def editor_sort(editor: str) -> tuple:
    """KnowEdit's column order, then the others alphabetically by name."""
    e = editor.lower()
    return (0, _KNOWEDIT_ORDER.index(e), "") if e in _KNOWEDIT_ORDER else (1, 0, e)


# -- reading ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    path: str
    result: dict[str, Any]  # migrated to the current schema


def result_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files ``paths`` name: a file as given, a folder as every ``*.json`` below it (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("*.json"))
            if not found:
                raise KnowEditTableError(f"{p}: no result files (*.json) in this folder")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise KnowEditTableError(f"{p}: no such file or folder")
    return list(dict.fromkeys(files))  # a file named twice (directly and through its folder) once


def load_sources(paths: Iterable[str | Path]) -> list[Source]:
    """Every result in ``paths``, validated; raises naming every file that is not a valid result."""
    sources, invalid = [], []
    for f in result_files(paths):
        report = validate_file(f)
        if not report.ok:
            invalid.append(report.describe())
            continue
        sources.append(Source(str(f), migrate(report.result)))
    if invalid:
        raise KnowEditTableError(f"{len(invalid)} file(s) are not valid knowbench results (`knowbench validate` "
                                 "says why); nothing was rendered:\n" + "\n".join(invalid))
    return sources


def metrics_name(result: dict[str, Any]) -> str:
    return result["protocol"]["metrics"]["name"]


def select(sources: Sequence[Source], model: str | None = None,
           metric_protocol: str | None = None) -> tuple[list[Source], list[str]]:
    """(the single-edit results that pass the filters, "path: why" for each one that does not)."""
    kept: list[Source] = []
    skipped: list[str] = []
    seen: dict[str, str] = {}
    for s in sources:
        r = s.result
        digest = r["integrity"]["sha256"]
        if r["protocol"]["name"] != "single":
            skipped.append(f"{s.path}: not a single-edit result ({protocol_label(r['protocol'])}); KnowEdit's "
                           "table is single edits")
        elif model is not None and r["model"]["id"] != model:
            skipped.append(f"{s.path}: model {r['model']['id']}, not --model {model}")
        elif metric_protocol is not None and metrics_name(r) != metric_protocol:
            skipped.append(f"{s.path}: metric protocol {metrics_name(r)}, not --metric-protocol {metric_protocol}")
        elif digest in seen:
            skipped.append(f"{s.path}: the same result as {seen[digest]} (same integrity hash), counted once")
        else:
            seen[digest] = s.path
            kept.append(s)
    return kept, skipped


# -- the table -------------------------------------------------------------------------------------
@dataclass
class Cell:
    values: dict[str, float]  # metric -> post-edit value (mean over seeds); absent: not measured
    n_edits: int
    seeds: list[int]
    files: list[str]
    data: tuple[str, str]  # (file names, sha256 first 8 hex digits)
    locality_baseline: Any = None  # editor.provenance.locality_baseline, when the result states one


@dataclass
class Block:
    task: str
    knowedit_name: str
    rows: list[str]  # metric names, in ROWS order
    specs: dict[str, MetricSpec]
    cells: dict[str, Cell] = field(default_factory=dict)  # editor -> cell

    def label(self, metric: str) -> str:
        spec = self.specs[metric]
        if spec.unit == "kl":
            return spec.label + " (KL↓)"
        return spec.label + ("" if spec.higher_is_better else " ↓")

    def text(self, metric: str, editor: str) -> str:
        cell = self.cells.get(editor)
        if cell is None or metric not in cell.values:
            return MISSING
        spec = self.specs[metric]
        return _fmt_entry({"value": cell.values[metric], "higher_is_better": spec.higher_is_better}, spec)


@dataclass
class KnowEditTable:
    model: str
    revision: str | None
    metric_protocol: str
    fixes: list[str]
    editors: list[str]  # column order
    blocks: list[Block]  # KnowEdit's task order
    dropped: list[str] = field(default_factory=list)  # --duplicates mean: results not shown, and why

    @property
    def title(self) -> str:
        rev = f" (revision {self.revision})" if self.revision else ""
        return f"KnowEdit table · model {self.model}{rev} · metric protocol {self.metric_protocol}"

    def block(self, task: str) -> Block:
        """The block of ``task`` (its name or KnowEdit's name)."""
        for b in self.blocks:
            if task in (b.task, b.knowedit_name):
                return b
        raise KeyError(task)

    def cell(self, task: str, metric: str, editor: str) -> str:
        """The rendered cell: a number, or ``–``."""
        return self.block(task).text(metric, editor)

    def grid(self) -> list[list[str]]:
        """KnowEdit's layout: per task a header row (its name), then one row per metric
        (blank, metric label, one cell per editor)."""
        rows: list[list[str]] = []
        for b in self.blocks:
            rows.append([b.knowedit_name, ""] + [""] * len(self.editors))
            for m in b.rows:
                rows.append(["", b.label(m)] + [b.text(m, e) for e in self.editors])
        return rows

    def header(self) -> list[str]:
        return ["DataSet", "Metric", *map(display_name, self.editors)]

    def footnote(self) -> str:
        fixes = f" (fixes: {', '.join(self.fixes)})" if self.fixes else ""
        parts = [f"Model {self.model}" + (f" (revision {self.revision})" if self.revision else ""),
                 f"metric protocol {self.metric_protocol}{fixes}", "single edits",
                 self._records(), f"data: {self._data()}",
                 "post-edit values; accuracies ×100, Fluency n-gram entropy ×100"
                 + ("; KL↓: a KL divergence, lower is better" if any(
                     b.specs[m].unit == "kl" for b in self.blocks for m in b.rows) else ""),
                 f"{MISSING} = no result or not measured"]
        return " · ".join(parts) + "."

    def notes(self) -> list[str]:
        """Notes below the footnote: editors whose locality is against a no-context baseline, and
        results left out of a cell (``--duplicates mean``)."""
        out = []
        for e in self.editors:
            said: list[str] = []
            for b in self.blocks:
                c = b.cells.get(e)
                if c is not None and c.locality_baseline not in (None, "", False):
                    v = c.locality_baseline
                    text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
                    if text not in said:
                        said.append(text)
            if said:
                out.append(f"{display_name(e)}: Locality is measured against a no-context baseline "
                           f"(locality_baseline: {'; '.join(said)}); do not compare it with the "
                           "parametric editors' Locality.")
        out += [f"Not shown: {d}" for d in self.dropped]
        return out

    def _records(self) -> str:
        cells = [(b, e, c) for b in self.blocks for e, c in b.cells.items()]
        kinds = {(c.n_edits, len(c.seeds)) for _, _, c in cells}
        if len(kinds) == 1:
            n, k = kinds.pop()
            return f"{n} records per cell" + (f" (mean of {k} seeds)" if k > 1 else "")
        def one(c: Cell) -> str:
            return f"{c.n_edits}" + (f" (mean of {len(c.seeds)} seeds)" if len(c.seeds) > 1 else "")

        per = [f"{b.knowedit_name} " + ", ".join(f"{display_name(e)} {one(b.cells[e])}"
                                                  for e in self.editors if e in b.cells) for b in self.blocks]
        return "records per cell: " + "; ".join(per)

    def _data(self) -> str:
        out = []
        for b in self.blocks:
            by_data: dict[tuple[str, str], list[str]] = {}
            for e in self.editors:
                if e in b.cells:
                    by_data.setdefault(b.cells[e].data, []).append(display_name(e))
            if len(by_data) == 1:
                (name, sha), = by_data
                out.append(f"{b.knowedit_name} {name} ({sha})")
            else:  # editors of one block scored on different files: say who used which
                out.append(f"{b.knowedit_name} " + ", ".join(
                    f"{name} ({sha}) for {' '.join(eds)}" for (name, sha), eds in by_data.items()))
        return "; ".join(out)


def build_tables(sources: Sequence[Source], duplicates: str = "error") -> list[KnowEditTable]:
    """One table per (model, revision, metric protocol) from single-edit results (``select``)."""
    if duplicates not in DUPLICATES:
        raise KnowEditTableError(f"duplicates={duplicates!r}: expected one of {', '.join(DUPLICATES)}")
    not_single = [s.path for s in sources if s.result["protocol"]["name"] != "single"]
    if not_single:
        raise KnowEditTableError(f"not single-edit results (select() skips them): {', '.join(not_single)}")
    groups: dict[tuple[str, str | None, str], list[Source]] = {}
    for s in sources:
        r = s.result
        groups.setdefault((r["model"]["id"], r["model"]["revision"], metrics_name(r)), []).append(s)
    order = sorted(groups, key=lambda k: (k[0] != "embedded", k[0], k[1] or "", k[2] != KNOWEDIT_METRICS_NAME, k[2]))
    return [_table(k, groups[k], duplicates) for k in order]


def _table(key: tuple[str, str | None, str], sources: list[Source], duplicates: str) -> KnowEditTable:
    model, revision, mp = key
    fixes = sorted({f for s in sources for f in s.result["protocol"]["metrics"]["fixes"]})
    by_task: dict[str, list[Source]] = {}
    for s in sources:
        by_task.setdefault(s.result["task"]["name"], []).append(s)
    table = KnowEditTable(model, revision, mp, fixes, editors=[], blocks=[])
    editors: set[str] = set()
    for task in sorted(by_task, key=lambda t: _task_sort(t, by_task[t][0].result["task"]["knowedit_name"])):
        members = by_task[task]
        first = members[0].result
        family = metric_family(first)
        specs = {m: (family.spec(m) if family else None) or KNOWEDIT_METRICS[m] for m in ROWS}
        rows = [m for m in ROWS if family is None or m in family.names()]
        block = Block(task, first["task"]["knowedit_name"], rows, {m: specs[m] for m in rows})
        by_editor: dict[str, list[Source]] = {}
        for s in members:
            by_editor.setdefault(s.result["editor"]["name"], []).append(s)
        for editor, cands in by_editor.items():
            chosen, dropped = _resolve(cands, duplicates, f"{block.knowedit_name} × {display_name(editor)} "
                                       f"(model {model}, metric protocol {mp})")
            block.cells[editor] = _cell(chosen, rows)
            table.dropped += dropped
            editors.add(editor)
        table.blocks.append(block)
    table.editors = sorted(editors, key=editor_sort)
    return table


def _describe(s: Source) -> str:
    r = s.result
    _, label, _ = _data_id(r)
    return (f"{s.path} (seed {r['protocol']['seed']}, {r['protocol']['n_edits']} edits, data {label} "
            f"{data_hash(r)[:8]})")


def _resolve(cands: list[Source], duplicates: str, what: str) -> tuple[list[Source], list[str]]:
    """(the results a cell shows — one, or the seeds of one experiment under ``mean`` —, what is left out)."""
    if len(cands) == 1:
        return cands, []
    listing = "\n".join(f"  {_describe(s)}" for s in sorted(cands, key=lambda s: s.path))
    if duplicates == "error":
        raise KnowEditTableError(
            f"{len(cands)} results for one cell, {what}:\n{listing}\npass one result per task and editor, or "
            "--duplicates mean (average the seeds of one experiment; of several, show the one on the default "
            "data with the most edits)")
    experiments: dict[tuple[str, int], list[Source]] = {}
    for s in cands:
        experiments.setdefault((data_hash(s.result), s.result["protocol"]["n_edits"]), []).append(s)

    def rank(k: tuple[str, int]) -> tuple:
        r = experiments[k][0].result
        return (not r["task"]["default_data"], -k[1], _data_id(r)[1], k[0])

    best = min(experiments, key=rank)
    chosen = sorted(experiments[best], key=lambda s: s.result["protocol"]["seed"])
    seeds = [s.result["protocol"]["seed"] for s in chosen]
    if len(set(seeds)) != len(seeds):
        raise KnowEditTableError(f"results for one cell, {what}, share data, number of edits and seed, so they "
                                 f"cannot be averaged (re-runs of one experiment?): pass one of them\n{listing}")
    dropped = [f"{_describe(s)}: {what}; the cell shows {chosen[0].result['protocol']['n_edits']} edits on "
               f"{_data_id(chosen[0].result)[1]}" for k in sorted(experiments, key=rank) if k != best
               for s in experiments[k]]
    return chosen, dropped


def _cell(chosen: list[Source], rows: list[str]) -> Cell:
    values: dict[str, float] = {}
    for m in rows:
        vals = [s.result["metrics"]["post"][m]["value"] for s in chosen if m in s.result["metrics"]["post"]]
        if vals:  # the seeds that measured it, as the leaderboard averages
            values[m] = sum(vals) / len(vals)
    r = chosen[0].result
    _, label, _ = _data_id(r)
    baseline = next((s.result["editor"].get("provenance", {}).get("locality_baseline") for s in chosen
                     if s.result["editor"].get("provenance", {}).get("locality_baseline") is not None), None)
    return Cell(values, r["protocol"]["n_edits"], [s.result["protocol"]["seed"] for s in chosen],
                [s.path for s in chosen], (label, data_hash(r)[:8]), baseline)


# -- rendering -------------------------------------------------------------------------------------
def render_text(tables: Sequence[KnowEditTable]) -> str:
    out = []
    for t in tables:
        out += [t.title, "", tabulate(t.grid(), t.header(), tablefmt="simple", disable_numparse=True,
                                      colalign=["left", "left"] + ["right"] * len(t.editors)), "",
                t.footnote(), *t.notes(), ""]
    return "\n".join(out)


def render_markdown(tables: Sequence[KnowEditTable], level: int = 2) -> str:
    """Each table under a heading of ``level``; the task rows in bold, as KnowEdit writes them."""
    out = []
    for t in tables:
        rows = [[f"**{_md_escape(r[0])}**" if r[0] else "", *map(_md_escape, r[1:])] for r in t.grid()]
        out += ["#" * level + " " + t.title, "",
                tabulate(rows, list(map(_md_escape, t.header())), tablefmt="pipe", disable_numparse=True,
                         colalign=["left", "left"] + ["right"] * len(t.editors)), "",
                _md_escape(t.footnote()), ""]
        out += [f"* {_md_escape(n)}" for n in t.notes()] + ([""] if t.notes() else [])
    return "\n".join(out)


def render_html_tables(tables: Sequence[KnowEditTable], level: int = 2) -> str:
    """The tables as an HTML fragment (``<table class="knowedit">``, a ``<tbody>`` per task)."""
    e = html.escape
    parts: list[str] = []
    for t in tables:
        parts.append(f"<h{level}>{e(t.title)}</h{level}>")
        parts.append(f'<table class="knowedit" data-model="{e(t.model)}" '
                     f'data-metric-protocol="{e(t.metric_protocol)}">')
        parts.append("<thead><tr>" + "".join(f'<th scope="col">{e(h)}</th>' for h in t.header()) + "</tr></thead>")
        for b in t.blocks:
            parts.append(f'<tbody data-knowedit-task="{e(b.knowedit_name)}">')
            parts.append(f'<tr class="task"><th scope="rowgroup" colspan="{2 + len(t.editors)}">'
                         f"{e(b.knowedit_name)}</th></tr>")
            for m in b.rows:
                tds = "".join(f"<td>{e(b.text(m, ed))}</td>" for ed in t.editors)
                parts.append(f'<tr data-metric="{e(m)}"><td></td><th scope="row">{e(b.label(m))}</th>{tds}</tr>')
            parts.append("</tbody>")
        parts.append("</table>")
        parts.append(f'<p class="footnote">{e(t.footnote())}</p>')
        parts += [f'<p class="footnote">{e(n)}</p>' for n in t.notes()]
    return "\n".join(parts)


HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>KnowEdit table</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #1d2330; }
  table.knowedit { border-collapse: collapse; margin-bottom: .5rem; font-variant-numeric: tabular-nums; }
  table.knowedit th, table.knowedit td { padding: .25rem .6rem; border-bottom: 1px solid #e3e7ee; text-align: right; }
  table.knowedit thead th { background: #f2f4f8; }
  table.knowedit thead th:nth-child(-n+2) { text-align: left; }
  table.knowedit th[scope="rowgroup"], table.knowedit th[scope="row"] { text-align: left; }
  table.knowedit tr.task th { background: #f7f9fc; }
  p.footnote { color: #4a5468; font-size: .9em; max-width: 60rem; }
</style>
</head>
<body>
{{TABLES}}
</body>
</html>
"""


def render_html(tables: Sequence[KnowEditTable]) -> str:
    return HTML_PAGE.replace("{{TABLES}}", render_html_tables(tables))


def render_csv(table: KnowEditTable) -> str:
    """One table, one row per (task, metric): model, revision, metric protocol, task, metric, then
    one column per editor (display names)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "revision", "metric_protocol", "task", "knowedit_task", "metric", "label",
                *map(display_name, table.editors)])
    for b in table.blocks:
        for m in b.rows:
            w.writerow([table.model, table.revision or "", table.metric_protocol, b.task, b.knowedit_name, m,
                        b.label(m), *[b.text(m, e) for e in table.editors]])
    return buf.getvalue()


def render(tables: Sequence[KnowEditTable], fmt: str) -> str:
    if fmt == "csv":
        if len(tables) != 1:
            raise KnowEditTableError(
                f"--format csv writes one table, but the results make {len(tables)}: "
                + "; ".join(f"model {t.model}" + (f" revision {t.revision}" if t.revision else "")
                            + f", metric protocol {t.metric_protocol}" for t in tables)
                + ". Choose one with --model and --metric-protocol (or pass only its files)")
        return render_csv(tables[0])
    if fmt == "markdown":
        return render_markdown(tables)
    if fmt == "html":
        return render_html(tables)
    if fmt == "text":
        return render_text(tables)
    raise KnowEditTableError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")


# -- the leaderboard's section ---------------------------------------------------------------------
LEADERBOARD_MODEL = "embedded"


def leaderboard_tables(results: Iterable[tuple[str, dict[str, Any]]]) -> list[KnowEditTable]:
    """The leaderboard page's KnowEdit section: the embedded model's single-edit results under the
    ``knowedit`` metric protocol, seeds averaged (``--duplicates mean``); ``results`` are
    (path, result as stored) pairs of validated files. Empty when there are none."""
    sources = [Source(str(p), migrate(r)) for p, r in results]
    kept, _ = select(sources, model=LEADERBOARD_MODEL, metric_protocol=KNOWEDIT_METRICS_NAME)
    return build_tables(kept, duplicates="mean") if kept else []


# -- command line ----------------------------------------------------------------------------------
def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="RESULT_OR_DIR",
                   help="result files written by `knowbench run`, or folders (every *.json below them)")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="text (default), markdown, html (a page) or csv (one table)")
    p.add_argument("--output", default=None, metavar="FILE", help="write the table here instead of stdout")
    p.add_argument("--model", default=None, metavar="ID", help="only results of this model id")
    p.add_argument("--metric-protocol", default=None, metavar="NAME",
                   help="only results under this metric protocol, e.g. knowedit or knowbench")
    p.add_argument("--duplicates", choices=DUPLICATES, default="error",
                   help="several results for one task and editor: error (default), or mean: average the "
                   "seeds of one experiment and, of several, show the one on the default data with the "
                   "most edits (the others are named below the table)")
    p.set_defaults(func=cmd_knowedit_table)


def add_knowedit_table(sub: Any) -> None:
    p = sub.add_parser(
        "knowedit-table",
        help="lay result files out as KnowEdit's table (a block per task, a column per editor)",
        description="Render single-edit result files the way KnowEdit publishes its results: per task (in "
        "KnowEdit's order) the rows Edit Succ., Portability, Locality and Fluency (post-edit), a column per "
        "editor (SERAC, ICE, AdaLoRA, MEND, ROME, MEMIT, FT-L, FT-M, then the others). One table per model "
        "and metric protocol; other protocols are skipped (listed on stderr); an invalid file is an error.",
    )
    _arguments(p)


def cmd_knowedit_table(args: argparse.Namespace) -> int:
    try:
        kept, skipped = select(load_sources(args.paths), model=args.model, metric_protocol=args.metric_protocol)
        for line in skipped:
            print(f"skipped {line}", file=sys.stderr)
        if not kept:
            raise KnowEditTableError("no single-edit results left to show" + (
                f" ({len(skipped)} skipped, see above)" if skipped else ""))
        text = render(build_tables(kept, args.duplicates), args.format)
    except KnowEditTableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    emit(text, args.output)
    return 0


def emit(text: str, output: str | None) -> None:
    """A rendered table to ``output`` (written atomically; said on stderr) or to stdout."""
    if output:
        from .results import _write_atomic

        _write_atomic(output, lambda f: f.write(text))
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``knowbench knowedit-table`` on its own: ``main(["leaderboard/results", "--format", "markdown"])``."""
    p = argparse.ArgumentParser(prog="knowbench knowedit-table",
                                description="Lay result files out as KnowEdit's table.")
    _arguments(p)
    args = p.parse_args(argv)
    return args.func(args)
