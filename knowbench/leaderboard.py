"""The leaderboard: submitted result files, stored one per run key, and the tables built from them.

Layout of a leaderboard folder (``leaderboard/`` in the knowbench repository)::

    results/<task>/<model>/<editor>/<protocol>_n<N>_d<data>_s<seed>.json
                  one validated result file per run key: (editor, model, task, protocol, number of
                  edits N, data, seed)
    README.md     generated Markdown tables
    index.html    generated static page, sortable columns
    .lock         the lock ``knowbench submit`` and ``knowbench leaderboard --write`` hold while
                  they change the folder (an empty file; never commit it)

``protocol`` in the key is ``single``, ``batch<B>`` or ``sequential<T>-<each|final>[-b<B>]``: runs
that differ in T, timing or batch size are different experiments. ``N`` is ``protocol.n_edits``
(for a single or batch run, the ``--limit`` sample size). ``data`` identifies the data the run was
scored on: the sha256 of its data file (of the comma-joined sha256s of its files, when a task reads
several); the key holds the whole digest, the file name its first 8 hex digits, so that
``sha256sum`` of the file shows where a run on it is stored. Runs on other data or another number
of edits are other entries. Only files that validate (``knowbench.validate``) are read; a file
outside its key's path is an error, so the tree itself guarantees one file per key
(``knowbench leaderboard --relocate`` moves valid files to their key's path, e.g. after a change
of layout).

Writers take ``.lock`` (a ``filelock.FileLock``) around the whole read-modify-write: reading the
stored entries, checking for clashes, writing result files and regenerating README.md and
index.html. Concurrent ``knowbench submit`` calls therefore run one after another; a submit that
cannot take the lock within its timeout changes nothing and says so. After writing, a submit
re-reads every stored file and reports it as added only when it holds the submitted result (the
same integrity hash).

Tables: one per (task, protocol). A row is one (editor, model, data, number of edits) with its
metrics averaged over the seeds submitted for it; columns are KnowEdit's (Edit Succ., Portability,
Locality, Fluency) plus Rephrase, which KnowEdit's table omits. A metric the run did not measure is an empty
cell, never 0. Rows are ranked within each (model, data) on Edit Succ., then Portability, Locality,
Fluency (each in its better direction, as the task's metric family says); the HTML page sorts by
any column. Metric names, labels, directions and protocol keys come from ``knowbench.schema``.

README.md and index.html open with KnowEdit's own layout of the embedded model's single-edit
results under the ``knowedit`` metric protocol (a block of rows per task, a column per editor;
``knowbench.knowedit_table``, seeds averaged), when there are such results. The Markdown and HTML
that ``knowbench leaderboard --format`` prints are the ranked tables only (``--task`` filters them);
``knowbench knowedit-table`` renders the KnowEdit layout of any result files. After it comes the
lifelong table of the embedded model's sequential zsre results (a row per editor, a column per T,
timing and batch size; ``knowbench.lifelong_table``), when there are such results.

Importing this module imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tabulate import tabulate

from .results import _write_atomic, write_json_atomic
from .schema import KNOWEDIT_COLUMNS as COLUMNS
from .schema import KNOWEDIT_METRICS, KNOWEDIT_TASK_ORDER, RANK_ORDER, MetricSpec, metric_family, protocol_key, protocol_label, protocol_sort
from .validate import Report, ValidationError, load_result, validate_file

RESULTS = "results"
LOCK = ".lock"
LOCK_TIMEOUT = 60.0  # seconds a writer waits for another one to finish
DATA_HASH_CHARS = 8  # hex digits of the data hash in a stored file's name


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
    n_edits: int
    data: str  # data_hash(): sha256 hex digest of the data the run was scored on
    seed: int

    def __str__(self) -> str:
        return (f"editor {self.editor}, model {self.model}, task {self.task}, protocol {self.protocol}, "
                f"{self.n_edits} edits, data {self.data[:DATA_HASH_CHARS]}, seed {self.seed}")


def data_hash(result: dict[str, Any]) -> str:
    """The identity of the data a run was scored on: its data file's sha256, or with several files
    the sha256 of their sha256s joined by commas (in the order the task read them)."""
    shas = [f["sha256"] for f in result["task"]["data_files"]]
    if len(shas) == 1:
        return shas[0]
    return hashlib.sha256(",".join(shas).encode()).hexdigest()


def result_key(result: dict[str, Any]) -> Key:
    p = result["protocol"]
    return Key(result["editor"]["name"], result["model"]["id"], result["task"]["name"], protocol_key(p),
               p["n_edits"], data_hash(result), p["seed"])


def key_path(k: Key) -> Path:
    """Where the result with key ``k`` is stored, relative to the leaderboard folder."""
    name = f"{slug(k.protocol)}_n{k.n_edits}_d{k.data[:DATA_HASH_CHARS]}_s{k.seed}.json"
    return Path(RESULTS, slug(k.task), slug(k.model), slug(k.editor), name)


def relative_path(result: dict[str, Any]) -> Path:
    return key_path(result_key(result))


def default_dir() -> Path:
    return Path(os.environ.get("KNOWBENCH_LEADERBOARD", "leaderboard"))


@contextlib.contextmanager
def locked(root: str | Path, timeout: float = LOCK_TIMEOUT) -> Iterator[Path]:
    """Hold ``root/.lock`` (created with ``root`` when missing) for a read-modify-write of the folder.

    Raises ``LeaderboardError`` when another writer holds it for longer than ``timeout`` seconds. The
    lock is an OS file lock (flock): a writer that dies releases it, so it never goes stale."""
    from filelock import FileLock, Timeout

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    lock = FileLock(path, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise LeaderboardError(
            f"could not lock the leaderboard {root} within {timeout:g} s: another `knowbench submit` or "
            f"`knowbench leaderboard --write` holds {path}. Nothing was changed; try again when it is done "
            "(or wait longer with --lock-timeout)"
        ) from None
    try:
        yield path
    finally:
        lock.release()


# -- reading the tree ------------------------------------------------------------------------------
@dataclass
class Entry:
    path: Path  # relative to the leaderboard folder
    result: dict[str, Any]

    @property
    def key(self) -> Key:
        return result_key(self.result)


def _stored(root: Path, problems: list[str]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(path relative to ``root``, result) of every valid file under ``root/results``; an invalid one
    goes into ``problems``."""
    for path in sorted((root / RESULTS).rglob("*.json")):
        report = validate_file(path)
        if not report.ok:
            problems.append(report.describe())
            continue
        assert report.result is not None
        yield path.relative_to(root), report.result


