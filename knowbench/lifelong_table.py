"""``knowbench lifelong-table``: sequential (lifelong) results laid out as the lifelong literature does.

WISE (Table 2) and AlphaEdit (Tables 1–2) report each editor after T sequential edits as a row
with Reliability / Generalisation / Locality (KnowEdit's Edit Succ. / Rephrase / Locality) per T.
This module builds that table from result files: a row per editor (KnowEdit's editor order, then
the others alphabetically), a column per setting — T, when the edits were evaluated (``each``:
right after its own edit; ``final``: all on the final model, the WISE/AlphaEdit protocol) and the
batch size of the stream (``b100``: turns of 100 edits) — each cell ``Edit Succ. / Rephrase /
Locality`` (×100, post-edit), and below it the pre-edit values of the records.

Inputs are validated exactly as for ``knowbench knowedit-table`` (an invalid file is an error naming
it); results that are not sequential, or of another task, model or metric protocol than the table
shows, are skipped and named on stderr. One table per (model, revision, metric protocol, task): runs
of different weights, data or metric definitions are never put side by side. Two results for one
cell are an error unless ``--duplicates mean`` (seeds of one experiment averaged).

``lifelong_figure`` draws the lifelong curves of every editor in one figure: Edit Succ. and
Locality on the run's probe subset after every K edits (``--curve-every``), one line per editor, for
the largest T (a ``final`` run preferred; the curve does not depend on the timing).

Importing this module imports no torch.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tabulate import tabulate

from .knowedit_table import (DUPLICATES, MISSING, KnowEditTableError, Source, _resolve, display_name, editor_sort,
                             emit, load_sources, metrics_name)
from .leaderboard import _data_id, _md_escape, data_hash

METRICS: tuple[str, ...] = ("edit_succ", "rephrase", "locality")  # Rel. / Gen. / Loc. in WISE's words
LABELS = {"edit_succ": "Edit Succ.", "rephrase": "Rephrase", "locality": "Locality"}
FORMATS = ("text", "markdown", "html", "csv")
TIMING_ORDER = {"each": 0, "final": 1}


class LifelongTableError(KnowEditTableError):
    pass


@dataclass(frozen=True, order=True)
class Setting:
    """One column: T sequential edits, evaluated ``each`` or ``final``, in turns of ``batch`` edits."""

    n_edits: int
    timing: str
    batch: int = 1

    @classmethod
    def of(cls, result: dict[str, Any]) -> "Setting":
        p = result["protocol"]
        return cls(int(p["n_edits"]), p["eval_timing"], int(p.get("batch_size") or 1))

    def sort_key(self) -> tuple:
        return (self.n_edits, self.batch, TIMING_ORDER.get(self.timing, 9))

    @property
    def label(self) -> str:
        return f"T={self.n_edits} {self.timing}" + (f" b{self.batch}" if self.batch > 1 else "")


@dataclass
class Cell:
    post: dict[str, float]
    pre: dict[str, float]
    seeds: list[int]
    files: list[str]
    data: tuple[str, str]
    edit_ms: float | None = None


@dataclass
class LifelongTable:
    model: str
    revision: str | None
    metric_protocol: str
    task: str
    knowedit_name: str
    settings: list[Setting] = field(default_factory=list)
    editors: list[str] = field(default_factory=list)
    cells: dict[tuple[str, Setting], Cell] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        rev = f" (revision {self.revision})" if self.revision else ""
        return (f"Lifelong table · {self.knowedit_name} ({self.task}) · model {self.model}{rev} · "
                f"metric protocol {self.metric_protocol}")

    def text(self, editor: str, setting: Setting, which: str = "post") -> str:
        c = self.cells.get((editor, setting))
        if c is None:
            return MISSING
        vals = c.post if which == "post" else c.pre
        return " / ".join(f"{vals[m]:.1f}" if m in vals else MISSING for m in METRICS)

    def header(self) -> list[str]:
        return ["Editor", *[s.label for s in self.settings]]

    def grid(self) -> list[list[str]]:
        rows = [[display_name(e), *[self.text(e, s) for s in self.settings]] for e in self.editors]
        pre = [self._pre(s) for s in self.settings]
        if any(p != MISSING for p in pre):
            rows.append(["(pre-edit)", *pre])
        return rows

    def _pre(self, s: Setting) -> str:
        """The pre-edit values of the setting's records (one editor's; they are the same records)."""
        for e in self.editors:
            c = self.cells.get((e, s))
            if c is not None and c.pre:
                return self.text(e, s, "pre")
        return MISSING

    def footnote(self) -> str:
        datas = sorted({c.data for c in self.cells.values()})
        data = ", ".join(f"{n} ({h})" for n, h in datas)
        seeds = sorted({len(c.seeds) for c in self.cells.values()})
        parts = ["Cells: Edit Succ. / Rephrase / Locality after T sequential edits (×100, post-edit; Locality "
                 "against the unedited model)",
                 "each: every edit scored right after it was applied; final: all edits scored on the final "
                 "model (the WISE / AlphaEdit protocol); bN: the stream applied in turns of N edits",
                 f"data: {data}"]
        if seeds != [1]:
            parts.append("seeds averaged where a cell has several")
        parts.append(f"{MISSING} = no result")
        return " · ".join(parts) + "."

    def notes(self) -> list[str]:
        return [f"Not shown: {d}" for d in self.dropped]


def select(sources: Sequence[Source], task: str | None = "zsre", model: str | None = None,
           metric_protocol: str | None = None) -> tuple[list[Source], list[str]]:
    """(the sequential results that pass the filters, "path: why" for each one that does not)."""
    kept, skipped, seen = [], [], {}
    for s in sources:
        r = s.result
        digest = r["integrity"]["sha256"]
        if r["protocol"]["name"] != "sequential":
            skipped.append(f"{s.path}: not a sequential result ({r['protocol']['name']})")
        elif task is not None and task.lower() not in (r["task"]["name"].lower(), r["task"]["knowedit_name"].lower()):
            skipped.append(f"{s.path}: task {r['task']['name']}, not --task {task}")
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


def build_tables(sources: Sequence[Source], duplicates: str = "error") -> list[LifelongTable]:
    if duplicates not in DUPLICATES:
        raise LifelongTableError(f"duplicates={duplicates!r}: expected one of {', '.join(DUPLICATES)}")
    groups: dict[tuple, list[Source]] = {}
    for s in sources:
        r = s.result
        if r["protocol"]["name"] != "sequential":
            raise LifelongTableError(f"{s.path}: not a sequential result (select() skips it)")
        groups.setdefault((r["model"]["id"], r["model"]["revision"], metrics_name(r), r["task"]["name"]), []).append(s)
    tables = []
    for key in sorted(groups, key=lambda k: (k[0] != "embedded", k[0], k[1] or "", k[2], k[3])):
        model, revision, mp, task = key
        members = groups[key]
        t = LifelongTable(model, revision, mp, task, members[0].result["task"]["knowedit_name"])
        by_cell: dict[tuple[str, Setting], list[Source]] = {}
        for s in members:
            by_cell.setdefault((s.result["editor"]["name"], Setting.of(s.result)), []).append(s)
        for (editor, setting), cands in by_cell.items():
            chosen, dropped = _resolve(cands, duplicates, f"{display_name(editor)} × {setting.label} (task {task}, "
                                       f"model {model}, metric protocol {mp})")
            t.cells[(editor, setting)] = _cell(chosen)
            t.dropped += dropped
        t.settings = sorted({s for _, s in t.cells}, key=Setting.sort_key)
        t.editors = sorted({e for e, _ in t.cells}, key=editor_sort)
        tables.append(t)
    return tables


def _mean(vals: list[float]) -> float:
    return sum(vals) / len(vals)


def _cell(chosen: list[Source]) -> Cell:
    post, pre = {}, {}
    for m in METRICS:
        v = [s.result["metrics"]["post"][m]["value"] for s in chosen if m in s.result["metrics"]["post"]]
        if v:
            post[m] = _mean(v)
        v = [s.result["metrics"]["pre"][m]["value"] for s in chosen
             if m in (s.result["metrics"].get("pre") or {})]
        if v:
            pre[m] = _mean(v)
    r = chosen[0].result
    ms = [s.result.get("timings", {}).get("edit_ms_per_edit") for s in chosen]
    ms = [x for x in ms if isinstance(x, (int, float))]
    return Cell(post, pre, [s.result["protocol"]["seed"] for s in chosen], [s.path for s in chosen],
                (_data_id(r)[1], data_hash(r)[:8]), _mean(ms) if ms else None)


# -- rendering -------------------------------------------------------------------------------------
def render_text(tables: Sequence[LifelongTable]) -> str:
    out = []
    for t in tables:
        out += [t.title, "", tabulate(t.grid(), t.header(), tablefmt="simple", disable_numparse=True,
                                      colalign=["left"] + ["right"] * len(t.settings)), "", t.footnote(),
                *t.notes(), ""]
    return "\n".join(out)


def render_markdown(tables: Sequence[LifelongTable], level: int = 2) -> str:
    out = []
    for t in tables:
        rows = [list(map(_md_escape, r)) for r in t.grid()]
        out += ["#" * level + " " + _md_escape(t.title), "",
                tabulate(rows, list(map(_md_escape, t.header())), tablefmt="pipe", disable_numparse=True,
                         colalign=["left"] + ["right"] * len(t.settings)), "", _md_escape(t.footnote()), ""]
        out += [f"* {_md_escape(n)}" for n in t.notes()] + ([""] if t.notes() else [])
    return "\n".join(out)


def render_html_tables(tables: Sequence[LifelongTable], level: int = 2) -> str:
    e = html.escape
    parts = []
    for t in tables:
        parts.append(f"<h{level}>{e(t.title)}</h{level}>")
        parts.append(f'<table class="lifelong" data-task="{e(t.task)}" data-model="{e(t.model)}">')
        parts.append("<thead><tr>" + "".join(f'<th scope="col">{e(h)}</th>' for h in t.header()) + "</tr></thead><tbody>")
        for row in t.grid():
            parts.append(f'<tr><th scope="row">{e(row[0])}</th>' + "".join(f"<td>{e(c)}</td>" for c in row[1:]) + "</tr>")
        parts.append("</tbody></table>")
        parts.append(f'<p class="footnote">{e(t.footnote())}</p>')
        parts += [f'<p class="footnote">{e(n)}</p>' for n in t.notes()]
    return "\n".join(parts)


def render_csv(tables: Sequence[LifelongTable]) -> str:
    """One row per (table, editor, setting, metric): long format, every table in one file."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "revision", "metric_protocol", "task", "editor", "n_edits", "eval_timing", "batch_size",
                "metric", "pre", "post", "edit_ms_per_edit", "seeds", "files"])
    for t in tables:
        for (editor, s), c in sorted(t.cells.items(), key=lambda kv: (editor_sort(kv[0][0]), kv[0][1].sort_key())):
            for m in METRICS:
                if m in c.post:
                    w.writerow([t.model, t.revision or "", t.metric_protocol, t.task, editor, s.n_edits, s.timing,
                                s.batch, m, f"{c.pre[m]:.4f}" if m in c.pre else "", f"{c.post[m]:.4f}",
                                f"{c.edit_ms:.1f}" if c.edit_ms is not None else "",
                                " ".join(map(str, c.seeds)), " ".join(c.files)])
    return buf.getvalue()


