"""The editing runner: load, select, edit under a protocol, evaluate, write the result file.

Protocols (DESIGN section 5):

* single       each edit on the original model, evaluated, weights restored exactly;
* batch B      B edits in one update on the original model, evaluated, restored;
* sequential T T edits applied one after another (in updates of B) without restoring, evaluated
               right after each update (``each``) or all on the final model (``final``); locality
               always against the unedited model. ``curve_every`` adds a lifelong curve: a fixed
               probe subset evaluated every k edits.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import __version__, registry
from .editor import (
    EditContext,
    EditRequest,
    hparams_hash,
    hparams_to_dict,
    load_hparams_file,
    override_hparams,
)
from .evaluation import EvalConfig, Evaluator, RecordScores, summarise
from .progress import progress_bar
from .records import EditRecord, LoadReport
from .results import SCHEMA_VERSION, environment, git_commit, peak_memory_mb, seal, sha256_file

log = logging.getLogger("knowbench")


@dataclass
class RunConfig:
    editor: str
    task: str
    model: str | None = None
    data: str | None = None
    limit: int | None = None
    sequential: int | None = None
    eval_timing: str = "each"
    batch_size: int | None = None  # edits per update; None: one
    seed: int = 0
    output: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    hparams: str | None = None
    eval_batch_size: int = 32
    fluency: bool = True
    curve_every: int | None = None
    curve_probes: int = 50
    log_records: str | None = None
    diagnostics: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class RunError(ValueError):
    pass


def protocol_name(cfg: RunConfig) -> str:
    if cfg.sequential:
        return "sequential"
    return "batch" if cfg.batch_size and cfg.batch_size > 1 else "single"


def select(report: LoadReport, n: int | None, seed: int) -> tuple[list[EditRecord], dict[str, Any]]:
    """A seeded sample of ``n`` records kept in file order; all records when ``n`` is None."""
    records = report.records
    if n is None or n >= len(records):
        chosen = list(records)
        method = "all"
    else:
        rng = random.Random(seed)
        picked = sorted(rng.sample(range(len(records)), n))
        chosen = [records[i] for i in picked]
        method = "seeded-sample"
    return chosen, {
        "method": method,
        "seed": seed,
        "n_available": len(records),
        "n_selected": len(chosen),
        "indices": [r.index for r in chosen],
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _requests(records: Sequence[EditRecord]) -> list[EditRequest]:
    return [
        EditRequest(prompt=r.prompt, target_new=r.target_new, subject=r.subject,
                    ground_truth=r.ground_truth, record_index=r.index)
        for r in records
    ]


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def run(cfg: RunConfig) -> dict[str, Any]:
    from . import defaults
    from .models import load_model

    t_start = time.perf_counter()
    if cfg.eval_timing not in ("each", "final"):
        raise RunError(f"--eval-timing must be 'each' or 'final', not {cfg.eval_timing!r}")
    if cfg.sequential is not None and cfg.sequential < 1:
        raise RunError("--sequential T needs T >= 1")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise RunError("--batch-size B needs B >= 1")
    seed_everything(cfg.seed)

    # -- task and data ---------------------------------------------------------------------
    task_info = registry.get(registry.TASK_GROUP, cfg.task)
    task = task_info.load()
    data_path = task.resolve(cfg.data)
    report: LoadReport = task.reader(data_path)
    _warn_bad(report)
    n_wanted = cfg.sequential if cfg.sequential else cfg.limit
    if cfg.sequential and cfg.limit is not None and cfg.limit < cfg.sequential:
        raise RunError(f"--limit {cfg.limit} is smaller than --sequential {cfg.sequential}")
    if n_wanted is not None and n_wanted > len(report.records):
        raise RunError(
            f"{data_path} has {len(report.records)} usable records, fewer than the {n_wanted} asked for"
        )
    records, selection = select(report, n_wanted, cfg.seed)
    if not records:
        raise RunError(f"{data_path}: no usable records to edit")

    # -- model and editor --------------------------------------------------------------------
    model_name = cfg.model or defaults.default_model()
    t0 = time.perf_counter()
    lm = load_model(model_name, dtype=cfg.dtype, device=cfg.device)
    load_s = time.perf_counter() - t0
    editor_info = registry.get(registry.EDITOR_GROUP, cfg.editor)
    editor_cls = editor_info.load()
    hp = editor_cls.default_hparams(lm.model, model_name)
    if cfg.hparams:
        hp = override_hparams(hp, load_hparams_file(cfg.hparams), source=f"--hparams {cfg.hparams}")
    context = EditContext(
        seed=cfg.seed, model_name=model_name, device=cfg.device,
        extras={**defaults.editor_extras(model_name, lm), **cfg.extra.get("stats", {})},
    )
    editor = editor_cls(lm.model, lm.tokenizer, hp, context)
    if hasattr(editor, "prepare"):  # one-off set-up (key statistics) is not edit time
        t0 = time.perf_counter()
        editor.prepare()
        prepare_s = time.perf_counter() - t0
    else:
        prepare_s = 0.0
    batch = cfg.batch_size or 1
    if batch > 1 and not getattr(editor_cls, "supports_batch", False):
        raise RunError(f"editor {cfg.editor} edits one fact at a time; drop --batch-size")

    # -- unedited reference and pre-edit metrics ------------------------------------------------
    evaluator = Evaluator(
        lm.model, lm.tokenizer, task.kind,
        EvalConfig(batch_size=cfg.eval_batch_size, fluency=cfg.fluency, seed=cfg.seed),
        shared=report.shared,
    )
    evaluator.prepare(records)
    t0 = time.perf_counter()
    log.info("evaluating %d records on the unedited model", len(records))
    ref = evaluator.reference(records, editor.rewrite_prompts)
    pre_scores = evaluator.evaluate(records, ref, locality=False)
    pre_s = time.perf_counter() - t0

    # -- edit -------------------------------------------------------------------------------
    protocol = protocol_name(cfg)
    from .diagnostics import for_runner  # superposition diagnostics: probe keys on the unedited model

    diag = for_runner(cfg, editor_cls, editor, lm, records, task, report, protocol)
    post_scores: dict[int, RecordScores] = {}
    edit_infos: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    edit_s = eval_s = 0.0
    chunks = _chunks(records, batch)
    probes = records[: cfg.curve_probes] if cfg.sequential and cfg.curve_every else []
    next_curve = cfg.curve_every or 0
    if probes:
        curve.append(_curve_point(evaluator, probes, set(), ref, editor, 0))

    with progress_bar(f"{cfg.editor} · {protocol}", total=len(records)) as advance:
        done = 0
        edited: set[int] = set()
        for chunk in chunks:
            t0 = time.perf_counter()
            outcome = editor.apply(_requests(chunk))
            dt = time.perf_counter() - t0
            edit_s += dt
            if diag is not None:
                diag.after_apply(chunk, outcome, dt)
            edit_infos.append({
                "records": [r.index for r in chunk], "seconds": round(dt, 4),
                "changed_params": outcome.changed_params, **outcome.info,
            })
            done += len(chunk)
            edited.update(r.index for r in chunk)
            if protocol != "sequential" or cfg.eval_timing == "each":
                t0 = time.perf_counter()
                for s in evaluator.evaluate(chunk, ref, editor.rewrite_prompts):
                    post_scores[s.index] = s
                eval_s += time.perf_counter() - t0
            if protocol != "sequential":
                editor.restore()
            elif probes and done >= next_curve:
                curve.append(_curve_point(evaluator, probes, edited, ref, editor, done))
                while next_curve <= done:
                    next_curve += cfg.curve_every
            advance(len(chunk))
        if probes and curve[-1]["edits"] != done:
            curve.append(_curve_point(evaluator, probes, edited, ref, editor, done))

    if protocol == "sequential" and cfg.eval_timing == "final":
        t0 = time.perf_counter()
        log.info("evaluating all %d edits on the final model", len(records))
        for s in evaluator.evaluate(records, ref, editor.rewrite_prompts):
            post_scores[s.index] = s
        eval_s += time.perf_counter() - t0

    post = [post_scores[r.index] for r in records]
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "knowbench": {"version": __version__, "git_commit": git_commit()},
        "editor": {
            "name": cfg.editor,
            "distribution": editor_info.dist,
            "version": editor_info.dist_version,
            "hparams": hparams_to_dict(hp),
            "hparams_hash": hparams_hash(hp),
            "hparams_file": cfg.hparams,
            "provenance": editor.provenance() if hasattr(editor, "provenance") else {},
        },
        "model": {
            "id": model_name,
            "source": lm.source,
            "path": lm.path,
            "revision": lm.revision,
            "model_type": lm.model.config.model_type,
            "dtype": cfg.dtype,
            "device": cfg.device,
            "n_params": lm.n_params,
            "default": cfg.model is None,
        },
        "task": {
            "name": task.name,
            "knowedit_name": task.knowedit_name,
            "kind": task.kind,
            "version": task.version,
            "distribution": task_info.dist,
            "format": report.format,
            "data_files": [{"path": str(p), "sha256": sha256_file(p)} for p in report.files],
            "default_data": cfg.data is None,
            "n_records_in_file": report.n_raw,
            "n_records_usable": len(report.records),
            "bad_records": [asdict(b) for b in report.bad],
            "selection": selection,
        },
        "protocol": {
            "name": protocol,
            "n_edits": len(records),
            "sequential": cfg.sequential,
            "eval_timing": cfg.eval_timing if protocol == "sequential" else "each",
            "batch_size": batch,
            "seed": cfg.seed,
            "curve_every": cfg.curve_every if probes else None,
            "curve_probes": len(probes),
            "fluency": cfg.fluency,
        },
        "metrics": {"pre": summarise(pre_scores, task.kind), "post": summarise(post, task.kind)},
        "curve": curve,
        "edits": edit_infos,
        "timings": {
            "load_model_s": round(load_s, 3),
            "editor_prepare_s": round(prepare_s, 3),
            "pre_eval_s": round(pre_s, 3),
            "edit_s": round(edit_s, 3),
            "edit_ms_per_edit": round(1000 * edit_s / len(records), 3),
            "post_eval_s": round(eval_s, 3),
            "total_s": round(time.perf_counter() - t_start, 3),
            "peak_memory_mb": round(peak_memory_mb(), 1),
        },
        "environment": environment(),
        "config": asdict(cfg),
    }
    if diag is not None:
        result["diagnostics"] = diag.result(post, result["protocol"]["eval_timing"])
    result["_records"] = _record_log(records, pre_scores, post)  # popped by the caller
    return result


def finish(result: dict[str, Any]) -> dict[str, Any]:
    """Seal a run's result (the per-record log is kept apart from the sealed file)."""
    result.pop("_records", None)
    return seal(result)


