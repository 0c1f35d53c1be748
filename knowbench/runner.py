"""The editing runner: the path of one run through the core.

    registry.load_task / load_editor        plugins, checked against their contracts
    task.reader → select                    the records (a seeded sample with --limit)
    models.load_model, editor(…, RunContext), editor.setup(), [train / load_artefact]
    task's metric family → Evaluator        reference and pre-edit scores on the unedited model
    observers.observer_for(editor)          diagnostics, by the kind of change the editor makes
    protocols (single / batch / sequential) apply → notify observers → score → restore or curve
    schema.Result                           the result, validated against the one result model

It names no editor and no task: everything specific lives behind the plugins' hooks.
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

from . import __version__, protocols, registry
from .editor import (
    Editor,
    EditRequest,
    RunContext,
    TrainSplit,
    hparams_hash,
    hparams_to_dict,
    load_hparams_file,
    override_hparams,
)
from .evaluation import EvalConfig, Evaluator, RecordScores, summarise
from .observers import observer_for
from .progress import progress_bar
from .records import EditRecord, LoadReport
from .results import environment, git_commit, peak_memory_mb, seal, sha256_file
from .schema import SCHEMA_VERSION, ResultBody, protocol_key

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
    train_data: str | None = None  # a trainable editor's training split (default: beside --data)
    extra: dict[str, Any] = field(default_factory=dict)


class RunError(ValueError):
    pass


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


def run(cfg: RunConfig) -> dict[str, Any]:
    """One run: load, select, set the editor up, score before, edit under the protocol (observers
    notified after every apply), score after, and return the result (a dict of the
    ``knowbench.schema.Result`` shape, validated, not yet sealed; ``_records`` holds the per-record log)."""
    t_start = time.perf_counter()
    try:
        protocol = protocols.from_options(
            sequential=cfg.sequential, batch_size=cfg.batch_size, eval_timing=cfg.eval_timing,
            curve_every=cfg.curve_every, curve_probes=cfg.curve_probes,
        )
    except ValueError as exc:
        raise RunError(str(exc)) from None
    seed_everything(cfg.seed)
    task_info, task = registry.load_task(cfg.task)
    editor_info, editor_cls = registry.load_editor(cfg.editor)
    if protocol.batch_size > 1 and not editor_cls.supports_batch:
        raise RunError(f"editor {editor_info.name} edits one fact at a time; drop --batch-size")
    report, records, selection = _select_records(cfg, task, protocol)

    t0 = time.perf_counter()
    lm, model_name = _load_model(cfg)
    load_s = time.perf_counter() - t0
    editor, hp = _build_editor(cfg, editor_cls, lm, model_name, task, report)
    t0 = time.perf_counter()
    editor.setup()  # one-off set-up (key statistics, an index) is not edit time
    artefact = _trained(cfg, editor, editor_info.name, model_name, hp) if editor_cls.trainable else None
    prepare_s = time.perf_counter() - t0

    # -- unedited reference and pre-edit metrics ------------------------------------------------
    family = task.family_class()(report.shared, EvalConfig(batch_size=cfg.eval_batch_size, fluency=cfg.fluency, seed=cfg.seed))
    evaluator = Evaluator(lm.model, lm.tokenizer, family, family.cfg)
    family.prepare(records)
    t0 = time.perf_counter()
    log.info("evaluating %d records on the unedited model", len(records))
    ref = evaluator.reference(records, editor.rewrite_prompts)
    pre_scores = evaluator.evaluate(records, ref, editor.rewrite_prompts, locality=False)
    pre_s = time.perf_counter() - t0

    observer = None
    if cfg.diagnostics:
        observer = observer_for(editor, evaluator, records, family.probes(records), accumulating=protocol.accumulates,
                                seed=cfg.seed, options=cfg.extra.get("diagnostics"))
    loop = _edit(cfg, protocol, editor, evaluator, records, ref, observer)

    post = [loop.post[r.index] for r in records]
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "knowbench": {"version": __version__, "git_commit": git_commit()},
        "editor": {
            "name": editor_info.name,
            "distribution": editor_info.dist,
            "version": editor_info.dist_version,
            "hparams": hparams_to_dict(hp),
            "hparams_hash": hparams_hash(hp),
            "hparams_file": cfg.hparams,
            "provenance": editor.provenance(),
            "kind": editor_cls.kind.value,
            "artefact": artefact,
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
            "metric_family": family.spec.model_dump(),
        },
        "protocol": protocol.info(len(records), cfg.seed, cfg.fluency, len(loop.probes)),
        "metrics": {"pre": summarise(pre_scores, family.spec), "post": summarise(post, family.spec)},
        "curve": loop.curve,
        "edits": loop.edits,
        "timings": {
            "load_model_s": round(load_s, 3),
            "editor_prepare_s": round(prepare_s, 3),
            "pre_eval_s": round(pre_s, 3),
            "edit_s": round(loop.edit_s, 3),
            "edit_ms_per_edit": round(1000 * loop.edit_s / len(records), 3),
            "post_eval_s": round(loop.eval_s, 3),
            "total_s": round(time.perf_counter() - t_start, 3),
            "peak_memory_mb": round(peak_memory_mb(), 1),
        },
        "environment": environment(),
        "config": asdict(cfg),
        "diagnostics": observer.result(post, protocol.eval_timing) if observer is not None else None,
    }
    if result["diagnostics"] is None:
        del result["diagnostics"]
    ResultBody.model_validate(result)  # the one result model (sealed later): a runner that drifts from it fails here
    result["_records"] = _record_log(records, pre_scores, post)  # popped by the caller
    return result


def _select_records(cfg: RunConfig, task: Any, protocol: Any) -> tuple[LoadReport, list[EditRecord], dict[str, Any]]:
    data_path = task.resolve(cfg.data)
    report: LoadReport = task.reader(data_path)
    _warn_bad(report)
    n_wanted = protocol.n_wanted(cfg.limit)
    if cfg.sequential and cfg.limit is not None and cfg.limit < cfg.sequential:
        raise RunError(f"--limit {cfg.limit} is smaller than --sequential {cfg.sequential}")
    if n_wanted is not None and n_wanted > len(report.records):
        raise RunError(
            f"{data_path} has {len(report.records)} usable records, fewer than the {n_wanted} asked for"
        )
    records, selection = select(report, n_wanted, cfg.seed)
    if not records:
        raise RunError(f"{data_path}: no usable records to edit")
    return report, records, selection


def _load_model(cfg: RunConfig) -> tuple[Any, str]:
    from . import defaults
    from .models import load_model

    model_name = cfg.model or defaults.default_model()
    return load_model(model_name, dtype=cfg.dtype, device=cfg.device), model_name


def _build_editor(cfg: RunConfig, editor_cls: type[Editor], lm: Any, model_name: str, task: Any,
                  report: LoadReport) -> tuple[Editor, Any]:
    from . import defaults

    hp = editor_cls.default_hparams(lm.model, model_name)
    if cfg.hparams:
        hp = override_hparams(hp, load_hparams_file(cfg.hparams), source=f"--hparams {cfg.hparams}")
    stats = defaults.stats_options(model_name, lm)
    for key, value in cfg.extra.get("stats", {}).items():  # --stats-corpus / --stats-source / --stats-samples
        setattr(stats, key, value)
        if key == "corpus":
            stats.corpus_name = None
    train_split = None
    if editor_cls.trainable:
        path = task.resolve_train(cfg.train_data, report.files[0])
        train_split = TrainSplit(report=task.reader(path), path=path, sha256=sha256_file(path))
    context = RunContext(
        seed=cfg.seed, device=cfg.device, dtype=cfg.dtype, model_name=model_name, stats=stats,
        train_split=train_split, progress=progress_bar,
    )
    return editor_cls(lm.model, lm.tokenizer, hp, context), hp


def _trained(cfg: RunConfig, editor: Editor, name: str, model_name: str, hp: Any) -> dict[str, Any]:
    """Load the stored artefact this editor was trained into for (model, training data, hparams,
    seed), training it first when there is none; its description goes into the result."""
    from .artefacts import find_or_train

    return find_or_train(editor, name, model_name, hparams_hash(hp), cfg.seed)


@dataclass
class _Loop:
    post: dict[int, RecordScores] = field(default_factory=dict)
    edits: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    probes: list[EditRecord] = field(default_factory=list)
    edit_s: float = 0.0
    eval_s: float = 0.0


def _edit(cfg: RunConfig, protocol: Any, editor: Editor, evaluator: Evaluator, records: list[EditRecord],
          ref: Any, observer: Any) -> _Loop:
    """Apply the records under ``protocol``; score, restore and draw the curve as it says."""
    loop = _Loop()
    if protocol.accumulates and protocol.curve_every:
        loop.probes = records[: protocol.curve_probes]
    next_curve = protocol.curve_every or 0
    if loop.probes:
        loop.curve.append(_curve_point(evaluator, loop.probes, set(), ref, editor, 0))
    with progress_bar(f"{cfg.editor} · {protocol.name}", total=len(records)) as advance:
        done = 0
        edited: set[int] = set()
        for chunk in protocol.chunks(records):
            t0 = time.perf_counter()
            outcome = editor.apply(_requests(chunk))
            dt = time.perf_counter() - t0
            loop.edit_s += dt
            if observer is not None:
                observer.after_apply(chunk, outcome, dt)
            loop.edits.append({
                "records": [r.index for r in chunk], "seconds": round(dt, 4),
                "changed_params": outcome.changed_params, **outcome.info,
            })
            done += len(chunk)
            edited.update(r.index for r in chunk)
            if protocol.score_after_apply:
                t0 = time.perf_counter()
                for s in evaluator.evaluate(chunk, ref, editor.rewrite_prompts):
                    loop.post[s.index] = s
                loop.eval_s += time.perf_counter() - t0
            if not protocol.accumulates:
                editor.restore()
            elif loop.probes and done >= next_curve:
                loop.curve.append(_curve_point(evaluator, loop.probes, edited, ref, editor, done))
                while next_curve <= done:
                    next_curve += protocol.curve_every
            advance(len(chunk))
        if loop.probes and loop.curve[-1]["edits"] != done:
            loop.curve.append(_curve_point(evaluator, loop.probes, edited, ref, editor, done))
    if not protocol.score_after_apply:
        t0 = time.perf_counter()
        log.info("evaluating all %d edits on the final model", len(records))
        for s in evaluator.evaluate(records, ref, editor.rewrite_prompts):
            loop.post[s.index] = s
        loop.eval_s += time.perf_counter() - t0
    return loop


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
    summary = summarise(scores, evaluator.family.spec)
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
    proto = protocol_key(p)
    model = Path(str(result["model"]["id"])).name.replace("/", "_")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{result['editor']['name']}_{result['task']['name']}_{model}_{proto}_s{p['seed']}_{stamp}.json"
