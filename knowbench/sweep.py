"""``knowbench sweep GRID.yaml``: run a grid of editors × tasks × models × seeds × protocols.

A grid file (YAML) names the axes; every combination is one *cell*, one ``knowbench run``::

    name: knowedit-table              # optional (default: the grid file's stem)
    output_dir: sweeps/knowedit-table # optional (default: sweeps/<grid file stem>), relative to the CWD
    editors:                          # names, or entries {name, label, hparams, protocols, resources, <run option>...}
      - ft-m
      - {name: rome, label: rome-l1, hparams: {layers: [1]}}   # hparams: overrides (a mapping) or a file
    tasks:                            # names, or entries {name, label, resources, <run option>...}
      - {name: zsre, limit: 100}
      - {name: wiki_recent, limit: 50, data: ../shared/data/knowedit}
    models: [embedded]                # default [null]: the default model; entries {name, label, device, dtype, ...}
    seeds: [0]                        # default [0]
    protocols:                        # default [single]
      - single
      - {batch_size: 10}                                   # the batch protocol
      - {sequential: 100, eval_timing: both}               # two result files: -each and -final
      - {sequential: 1000, batch_size: 100, eval_timing: final, curve_every: 50}
    run: {fluency: false, diagnostics: true, eval_batch_size: 32}   # any RunConfig field, for every cell
    resources: {num_cpus: 1, num_gpus: 0}                  # per cell (an entry's resources: override it)
    retries: 1                        # a failed cell is tried again up to this many times
    checkpoint_every: 100             # checkpoint every K edits (resumed when the cell is started again)
    exclude:                          # cells left out: every key given must match (a value or a list)
      - {editor: rome, protocol: seq1000-b100-final}

Run options. Any :class:`~knowbench.runconfig.RunConfig` field may be set in ``run`` (every cell)
or in an editor, task, model or protocol entry (its cells); the later wins in the order run < model
< task < editor < protocol. ``editor``, ``task``, ``model`` and ``seed`` are the axes, ``output``
and ``checkpoint`` are the sweep's; ``sequential``, ``batch_size`` and ``eval_timing`` belong in
protocol entries. ``extra`` mappings are merged key by key. ``log_records: true`` writes each cell's
per-record log beside its result. As on the command line, a sequential protocol draws its
lifelong curve every T/20 edits unless ``curve_every`` is given (0: no curve). An editor entry's
``protocols`` replace the grid's for that editor (e.g. a batched stream only where it can batch).
An unknown key or a value of the wrong type is an error naming the grid file and the key.

Cells and files. Each cell has a readable, deterministic name,
``<editor>_<task>_<model>_<protocol>_s<seed>[_h<hparams hash>]`` (labels replace names where given;
the protocol is ``single``, ``batch<B>`` or ``seq<T>[-b<B>]-<timing>``), and writes
``<output_dir>/results/<cell>.json`` (with ``eval_timing: both``: ``<cell>-each.json`` and
``<cell>-final.json``), sealed as ``knowbench run`` seals its results. A cell's identity — its
options as the grid gives them and its hyper-parameter overrides' content — is hashed into
``config.extra.sweep_cell`` of its result. A cell is done when its result files exist, pass
``knowbench validate`` and carry that hash: a rerun of the sweep skips done cells, and reruns a cell
whose file is missing, corrupt (hand-edited, cut short) or was written for other options (the grid
changed). ``<output_dir>/sweep.json`` records every cell's status, attempts and errors (rewritten as
the sweep goes); ``<output_dir>/failures.jsonl`` gets a line per failed attempt with its traceback.
A failed cell is tried again up to ``retries`` times, except for a :class:`RunError` (a bad option
or data file, which fails the same way every time). A trainable editor is trained first when it has
no artefact yet (``knowbench train`` with the cell's options; a file lock keeps two cells of one
node from training the same artefact at once). With ``checkpoint_every`` a cell writes
``results/<cell>.ckpt``; a cell started again while its checkpoint exists continues from it
(``runner.resume_all``, when this knowbench has it) and the checkpoint is deleted once the result
is written.

Engines. ``--engine local`` (default) runs the cells one after another in this process
(``--workers 1``) or in N spawned worker processes (``--workers N``). ``--engine ray`` makes each
cell a Ray task with the cell's ``num_cpus`` / ``num_gpus`` (``pip install "knowbench[ray]"``):
``--address`` None starts a local Ray instance (capped at ``--workers`` CPUs when given), ``auto``
joins the running cluster, ``ray://HOST:PORT`` connects a client; ``--runtime-env JSON`` is passed
to ``ray.init`` (e.g. ``{"pip": ["knowbench"]}`` for a cluster without this environment). A cell
returns its results to the driver, which seals and writes them, so the results need no shared
filesystem; the data files, hyper-parameter files and checkpoints are read and written by the
worker at the driver's absolute paths, so on a multi-node cluster either share the output and data
folders or leave ``checkpoint_every`` off. Each cell pins torch to its CPUs
(``torch.set_num_threads(num_cpus)``, and ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` for what it
starts): processes that each spin every core thrash when they share a node. The local engine does
not share out CPUs (nor GPUs): choose ``--workers`` × ``num_cpus`` ≤ the cores. Ray starts its
workers at nice 15, so on a machine busy with other work the cells get little CPU
(``RAY_worker_niceness=0`` before the sweep starts its local instance changes that).

Output. One progress view across the cells on stderr (rich bars on a terminal, log lines
otherwise; a cell's own progress bars are off). At the end, the results as tables: single-edit
results in KnowEdit's layout (``knowbench knowedit-table``) and sequential ones in the lifelong
layout (``knowbench lifelong-table``), seeds averaged, written as ``knowedit.{md,html,csv}`` /
``lifelong.{md,html,csv}`` in the output folder and printed to stdout in ``--format``.
``--submit DIR`` files the finished results on that leaderboard (``knowbench submit``; a result
already stored there unchanged is left alone). Exit status 0 when every cell is done, 1 when a cell
failed or the submit did, 2 for a bad grid.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

log = logging.getLogger("knowbench.sweep")

TOP_KEYS = ("name", "output_dir", "editors", "tasks", "models", "seeds", "protocols", "run", "resources",
            "retries", "checkpoint_every", "exclude")
AXES = ("editor", "task", "model", "seed")  # RunConfig fields the grid's axes set
OWN = ("output", "checkpoint")  # RunConfig fields the sweep sets
PROTOCOL_FIELDS = ("sequential", "batch_size", "eval_timing")  # only in protocol entries
RESOURCE_KEYS = ("num_cpus", "num_gpus")
EXCLUDE_KEYS = ("editor", "task", "model", "protocol", "seed")
DEFAULT_RESOURCES = {"num_cpus": 1, "num_gpus": 0}
DEFAULT_RETRIES = 1
RESULTS_DIR = "results"
MANIFEST = "sweep.json"
FAILURES = "failures.jsonl"
RAY_HINT = 'pip install "knowbench[ray]"'


class GridError(ValueError):
    """A grid file that cannot be run; the message names the file and the key."""


# -- the grid --------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One run of the grid."""

    name: str  # the file stem: <editor>_<task>_<model>_<protocol>_s<seed>[_h<hash>]
    key: str  # hash of the cell's options as the grid gives them (config.extra.sweep_cell)
    editor: str  # label (the entry's name unless it has a label)
    task: str
    model: str
    protocol: str  # single | batch<B> | seq<T>[-b<B>]-<timing>, or the entry's label
    seed: int
    options: dict[str, Any]  # RunConfig keyword arguments (paths as the grid gives them)
    hparams: dict[str, Any] | None = None  # overrides to write to a file (an editor entry's mapping)
    resources: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    where: str = ""  # the entries it comes from, for messages

    @property
    def sequential(self) -> bool:
        return bool(self.options.get("sequential"))

    @property
    def timings(self) -> list[str]:
        return ["each", "final"] if self.options.get("eval_timing") == "both" else [self.options.get("eval_timing", "each")]