def load_entries(root: str | Path) -> list[Entry]:
    """Every result under ``root/results``; raises listing every file that is invalid or misplaced."""
    root = Path(root)
    entries: list[Entry] = []
    problems: list[str] = []
    for rel, result in _stored(root, problems):
        path = root / rel
        want = relative_path(result)
        if rel != want:
            problems.append(f"{path}: holds the result for ({result_key(result)}), which belongs at {root / want} "
                            "(`knowbench leaderboard --relocate` moves it)")
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
    # a row: one (model, data, editor, number of edits); its seeds are averaged
    groups: dict[tuple[str, str, str, int], list[Entry]] = {}
    data_info: dict[str, tuple[str, str]] = {}
    for e in entries:
        ident, label, title = _data_id(e.result)
        data_info[ident] = (label, title)
        groups.setdefault((e.result["model"]["id"], ident, e.result["editor"]["name"],
                           e.result["protocol"]["n_edits"]), []).append(e)
    rows_by_board: dict[tuple[str, str], list[Row]] = {}
    for (model, ident, editor, _n), members in groups.items():
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
    return (*key, row.editor, int(row.n_edits.split("/")[0]))


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


# -- rendering ------------------------------------------------------------------------------------
INTRO = """\
Knowledge editors ranked per task and protocol on [KnowEdit](https://huggingface.co/datasets/zjunlp/KnowEdit)'s
columns, built by `knowbench leaderboard --write` from the validated result files under
[`results/`](results/). Do not edit this file by hand: submit a result and it is regenerated.

* One table per task and protocol (single edits, batch of B, or T sequential edits evaluated right
  after each edit or all on the final model) and metric protocol (KnowEdit's definitions, unmarked,
  or "metrics: …" naming the fixes applied; see `knowbench metric-protocols`): results under
  different metric protocols are never ranked together. Rows are ranked within each model and
  data file on Edit Succ., then Portability, Locality and Fluency.
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


KNOWEDIT_INTRO = (
    "The {model} model's single-edit results under the `knowedit` metric protocol, laid out as KnowEdit "
    "publishes its table: a block of rows per task, a column per editor (KnowEdit's editors first, in its "
    "order), post-edit values; seeds of one run are averaged. `knowbench knowedit-table RESULT_OR_DIR...` "
    "renders any result files this way. The ranked tables below cover every protocol."
)


LIFELONG_INTRO = (
    "The {model} model's sequential (lifelong) zsre results under the `knowedit` metric protocol: a row per "
    "editor, a column per number of edits T, evaluation timing and batch size; seeds of one run are averaged. "
    "`knowbench lifelong-table RESULT_OR_DIR...` renders any result files this way."
)


def render_markdown(tables: Sequence[Table], n_files: int | None = None,
                    knowedit: Sequence[Any] | None = None, lifelong: Sequence[Any] | None = None) -> str:
    """The README; ``knowedit`` (``knowedit_table.leaderboard_tables``) opens it with KnowEdit's layout."""
    out = ["# knowbench leaderboard", "", "<!-- generated by `knowbench leaderboard --write`; do not edit -->", "",
           INTRO]
    if not tables:
        out += ["## Results", "", "No results submitted yet.", ""]
        return "\n".join(out)
    if n_files is not None:
        out += [f"{n_files} result file{'s' if n_files != 1 else ''}.", ""]
    if knowedit:
        from .knowedit_table import LEADERBOARD_MODEL
        from .knowedit_table import render_markdown as knowedit_markdown

        out += ["## KnowEdit's table", "", KNOWEDIT_INTRO.format(model=LEADERBOARD_MODEL), "",
                knowedit_markdown(knowedit, level=3)]
    if lifelong:
        from .knowedit_table import LEADERBOARD_MODEL
        from .lifelong_table import render_markdown as lifelong_markdown

        out += ["## Lifelong table", "", LIFELONG_INTRO.format(model=LEADERBOARD_MODEL), "",
                lifelong_markdown(lifelong, level=3)]
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


