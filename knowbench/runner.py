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

import dataclasses
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import __version__
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
from .evaluation import EvalConfig, Evaluator, RecordScores, edit_request, summarise
from .observers import observer_for
from .progress import progress_bar
from .metric_protocol import MetricProtocol
from .records import BadRecord, EditRecord, LoadReport
from .results import environment, git_commit, peak_memory_mb, seal, sha256_file
from .schema import SCHEMA_VERSION, ResultBody, protocol_key
from .hub import data_file_info as hub_data_file_info
from .fitting import drop_failed, fit_context, fitting_probes
from .preflight import preflight
from .runconfig import RunConfig, RunError

log = logging.getLogger("knowbench")

__all__ = ["RunConfig", "RunError", "run", "run_all", "resume_all", "finish", "write_results", "default_output", "preflight"]


# -- what the run has done so far (read by the command line when the run is interrupted) ---------
@dataclass
class RunProgress:
    stage: str = "idle"  # starting, loading the model, ..., editing, evaluating the edits, finished, written
    edits_done: int = 0
    edits_total: int | None = None
    output: str | None = None  # where the result was written (stage "written")
    checkpoint: str | None = None  # the last checkpoint written, and after how many edits
    checkpoint_edits: int = 0

    def reset(self) -> None:
        self.stage, self.edits_done, self.edits_total, self.output = "starting", 0, None, None
        self.checkpoint, self.checkpoint_edits = None, 0

    def interrupted(self, signame: str = "SIGINT") -> str:
        """What a run cut short by ``signame`` finished and what it did not."""
        nothing = "nothing was written: the result file is written only at the end"
        if self.checkpoint and self.stage != "written":
            nothing = (f"a checkpoint after {self.checkpoint_edits} edits is at {self.checkpoint}: go on with "
                       f"`knowbench run --resume {self.checkpoint}`")
        total = self.edits_total
        if self.stage == "written":
            return f"interrupted ({signame}) after the result was written to {self.output}"
        if self.stage == "finished":
            return f"interrupted ({signame}) after all {total} edits were evaluated, before the result was written; {nothing}"
        if self.stage == "evaluating the edits":
            return f"interrupted ({signame}) after all {total} edits, while evaluating them on the final model; {nothing}"
        if self.stage == "editing":
            return f"interrupted ({signame}) after {self.edits_done} of {total} edits; {nothing}"
        before = f"before the first of {total} edits" if total else "before any edit"
        if self.stage in ("idle", "starting"):
            return f"interrupted ({signame}) {before}; {nothing}"
        return f"interrupted ({signame}) while {self.stage}, {before}; {nothing}"


PROGRESS = RunProgress()


class RunInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM during a checkpointed edit loop, raised after the checkpoint was written."""

    def __init__(self, signum: int):
        import signal

        self.signum, self.signame = signum, signal.Signals(signum).name
        super().__init__(self.signame)


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


def select_given(report: LoadReport, indices: list[int], seed: int) -> tuple[list[EditRecord], dict[str, Any]]:
    """The records at the given file indices, in the order given; an index that is not a usable
    record is a RunError."""
    by_index = {r.index: r for r in report.records}
    missing = [i for i in indices if i not in by_index]
    if missing:
        raise RunError(f"records {missing[:10]} are not usable records of {', '.join(p.name for p in report.files)}")
    chosen = [by_index[i] for i in indices]
    return chosen, {"method": "given", "seed": seed, "n_available": len(report.records),
                    "n_selected": len(chosen), "indices": list(indices)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _requests(records: Sequence[EditRecord]) -> list[EditRequest]:
    return [edit_request(r) for r in records]


def run(cfg: RunConfig) -> dict[str, Any]:
    """One run: check the options (:func:`preflight`), load, select, check the records against the
    model's context, set the editor up, score before, edit under the protocol (observers notified
    after every apply), score after, and return the result (a dict of the
    ``knowbench.schema.Result`` shape, validated, not yet sealed; ``_records`` holds the per-record log).
    ``--eval-timing both`` makes two results: use :func:`run_all`."""
    results = run_all(cfg)
    if len(results) != 1:
        raise RunError("--eval-timing both makes one result per timing: call runner.run_all")
    return results[0]


def resume_all(checkpoint: str | Path, output: str | None = None) -> list[dict[str, Any]]:
    """Go on with the run a checkpoint was written by (``knowbench run --resume``): its options come
    from the checkpoint (``output`` may move the result); returns what :func:`run_all` would have."""
    from .checkpoint import read_header

    head = read_header(checkpoint)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    cfg = RunConfig(**{k: v for k, v in head["config"].items() if k in fields})
    if output is not None:
        cfg = dataclasses.replace(cfg, output=output)
    return run_all(cfg, resume=str(checkpoint))


def run_all(cfg: RunConfig, resume: str | None = None) -> list[dict[str, Any]]:
    """:func:`run`'s results: one, or with ``--eval-timing both`` two from one stream of edits —
    each edit scored right after it (``each``) and all scored on the final model (``final``). The
    evaluations between edits run on a saved and restored random state, so the edits, and the final
    model, are those of a ``--eval-timing final`` run. With ``cfg.checkpoint_every`` the edit loop
    writes checkpoints (:mod:`knowbench.checkpoint`); ``resume`` names one to go on from."""
    t_start = time.perf_counter()
    PROGRESS.reset()
    pf = preflight(cfg)
    if cfg.editor != pf.editor_info.name:  # --editor ROME runs (and is recorded) as rome
        cfg = dataclasses.replace(cfg, editor=pf.editor_info.name)
    protocol, task_info, task, editor_info, editor_cls = pf.protocol, pf.task_info, pf.task, pf.editor_info, pf.editor_cls
    seed_everything(cfg.seed)
    PROGRESS.stage = "reading the records"
    metrics = pf.metrics
    report, records, selection = _select_records(cfg, task, protocol, metrics)
    PROGRESS.edits_total = len(records)

    PROGRESS.stage = "loading the model"
    t0 = time.perf_counter()
    lm, model_name = _load_model(cfg)
    load_s = time.perf_counter() - t0
    ckpt = _Checkpointing.for_run(cfg, lm.model, resume)
    PROGRESS.stage = "checking the records against the model's context"
    eval_cfg = EvalConfig(batch_size=cfg.eval_batch_size, fluency=cfg.fluency, seed=cfg.seed, metrics=metrics)
    family_cls = task.family_class()
    n_asked = len(records)
    records = fit_context(records, report, selection, lm, model_name, family_cls, eval_cfg, protocol, n_asked)
    PROGRESS.edits_total = len(records)
    PROGRESS.stage = "preparing the editor"
    editor, hp = _build_editor(cfg, editor_cls, lm, model_name, task, report)
    t0 = time.perf_counter()
    editor.setup()  # one-off set-up (key statistics, an index) is not edit time
    artefact = _trained(cfg, editor, editor_info.name, model_name, hp) if editor_cls.trainable else None
    prepare_s = time.perf_counter() - t0

    # -- unedited reference and pre-edit metrics ------------------------------------------------
    PROGRESS.stage = "evaluating the unedited model"
    family = family_cls(report.shared, eval_cfg)
    evaluator = Evaluator(lm.model, lm.tokenizer, family, family.cfg)
    family.prepare(records)
    t0 = time.perf_counter()
    log.info("evaluating %d records on the unedited model", len(records))
    ref = evaluator.reference(records, editor.rewrite_prompts)
    pre_scores = evaluator.evaluate(records, ref, editor.rewrite_prompts, locality=False)
    pre_s = time.perf_counter() - t0

    observer = None
    if cfg.diagnostics:  # on resume too: its set-up tensors are what the checkpoint refers to
        probes = fitting_probes(family.probes(records), lm, model_name)
        observer = observer_for(editor, evaluator, records, probes, accumulating=protocol.accumulates,
                                seed=cfg.seed, options=cfg.extra.get("diagnostics"))
    start = None
    if ckpt is not None:
        ckpt.bind(records, hparams_hash(hp), {"tok": lm.tokenizer, "evaluator": evaluator, "family": family,
                                              "context": editor.context}, (editor, observer))
        if resume is not None:  # the edited model, the editor and the observer as the checkpoint left them
            start = ckpt.load(resume)
            lm.model = evaluator.model = start["model"]
            editor, observer = start["editor"], start["observer"]
            t_start -= start["elapsed_s"]
    PROGRESS.stage = "editing"
    loop = _edit(cfg, protocol, editor, evaluator, records, ref, observer, ckpt, start)
    if loop.stopped_at is not None:  # --stop-below: the result covers the edits made before the stop
        records, pre_scores = records[: loop.applied], pre_scores[: loop.applied]
    if loop.failed:
        records, pre_scores = drop_failed(loop.failed, records, pre_scores, report, selection, protocol,
                                           editor_info.name, n_asked)
    PROGRESS.stage = "finished"

    def result_of(timing: str) -> dict[str, Any]:
        """The result of one evaluation timing (validated, not sealed)."""
        both = protocol.eval_timing == "both"
        scored, eval_s = (loop.post_final, loop.eval_final_s) if both and timing == "final" else (loop.post, loop.eval_s)
        post = [scored[r.index] for r in records]
        config = asdict(cfg)
        if both:  # this file alone is reproduced by a run with its own timing
            config["eval_timing"] = timing
            config["extra"] = {**config.get("extra", {}), "eval_timing_both": True}
        if start is not None:
            config["extra"] = {**config.get("extra", {}),
                               "resumed_from": {"checkpoint": str(resume), "edits_done": start["done"]}}
        proto = protocol.with_timing(timing)
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
                "data_files": [{"path": str(p), "sha256": sha256_file(p), **hub_data_file_info(p)} for p in report.files],
                "default_data": cfg.data is None,
                "n_records_in_file": report.n_raw,
                "n_records_usable": len(report.records),
                "bad_records": [asdict(b) for b in report.bad],
                "selection": selection,
                "metric_family": family.spec.model_dump(),
            },
            "protocol": proto.info(len(records), cfg.seed, cfg.fluency, len(loop.probes), metrics.info(),
                                   **({"stopped_at": len(records)} if loop.stopped_at is not None else {})),
            "metrics": {"pre": summarise(pre_scores, family.spec), "post": summarise(post, family.spec)},
            "curve": loop.curve,
            "edits": loop.edits,
            "timings": {
                "load_model_s": round(load_s, 3),
                "editor_prepare_s": round(prepare_s, 3),
                "pre_eval_s": round(pre_s, 3),
                "edit_s": round(loop.edit_s, 3),
                "edit_ms_per_edit": round(1000 * loop.edit_s / len(records), 3),
                "post_eval_s": round(eval_s, 3),
                "total_s": round(time.perf_counter() - t_start, 3),
                "peak_memory_mb": round(peak_memory_mb(), 1),
            },
            "environment": environment(),
            "config": config,
            "diagnostics": observer.result(post, timing) if observer is not None else None,
        }
        if result["diagnostics"] is None:
            del result["diagnostics"]
        elif "editor" not in result["diagnostics"] and (own := editor.report()):
            result["diagnostics"]["editor"] = own  # a weight editor's own diagnostics (e.g. its layer choices)
        result["records"] = [{"index": r.index, "pre": p.values, "post": q.values}
                             for r, p, q in zip(records, pre_scores, post)]
        ResultBody.model_validate(result)  # the one result model (sealed later): a runner that drifts from it fails here
        result["_records"] = _record_log(records, result["records"])  # popped by the caller
        return result

    return [result_of(t) for t in protocol.timings]


def _select_records(cfg: RunConfig, task: Any, protocol: Any, metrics: MetricProtocol) -> tuple[LoadReport, list[EditRecord], dict[str, Any]]:
    """Read the task's records, leave out (counted) those the metric protocol cannot score, select,
    and give the selected records and the task's shared data the protocol's texts."""
    data_path = task.resolve(cfg.data)
    report: LoadReport = task.reader(data_path)
    kept = []
    for r in report.records:
        why = metrics.refusal(r)
        if why is None:
            kept.append(r)
        else:
            report.bad.append(BadRecord(r.source, r.index, f"{why} [metrics {metrics.name}]"))
    report.records = kept
    report.shared = metrics.shared(report.shared)
    _warn_bad(report)
    n_wanted = protocol.n_wanted(cfg.limit)
    if cfg.sequential and cfg.limit is not None and cfg.limit < cfg.sequential:
        raise RunError(f"--limit {cfg.limit} is smaller than --sequential {cfg.sequential}")
    if n_wanted is not None and n_wanted > len(report.records):
        raise RunError(
            f"{data_path} has {len(report.records)} usable records, fewer than the {n_wanted} asked for"
        )
    given = cfg.extra.get("indices")
    if given is not None:  # exactly these records, in this order (knowbench verify)
        records, selection = select_given(report, list(given), cfg.seed)
        if cfg.sequential and cfg.sequential != len(records):
            raise RunError(f"--sequential {cfg.sequential} but {len(records)} records were given")
    else:
        records, selection = select(report, n_wanted, cfg.seed)
    if not records:
        raise RunError(f"{data_path}: no usable records to edit")
    return report, [metrics.prepare(r) for r in records], selection


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
    if editor_cls.trainable or editor_cls.uses_train_split:
        path = task.resolve_train(cfg.train_data, report.files[0])
        train_split = TrainSplit(report=task.reader(path), path=path, sha256=sha256_file(path))
    context = RunContext(
        seed=cfg.seed, device=cfg.device, dtype=cfg.dtype, model_name=model_name, stats=stats,
        train_split=train_split, progress=progress_bar,
    )
    return editor_cls(lm.model, lm.tokenizer, hp, context), hp


def _trained(cfg: RunConfig, editor: Editor, name: str, model_name: str, hp: Any) -> dict[str, Any]:
    """Load the stored artefact this editor was trained into for (model, training data, hparams,
    seed); a RunError naming the ``knowbench train`` command when there is none. Its description
    goes into the result."""
    from .artefacts import find_trained

    return find_trained(editor, name, model_name, hparams_hash(hp), cfg.seed, train_command(cfg))


def train_command(cfg: RunConfig) -> str:
    """The ``knowbench train`` command that makes the artefact a run with ``cfg`` looks for."""
    import shlex

    parts = ["knowbench", "train", "--editor", cfg.editor, "--task", cfg.task]
    for flag, value in (("--model", cfg.model), ("--data", cfg.data), ("--train-data", cfg.train_data),
                        ("--hparams", cfg.hparams), ("--device", None if cfg.device == "cpu" else cfg.device),
                        ("--dtype", None if cfg.dtype == "float32" else cfg.dtype),
                        ("--seed", None if cfg.seed == 0 else str(cfg.seed))):
        if value is not None:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


@dataclass
class _Loop:
    post: dict[int, RecordScores] = field(default_factory=dict)
    edits: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    probes: list[EditRecord] = field(default_factory=list)
    edit_s: float = 0.0
    eval_s: float = 0.0
    post_final: dict[int, RecordScores] = field(default_factory=dict)  # --eval-timing both: the final model's
    eval_final_s: float = 0.0
    failed: dict[int, str] = field(default_factory=dict)  # record index -> why the editor refused it
    stopped_at: int | None = None  # --stop-below: edits made when the probe curve fell below it
    applied: int = 0  # records the stream went through (all of them unless it stopped)


def _edit(cfg: RunConfig, protocol: Any, editor: Editor, evaluator: Evaluator, records: list[EditRecord],
          ref: Any, observer: Any, ckpt: "_Checkpointing | None" = None, start: dict[str, Any] | None = None) -> _Loop:
    """Apply the records under ``protocol``; score, restore and draw the curve as it says; write a
    checkpoint every ``ckpt.every`` edits and when a signal asks the run to stop. ``start``: a
    checkpoint's loop state to go on from (its random states are set before the next apply)."""
    chunks = list(protocol.chunks(records))
    if start is None:
        loop, position, done, edited = _Loop(), 0, 0, set()
        if protocol.accumulates and protocol.curve_every:
            loop.probes = records[: protocol.curve_probes]
        next_curve = protocol.curve_every or 0
        if loop.probes:
            loop.curve.append(_curve_point(evaluator, loop.probes, set(), ref, editor, 0))
    else:
        loop, position, done, edited, next_curve = (start[k] for k in ("loop", "position", "done", "edited", "next_curve"))
        PROGRESS.edits_done = done
    stopping = _StopAfterApply(ckpt is not None)
    with progress_bar(f"{cfg.editor} · {protocol.name}", total=len(records)) as advance, stopping:
        if start is not None:
            from .checkpoint import set_rng_states

            advance(sum(len(c) for c in chunks[:position]))
            set_rng_states(start["rng"])
        for given in chunks[position:]:
            t0 = time.perf_counter()
            chunk, outcome = _apply(editor, given, protocol, loop.failed)
            dt = time.perf_counter() - t0
            if outcome is None:  # the editor refused every record of this apply
                advance(len(given))
                position += 1
                continue
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
                # with both timings, scoring between edits must not move the random state the edits
                # draw from, or the final model would differ from a --eval-timing final run's
                with _rng_kept(protocol.eval_timing == "both"):
                    for s in evaluator.evaluate(chunk, ref, editor.rewrite_prompts):
                        loop.post[s.index] = s
                loop.eval_s += time.perf_counter() - t0
            if not protocol.accumulates:
                editor.restore()
            elif loop.probes and done >= next_curve:
                loop.curve.append(_curve_point(evaluator, loop.probes, edited, ref, editor, done))
                while next_curve <= done:
                    next_curve += protocol.curve_every
                if _collapsed(protocol, loop.curve[-1]) and position + 1 < len(chunks):
                    loop.stopped_at = done
                    log.warning("probe Edit Succ. %.1f %% < %g %% after %d edits: stopping the stream (--stop-below)",
                                loop.curve[-1]["edit_succ"], protocol.stop_below, done)
            PROGRESS.edits_done = done
            advance(len(given))
            position += 1
            if ckpt is not None and (ckpt.due(done) or stopping.signum or position == len(chunks)):
                ckpt.write(evaluator.model, editor, observer, loop, position, done, edited, next_curve)
            if stopping.signum:
                raise RunInterrupted(stopping.signum)
            if loop.stopped_at is not None:
                break
        loop.applied = sum(len(c) for c in chunks[:position])
        if loop.probes and loop.curve[-1]["edits"] != done:
            loop.curve.append(_curve_point(evaluator, loop.probes, edited, ref, editor, done))
    if protocol.score_at_end:
        PROGRESS.stage = "evaluating the edits"
        t0 = time.perf_counter()
        edited_records = [r for r in records[: loop.applied] if r.index not in loop.failed]
        log.info("evaluating all %d edits on the final model", len(edited_records))
        into = loop.post_final if protocol.score_after_apply else loop.post
        for s in evaluator.evaluate(edited_records, ref, editor.rewrite_prompts):
            into[s.index] = s
        if protocol.score_after_apply:
            loop.eval_final_s += time.perf_counter() - t0
        else:
            loop.eval_s += time.perf_counter() - t0
    return loop