def _record_log(records, pre: list[RecordScores], post: list[RecordScores]) -> list[dict[str, Any]]:
    return [
        {
            "index": r.index, "source": r.source, "subject": r.subject, "prompt": r.prompt,
            "target_new": r.target_new, "pre": p.values, "post": q.values,
        }
        for r, p, q in zip(records, pre, post)
    ]


def _curve_point(evaluator: Evaluator, probes, edited: set[int], ref, editor, n_edits: int) -> dict[str, Any]:
    scores = evaluator.evaluate(probes, ref, editor.rewrite_prompts, fluency=False)
    # only edits already applied count towards edit success; locality is measured on every probe
    for s in scores:
        if s.index not in edited:
            for key in ("edit_succ", "rephrase", "portability"):
                s.values.pop(key, None)
    summary = summarise(scores, evaluator.kind)
    return {"edits": n_edits, **{k: v["value"] for k, v in summary.items()}}


def _warn_bad(report: LoadReport) -> None:
    if not report.bad:
        return
    dropped = report.n_dropped
    items = len(report.bad) - dropped
    files = ", ".join(p.name for p in report.files)
    log.warning(
        "%s: %d of %d records skipped, %d items skipped inside kept records (all listed in the result file)",
        files, dropped, report.n_raw, items,
    )
    for bad in report.bad[:10]:
        log.warning("  %s", bad)
    if len(report.bad) > 10:
        log.warning("  ... and %d more", len(report.bad) - 10)


def default_output(result: dict[str, Any]) -> Path:
    p = result["protocol"]
    proto = p["name"] if p["name"] == "single" else f"{p['name']}{p['n_edits']}-{p['eval_timing']}"
    model = Path(str(result["model"]["id"])).name.replace("/", "_")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{result['editor']['name']}_{result['task']['name']}_{model}_{proto}_s{p['seed']}_{stamp}.json"