def render_html(tables: Sequence[Table], n_files: int | None = None, knowedit: Sequence[Any] | None = None,
                lifelong: Sequence[Any] | None = None) -> str:
    """The page; ``knowedit`` (``knowedit_table.leaderboard_tables``) opens it with KnowEdit's layout."""
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
    section = ""
    if knowedit:
        from .knowedit_table import LEADERBOARD_MODEL, render_html_tables

        intro = re.sub(r"`([^`]*)`", r"<code>\1</code>", e(KNOWEDIT_INTRO.format(model=LEADERBOARD_MODEL)))
        section = (f'<h2 id="knowedit">KnowEdit\'s table</h2>\n<p class="note">{intro}</p>\n'
                   + render_html_tables(knowedit, level=3))
    if lifelong:
        from .knowedit_table import LEADERBOARD_MODEL
        from .lifelong_table import render_html_tables as lifelong_html

        intro = re.sub(r"`([^`]*)`", r"<code>\1</code>", e(LIFELONG_INTRO.format(model=LEADERBOARD_MODEL)))
        section += (f'\n<h2 id="lifelong">Lifelong table</h2>\n<p class="note">{intro}</p>\n'
                    + lifelong_html(lifelong, level=3))
    return (PAGE.replace("{{COUNT}}", e(count)).replace("{{KNOWEDIT}}", section)
            .replace("{{TABLES}}", "\n".join(parts)))


