"""The leaderboard: submitted result files, stored one per run key, and the tables built from them.

Layout of a leaderboard folder (``leaderboard/`` in the knowbench repository)::

    results/<task>/<model>/<editor>/<protocol>_s<seed>.json   one validated result file per
                                                              (editor, model, task, protocol, seed)
    README.md                                                 generated Markdown tables
    index.html                                                generated static page, sortable columns

``protocol`` in the key is ``single``, ``batch<B>`` or ``sequential<T>-<each|final>[-b<B>]``: runs
that differ in T, timing or batch size are different experiments. Only files that validate
(``knowbench.validate``) are read; a file outside its key's path is an error, so the tree itself
guarantees one file per key.

Tables: one per (task, protocol). A row is one (editor, model, data) with its metrics averaged
over the seeds submitted for it; columns are KnowEdit's (Edit Succ., Portability, Locality,
Fluency) plus Rephrase, which KnowEdit's table omits. A metric the run did not measure is an empty
cell, never 0. Rows are ranked within each (model, data) on Edit Succ., then Portability, Locality,
Fluency (each in its better direction, as the task's metric family says); the HTML page sorts by
any column. Metric names, labels, directions and protocol keys come from ``knowbench.schema``.

Importing this module imports no torch.
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from tabulate import tabulate

from .results import write_json_atomic
from .schema import KNOWEDIT_COLUMNS as COLUMNS
from .schema import KNOWEDIT_METRICS, KNOWEDIT_TASK_ORDER, RANK_ORDER, MetricSpec, metric_family, protocol_key, protocol_label, protocol_sort
from .validate import Report, ValidationError, validate_file

RESULTS = "results"


class LeaderboardError(ValueError):
    pass


# -- keys and paths ------------------------------------------------------------------------------
def slug(text: str) -> str:
    """A file-name-safe form of an id: ``meta-llama/Llama-2-7b`` -> ``meta-llama--Llama-2-7b``."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text).strip().replace("/", "--")).strip("-.")
    return s or "_"


@dataclass(frozen=True)
class Key:
    editor: str
    model: str
    task: str
    protocol: str
    seed: int

    def __str__(self) -> str:
        return f"editor {self.editor}, model {self.model}, task {self.task}, protocol {self.protocol}, seed {self.seed}"


def result_key(result: dict[str, Any]) -> Key:
    return Key(result["editor"]["name"], result["model"]["id"], result["task"]["name"],
               protocol_key(result["protocol"]), result["protocol"]["seed"])


def relative_path(result: dict[str, Any]) -> Path:
    k = result_key(result)
    return Path(RESULTS, slug(k.task), slug(k.model), slug(k.editor), f"{slug(k.protocol)}_s{k.seed}.json")


def default_dir() -> Path:
    return Path(os.environ.get("KNOWBENCH_LEADERBOARD", "leaderboard"))


# -- reading the tree ------------------------------------------------------------------------------
@dataclass
class Entry:
    path: Path  # relative to the leaderboard folder
    result: dict[str, Any]

    @property
    def key(self) -> Key:
        return result_key(self.result)


def load_entries(root: str | Path) -> list[Entry]:
    """Every result under ``root/results``; raises listing every file that is invalid or misplaced."""
    root = Path(root)
    entries: list[Entry] = []
    problems: list[str] = []
    for path in sorted((root / RESULTS).rglob("*.json")):
        rel = path.relative_to(root)
        report = validate_file(path)
        if not report.ok:
            problems.append(report.describe())
            continue
        result = report.result
        assert result is not None
        want = relative_path(result)
        if rel != want:
            problems.append(f"{path}: holds the result for ({result_key(result)}), which belongs at {root / want}")
            continue
        entries.append(Entry(rel, result))
    if problems:
        raise LeaderboardError(f"{len(problems)} result file(s) in {root / RESULTS} cannot be used "
                               "(the leaderboard is built only from valid files):\n" + "\n".join(problems))
    return entries


# -- tables -------------------------------------------------------------------------------------
@dataclass
class Row:
    rank: int
    editor: str
    provided_by: str
    model: str
    data: str
    data_title: str  # data file names and hashes, for a tooltip
    n_edits: str
    seeds: list[int]
    values: dict[str, float | None]  # column -> mean over the seeds that measured it; None: not measured
    files: list[str]