@dataclass
class Grid:
    path: Path
    name: str
    output_dir: Path
    cells: list[Cell]
    retries: int = DEFAULT_RETRIES

    @property
    def results_dir(self) -> Path:
        return self.output_dir / RESULTS_DIR

    def files(self, cell: Cell) -> list[Path]:
        """The result files a done cell has."""
        base = self.results_dir / f"{cell.name}.json"
        if len(cell.timings) > 1:  # runner.write_results: STEM-each.json, STEM-final.json
            return [base.with_name(f"{cell.name}-{t}.json") for t in cell.timings]
        return [base]

    def checkpoint(self, cell: Cell) -> Path:
        return self.results_dir / f"{cell.name}.ckpt"

    def hparams_file(self, cell: Cell) -> Path:
        return self.output_dir / "hparams" / f"{_slug(cell.editor)}-{_digest(cell.hparams)[:8]}.yaml"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


class _Where:
    """Error messages that name the grid file and the key."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, where: str, message: str) -> GridError:
        return GridError(f"grid {self.path}: {where}: {message}" if where else f"grid {self.path}: {message}")


def _run_fields() -> dict[str, Any]:
    from typing import get_type_hints

    from .runconfig import RunConfig

    hints = get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)}


def _check_value(w: _Where, where: str, kind: Any, value: Any) -> Any:
    from pydantic import TypeAdapter, ValidationError

    from .editor import _type_name

    try:
        return TypeAdapter(kind).validate_python(value, strict=True)
    except ValidationError:
        got = "null" if value is None else f"{value!r} ({type(value).__name__})"
        raise w.error(where, f"must be {_type_name(kind)}, got {got}") from None


def _check_keys(w: _Where, where: str, entry: dict[str, Any], allowed: Sequence[str]) -> None:
    for k in entry:
        if not isinstance(k, str) or k not in allowed:
            raise w.error(f"{where}.{k}" if where else str(k), "unknown key; valid keys: " + ", ".join(sorted(allowed)))


def _check_entry_keys(w: _Where, where: str, entry: dict[str, Any], own_keys: Sequence[str],
                      fields: dict[str, Any], protocol: bool = False) -> None:
    """An entry's keys: its own (name, label, ...) and run options; a RunConfig field that the grid
    sets otherwise is named as such."""
    for k in entry:
        if k in own_keys:
            continue
        if k in AXES:
            raise w.error(f"{where}.{k}", f"is set by the grid's {k}s axis, not in an entry")
        if k in OWN:
            raise w.error(f"{where}.{k}", "is set by the sweep (results go to output_dir/results/<cell>.json)")
        if k in PROTOCOL_FIELDS and not protocol:
            raise w.error(f"{where}.{k}", "belongs in a protocols entry")
        if k not in fields:
            valid = [*own_keys, *(f for f in fields if f not in AXES + OWN + (() if protocol else PROTOCOL_FIELDS))]
            raise w.error(f"{where}.{k}", "unknown key; valid keys: " + ", ".join(sorted(valid)))


def _options(w: _Where, where: str, entry: dict[str, Any], fields: dict[str, Any], protocol: bool = False) -> dict[str, Any]:
    """The run options of an entry (its RunConfig fields; keys checked by _check_entry_keys), each
    checked against its type."""
    out: dict[str, Any] = {}
    for k, v in entry.items():
        if k not in fields:
            continue
        if k == "log_records":
            if not isinstance(v, bool):
                raise w.error(f"{where}.{k}", f"must be true or false (the log goes beside the result), got {v!r}")
            out[k] = v
            continue
        if k == "hparams" and isinstance(v, dict):
            raise w.error(f"{where}.{k}", "hyper-parameter overrides (a mapping) go in an editors entry; here give a file")
        out[k] = _check_value(w, f"{where}.{k}", fields[k], v)
    return out


def _resources(w: _Where, where: str, value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise w.error(where, f"must be a mapping of {', '.join(RESOURCE_KEYS)}, got {value!r}")
    _check_keys(w, where, value, RESOURCE_KEYS)
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (k == "num_cpus" and v <= 0):
            raise w.error(f"{where}.{k}", f"must be a {'positive' if k == 'num_cpus' else 'non-negative'} number, got {v!r}")
    return dict(value)


def _entries(w: _Where, raw: dict[str, Any], key: str, default: list[Any] | None) -> list[Any]:
    value = raw.get(key, default)
    if value is None:
        raise w.error(key, "is required (a list)")
    if not isinstance(value, list) or not value:
        raise w.error(key, f"must be a non-empty list, got {value!r}")
    return value


def _named(w: _Where, where: str, item: Any, extra_keys: Sequence[str], fields: dict[str, Any],
           allow_null: bool = False) -> dict[str, Any]:
    """An axis entry as {name, label, resources, options, ...}: a plain name or a mapping with ``name``."""
    if item is None and allow_null or isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict):
        raise w.error(where, f"must be a name or a mapping with a name, got {item!r}")
    _check_entry_keys(w, where, item, ("name", "label", "resources", *extra_keys), fields)
    if "name" not in item:
        raise w.error(where, "needs a name")
    name = item["name"]
    if not (isinstance(name, str) and name) and not (allow_null and name is None):
        raise w.error(f"{where}.name", f"must be a non-empty string, got {name!r}")
    label = item.get("label")
    if label is not None and not (isinstance(label, str) and label):
        raise w.error(f"{where}.label", f"must be a non-empty string, got {label!r}")
    return item


def _protocol(w: _Where, where: str, item: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """A protocols entry: ``single``, or {name?, sequential?, batch_size?, eval_timing?, ...}."""
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict):
        raise w.error(where, f"must be 'single' or a mapping such as {{sequential: 100}}, got {item!r}")
    _check_entry_keys(w, where, item, ("name", "label", "resources"), fields, protocol=True)
    opts = _options(w, where, {k: v for k, v in item.items() if k != "name"}, fields, protocol=True)
    name = item.get("name")
    seq, batch = opts.get("sequential"), opts.get("batch_size")
    inferred = "sequential" if seq else "batch" if batch and batch > 1 else "single"
    if name is None:
        name = inferred
    if name not in ("single", "batch", "sequential"):
        raise w.error(f"{where}.name", f"{name!r} is not a protocol (single, batch or sequential)")
    if name == "sequential" and not seq:
        raise w.error(where, "a sequential protocol needs sequential: T")
    if name != inferred:
        raise w.error(where, f"name {name} but its options make a {inferred} protocol "
                      f"(sequential: {seq}, batch_size: {batch})")
    timing = opts.get("eval_timing", "each")
    if timing not in ("each", "final", "both"):
        raise w.error(f"{where}.eval_timing", f"{timing!r} is not one of each, final, both")
    if timing != "each" and not seq:
        raise w.error(f"{where}.eval_timing", "only a sequential protocol evaluates at another time than each")
    if seq:
        if "curve_every" not in opts:  # as the command line: a lifelong curve of 20 points
            opts["curve_every"] = max(1, seq // 20)
        elif opts["curve_every"] == 0:
            opts["curve_every"] = None
        pid = f"seq{seq}" + (f"-b{batch}" if batch and batch > 1 else "") + f"-{timing}"
    else:
        pid = f"batch{batch}" if name == "batch" else "single"
    label = item.get("label")
    if label is not None and not (isinstance(label, str) and label):
        raise w.error(f"{where}.label", f"must be a non-empty string, got {label!r}")
    res = _resources(w, f"{where}.resources", item["resources"]) if "resources" in item else {}
    return {"id": label or pid, "options": opts, "resources": res, "where": where}


def _merge(*layers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            out[k] = {**out.get(k, {}), **v} if k == "extra" and isinstance(v, dict) else v
    return out


def _default_model() -> str:
    try:
        from .defaults import default_model

        return default_model()
    except Exception:  # noqa: BLE001 - only a name for the cells' files
        return "default"


def load_grid(path: str | Path, output_dir: str | Path | None = None) -> Grid:
    """Read and check a grid file and expand it into its cells (nothing is run or written)."""
    import yaml

    path = Path(path)
    w = _Where(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GridError(f"grid {path}: no such file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise GridError(f"grid {path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise w.error("", "must hold a mapping (editors:, tasks:, ...)")
    _check_keys(w, "", raw, TOP_KEYS)
    fields = _run_fields()
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise w.error("name", f"must be a non-empty string, got {name!r}")
    out_dir = output_dir if output_dir is not None else raw.get("output_dir", str(Path("sweeps") / path.stem))
    if not isinstance(out_dir, (str, Path)) or not str(out_dir):
        raise w.error("output_dir", f"must be a folder path, got {out_dir!r}")
    retries = raw.get("retries", DEFAULT_RETRIES)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise w.error("retries", f"must be an integer >= 0, got {retries!r}")
    resources = {**DEFAULT_RESOURCES, **_resources(w, "resources", raw.get("resources", {}))}
    run = raw.get("run", {})
    if not isinstance(run, dict):
        raise w.error("run", f"must be a mapping of run options, got {run!r}")
    _check_entry_keys(w, "run", run, (), fields)
    run_opts = _options(w, "run", run, fields)
    if "checkpoint_every" in raw:
        run_opts = {"checkpoint_every": _check_value(w, "checkpoint_every", fields["checkpoint_every"],
                                                     raw["checkpoint_every"]), **run_opts}

    editors = [_named(w, f"editors[{i}]", e, ("hparams", "protocols"), fields)
               for i, e in enumerate(_entries(w, raw, "editors", None))]
    tasks = [_named(w, f"tasks[{i}]", t, (), fields) for i, t in enumerate(_entries(w, raw, "tasks", None))]
    models = [_named(w, f"models[{i}]", m, (), fields, allow_null=True)
              for i, m in enumerate(_entries(w, raw, "models", [None]))]
    seeds = _entries(w, raw, "seeds", [0])
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int):
            raise w.error(f"seeds[{i}]", f"must be an integer, got {s!r}")
    protocols = [_protocol(w, f"protocols[{i}]", p, fields) for i, p in enumerate(_entries(w, raw, "protocols", ["single"]))]
    exclude = raw.get("exclude", [])
    if not isinstance(exclude, list):
        raise w.error("exclude", f"must be a list of mappings, got {exclude!r}")
    for i, ex in enumerate(exclude):
        if not isinstance(ex, dict) or not ex:
            raise w.error(f"exclude[{i}]", f"must be a mapping of {', '.join(EXCLUDE_KEYS)}, got {ex!r}")
        _check_keys(w, f"exclude[{i}]", ex, EXCLUDE_KEYS)

    default_model = None
    cells: list[Cell] = []
    for e_i, ed in enumerate(editors):
        e_where = f"editors[{e_i}]"
        e_opts = _options(w, e_where, {k: v for k, v in ed.items() if k != "hparams"}, fields)
        e_res = _resources(w, f"{e_where}.resources", ed["resources"]) if "resources" in ed else {}
        hp = ed.get("hparams")
        if hp is not None and not isinstance(hp, (dict, str)):
            raise w.error(f"{e_where}.hparams", f"must be a mapping of overrides or a file path, got {hp!r}")
        if isinstance(hp, str):
            e_opts["hparams"] = hp
            hp = None
        e_protocols = protocols
        if "protocols" in ed:
            if not isinstance(ed["protocols"], list) or not ed["protocols"]:
                raise w.error(f"{e_where}.protocols", "must be a non-empty list")
            e_protocols = [_protocol(w, f"{e_where}.protocols[{i}]", p, fields) for i, p in enumerate(ed["protocols"])]
        for t_i, tk in enumerate(tasks):
            t_opts = _options(w, f"tasks[{t_i}]", tk, fields)
            t_res = _resources(w, f"tasks[{t_i}].resources", tk["resources"]) if "resources" in tk else {}
            for m_i, md in enumerate(models):
                m_opts = _options(w, f"models[{m_i}]", md, fields)
                m_res = _resources(w, f"models[{m_i}].resources", md["resources"]) if "resources" in md else {}
                if md["name"] is None and md.get("label") is None and default_model is None:
                    default_model = _default_model()
                m_label = md.get("label") or (Path(md["name"]).name if md["name"] else default_model)
                for pr in e_protocols:
                    for seed in seeds:
                        opts = _merge(run_opts, m_opts, t_opts, e_opts, pr["options"])
                        labels = {"editor": ed.get("label") or ed["name"], "task": tk.get("label") or tk["name"],
                                  "model": m_label, "protocol": pr["id"], "seed": seed}
                        if any(_excluded(ex, labels) for ex in exclude):
                            continue
                        cells.append(_cell(w, labels, ed["name"], tk["name"], md["name"], seed, opts, hp,
                                           {**resources, **m_res, **t_res, **e_res, **pr["resources"]},
                                           f"{e_where} × tasks[{t_i}] × models[{m_i}] × {pr['where']} × seed {seed}"))
    seen: dict[str, Cell] = {}
    for c in cells:
        if c.name in seen:
            raise w.error("", f"two cells would write {c.name}.json: {seen[c.name].where} and {c.where}; "
                          "give one of the entries a label")
        seen[c.name] = c
    if not cells:
        raise w.error("exclude", "leaves no cell to run")
    return Grid(path, name, Path(out_dir), cells, retries)


def _excluded(ex: dict[str, Any], labels: dict[str, Any]) -> bool:
    for k, v in ex.items():
        allowed = v if isinstance(v, list) else [v]
        if labels[k] not in allowed and str(labels[k]) not in map(str, allowed):
            return False
    return True


def _cell(w: _Where, labels: dict[str, Any], editor: str, task: str, model: str | None, seed: int,
          opts: dict[str, Any], hp: dict[str, Any] | None, resources: dict[str, float], where: str) -> Cell:
    ident: dict[str, Any] = {"editor": editor, "task": task, "model": model, "seed": seed,
                             "options": {k: v for k, v in opts.items() if k not in ("checkpoint_every", "log_records")}}
    if hp is not None:
        ident["hparams"] = hp
    elif opts.get("hparams"):
        f = Path(opts["hparams"]).expanduser()
        if not f.is_file():
            raise w.error(f"{where}: hparams", f"{opts['hparams']}: no such file")
        from .results import sha256_file

        ident["hparams_sha256"] = sha256_file(f)
    name = "_".join(_slug(str(labels[k])) for k in ("editor", "task", "model", "protocol")) + f"_s{seed}"
    if hp is not None:
        name += f"_h{_digest(hp)[:6]}"
    options = {**opts, "editor": editor, "task": task, "model": model, "seed": seed}
    return Cell(name, _digest(ident)[:16], str(labels["editor"]), str(labels["task"]), str(labels["model"]),
                str(labels["protocol"]), seed, options, hp, resources, where)


# -- state: which cells are done -------------------------------------------------------------------
@dataclass
class CellState:
    cell: Cell
    todo: bool  # must run
    why: str  # "done", "no result yet", "result invalid: ...", "options changed", ...
    resume: bool = False  # its checkpoint exists


def cell_state(grid: Grid, cell: Cell) -> CellState:
    """Whether ``cell`` is done: every result file exists, validates and carries the cell's hash."""
    from .validate import validate_file

    for f in grid.files(cell):
        if not f.exists():
            return CellState(cell, True, "no result yet", grid.checkpoint(cell).exists())
        report = validate_file(f)
        if not report.ok:
            first = str(report.errors[0]) if report.errors else "not a result"
            first = first if len(first) <= 60 else first[:59] + "…"
            return CellState(cell, True, f"{f.name} is not a valid result ({first})")
        got = ((report.result or {}).get("config", {}).get("extra") or {}).get("sweep_cell")
        if got != cell.key:
            return CellState(cell, True, f"{f.name} was written for other options")
    return CellState(cell, False, "done")