def _collapsed(protocol: Any, point: dict[str, Any]) -> bool:
    """Whether a curve point is below the protocol's --stop-below (probe Edit Succ., %)."""
    below = getattr(protocol, "stop_below", None)
    value = point.get("edit_succ")
    return below is not None and value is not None and value < below


class _StopAfterApply:
    """While a checkpointed edit loop runs, SIGINT / SIGTERM only ask it to stop after the current
    apply (the loop then writes a checkpoint and raises :class:`RunInterrupted`); a second signal
    stops at once. Inactive off the main thread or without checkpoints."""

    def __init__(self, active: bool):
        self.active, self.signum, self.previous = active, 0, {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise RunInterrupted(signum)
        self.signum = signum
        log.warning("%s: writing a checkpoint after the current edit, then stopping (again to stop now)",
                    __import__("signal").Signals(signum).name)

    def __enter__(self) -> "_StopAfterApply":
        import signal

        if self.active:
            try:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class _Checkpointing:
    """Where and how often a run checkpoints (:mod:`knowbench.checkpoint`), and what it needs to."""

    cfg: RunConfig
    path: Path
    every: int | None
    loaded: Any  # checkpoint.Loaded: the unedited model's tensors and fingerprints
    header: dict[str, Any] = field(default_factory=dict)
    refs: dict[str, Any] = field(default_factory=dict)
    setup: Any = None  # checkpoint.SetupTensors of the editor and observer before the first edit
    t0: float = field(default_factory=time.perf_counter)
    elapsed_before: float = 0.0

    @classmethod
    def for_run(cls, cfg: RunConfig, model: Any, resume: str | None) -> "_Checkpointing | None":
        if not (cfg.checkpoint_every or cfg.checkpoint or resume):
            return None
        from .checkpoint import Loaded

        if cfg.checkpoint_every is not None and cfg.checkpoint_every < 1:
            raise RunError(f"--checkpoint-every {cfg.checkpoint_every}: must be at least 1")
        path = Path(cfg.checkpoint or resume or checkpoint_path(cfg))
        return cls(cfg, path, cfg.checkpoint_every, Loaded.of(model))

    def bind(self, records: Sequence[EditRecord], hp_hash: str, objects: dict[str, Any], prepared: Any) -> None:
        """The run's records and hyper-parameters (checked on resume), the objects a resumed run
        rebuilds itself and, in ``prepared`` (the editor and the observer before the first edit),
        the tensors its set-up rebuilds (both pickled as references)."""
        from .checkpoint import SetupTensors

        self.header = {"config": asdict(self.cfg), "indices": [r.index for r in records], "hparams_hash": hp_hash,
                       "model_print": self.loaded.model_print(), "knowbench": __version__}
        self.refs = {**objects, **{f"record:{r.index}": r for r in records}}
        self.setup = SetupTensors.of(prepared, self.refs, self.loaded)

    def due(self, done: int) -> bool:
        return bool(self.every) and done // self.every > self.header.get("done", 0) // self.every

    def write(self, model: Any, editor: Editor, observer: Any, loop: "_Loop", position: int, done: int,
              edited: set[int], next_curve: int) -> None:
        from .checkpoint import rng_states, save

        changed = {p for e in loop.edits for p in (e.get("changed_params") or [])}
        elapsed = self.elapsed_before + time.perf_counter() - self.t0
        body = {"model": model, "editor": editor, "observer": observer, "loop": loop, "position": position,
                "done": done, "edited": edited, "next_curve": next_curve, "rng": rng_states(), "elapsed_s": elapsed}
        self.header.update(done=done, position=position)
        t0 = time.perf_counter()
        sizes = save(self.path, self.header, body, self.refs, self.loaded, changed, self.setup)
        PROGRESS.checkpoint, PROGRESS.checkpoint_edits = str(self.path), done
        log.info("checkpoint after %d edits: %s (%.1f MB, %d tensors by value, %d by reference; %.1f s)",
                 done, self.path, sizes["bytes"] / 2**20, sizes["by_value"], sizes["by_reference"],
                 time.perf_counter() - t0)

    def load(self, resume: str) -> dict[str, Any]:
        """The loop state of checkpoint ``resume``, checked against this run."""
        from .checkpoint import CheckpointError, load_body, read_header

        head = read_header(resume)
        for key, what in (("indices", "the selected records"), ("hparams_hash", "the hyper-parameters"),
                          ("model_print", "the loaded model's weights")):
            if head.get(key) != self.header[key]:
                raise CheckpointError(f"--resume {resume}: {what} differ from those of the run that wrote it")
        if head.get("knowbench") != __version__:
            log.warning("--resume %s: written by knowbench %s, resumed by %s", resume, head.get("knowbench"), __version__)
        start = load_body(resume, self.refs, self.loaded, self.setup)
        self.header.update(done=start["done"], position=start["position"])
        self.elapsed_before = start["elapsed_s"]
        PROGRESS.checkpoint, PROGRESS.checkpoint_edits = str(resume), start["done"]
        log.info("resuming %s after %d of %d edits", resume, start["done"], len(self.header["indices"]))
        return start


def checkpoint_path(cfg: RunConfig) -> Path:
    """Where ``--checkpoint-every`` writes without ``--checkpoint``: beside ``--output``, else
    ``checkpoints/<editor>_<task>_<protocol>_s<seed>.ckpt``."""
    if cfg.output:
        return Path(cfg.output).with_suffix(".ckpt")
    proto = f"seq{cfg.sequential}" if cfg.sequential else "single"
    if cfg.batch_size:
        proto += f"_b{cfg.batch_size}"
    return Path("checkpoints") / f"{cfg.editor}_{cfg.task}_{proto}_s{cfg.seed}.ckpt"


class _rng_kept:
    """Restore Python's, NumPy's and torch's random states on exit (when ``active``)."""

    def __init__(self, active: bool):
        self.active = active

    def __enter__(self) -> None:
        if self.active:
            self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                           torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            py, npy, cpu, cuda = self.states
            random.setstate(py)
            np.random.set_state(npy)
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)