@dataclass
class Table:
    task: str
    task_title: str
    protocol: str  # the key, e.g. sequential1000-each
    protocol_label: str
    columns: list[str]
    specs: dict[str, MetricSpec]  # column -> its spec in the task's metric family
    rows: list[Row] = field(default_factory=list)

    @property
    def lower_is_better(self) -> set[str]:
        return {c for c in self.columns if not self.specs[c].higher_is_better}

    @property
    def title(self) -> str:
        return f"{self.task_title} · {self.protocol_label}"

    @property
    def anchor(self) -> str:
        return slug(f"{self.task}-{self.protocol}").lower()

    def header(self, col: str) -> str:
        spec = self.specs[col]
        unit = " (KL)" if spec.unit == "kl" else ""
        return spec.label + unit + (" ↑" if spec.higher_is_better else " ↓")


def _data_id(result: dict[str, Any]) -> tuple[str, str, str]:
    """(identity, label, tooltip) of the data a run was scored on."""
    files = result["task"]["data_files"]
    ident = ",".join(f["sha256"] for f in files)
    label = ", ".join(Path(f["path"]).name for f in files)
    title = "; ".join(f"{Path(f['path']).name} sha256 {f['sha256'][:12]}" for f in files)
    return ident, label, title


def _task_sort(name: str, knowedit_name: str | None) -> tuple:
    """KnowEdit's column order of tasks (by the name KnowEdit gives the task); others after, by name."""
    order = KNOWEDIT_TASK_ORDER
    return (order.index(knowedit_name) if knowedit_name in order else len(order), name)


def build_tables(entries: Sequence[Entry], task: str | None = None) -> list[Table]:
    """One table per (task, protocol), rows ranked within each (model, data)."""
    if task is not None:
        wanted = _task_names(task, entries)
        entries = [e for e in entries if e.result["task"]["name"] in wanted]
    by_table: dict[tuple[str, str], list[Entry]] = {}
    for e in entries:
        by_table.setdefault((e.result["task"]["name"], protocol_key(e.result["protocol"])), []).append(e)
    order = sorted(by_table, key=lambda k: (_task_sort(k[0], by_table[k][0].result["task"].get("knowedit_name")),
                                            protocol_sort(by_table[k][0].result["protocol"])))
    return [_table(by_table[k]) for k in order]


def _task_names(task: str, entries: Sequence[Entry]) -> set[str]:
    """Task names on the leaderboard that ``task`` means (its name, an alias, or KnowEdit's name)."""
    t = task.strip().lower().replace("-", "_")
    names = {e.result["task"]["name"] for e in entries
             if t in (e.result["task"]["name"].lower(), e.result["task"]["knowedit_name"].lower())}
    if not names:
        try:  # an alias such as wikidata_recent: the entry point it shares with a task name
            from . import registry

            plugins = registry.discover(registry.TASK_GROUP)
            target = plugins.get(t)
            if target is not None:
                names = {p.name for p in plugins.values() if p.value == target.value}
        except Exception:  # a broken plugin environment must not hide the real answer below
            pass
    if not {e.result["task"]["name"] for e in entries} & names:
        have = sorted({e.result["task"]["name"] for e in entries})
        raise LeaderboardError(f"no results for task {task!r} on the leaderboard; tasks with results: "
                               f"{', '.join(have) or 'none yet'}")
    return names


def _table(entries: list[Entry]) -> Table:
    first = entries[0].result
    family = metric_family(first)
    specs = {c: (family.spec(c) if family else None) or KNOWEDIT_METRICS[c] for c in COLUMNS}
    present = [c for c in COLUMNS if any(c in e.result["metrics"]["post"] for e in entries)]
    table = Table(
        task=first["task"]["name"], task_title=f"{first['task']['knowedit_name']} ({first['task']['name']})",
        protocol=protocol_key(first["protocol"]), protocol_label=protocol_label(first["protocol"]),
        columns=present, specs={c: specs[c] for c in present},
    )
    groups: dict[tuple[str, str, str], list[Entry]] = {}
    data_info: dict[str, tuple[str, str]] = {}
    for e in entries:
        ident, label, title = _data_id(e.result)
        data_info[ident] = (label, title)
        groups.setdefault((e.result["model"]["id"], ident, e.result["editor"]["name"]), []).append(e)
    rows_by_board: dict[tuple[str, str], list[Row]] = {}
    for (model, ident, editor), members in groups.items():
        members.sort(key=lambda e: e.result["protocol"]["seed"])
        values: dict[str, float | None] = {}
        for c in present:
            vals = [e.result["metrics"]["post"][c]["value"] for e in members if c in e.result["metrics"]["post"]]
            values[c] = sum(vals) / len(vals) if vals else None
        provided = sorted({f"{e.result['editor']['distribution']} {e.result['editor']['version']}" for e in members})
        n_edits = sorted({e.result["protocol"]["n_edits"] for e in members})
        rows_by_board.setdefault((model, ident), []).append(Row(
            rank=0, editor=editor, provided_by=", ".join(provided), model=model, data=data_info[ident][0],
            data_title=data_info[ident][1], n_edits="/".join(map(str, n_edits)),
            seeds=[e.result["protocol"]["seed"] for e in members], values=values,
            files=[e.path.as_posix() for e in members],
        ))
    lower = {c for c in COLUMNS if not specs[c].higher_is_better}
    for board in sorted(rows_by_board, key=lambda b: (b[0] != "embedded", b[0], data_info[b[1]][0])):
        rows = sorted(rows_by_board[board], key=lambda r: _rank_key(r, lower))
        for i, r in enumerate(rows, 1):
            r.rank = i
        table.rows.extend(rows)
    return table