def plan(grid: Grid) -> list[CellState]:
    return [cell_state(grid, c) for c in grid.cells]


# -- one cell (in the worker) ----------------------------------------------------------------------
@contextmanager
def _pinned(num_cpus: float) -> Iterator[None]:
    """torch on ``num_cpus`` threads, OMP / MKL told the same for subprocesses, the cell's own
    progress bars off (the sweep shows progress across cells); all put back afterwards (the local
    engine's one-worker mode runs cells in the sweep's own process)."""
    n = str(max(1, int(num_cpus)))
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KNOWBENCH_PROGRESS")}
    os.environ.update({"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "KNOWBENCH_PROGRESS": "0"})
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(int(n))
    hf = _hf_bars(False)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _hf_bars(hf)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _hf_bars(on: bool | None) -> bool | None:
    """Turn transformers' own progress bars (weight loading) on or off; returns what they were."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    was = hf_logging.is_progress_bar_enabled()
    if on is not None:
        (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()
    return was


def _drop(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _train_if_needed(cfg: Any) -> bool:
    """Train a trainable editor's artefact for the cell when there is none (``runner.train`` reuses
    a finished one); a file lock in the cache keeps two cells on one node from training it at once."""
    from filelock import FileLock

    from . import registry, runner
    from .editor import RunContext
    from .runconfig import RunConfig

    try:
        _, cls = registry.load_editor(cfg.editor)
    except Exception:  # noqa: BLE001 - an unknown editor is reported by the run's preflight
        return False
    if not getattr(cls, "trainable", False):
        return False
    tcfg = RunConfig(editor=cfg.editor, task=cfg.task, model=cfg.model, data=cfg.data, seed=cfg.seed,
                     device=cfg.device, dtype=cfg.dtype, hparams=cfg.hparams, train_data=cfg.train_data)
    ident = _digest([tcfg.editor, tcfg.task, tcfg.model, tcfg.data, tcfg.train_data, tcfg.seed, tcfg.dtype,
                     Path(tcfg.hparams).read_text() if tcfg.hparams else None])[:16]
    with FileLock(str(RunContext().cache("locks") / f"train-{_slug(cfg.editor)}-{ident}.lock")):
        meta = runner.train(tcfg)
    return not meta.get("reused", False)


def run_cell(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one cell (in whichever process the engine chose) and return its outcome: ``results``
    (``runner.run_all``'s, unsealed; the driver seals and writes them) or ``error``, ``traceback`` and
    whether another attempt may help (``retryable``: not for a RunError)."""
    import platform

    from .runconfig import RunError

    t0 = time.perf_counter()
    out: dict[str, Any] = {"ok": False, "results": None, "error": "", "traceback": "", "retryable": True,
                           "resumed": False, "trained": False, "host": platform.node(), "pid": os.getpid()}
    try:
        from . import runner
        from .runconfig import RunConfig

        with _pinned(payload["num_cpus"]):
            cfg = RunConfig(**payload["options"])
            if payload.get("hparams_text") is not None and cfg.hparams and not Path(cfg.hparams).exists():
                Path(cfg.hparams).parent.mkdir(parents=True, exist_ok=True)  # a node without the driver's files
                Path(cfg.hparams).write_text(payload["hparams_text"], encoding="utf-8")
            out["trained"] = _train_if_needed(cfg)
            ckpt = Path(cfg.checkpoint) if cfg.checkpoint else None
            if ckpt is not None:
                tag = ckpt.with_name(ckpt.name + ".cell")  # which cell (options) the checkpoint is of
                if ckpt.exists() and (not tag.exists() or tag.read_text().strip() != payload["key"]):
                    _drop(ckpt)  # a checkpoint of other options: start over
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                tag.write_text(payload["key"])
            if ckpt is not None and ckpt.exists() and hasattr(runner, "resume_all"):
                out["resumed"] = True
                results = runner.resume_all(str(ckpt))
            else:
                results = runner.run_all(cfg)
        out.update(ok=True, results=results)
    except Exception as exc:  # noqa: BLE001 - recorded with the cell, the sweep goes on
        out.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=30),
                   retryable=not isinstance(exc, RunError))
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _worker_init() -> None:
    os.environ["KNOWBENCH_PROGRESS"] = "0"