def n_files(tables: Sequence[Table]) -> int:
    return sum(len(r.files) for t in tables for r in t.rows)


def render_outputs(root: str | Path) -> dict[str, str]:
    """The generated files' content, from the result files now in ``root/results``."""
    from .knowedit_table import leaderboard_tables
    from .lifelong_table import leaderboard_tables as lifelong_tables

    entries = load_entries(root)
    tables = build_tables(entries)
    pairs = [(e.path.as_posix(), e.result) for e in entries]
    knowedit = leaderboard_tables(pairs)
    lifelong = lifelong_tables(pairs)
    n = n_files(tables)
    return {"README.md": render_markdown(tables, n, knowedit, lifelong),
            "index.html": render_html(tables, n, knowedit, lifelong)}


def write_outputs(root: str | Path) -> list[Path]:
    root = Path(root)
    written = []
    for name, text in render_outputs(root).items():
        path = root / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            _write_atomic(path, lambda f, text=text: f.write(text))  # a reader never sees half a page
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
    source: Path  # the file submitted
    path: Path  # where it is stored
    replaced: bool
    kept: bool = True  # re-read after writing: the stored file holds this result
    problem: str = ""  # why not, when not kept


class SubmitError(LeaderboardError):
    """Some submitted files were written but are not what is stored now; ``done`` says which were kept."""

    def __init__(self, message: str, done: list[Submitted]):
        super().__init__(message)
        self.done = done


def submit(files: Iterable[str | Path], root: str | Path, replace: bool = False,
           lock_timeout: float = LOCK_TIMEOUT, verify: Any = None) -> list[Submitted]:
    """Validate ``files``, store each at its key's path under ``root``, regenerate the tables.

    All-or-nothing: nothing is written unless every file validates and none is a duplicate (of a
    stored result, or of another file in the same call) — unless ``replace``. ``verify`` (a callable
    taking a file's path and returning a problem string, or "" when it passes; ``knowbench submit
    --verify`` passes ``knowbench.verify``'s check) runs on every file first. The stored entries are
    read, checked and written while holding ``root/.lock``; afterwards every stored file is re-read,
    and a file that does not hold the submitted result (integrity hash) raises ``SubmitError``."""
    root = Path(root)
    files = [Path(f) for f in files]
    reports: list[Report] = [validate_file(f) for f in files]
    invalid = [r for r in reports if not r.ok]
    if invalid:
        if len(invalid) == 1 and len(files) == 1:
            raise ValidationError(invalid[0])
        raise LeaderboardError("not submitted, invalid result file(s):\n" + "\n".join(r.describe() for r in invalid))
    results = [rep.result for rep in reports]
    seen: dict[Key, Path] = {}
    problems = []
    for f, result in zip(files, results):
        assert result is not None
        proto = result["protocol"] if isinstance(result, dict) else result.protocol.model_dump()
        if proto.get("stopped_at") is not None:
            problems.append(f"{f}: a run stopped by --stop-below after {proto['stopped_at']} of "
                            f"{proto['sequential']} edits is a collapse measurement, not a leaderboard entry")
            continue
        key = result_key(result)
        if key in seen:
            problems.append(f"{f}: same run key as {seen[key]} ({key}); submit one of them")
        seen[key] = f
    if problems:
        raise LeaderboardError("not submitted:\n" + "\n".join(problems))
    if verify is not None:  # slow (it re-runs edits): before taking the lock
        failed = [f"{f}: {why}" for f in files if (why := verify(f))]
        if failed:
            raise LeaderboardError("not submitted, failed verification:\n" + "\n".join(failed))
    with locked(root, lock_timeout):
        return _store(files, results, root, replace)  # type: ignore[arg-type]