def _apply(editor: Editor, chunk: Sequence[EditRecord], protocol: Any, failed: dict[int, str]) -> tuple[Sequence[EditRecord], Any]:
    """``editor.apply`` on ``chunk``; a record the editor refuses (a ValueError: no subject, a subject
    it cannot find, a target it cannot fit, ...) goes into ``failed`` instead of ending the run.
    An apply of several records that fails on a protocol that restores is retried record by record
    to find the one(s) at fault, then applied again without them; a failed update of a sequential
    run loses its records. Returns the records applied and the outcome (None: none was)."""
    try:
        return chunk, editor.apply(_requests(chunk))
    except ValueError as exc:
        error = exc
    if len(chunk) == 1 or protocol.accumulates:
        if not protocol.accumulates:
            editor.restore()
        note = "" if len(chunk) == 1 else f" (in an update of {len(chunk)} edits)"
        for r in chunk:
            failed[r.index] = f"{error}{note}"
            log.warning("record %d: %s could not edit it: %s%s", r.index, editor.name, error, note)
        return [], None
    editor.restore()
    good = []
    for r in chunk:
        try:
            editor.apply(_requests([r]))
            good.append(r)
        except ValueError as exc:
            failed[r.index] = str(exc)
            log.warning("record %d: %s could not edit it: %s", r.index, editor.name, exc)
        finally:
            editor.restore()
    if not good:
        return [], None
    return _apply(editor, good, protocol, failed)