# -- engines: submit a payload, wait for outcomes --------------------------------------------------
class _InProcess:
    """``--engine local --workers 1``: each cell in this process, one after another."""

    capacity = 1
    verb = "started"

    def __init__(self) -> None:
        self.queue: list[tuple[int, dict[str, Any]]] = []

    def submit(self, handle: int, payload: dict[str, Any]) -> None:
        self.queue.append((handle, payload))

    def wait(self) -> list[tuple[int, dict[str, Any]]]:
        handle, payload = self.queue.pop(0)
        return [(handle, run_cell(payload))]

    def close(self) -> None:
        pass


class _Processes:
    """``--engine local --workers N``: N spawned worker processes (a worker that dies fails its cell)."""

    verb = "started"

    def __init__(self, workers: int):
        self.capacity = workers
        self.futures: dict[Any, int] = {}
        self.pool = self._pool()

    def _pool(self) -> Any:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=self.capacity, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init)

    def submit(self, handle: int, payload: dict[str, Any]) -> None:
        try:
            fut = self.pool.submit(run_cell, payload)
        except RuntimeError:  # the pool broke (a worker died): a new one
            self.pool = self._pool()
            fut = self.pool.submit(run_cell, payload)
        self.futures[fut] = handle

    def wait(self) -> list[tuple[int, dict[str, Any]]]:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_futures

        done, _ = wait_futures(list(self.futures), return_when=FIRST_COMPLETED)
        out = []
        broken = False
        for fut in done:
            handle = self.futures.pop(fut)
            exc = fut.exception()
            if exc is None:
                out.append((handle, fut.result()))
            else:
                broken = True
                out.append((handle, _lost(f"the worker process died ({type(exc).__name__}: {exc})")))
        if broken:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._pool()
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)  # nothing runs any more unless interrupted


