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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from . import metrics as M
from . import scoring
from .editor import EditRequest, PromptOwner
from .metric_protocol import FLUENCY_CONTINUATION, PADDING_SAFE, STRIP_WHITESPACE, MetricProtocol
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
    # ConvSent locality: replies of the unrelated topic compared (None: all, as the reference; each
    # reply's unedited distributions are kept until the edit is scored, ~5 MB a reply at a 50k vocab)
    convsent_locality_replies: int | None = 3
    seed: int = 0
    metrics: MetricProtocol = field(default_factory=MetricProtocol)  # knowedit: the reference's definitions


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

    def _scoring_options(self, owners: list[PromptOwner], own_positions: bool) -> dict[str, Any]:
        """How the metric protocol scores: the reference's per-list batches (one group per record,
        metric and sub-key, as its scorer is called) unless ``padding_safe``; its join of prompt and
        target unless ``strip_whitespace``."""
        groups = None
        if not self.cfg.metrics.has(PADDING_SAFE):
            groups, last = [], None
            for i, o in enumerate(owners):
                key = (o.record, o.metric, o.key)
                if key != last:
                    groups.append([])
                    last = key
                groups[-1].append(i)
        return {"groups": groups, "reference_join": not self.cfg.metrics.has(STRIP_WHITESPACE),
                "own_positions": own_positions}

    def tf(self, pairs: list[tuple[str, str]], owners: list[PromptOwner], rewrite: Rewrite | None,
           own_positions: bool = False) -> list[scoring.TeacherForced]:
        """Teacher-forced scores of (prompt, target) pairs; ``own_positions``: log-probs read at each
        target token's own position (see :func:`knowbench.scoring.teacher_forced`)."""
        if not pairs:
            return []
        pairs = self.rewrite_pairs(pairs, owners, rewrite)
        return scoring.teacher_forced(self.model, self.tok, pairs, batch_size=self.cfg.batch_size,
                                      **self._scoring_options(owners, own_positions))

    def continuation_logprobs(self, pairs: list[tuple[str, str]], owners: list[PromptOwner], rewrite: Rewrite | None,
                              own_positions: bool = False) -> list[Any]:
        """Log-distributions over each continuation's positions (those predicting its tokens, or
        with ``own_positions`` those at its tokens)."""
        if not pairs:
            return []
        pairs = self.rewrite_pairs(pairs, owners, rewrite)
        return scoring.continuation_logprobs(self.model, self.tok, pairs, batch_size=self.cfg.batch_size,
                                             **self._scoring_options(owners, own_positions))

    def _generate(self, fn, prompts: list[str], owners: list[PromptOwner], rewrite: Rewrite | None,
                  max_new: int, top_k: int | None, **options: Any) -> list:
        if not prompts:
            return []
        if rewrite is not None:
            prompts = rewrite(prompts, owners)
        return fn(
            self.model, self.tok, prompts, max_new_tokens=max_new, top_k=top_k,
            seed=self.cfg.seed, batch_size=self.cfg.gen_batch_size, **options,
        )

    def generate(self, prompts: list[str], owners: list[PromptOwner], rewrite: Rewrite | None,
                 max_new: int, top_k: int | None) -> list[str]:
        """Generated continuations (seeded top-k sampling; greedy with ``top_k=None``)."""
        return self._generate(scoring.generate, prompts, owners, rewrite, max_new, top_k)

    def greedy_ids(self, prompts: list[str], owners: list[PromptOwner], rewrite: Rewrite | None, max_new: int,
                   batch_tail: bool = False) -> list[list[int]]:
        """Greedy continuations as token ids (``batch_tail``: as a batched generate call leaves
        them, see :func:`knowbench.scoring.generate_ids`)."""
        return self._generate(scoring.generate_ids, prompts, owners, rewrite, max_new, None, batch_tail=batch_tail)

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
            for s, text in zip(out, self.fluency_texts(records, rewrite)):
                s.values["fluency"] = M.ngram_entropy(text)
        return out

    def fluency_texts(self, records: Sequence[EditRecord], rewrite: Rewrite | None = None) -> list[str]:
        """The texts Fluency scores. KnowEdit's: the prompt and its top-k continuation, sampled until
        both reach ``fluency_tokens`` tokens, end-of-sequence not stopping it. With the
        ``fluency_continuation`` fix: ``fluency_tokens`` new tokens, stopping at end-of-sequence,
        the continuation alone."""
        prompts = [self.family.fluency_prompt(r) for r in records]
        owners = [owner(r, "fluency") for r in records]
        fn = scoring.generate if self.cfg.metrics.has(FLUENCY_CONTINUATION) else _sample_with_prompt
        return self._generate(fn, prompts, owners, rewrite, self.cfg.fluency_tokens, self.cfg.fluency_top_k)


def _sample_with_prompt(model: Any, tok: Any, prompts: list[str], *, max_new_tokens: int, top_k: int | None,
                        seed: int, batch_size: int) -> list[str]:
    """:func:`knowbench.scoring.sample_with_prompt` with ``max_new_tokens`` as its cap on prompt +
    continuation (KnowEdit's ``max_out_len``)."""
    return scoring.sample_with_prompt(model, tok, prompts, max_total=max_new_tokens, top_k=top_k or 1,
                                      seed=seed, batch_size=batch_size)


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
