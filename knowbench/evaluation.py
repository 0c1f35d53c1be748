"""Evaluation primitives, batched across records, and the aggregation of per-record scores.

The task's metric family (:class:`knowbench.task.MetricFamily`, declared by the task plugin) says
which prompts each metric scores; it gathers every prompt of a list of records into one batched
call per primitive here (teacher forcing, continuation distributions, generation) and splits the
results back per record. Every primitive takes the prompts' owners (:class:`PromptOwner`: record,
metric, sub-key), so an editor that rewrites prompts (in-context editing) knows what each one is.

Per-record scores are fractions; :func:`summarise` aggregates them to KnowEdit's ×100 scale
(DESIGN 4), with names and directions from the family's spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from . import metrics as M
from . import scoring
from .editor import EditRequest, PromptOwner
from .records import EditRecord

if TYPE_CHECKING:
    from .task import MetricFamily

Rewrite = Callable[[list[str], list[PromptOwner]], list[str]]


@dataclass
class EvalConfig:
    batch_size: int = 32
    gen_batch_size: int = 16
    fluency: bool = True
    fluency_tokens: int = 100
    fluency_top_k: int = 5
    sanitation_tokens: int = 10
    convsent_locality_replies: int = 3  # replies of the unrelated topic whose distributions are compared
    seed: int = 0


@dataclass
class RecordScores:
    index: int
    values: dict[str, Any]  # metric -> fraction, or sub-key -> [item fractions]


def edit_request(record: EditRecord) -> EditRequest:
    """The edit a record asks for, as editors receive it."""
    return EditRequest(prompt=record.prompt, target_new=record.target_new, subject=record.subject,
                       ground_truth=record.ground_truth, record_index=record.index)


def owner(record: EditRecord, metric: str, key: str | None = None) -> PromptOwner:
    """The owner of a prompt evaluated for ``record``'s ``metric`` (and sub-key)."""
    return PromptOwner(record=record.index, metric=metric, key=key, request=edit_request(record))


class Evaluator:
    """The model, its tokenizer and the primitives a metric family scores with."""

    def __init__(self, model: Any, tok: Any, family: "MetricFamily", config: EvalConfig):
        self.model = model
        self.tok = tok
        self.family = family
        self.cfg = config

    # -- primitives with an optional prompt rewrite (in-context editors) ----------------------
    @staticmethod
    def rewrite_pairs(pairs: list[tuple[str, str]], owners: list[PromptOwner], rewrite: Rewrite | None) -> list[tuple[str, str]]:
        if rewrite is None or not pairs:
            return pairs
        return list(zip(rewrite([p for p, _ in pairs], owners), [t for _, t in pairs]))

    def tf(self, pairs: list[tuple[str, str]], owners: list[PromptOwner], rewrite: Rewrite | None) -> list[scoring.TeacherForced]:
        """Teacher-forced scores of (prompt, target) pairs."""
        if not pairs:
            return []
        pairs = self.rewrite_pairs(pairs, owners, rewrite)
        return scoring.teacher_forced(self.model, self.tok, pairs, batch_size=self.cfg.batch_size)

    def continuation_logprobs(self, pairs: list[tuple[str, str]], owners: list[PromptOwner], rewrite: Rewrite | None) -> list[Any]:
        """Next-token log-distributions over each continuation's positions."""
        if not pairs:
            return []
        pairs = self.rewrite_pairs(pairs, owners, rewrite)
        return scoring.continuation_logprobs(self.model, self.tok, pairs, batch_size=self.cfg.batch_size)

    def _generate(self, fn, prompts: list[str], owners: list[PromptOwner], rewrite: Rewrite | None,
                  max_new: int, top_k: int | None) -> list:
        if not prompts:
            return []
        if rewrite is not None:
            prompts = rewrite(prompts, owners)
        return fn(
            self.model, self.tok, prompts, max_new_tokens=max_new, top_k=top_k,
            seed=self.cfg.seed, batch_size=self.cfg.gen_batch_size,
        )

    def generate(self, prompts: list[str], owners: list[PromptOwner], rewrite: Rewrite | None,
                 max_new: int, top_k: int | None) -> list[str]:
        """Generated continuations (seeded top-k sampling; greedy with ``top_k=None``)."""
        return self._generate(scoring.generate, prompts, owners, rewrite, max_new, top_k)

    def greedy_ids(self, prompts: list[str], owners: list[PromptOwner], rewrite: Rewrite | None, max_new: int) -> list[list[int]]:
        """Greedy continuations as token ids."""
        return self._generate(scoring.generate_ids, prompts, owners, rewrite, max_new, None)

    # -- what a run calls ---------------------------------------------------------------------
    def reference(self, records: Sequence[EditRecord], rewrite: Rewrite | None = None) -> Any:
        return self.family.reference(self, records, rewrite)

    def evaluate(
        self, records: Sequence[EditRecord], ref: Any, rewrite: Rewrite | None = None,
        *, fluency: bool | None = None, locality: bool = True,
    ) -> list[RecordScores]:
        fluency = self.cfg.fluency if fluency is None else fluency
        out = self.family.evaluate(self, records, ref, rewrite, locality)
        if fluency:
            texts = self.generate(
                [self.family.fluency_prompt(r) for r in records], [owner(r, "fluency") for r in records],
                rewrite, self.cfg.fluency_tokens, self.cfg.fluency_top_k,
            )
            for s, text in zip(out, texts):
                s.values["fluency"] = M.ngram_entropy(text)
        return out


# -- aggregation --------------------------------------------------------------------------------
def summarise(scores: Sequence[RecordScores], spec: Any = None) -> dict[str, dict[str, Any]]:
    """Per-metric {value (×100, KnowEdit scale), n, higher_is_better}; unmeasured metrics are absent.

    ``spec`` (a ``knowbench.schema.MetricFamily``) gives each metric's direction and unit: a
    divergence (unit ``kl``, ConvSent's locality) is reported as is, not ×100."""
    specs = {m.name: m for m in spec.metrics} if spec is not None else {}
    names: list[str] = []
    for s in scores:
        for k in s.values:
            if k not in names:
                names.append(k)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        m = specs.get(name)
        higher = m.higher_is_better if m is not None else True
        vals = [s.values.get(name) for s in scores]
        if any(isinstance(v, dict) for v in vals):
            # portability / locality: per record the mean over keys of the mean over items
            value, n = M.aggregate([M.mean_of_keys(v) if isinstance(v, dict) else None for v in vals])
            if value is not None:
                out[name] = _entry(value, n, higher)
            keys = sorted({k for v in vals if isinstance(v, dict) for k in v})
            for key in keys:
                sub = [float(np.mean(v[key])) if isinstance(v, dict) and v.get(key) else None for v in vals]
                value, n = M.aggregate(sub)
                if value is not None:
                    out[f"{name}.{key}"] = _entry(value, n, higher)
        else:
            value, n = M.aggregate([v for v in vals if v is not None])
            if value is not None:
                scale = 100.0 if m is not None and m.unit == "kl" else 1.0
                out[name] = _entry(value / scale, n, higher)
    return out


def _entry(value: float, n: int, higher_is_better: bool = True) -> dict[str, Any]:
    return {"value": round(float(value), 4), "n": n, "higher_is_better": higher_is_better}