def render(tables: Sequence[LifelongTable], fmt: str) -> str:
    if fmt == "markdown":
        return render_markdown(tables)
    if fmt == "html":
        from .knowedit_table import HTML_PAGE

        return HTML_PAGE.replace("<title>KnowEdit table</title>", "<title>Lifelong table</title>").replace(
            "{{TABLES}}", render_html_tables(tables)).replace("table.knowedit", "table.lifelong")
    if fmt == "csv":
        return render_csv(tables)
    if fmt == "text":
        return render_text(tables)
    raise LifelongTableError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")


# -- the figure ------------------------------------------------------------------------------------
def curve_runs(table: LifelongTable) -> dict[str, tuple[Setting, list[dict[str, Any]]]]:
    """Per editor, the run whose lifelong curve the figure draws: the largest T with a curve, batch 1
    before batched streams, ``final`` before ``each`` (the curve itself does not depend on the timing)."""
    import json

    out: dict[str, tuple[Setting, list[dict[str, Any]]]] = {}
    for editor in table.editors:
        cands = [s for e, s in table.cells if e == editor]
        cands.sort(key=lambda s: (-s.n_edits, s.batch, -TIMING_ORDER.get(s.timing, 0)))
        for s in cands:
            curve = json.loads(Path(table.cells[(editor, s)].files[0]).read_text()).get("curve") or []
            if curve:
                out[editor] = (s, curve)
                break
    return out