def _rank_key(row: Row, lower: set[str]) -> tuple:
    key: list[Any] = []
    for c in RANK_ORDER:
        v = row.values.get(c)
        # measured before unmeasured; then the better value first
        key += [v is None, 0.0 if v is None else (v if c in lower else -v)]
    return (*key, row.editor)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


# -- rendering ------------------------------------------------------------------------------------
INTRO = """\
Knowledge editors ranked per task and protocol on [KnowEdit](https://huggingface.co/datasets/zjunlp/KnowEdit)'s
columns, built by `knowbench leaderboard --write` from the validated result files under
[`results/`](results/). Do not edit this file by hand: submit a result and it is regenerated.

* One table per task and protocol (single edits, batch of B, or T sequential edits evaluated right
  after each edit or all on the final model). Rows are ranked within each model and data file on
  Edit Succ., then Portability, Locality and Fluency.
* Accuracies are teacher-forced token accuracies ×100; Fluency is weighted n-gram entropy ×100;
  ConvSent's Locality is a KL divergence (lower is better). Rephrase is reported although
  KnowEdit's table omits it. A metric a run did not measure is an empty cell, never 0.
* A row averages the seeds submitted for it (column Seeds); Edits is the number of edits per run.
* [`index.html`](index.html) is the same table as a page whose columns sort on click.

Submit a run:

```
knowbench run --editor rome --task zsre --output rome_zsre.json
knowbench submit rome_zsre.json          # validates, stores results/<task>/<model>/<editor>/..., regenerates
```
"""


def _row_cells(table: Table, r: Row) -> list[str]:
    return [str(r.rank), r.editor, r.model, r.data, r.n_edits, ",".join(map(str, r.seeds)),
            *[_fmt(r.values.get(c)) for c in table.columns]]


def _head_cells(table: Table) -> list[str]:
    return ["#", "Editor", "Model", "Data", "Edits", "Seeds", *[table.header(c) for c in table.columns]]


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def render_markdown(tables: Sequence[Table], n_files: int | None = None) -> str:
    out = ["# knowbench leaderboard", "", "<!-- generated by `knowbench leaderboard --write`; do not edit -->", "",
           INTRO]
    if not tables:
        out += ["## Results", "", "No results submitted yet.", ""]
        return "\n".join(out)
    if n_files is not None:
        out += [f"{n_files} result file{'s' if n_files != 1 else ''}.", ""]
    last_task = None
    for t in tables:
        if t.task != last_task:
            out += [f"## {t.task_title}", ""]
            last_task = t.task
        out += [f"### {t.protocol_label}", ""]
        numeric = [True, False, False, False, True, False] + [True] * len(t.columns)
        out.append(tabulate(
            [[_md_escape(c) for c in _row_cells(t, r)] for r in t.rows], [_md_escape(h) for h in _head_cells(t)],
            tablefmt="pipe", colalign=["right" if n else "left" for n in numeric], disable_numparse=True,
        ))
        out.append("")
    return "\n".join(out)