def _lost(why: str) -> dict[str, Any]:
    return {"ok": False, "results": None, "error": why, "traceback": "", "retryable": True, "resumed": False,
            "trained": False, "host": "", "pid": None, "seconds": None}


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RuntimeError(f"--engine ray needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


class _Ray:
    """``--engine ray``: each cell a Ray task with its num_cpus / num_gpus; Ray queues what does not fit."""

    capacity = 1 << 30
    verb = "queued"

    def __init__(self, address: str | None, runtime_env: dict[str, Any] | None, num_cpus: int | None):
        ray = self.ray = _import_ray()
        self.started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
            if runtime_env:
                kwargs["runtime_env"] = runtime_env
            if address in (None, "", "local"):
                if num_cpus:
                    kwargs["num_cpus"] = num_cpus
                ray.init(**kwargs)
            else:
                ray.init(address=address, **kwargs)
            self.started = True
        self.remote = ray.remote(max_retries=0)(run_cell)
        self.refs: dict[Any, int] = {}

    def submit(self, handle: int, payload: dict[str, Any]) -> None:
        res = payload["resources"]
        ref = self.remote.options(num_cpus=res.get("num_cpus", 1), num_gpus=res.get("num_gpus", 0),
                                  name=f"knowbench-sweep:{payload['name']}").remote(payload)
        self.refs[ref] = handle

    def wait(self) -> list[tuple[int, dict[str, Any]]]:
        ready, _ = self.ray.wait(list(self.refs), num_returns=1)
        out = []
        for ref in ready:
            handle = self.refs.pop(ref)
            try:
                out.append((handle, self.ray.get(ref)))
            except Exception as exc:  # noqa: BLE001 - a worker that died, a task Ray could not run
                out.append((handle, _lost(f"the Ray task failed ({type(exc).__name__}: {exc})")))
        return out

    def close(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)
        if self.started:
            self.ray.shutdown()


def make_engine(engine: str, workers: int = 1, address: str | None = None,
                runtime_env: dict[str, Any] | None = None) -> Any:
    if engine == "local":
        if address or runtime_env:
            raise ValueError("--address and --runtime-env are for --engine ray")
        return _InProcess() if workers <= 1 else _Processes(workers)
    if engine == "ray":
        return _Ray(address, runtime_env, workers if workers > 1 else None)
    raise ValueError(f"--engine {engine!r}: expected local or ray")


# -- progress across cells -------------------------------------------------------------------------
class _View:
    """Cells done / to run, and one line per running cell: rich bars on a terminal, log lines
    otherwise (``KNOWBENCH_PROGRESS=0`` leaves only the log lines of finished and failed cells)."""

    def __init__(self, title: str, total: int):
        from .progress import _enabled, _interactive, stderr

        self.total, self.done = total, 0
        self.live = _enabled() and _interactive() and total > 0
        self.rows: dict[str, Any] = {}
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn)

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), console=stderr, transient=False)
            self.progress.start()
            self.overall = self.progress.add_task(f"[bold]{title}", total=total)

    def started(self, cell: Cell, attempt: int, verb: str = "started") -> None:
        note = f" (attempt {attempt})" if attempt > 1 else ""
        if self.live:
            self.rows[cell.name] = self.progress.add_task(f"  {cell.name}{note}", total=None)
        else:
            log.info("[%d/%d done] %s %s%s", self.done, self.total, verb, cell.name, note)

    def finished(self, cell: Cell, line: str, final: bool, level: int = logging.INFO) -> None:
        if final:
            self.done += 1
        if self.live:
            row = self.rows.pop(cell.name, None)
            if row is not None:
                self.progress.remove_task(row)
            if final:
                self.progress.advance(self.overall)
        log.log(level, "[%d/%d done] %s", self.done, self.total, line)

    def close(self) -> None:
        if self.live:
            self.progress.stop()