def _store(files: list[Path], results: list[dict[str, Any]], root: Path, replace: bool) -> list[Submitted]:
    """The read-modify-write of ``submit``; the caller holds the lock."""
    entries = load_entries(root) if (root / RESULTS).exists() else []
    existing = {e.key: e for e in entries}
    at_path = {e.path: e for e in entries}
    problems = []
    for f, result in zip(files, results):
        key, rel = result_key(result), relative_path(result)
        if key in existing and not replace:
            old = existing[key].result
            same = old["integrity"]["sha256"] == result["integrity"]["sha256"]
            problems.append(
                f"{f}: {'this exact result is' if same else 'a result for the same run key is'} already on the "
                f"leaderboard at {root / existing[key].path} ({key}); pass --replace to overwrite it"
            )
        elif key not in existing and rel in at_path:  # two data hashes sharing their first 8 hex digits
            problems.append(f"{f}: its path {root / rel} holds another run ({at_path[rel].key}); "
                            "the two keys differ only past the data hash's first digits: rename neither, "
                            "report it as a knowbench issue")
    if problems:
        raise LeaderboardError("not submitted:\n" + "\n".join(problems))
    done = []
    for f, result in zip(files, results):
        dest = root / relative_path(result)
        done.append(Submitted(f, dest, result_key(result) in existing))
        write_json_atomic(dest, result)
    write_outputs(root)
    for s, result in zip(done, results):  # "added" only for what is stored now
        s.problem = _stored_problem(s.path, result)
        s.kept = not s.problem
    lost = [s for s in done if not s.kept]
    if lost:
        raise SubmitError("stored file(s) do not hold the submitted result:\n"
                          + "\n".join(f"{s.source}: {s.problem}" for s in lost), done)
    return done