def lifelong_figure(table: LifelongTable, out: Path) -> Path:
    """Edit Succ. and Locality on the probe subset against edits applied, one line per editor."""
    from .plots import require_matplotlib

    plt = require_matplotlib()
    runs = curve_runs(table)
    if not runs:
        raise LifelongTableError(f"{table.title}: no result has a lifelong curve (run with --curve-every K)")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours; the markers and dashes tell more apart
    for i, (editor, (s, curve)) in enumerate(runs.items()):
        style = {"color": colours[(2 * i) % 20 + (i // 10) % 2], "marker": "os^Dv"[i % 5],
                 "ls": "-" if i < 10 else "--"}
        for ax, m in zip(axes, ("edit_succ", "locality")):
            pts = [(pt["edits"], pt[m]) for pt in curve if m in pt]
            if pts:
                ax.plot(*zip(*pts), ms=3, lw=1.3, label=f"{display_name(editor)} ({s.label})", **style)
    for ax, m in zip(axes, ("edit_succ", "locality")):
        ax.set_xlabel("edits applied")
        ax.set_ylabel(f"{LABELS[m]} (×100, probe subset)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0].set_title("edits kept (probe records' own edits)")
    axes[1].set_title("locality (probe records' locality prompts)")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside the plots, not on the lines
    fig.suptitle(f"{table.knowedit_name} · model {table.model}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# -- the leaderboard's section ---------------------------------------------------------------------
def leaderboard_tables(results: Sequence[tuple[str, dict[str, Any]]]) -> list[LifelongTable]:
    """The leaderboard page's lifelong section: the embedded model's sequential zsre results under the
    ``knowedit`` metric protocol, seeds averaged. Empty when there are none."""
    from .knowedit_table import LEADERBOARD_MODEL
    from .schema import KNOWEDIT_METRICS_NAME, migrate

    sources = [Source(str(p), migrate(r)) for p, r in results]
    kept, _ = select(sources, task="zsre", model=LEADERBOARD_MODEL, metric_protocol=KNOWEDIT_METRICS_NAME)
    return build_tables(kept, duplicates="mean") if kept else []


# -- command line ----------------------------------------------------------------------------------
def add_lifelong_table(sub: Any) -> None:
    p = sub.add_parser(
        "lifelong-table",
        help="lay sequential results out as the lifelong table (a row per editor, a column per T and timing)",
        description="Render sequential (lifelong) result files as the lifelong literature reports them: a row "
        "per editor, a column per setting (T, evaluated right after each edit or all at the end, batch size), "
        "each cell Edit Succ. / Rephrase / Locality. One table per model, metric protocol and task; other "
        "results are skipped (listed on stderr); an invalid file is an error. --figure draws the lifelong "
        "curves of every editor in one PNG.",
    )
    p.add_argument("paths", nargs="+", metavar="RESULT_OR_DIR",
                   help="result files written by `knowbench run --sequential T`, or folders of them")
    p.add_argument("--task", default="zsre", help="the task to show (default zsre; 'all' for every task)")
    p.add_argument("--format", choices=FORMATS, default="text", help="text (default), markdown, html or csv")
    p.add_argument("--output", default=None, metavar="FILE", help="write the table here instead of stdout")
    p.add_argument("--figure", default=None, metavar="PNG",
                   help="also draw every editor's lifelong curve (first table) into this PNG")
    p.add_argument("--model", default=None, metavar="ID", help="only results of this model id")
    p.add_argument("--metric-protocol", default=None, metavar="NAME", help="only results under this metric protocol")
    p.add_argument("--duplicates", choices=DUPLICATES, default="error",
                   help="several results for one cell: error (default) or mean (average seeds of one experiment)")
    p.set_defaults(func=cmd_lifelong_table)


def cmd_lifelong_table(args: argparse.Namespace) -> int:
    try:
        task = None if args.task == "all" else args.task
        kept, skipped = select(load_sources(args.paths), task=task, model=args.model,
                               metric_protocol=args.metric_protocol)
        for line in skipped:
            print(f"skipped {line}", file=sys.stderr)
        if not kept:
            raise LifelongTableError("no sequential results left to show" + (
                f" ({len(skipped)} skipped, see above)" if skipped else ""))
        tables = build_tables(kept, args.duplicates)
        text = render(tables, args.format)
        if args.figure:
            print(f"wrote {lifelong_figure(tables[0], Path(args.figure))}", file=sys.stderr)
    except KnowEditTableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    emit(text, args.output)
    return 0