def render_rich(tables: Sequence[Table], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    console = console or Console()
    if not tables:
        console.print("No results on the leaderboard yet (submit one with `knowbench submit RESULT.json`).")
        return
    for t in tables:
        # a terminal is narrow: when every row shares model and data, say so once in the title
        shared = len({(r.model, r.data) for r in t.rows}) == 1
        drop = {2, 3} if shared else set()
        title = t.title + (f" · model {t.rows[0].model} · data {t.rows[0].data}" if shared else "")
        rt = RichTable(title=title, title_justify="left")
        for i, h in enumerate(_head_cells(t)):
            if i not in drop:
                rt.add_column(h, justify="right" if i == 0 or i == 4 or i >= 6 else "left")
        for j, r in enumerate(t.rows):
            last_of_board = j + 1 < len(t.rows) and (t.rows[j + 1].model, t.rows[j + 1].data) != (r.model, r.data)
            rt.add_row(*[c for i, c in enumerate(_row_cells(t, r)) if i not in drop], end_section=last_of_board)
        console.print(rt)


def render_html(tables: Sequence[Table], n_files: int | None = None) -> str:
    from ._leaderboard_html import PAGE

    e = html.escape
    parts: list[str] = []
    if not tables:
        parts.append('<p class="empty">No results submitted yet.</p>')
    last_task = None
    for t in tables:
        if t.task != last_task:
            parts.append(f"<h2>{e(t.task_title)}</h2>")
            last_task = t.task
        parts.append(f'<h3 id="{e(t.anchor)}">{e(t.protocol_label)}</h3>')
        parts.append(f'<table class="kb" data-task="{e(t.task)}" data-protocol="{e(t.protocol)}">')
        parts.append("<thead><tr>")
        kinds = ["num", "text", "text", "text", "num", "text"] + ["num"] * len(t.columns)
        best = ["asc", "asc", "asc", "asc", "desc", "asc"] + ["asc" if c in t.lower_is_better else "desc" for c in t.columns]
        keys = ["rank", "editor", "model", "data", "edits", "seeds", *t.columns]
        for h, kind, b, k in zip(_head_cells(t), kinds, best, keys):
            parts.append(f'<th scope="col" data-col="{e(k)}" data-type="{kind}" data-first="{b}" aria-sort="none">'
                         f'<button type="button">{e(h)}</button></th>')
        parts.append("</tr></thead><tbody>")
        for r in t.rows:
            cells = _row_cells(t, r)
            tds = [
                f'<td data-value="{r.rank}">{r.rank}</td>',
                f'<td title="{e(r.provided_by)}">{e(r.editor)}</td>',
                f"<td>{e(r.model)}</td>",
                f'<td title="{e(r.data_title)}">{e(r.data)}</td>',
                f'<td data-value="{e(r.n_edits.split("/")[0])}">{e(r.n_edits)}</td>',
                f"<td>{e(cells[5])}</td>",
            ]
            for c in t.columns:
                v = r.values.get(c)
                tds.append(f'<td data-value="{"" if v is None else repr(round(v, 6))}">{_fmt(v)}</td>')
            parts.append(f'<tr data-files="{e(" ".join(r.files))}">' + "".join(tds) + "</tr>")
        parts.append("</tbody></table>")
    count = "" if n_files is None else f"{n_files} result file{'s' if n_files != 1 else ''}. "
    return PAGE.replace("{{COUNT}}", e(count)).replace("{{TABLES}}", "\n".join(parts))


def n_files(tables: Sequence[Table]) -> int:
    return sum(len(r.files) for t in tables for r in t.rows)


def render_outputs(root: str | Path) -> dict[str, str]:
    """The generated files' content, from the result files now in ``root/results``."""
    tables = build_tables(load_entries(root))
    return {"README.md": render_markdown(tables, n_files(tables)), "index.html": render_html(tables, n_files(tables))}


def write_outputs(root: str | Path) -> list[Path]:
    root = Path(root)
    written = []
    for name, text in render_outputs(root).items():
        path = root / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_outputs(root: str | Path) -> list[str]:
    """Generated files whose content differs from what the result files produce now."""
    root = Path(root)
    return [name for name, text in render_outputs(root).items()
            if not (root / name).exists() or (root / name).read_text(encoding="utf-8") != text]


# -- submitting -------------------------------------------------------------------------------------
@dataclass
class Submitted:
    path: Path
    replaced: bool


def submit(files: Iterable[str | Path], root: str | Path, replace: bool = False) -> list[Submitted]:
    """Validate ``files``, store each at its key's path under ``root``, regenerate the tables.

    All-or-nothing: nothing is written unless every file validates and none is a duplicate (of a
    stored result, or of another file in the same call) — unless ``replace``."""
    root = Path(root)
    files = [Path(f) for f in files]
    reports: list[Report] = [validate_file(f) for f in files]
    invalid = [r for r in reports if not r.ok]
    if invalid:
        if len(invalid) == 1 and len(files) == 1:
            raise ValidationError(invalid[0])
        raise LeaderboardError("not submitted, invalid result file(s):\n" + "\n".join(r.describe() for r in invalid))
    existing = {e.key: e for e in load_entries(root)} if (root / RESULTS).exists() else {}
    seen: dict[Key, Path] = {}
    problems = []
    for f, rep in zip(files, reports):
        result = rep.result
        assert result is not None
        key = result_key(result)
        if key in seen:
            problems.append(f"{f}: same run key as {seen[key]} ({key}); submit one of them")
        seen[key] = f
        if key in existing and not replace:
            old = existing[key].result
            same = old["integrity"]["sha256"] == result["integrity"]["sha256"]
            problems.append(
                f"{f}: {'this exact result is' if same else 'a result for the same run key is'} already on the "
                f"leaderboard at {root / existing[key].path} ({key}); pass --replace to overwrite it"
            )
    if problems:
        raise LeaderboardError("not submitted:\n" + "\n".join(problems))
    done = []
    for rep in reports:
        result = rep.result
        assert result is not None
        dest = root / relative_path(result)
        done.append(Submitted(dest, result_key(result) in existing))
        write_json_atomic(dest, result)
    write_outputs(root)
    return done


# -- command line ------------------------------------------------------------------------------------
def add_submit(sub: Any) -> None:
    p = sub.add_parser(
        "submit",
        help="validate result files and add them to the leaderboard",
        description="Validate result files, store each under <leaderboard>/results/<task>/<model>/<editor>/"
        "<protocol>_s<seed>.json (one file per editor, model, task, protocol and seed) and regenerate "
        "the leaderboard's README.md and index.html. Nothing is written if any file is invalid or "
        "already on the leaderboard.",
    )
    p.add_argument("files", nargs="+", metavar="RESULT.json", help="result files written by `knowbench run`")
    p.add_argument("--leaderboard", default=None, metavar="DIR",
                   help="leaderboard folder (default: $KNOWBENCH_LEADERBOARD or ./leaderboard)")
    p.add_argument("--replace", action="store_true", help="overwrite a stored result with the same run key")
    p.set_defaults(func=cmd_submit)


def cmd_submit(args: Any) -> int:
    root = Path(args.leaderboard) if args.leaderboard else default_dir()
    try:
        done = submit(args.files, root, replace=args.replace)
    except (ValidationError, LeaderboardError) as exc:
        print(exc)
        return 1
    for s in done:
        print(f"{'replaced' if s.replaced else 'added'} {s.path}")
    print(f"regenerated {root / 'README.md'} and {root / 'index.html'}")
    return 0


def add_leaderboard(sub: Any) -> None:
    p = sub.add_parser(
        "leaderboard",
        help="show the leaderboard (terminal, Markdown or HTML), or regenerate its files",
        description="Rank editors per task and protocol on KnowEdit's columns from the result files in a "
        "leaderboard folder. A metric a run did not measure is left empty.",
    )
    p.add_argument("--leaderboard", default=None, metavar="DIR",
                   help="leaderboard folder (default: $KNOWBENCH_LEADERBOARD or ./leaderboard)")
    p.add_argument("--format", choices=("rich", "markdown", "html"), default="rich",
                   help="rich: terminal tables (default); markdown / html: the generated documents on stdout")
    p.add_argument("--task", default=None, metavar="T", help="only this task (name, alias or KnowEdit name)")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--write", action="store_true", help="regenerate README.md and index.html in the folder")
    act.add_argument("--check", action="store_true",
                     help="exit 1 when README.md or index.html is stale relative to the result files")
    p.set_defaults(func=cmd_leaderboard)


def cmd_leaderboard(args: Any) -> int:
    root = Path(args.leaderboard) if args.leaderboard else default_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"leaderboard folder {root} does not exist (pass --leaderboard DIR)")
    try:
        if args.check:
            stale = stale_outputs(root)
            for name in stale:
                print(f"{root / name} is stale: run `knowbench leaderboard --write --leaderboard {root}`")
            return 1 if stale else 0
        if args.write:
            for path in write_outputs(root):
                print(f"wrote {path}")
            return 0
        entries = load_entries(root)
        tables = build_tables(entries, task=args.task)
    except LeaderboardError as exc:
        print(exc)
        return 1
    if args.format == "markdown":
        print(render_markdown(tables, n_files(tables)), end="")
    elif args.format == "html":
        print(render_html(tables, n_files(tables)), end="")
    else:
        render_rich(tables)
    return 0