def finish(result: dict[str, Any]) -> dict[str, Any]:
    """Seal a run's result (the per-record log is kept apart from the sealed file). A result file is
    strict JSON: a NaN or infinity that an editor or a plugin put into a free-form block (provenance,
    an artefact's training curve, diagnostics) becomes null, each one named in a warning, rather than
    a file that ``knowbench validate`` rejects after the run's work is done."""
    result.pop("_records", None)
    replaced: list[str] = []
    result = _finite(result, "", replaced)
    if replaced:
        log.warning("%d non-finite number(s) written as null: %s%s", len(replaced), ", ".join(replaced[:8]),
                    " ..." if len(replaced) > 8 else "")
    return seal(result)


def write_results(results: list[dict[str, Any]], output: str | None, log_records: str | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Seal and write :func:`run_all`'s results (atomically): ``output`` (default
    :func:`default_output`), or with ``--eval-timing both`` ``STEM-each.json`` and ``STEM-final.json``;
    the per-record logs beside them when ``log_records`` is given. Returns (path, sealed result) pairs."""
    from .results import write_json_atomic, write_jsonl_atomic

    written = []
    for result in results:
        records = result.pop("_records")
        result = finish(result)
        timing = result["protocol"]["eval_timing"]
        out, log_path = Path(output) if output else default_output(result), log_records
        if len(results) > 1:  # --eval-timing both: one file per timing
            out = out.with_name(f"{out.stem}-{timing}{out.suffix}") if output else out
            log_path = log_path and str(Path(log_path).with_name(f"{Path(log_path).stem}-{timing}{Path(log_path).suffix}"))
        write_json_atomic(out, result)
        if log_path:
            write_jsonl_atomic(log_path, records)
            log.info("per-record log: %s", log_path)
        written.append((out, result))
    return written


def _finite(x: Any, path: str, replaced: list[str]) -> Any:
    if isinstance(x, float) and not np.isfinite(x):
        replaced.append(path or "(root)")
        return None
    if isinstance(x, dict):
        return {k: _finite(v, f"{path}.{k}" if path else str(k), replaced) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v, f"{path}[{i}]", replaced) for i, v in enumerate(x)]
    return x


def _record_log(records: Sequence[EditRecord], scores: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The result's per-record scores with each record's texts (``--log-records``)."""
    return [{"index": r.index, "source": r.source, "subject": r.subject, "prompt": r.prompt,
             "target_new": r.target_new, "pre": s["pre"], "post": s["post"]} for r, s in zip(records, scores)]


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


