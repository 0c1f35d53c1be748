"""Run observers: what the runner notifies after every ``editor.apply``.

An observer is built on the unedited model before the first edit, told about each apply
(``after_apply(requests, outcome, seconds)``, before any restore) and asked for its block of the
result at the end (``result(post_scores, eval_timing)``). Which one a run gets depends on the kind of
change the editor declares (:class:`knowbench.editor.ChangeKind`):

* weights  → :class:`knowbench.diagnostics.EditDiagnostics`, the superposition diagnostics of
  DESIGN 7 (whitened overlaps, interference observed and predicted) at the editor's ``sites()``;
* modules, prompts, memory → :class:`BehaviourDiagnostics`: the editor changes no weight in place,
  so what can be measured is behaviour — retention of earlier edits, locality drift on probe
  prompts against the unedited model, and the numbers the editor reports itself (``report()``).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Protocol, Sequence

import numpy as np

from . import metrics as M
from .editor import ChangeKind, Editor, EditOutcome, PromptOwner
from .evaluation import Evaluator, owner
from .records import EditRecord, KeyProbe

log = logging.getLogger("knowbench")


class Observer(Protocol):
    def after_apply(self, requests: Sequence[Any], outcome: EditOutcome, edit_seconds: float | None = None) -> Any: ...

    def result(self, post: Any = None, eval_timing: str = "each") -> dict[str, Any]: ...


class BehaviourDiagnostics:
    """Behavioural diagnostics of editors that do not edit weights in place.

    After every apply:

    * ``retention``: mean teacher-forced accuracy (×100) of the edits applied so far — in
      accumulating runs a seeded sample of at most ``max_items`` of them (the latest apply's always
      included), otherwise the apply's own edits — on each edit's own prompt and target;
    * ``locality_drift``: the share (×100) of probe prompts (the task's locality items, a seeded
      sample of at most ``max_items``) whose greedy next token differs from the unedited model's on
      the bare prompt; the editor's prompt rewrite applies to the edited side;
    * ``editor``: what ``editor.report()`` returns (router hit rates, codebook size, ...).

    An accumulating run measures after the apply that reaches every ``every``-th edit and after the
    last one (``observer_for``: about 100 points a run, every apply up to 100 edits): each point
    costs two forward passes over up to ``max_items`` prompts, which at one point per edit of a
    1000-edit GRACE or WISE run was three quarters of its time.
    """

    def __init__(self, evaluator: Evaluator, editor: Editor, records: Sequence[EditRecord],
                 probes: Sequence[KeyProbe], *, accumulating: bool, seed: int = 0, max_items: int = 32,
                 every: int = 1):
        t0 = time.perf_counter()
        self.ev, self.editor = evaluator, editor
        self.accumulating = accumulating
        self.every, self.n_records = max(1, every), len(records)
        self.rng = random.Random(seed)
        self.max_items = max_items
        self.by_index = {r.index: r for r in records}
        probes = list(probes)
        if len(probes) > max_items:
            keep = sorted(random.Random(seed).sample(range(len(probes)), max_items))
            probes = [probes[i] for i in keep]
        self.probes = probes
        self._probe_owners = [self._probe_owner(p) for p in probes]
        self.reference = self._next_tokens(rewrite=None)  # the unedited model on the bare prompts
        self.applied: list[int] = []
        self.series: list[dict[str, Any]] = []
        self.setup_s = time.perf_counter() - t0
        self.apply_s = 0.0
        self.edit_s = 0.0

    def _probe_owner(self, p: KeyProbe):
        r = self.by_index.get(p.record) if p.record is not None else None
        if r is None:
            return PromptOwner(record=-1, metric="locality", key=p.key)
        return owner(r, "locality", p.key)

    def _next_tokens(self, rewrite: Any) -> list[int]:
        ids = self.ev.greedy_ids([p.prompt for p in self.probes], self._probe_owners, rewrite, 1)
        return [row[0] if row else -1 for row in ids]

    def after_apply(self, requests: Sequence[EditRecord], outcome: EditOutcome,
                    edit_seconds: float | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        if edit_seconds is not None:
            self.edit_s += edit_seconds
        latest = [r.index for r in requests]
        if self.accumulating:
            before = len(self.applied)
            self.applied.extend(latest)
            if len(self.applied) // self.every == before // self.every and len(self.applied) < self.n_records:
                self.apply_s += time.perf_counter() - t0
                return {}  # between two measured points
            earlier = [i for i in self.applied[: -len(latest)] if i in self.by_index]
            room = max(0, self.max_items - len(latest))
            checked = latest + (self.rng.sample(earlier, room) if len(earlier) > room else earlier)
        else:
            checked = latest
        pairs, owners = [], []
        for idx in checked:
            r = self.by_index.get(idx)
            if r is None:
                continue
            for pair in self.ev.family.edit_pairs(r):
                pairs.append(pair)
                owners.append(owner(r, "edit_succ"))
        rewrite = self.editor.rewrite_prompts
        point: dict[str, Any] = {"n_edits": len(self.applied) if self.accumulating else len(latest)}
        if pairs:
            scores = [M.accuracy(tf) for tf in self.ev.tf(pairs, owners, rewrite)]
            point["retention"] = round(100 * float(np.mean(scores)), 4)
            point["n_retention"] = len(scores)
        if self.probes:
            now = self._next_tokens(rewrite)
            point["locality_drift"] = round(100 * float(np.mean([a != b for a, b in zip(now, self.reference)])), 4)
            point["n_probes"] = len(self.probes)
        report = self.editor.report()
        if report:
            point["editor"] = report
        self.series.append(point)
        self.apply_s += time.perf_counter() - t0
        return point

    def result(self, post: Any = None, eval_timing: str = "each") -> dict[str, Any]:
        summary: dict[str, Any] = {"accumulating": self.accumulating, "n_points": len(self.series),
                                   "every_n_edits": self.every}
        for name in ("retention", "locality_drift"):
            vals = [p[name] for p in self.series if name in p]
            if vals:
                summary[name] = {"final": vals[-1], "mean": round(float(np.mean(vals)), 4),
                                 "min": float(np.min(vals)), "max": float(np.max(vals))}
        reports = [p["editor"] for p in self.series if "editor" in p]
        if reports:
            summary["editor_final"] = reports[-1]
        summary["timing"] = {
            "setup_s": round(self.setup_s, 4),
            "per_apply_s": round(self.apply_s / max(1, len(self.series)), 5),
            "fraction_of_edit_time": round(self.apply_s / self.edit_s, 4) if self.edit_s else None,
        }
        return {"kind": "behaviour", "editor_kind": self.editor.kind.value, "series": self.series, "summary": summary}


def observer_for(editor: Editor, evaluator: Evaluator, records: Sequence[EditRecord], task_probes: list[KeyProbe],
                 *, accumulating: bool, seed: int, options: dict[str, Any] | None) -> Observer:
    """The diagnostics observer a run with ``editor`` gets (see the module docstring)."""
    if editor.kind is ChangeKind.WEIGHTS:
        from .diagnostics import for_run

        return for_run(evaluator.model, evaluator.tok, editor.sites(), records, task_probes,
                       sequential=accumulating, seed=seed, options=options)
    from .diagnostics import diagnostics_config, run_probes

    cfg = diagnostics_config(options, sequential=accumulating, seed=seed)
    probes, _ = run_probes(task_probes, cfg)
    every = -(-len(records) // 100) if accumulating else 1  # about 100 points a run
    return BehaviourDiagnostics(evaluator, editor, records, probes, accumulating=accumulating, seed=seed, every=every)