# -- the sweep -------------------------------------------------------------------------------------
@dataclass
class CellRecord:
    """A cell's line in ``sweep.json``."""

    name: str
    key: str
    editor: str
    task: str
    model: str
    protocol: str
    seed: int
    status: str = "pending"  # pending | running | done | failed
    skipped: bool = False  # done by an earlier run of the sweep
    attempts: int = 0
    files: list[str] = field(default_factory=list)
    seconds: float | None = None
    resumed: bool = False
    trained: bool = False
    note: str = ""  # why it ran ("no result yet", "... not a valid result ...")
    errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SweepReport:
    grid: Grid
    records: dict[str, CellRecord]

    @property
    def done_files(self) -> list[Path]:
        return [Path(f) for r in self.records.values() if r.status == "done" for f in r.files]

    @property
    def failed(self) -> list[CellRecord]:
        return [r for r in self.records.values() if r.status == "failed"]


def _payload(grid: Grid, cell: Cell) -> dict[str, Any]:
    opts = dict(cell.options)
    for k in ("data", "train_data", "hparams"):  # a worker may start in another folder
        if opts.get(k):
            opts[k] = str(Path(opts[k]).expanduser().absolute())
    hparams_text = None
    if cell.hparams is not None:
        import yaml

        f = grid.hparams_file(cell).absolute()
        hparams_text = yaml.safe_dump(cell.hparams, sort_keys=True)
        if not f.exists() or f.read_text(encoding="utf-8") != hparams_text:
            from .results import _write_atomic

            _write_atomic(f, lambda fh: fh.write(hparams_text))
        opts["hparams"] = str(f)
    opts["extra"] = {"diagnostics": {}, "stats": {}, **opts.get("extra", {}), "sweep_cell": cell.key}
    opts["output"] = str((grid.results_dir / f"{cell.name}.json").absolute())  # with both: -each, -final
    opts.pop("log_records", None)
    if opts.get("checkpoint_every"):
        opts["checkpoint"] = str(grid.checkpoint(cell).absolute())
    else:
        opts.pop("checkpoint_every", None)
    return {"name": cell.name, "key": cell.key, "options": opts, "hparams_text": hparams_text,
            "num_cpus": cell.resources.get("num_cpus", 1), "resources": cell.resources}


def _write_manifest(grid: Grid, records: dict[str, CellRecord], started: float, engine: str) -> None:
    from .results import write_json_atomic

    counts: dict[str, int] = {}
    for r in records.values():
        counts[r.status] = counts.get(r.status, 0) + 1
    write_json_atomic(grid.output_dir / MANIFEST, {
        "grid": str(grid.path), "name": grid.name, "engine": engine,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "counts": counts,
        "cells": [dataclasses.asdict(r) for r in records.values()],
    })