def train(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    """``knowbench train``: build the editor exactly as ``run`` with ``cfg`` would (model, task,
    training split, hyper-parameters, seed), train it (resuming a killed training from its
    checkpoint) and store it where ``run`` looks. Returns the artefact's description."""
    from .artefacts import train_and_store

    pf = preflight(cfg)
    if not pf.editor_cls.trainable:
        trainable = ", ".join(sorted(i.name for i, c in _trainable_editors())) or "none installed"
        raise RunError(f"--editor {pf.editor_info.name} has no training phase (trainable editors: {trainable})")
    cfg = dataclasses.replace(cfg, editor=pf.editor_info.name)
    seed_everything(cfg.seed)
    report = pf.task.reader(pf.task.resolve(cfg.data))
    lm, model_name = _load_model(cfg)
    editor, hp = _build_editor(cfg, pf.editor_cls, lm, model_name, pf.task, report)
    editor.setup()
    return train_and_store(editor, pf.editor_info.name, model_name, hparams_hash(hp), cfg.seed, force=force)


def _trainable_editors() -> list[tuple[Any, type[Editor]]]:
    from . import registry

    out = []
    for info in {i.name: i for i in registry.discover(registry.EDITOR_GROUP).values()}.values():
        try:
            _, cls = registry.load_editor(info.name)
        except Exception:  # noqa: BLE001 - a broken plugin is reported by `knowbench ls`, not here
            continue
        if cls.trainable:
            out.append((info, cls))
    return out