def _drop_empty_dirs(folder: Path, top: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``top`` while they are empty."""
    for d in [folder, *folder.parents]:
        if d == top or top not in d.parents or any(d.iterdir()):
            return
        d.rmdir()


def _stored_problem(path: Path, result: dict[str, Any]) -> str:
    """Why the file at ``path`` is not ``result`` as submitted ("" when it is)."""
    stored, report = load_result(path)
    if report.problems:
        return f"{path} cannot be read back: {report.problems[0]}"
    want = result["integrity"]["sha256"]
    got = (stored.get("integrity") or {}).get("sha256") if isinstance(stored, dict) else None
    if got != want:
        return (f"{path} holds a result with integrity hash {str(got)[:16]}…, not the submitted {want[:16]}… "
                "(another writer that does not take the leaderboard's lock replaced it?)")
    if stored != result:
        return f"{path} differs from the submitted file although its integrity hash is the same"
    return ""


def relocate(root: str | Path, lock_timeout: float = LOCK_TIMEOUT) -> list[tuple[Path, Path]]:
    """Move every valid result file under ``root/results`` that is not at its key's path there
    (e.g. stored under an older layout), then regenerate the tables; returns (old, new) paths
    relative to ``root``. All-or-nothing: nothing moves when a file is invalid or two files (or a
    file and a stored one) claim the same path."""
    root = Path(root)
    with locked(root, lock_timeout):
        moves: list[tuple[Path, Path]] = []
        problems: list[str] = []
        claimed: dict[Path, Path] = {}
        for rel, result in _stored(root, problems):
            want = relative_path(result)
            if want in claimed:
                problems.append(f"{root / rel} and {root / claimed[want]} are both the run for {root / want}")
            claimed[want] = rel
            if rel != want:
                moves.append((rel, want))
        if problems:
            raise LeaderboardError("nothing moved:\n" + "\n".join(problems))
        pending = list(moves)
        while pending:  # a file whose path another one is to take moves out of the way first
            ready = [m for m in pending if not (root / m[1]).exists()]
            if not ready:
                raise LeaderboardError("cannot relocate: these files would take each other's paths: "
                                       + ", ".join(str(root / old) for old, _ in pending))
            for old, new in ready:
                (root / new).parent.mkdir(parents=True, exist_ok=True)
                os.replace(root / old, root / new)
                _drop_empty_dirs((root / old).parent, root / RESULTS)
            pending = [m for m in pending if m not in ready]
        write_outputs(root)
    return moves


# -- command line ------------------------------------------------------------------------------------
def add_submit(sub: Any) -> None:
    p = sub.add_parser(
        "submit",
        help="validate result files and add them to the leaderboard",
        description="Validate result files, store each under <leaderboard>/results/<task>/<model>/<editor>/"
        "<protocol>_n<N>_d<data>_s<seed>.json (one file per editor, model, task, protocol, number of edits, "
        "data file and seed) and regenerate the leaderboard's README.md and index.html. Nothing is written if "
        "any file is invalid or already on the leaderboard. Concurrent submits to one folder take turns "
        "(a lock file, <leaderboard>/.lock); a file is reported as added only when it is what is stored.",
    )
    p.add_argument("files", nargs="+", metavar="RESULT.json", help="result files written by `knowbench run`")
    p.add_argument("--leaderboard", default=None, metavar="DIR",
                   help="leaderboard folder (default: $KNOWBENCH_LEADERBOARD or ./leaderboard)")
    p.add_argument("--replace", action="store_true", help="overwrite a stored result with the same run key")
    p.add_argument("--verify", action="store_true",
                   help="first re-run a seeded sample of each file's records (`knowbench verify`) and refuse "
                   "a file whose numbers do not reproduce")
    p.add_argument("--lock-timeout", type=float, default=LOCK_TIMEOUT, metavar="S",
                   help=f"seconds to wait for another writer of the leaderboard (default {LOCK_TIMEOUT:g})")
    p.set_defaults(func=cmd_submit)


def cmd_submit(args: Any) -> int:
    root = Path(args.leaderboard) if args.leaderboard else default_dir()
    check = None
    if getattr(args, "verify", False):
        from .verify import submit_check as check
    try:
        done = submit(args.files, root, replace=args.replace, lock_timeout=args.lock_timeout, verify=check)
    except SubmitError as exc:
        _print_done(exc.done)
        print(f"error: {exc}")
        return 1
    except (ValidationError, LeaderboardError) as exc:
        print(exc)
        return 1
    _print_done(done)
    print(f"regenerated {root / 'README.md'} and {root / 'index.html'}")
    return 0


def _print_done(done: list[Submitted]) -> None:
    for s in done:
        if s.kept:
            print(f"{'replaced' if s.replaced else 'added'} {s.path}")


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
                   help="rich: terminal tables (default); markdown / html: the generated documents' ranked "
                   "tables on stdout (README.md and index.html also open with KnowEdit's layout: "
                   "`knowbench knowedit-table`)")
    p.add_argument("--task", default=None, metavar="T", help="only this task (name, alias or KnowEdit name)")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--write", action="store_true", help="regenerate README.md and index.html in the folder")
    act.add_argument("--check", action="store_true",
                     help="exit 1 when README.md or index.html is stale relative to the result files")
    act.add_argument("--relocate", action="store_true",
                     help="move valid result files to their run key's path (e.g. stored under an older layout), "
                     "then regenerate README.md and index.html")
    p.add_argument("--lock-timeout", type=float, default=LOCK_TIMEOUT, metavar="S",
                   help=f"--write / --relocate: seconds to wait for another writer (default {LOCK_TIMEOUT:g})")
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
            with locked(root, args.lock_timeout):
                written = write_outputs(root)
            for path in written:
                print(f"wrote {path}")
            return 0
        if args.relocate:
            moves = relocate(root, args.lock_timeout)
            for old, new in moves:
                print(f"moved {root / old} -> {root / new}")
            print(f"{len(moves)} file{'s' if len(moves) != 1 else ''} moved; regenerated {root / 'README.md'} "
                  f"and {root / 'index.html'}")
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