def _log_failure(grid: Grid, rec: CellRecord, outcome: dict[str, Any]) -> None:
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cell": rec.name, "attempt": rec.attempts,
           "error": outcome["error"], "host": outcome.get("host"), "seconds": outcome.get("seconds"),
           "traceback": outcome.get("traceback", "")}
    grid.output_dir.mkdir(parents=True, exist_ok=True)
    with open(grid.output_dir / FAILURES, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def run_sweep(grid: Grid, engine: str = "local", workers: int = 1, address: str | None = None,
              runtime_env: dict[str, Any] | None = None, retries: int | None = None) -> SweepReport:
    """Run every cell of ``grid`` that is not done; a failed cell is tried again up to ``retries``
    times (default: the grid's). Returns every cell's record (also in ``sweep.json``)."""
    from .runner import write_results
    from .validate import validate_file

    retries = grid.retries if retries is None else retries
    t_start = time.time()
    states = plan(grid)
    records = {s.cell.name: CellRecord(s.cell.name, s.cell.key, s.cell.editor, s.cell.task, s.cell.model,
                                       s.cell.protocol, s.cell.seed, note=s.why) for s in states}
    for s in states:
        if not s.todo:
            r = records[s.cell.name]
            r.status, r.skipped, r.files = "done", True, [str(f.absolute()) for f in grid.files(s.cell)]
    todo = [s.cell for s in states if s.todo]
    n_done = len(states) - len(todo)
    log.info("sweep %s: %d cells, %d done already (skipped), %d to run (engine %s%s)", grid.name, len(states),
             n_done, len(todo), engine, f", {workers} workers" if engine == "local" and workers > 1 else "")
    grid.results_dir.mkdir(parents=True, exist_ok=True)
    _write_manifest(grid, records, t_start, engine)
    if not todo:
        return SweepReport(grid, records)

    ex = make_engine(engine, workers, address, runtime_env)
    view = _View(f"sweep {grid.name}", len(todo))
    cells = {i: c for i, c in enumerate(todo)}
    pending = list(cells)
    inflight: set[int] = set()
    try:
        while pending or inflight:
            while pending and len(inflight) < ex.capacity:
                h = pending.pop(0)
                cell, rec = cells[h], records[cells[h].name]
                rec.attempts += 1
                rec.status = "running"
                ex.submit(h, _payload(grid, cell))
                inflight.add(h)
                view.started(cell, rec.attempts, ex.verb)
            _write_manifest(grid, records, t_start, engine)
            for h, outcome in ex.wait():
                inflight.discard(h)
                cell, rec = cells[h], records[cells[h].name]
                rec.resumed = rec.resumed or bool(outcome.get("resumed"))
                rec.trained = rec.trained or bool(outcome.get("trained"))
                if outcome["ok"]:
                    try:
                        written = write_results(outcome["results"], str(grid.results_dir.absolute() / f"{cell.name}.json"),
                                                _log_path(grid, cell))
                        bad = [validate_file(p).describe() for p, _ in written if not validate_file(p).ok]
                        if bad:
                            raise ValueError("the written result does not validate:\n" + "\n".join(bad))
                    except Exception as exc:  # noqa: BLE001 - a result that cannot be written fails the cell
                        outcome = {**outcome, "ok": False, "error": f"writing the result: {type(exc).__name__}: {exc}",
                                   "traceback": traceback.format_exc(limit=20), "retryable": True}
                    else:
                        ckpt = grid.checkpoint(cell)
                        _drop(ckpt)
                        ckpt.with_name(ckpt.name + ".cell").unlink(missing_ok=True)
                        rec.status, rec.files, rec.seconds = "done", [str(p) for p, _ in written], outcome["seconds"]
                        view.finished(cell, f"done {cell.name} in {outcome['seconds']:.1f} s"
                                      + (" (resumed from its checkpoint)" if outcome.get("resumed") else ""), True)
                        continue
                rec.errors.append({"attempt": rec.attempts, "error": outcome["error"], "host": outcome.get("host"),
                                   "seconds": outcome.get("seconds")})
                _log_failure(grid, rec, outcome)
                again = outcome.get("retryable", True) and rec.attempts <= retries
                if again:
                    rec.status = "pending"
                    pending.append(h)
                    view.finished(cell, f"failed {cell.name} (attempt {rec.attempts} of {retries + 1}), trying "
                                  f"again: {_first_line(outcome['error'])}", False, logging.WARNING)
                else:
                    rec.status = "failed"
                    why = "" if outcome.get("retryable", True) else " (not retried: a bad option or data file)"
                    view.finished(cell, f"FAILED {cell.name} after {rec.attempts} attempt(s){why}: "
                                  f"{_first_line(outcome['error'])}", True, logging.WARNING)
            _write_manifest(grid, records, t_start, engine)
    finally:
        view.close()
        for r in records.values():
            if r.status == "running":
                r.status = "pending"
        _write_manifest(grid, records, t_start, engine)
        ex.close()
    return SweepReport(grid, records)


def _log_path(grid: Grid, cell: Cell) -> str | None:
    if cell.options.get("log_records"):
        return str(grid.results_dir.absolute() / f"{cell.name}.records.jsonl")
    return None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


# -- the tables at the end -------------------------------------------------------------------------
def write_tables(files: Sequence[Path], output_dir: Path, fmt: str = "text") -> tuple[str, list[Path]]:
    """The finished results as tables: single edits in KnowEdit's layout, sequential runs in the
    lifelong layout (each only when there are such results; seeds averaged), written as Markdown,
    HTML and CSV into ``output_dir``; returns (the tables in ``fmt`` for stdout, the files written)."""
    from . import knowedit_table as ke
    from . import lifelong_table as ll
    from .results import _write_atomic

    if not files:
        return "", []
    sources = ke.load_sources(files)
    single, _ = ke.select(sources)
    seq, _ = ll.select(sources, task=None)
    texts: list[str] = []
    written: list[Path] = []

    def put(name: str, text: str) -> None:
        written.append(_write_atomic(output_dir / name, lambda f: f.write(text if text.endswith("\n") else text + "\n")))

    if single:
        tables = ke.build_tables(single, duplicates="mean")
        put("knowedit.md", ke.render_markdown(tables))
        put("knowedit.html", ke.render_html(tables))
        put("knowedit.csv", "\n".join(ke.render_csv(t) for t in tables))
        texts.append("\n".join(ke.render_csv(t) for t in tables) if fmt == "csv" else ke.render(tables, fmt))
    if seq:
        tables = ll.build_tables(seq, duplicates="mean")
        for suffix, f in (("md", "markdown"), ("html", "html"), ("csv", "csv")):
            put(f"lifelong.{suffix}", ll.render(tables, f))
        texts.append(ll.render(tables, fmt))
    if len(single) + len(seq) < len(sources):
        log.info("%d result(s) are neither single edits nor sequential (batch): in no table",
                 len(sources) - len(single) - len(seq))
    return "\n".join(texts), written


def submit_results(files: Sequence[Path], leaderboard: str | Path, replace: bool = False) -> list[Any]:
    """File ``files`` on the leaderboard (``knowbench.leaderboard.submit``), leaving out each one the
    leaderboard already stores unchanged (a rerun of a finished sweep submits nothing new)."""
    from .leaderboard import relative_path, submit
    from .validate import load_result

    root = Path(leaderboard)
    new = []
    for f in files:
        result, _ = load_result(f)
        stored, report = load_result(root / relative_path(result)) if isinstance(result, dict) else (None, None)
        same = (isinstance(stored, dict) and not report.problems
                and (stored.get("integrity") or {}).get("sha256") == result["integrity"]["sha256"])
        if not same:
            new.append(f)
    if not new:
        log.info("every result is on the leaderboard %s already", root)
        return []
    return submit(new, root, replace=replace)


# -- command line ----------------------------------------------------------------------------------
def add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="run a grid of editors x tasks x models x seeds x protocols",
        description="Run every cell of a grid file (editors × tasks × models × seeds × protocols, run options, "
        "resources per cell) locally or on Ray; each cell writes a sealed result, a rerun skips the cells "
        "whose results validate, a failed cell is retried and recorded; at the end the results as KnowEdit's "
        "table and/or the lifelong table (Markdown, HTML and CSV in the output folder; --format on stdout). "
        "The grid format is in `python -c 'import knowbench.sweep as s; help(s)'` and the README.",
    )
    p.add_argument("grid", metavar="GRID.yaml", help="the grid file")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local (default): this machine, --workers processes; ray: each cell a Ray task")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="local: cells at a time (1: in this process; N: N spawned processes); ray: CPUs of the "
                   "local Ray instance it starts (default: all)")
    p.add_argument("--address", default=None, help="ray: the cluster (auto, ray://HOST:PORT; default: start a "
                   "local instance)")
    p.add_argument("--runtime-env", default=None, metavar="JSON", help="ray: runtime_env for ray.init, as JSON")
    p.add_argument("--retries", type=int, default=None, metavar="N",
                   help="tries after a cell's first failure (default: the grid's retries, else 1)")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where the results go (default: the grid's output_dir, else sweeps/<grid stem>)")
    p.add_argument("--submit", default=None, metavar="LEADERBOARD_DIR",
                   help="file the finished results on this leaderboard (as `knowbench submit`)")
    p.add_argument("--replace", action="store_true", help="--submit: overwrite stored results with the same run key")
    p.add_argument("--dry-run", action="store_true", help="list the cells and whether each would run; run nothing")
    p.add_argument("--format", choices=("text", "markdown", "html", "csv"), default="text",
                   help="the tables on stdout (the files in the output folder are written in every format)")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ValueError("--workers N needs N >= 1")
    if args.retries is not None and args.retries < 0:
        raise ValueError("--retries N needs N >= 0")
    runtime_env = None
    if args.runtime_env:
        try:
            runtime_env = json.loads(args.runtime_env)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--runtime-env: not JSON: {exc}") from None
        if not isinstance(runtime_env, dict):
            raise ValueError("--runtime-env: must be a JSON object")
    if args.engine == "local" and (args.address or runtime_env):
        raise ValueError("--address and --runtime-env are for --engine ray")
    grid = load_grid(args.grid, args.output_dir)
    if args.dry_run:
        return _dry_run(grid)
    if args.engine == "ray":
        _import_ray()
    report = run_sweep(grid, args.engine, args.workers, args.address, runtime_env, args.retries)
    rc = 0
    if report.failed:
        rc = 1
        log.error("%d of %d cells failed (errors in %s):", len(report.failed), len(report.records),
                  grid.output_dir / MANIFEST)
        for r in report.failed:
            log.error("  %s: %s", r.name, _first_line(r.errors[-1]["error"]) if r.errors else "")
    files = report.done_files
    from .knowedit_table import KnowEditTableError

    try:
        text, written = write_tables(files, grid.output_dir, args.format)
    except KnowEditTableError as exc:
        log.error("the results are written, but no table could be made of them: %s", exc)
        text, written, rc = "", [], 1
    if text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    for f in written:
        log.info("wrote %s", f)
    if args.submit:
        from .leaderboard import LeaderboardError

        try:
            done = submit_results(files, args.submit, args.replace)
        except (LeaderboardError, ValueError) as exc:
            log.error("--submit %s: %s", args.submit, exc)
            return 1
        for s in done:
            log.info("%s %s", "replaced" if s.replaced else "added", s.path)
    return rc


def _dry_run(grid: Grid) -> int:
    """Each cell, whether it would run and why, and a preflight of its options (nothing is written)."""
    from tabulate import tabulate

    from .preflight import preflight
    from .runconfig import RunConfig, RunError

    import tempfile

    import yaml

    rows = []
    for s in plan(grid):
        opts = {k: v for k, v in s.cell.options.items() if k not in ("log_records", "checkpoint_every")}
        check = ""
        if s.todo:
            with tempfile.TemporaryDirectory() as tmp:
                if s.cell.hparams is not None:  # the overrides as the cell's file will hold them
                    opts["hparams"] = str(Path(tmp) / "hparams.yaml")
                    Path(opts["hparams"]).write_text(yaml.safe_dump(s.cell.hparams), encoding="utf-8")
                try:
                    preflight(RunConfig(**opts))
                except (RunError, ValueError, LookupError) as exc:
                    check = f"error: {_first_line(str(exc))}"
        state = ("skip: done" if not s.todo else ("resume" if s.resume else "run") + f" ({s.why})")
        res = ", ".join(f"{k} {v:g}" for k, v in s.cell.resources.items())
        rows.append([s.cell.name, state + (f"; {check}" if check else ""), res])
    n_run = sum(1 for r in rows if not r[1].startswith("skip"))
    print(tabulate(rows, ["cell", "would", "resources"], tablefmt="simple", disable_numparse=True))
    print(f"{len(rows)} cells: {n_run} would run, {len(rows) - n_run} done (skipped); results in {grid.results_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``knowbench sweep`` on its own (the tests call ``knowbench.cli.main(["sweep", ...])``)."""
    from .cli import main as cli_main

    return cli_main(["sweep", *(argv or [])])

