"""Task-level evaluation: which prompts each metric scores, batched across records.

For a list of records the evaluator gathers every prompt all metrics need into one batched call
per primitive (teacher forcing, continuation distributions, generation), then splits the results
back per record. Locality and ConvSent need numbers from the unedited model: ``reference()``
computes them once, before the first edit, and ``evaluate()`` compares against them.

Per-record scores are fractions; ``summarise()`` aggregates them to KnowEdit's ×100 scale (DESIGN 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from . import metrics as M
from . import scoring
from .records import EditRecord, Probe

Rewrite = Callable[[list[str]], list[str]]


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
class Reference:
    """Unedited-model numbers that post-edit metrics compare against, keyed by record index."""

    locality: dict[int, dict[str, list[scoring.TeacherForced]]] = field(default_factory=dict)
    convsent_target_lp: dict[int, tuple[list[float], list[int]]] = field(default_factory=dict)
    convsent_locality: dict[int, list[Any]] = field(default_factory=dict)  # (n_tok, vocab) log-probs
    sanitation_locality: dict[int, list[list[int]]] = field(default_factory=dict)  # greedy ids


@dataclass
class RecordScores:
    index: int
    values: dict[str, Any]  # metric -> fraction, or sub-key -> [item fractions]


def sanitation_probes(records: Sequence[EditRecord], shared: dict[str, Any]) -> dict[int, list[Probe]]:
    """Spread the task-wide locality questions over the records, round-robin by selection order,
    so that each question is asked once per run and a single edit is checked on its own share."""
    probes: list[Probe] = shared.get("locality", [])
    out: dict[int, list[Probe]] = {r.index: [] for r in records}
    if not records:
        return out
    for j, probe in enumerate(probes):
        out[records[j % len(records)].index].append(probe)
    return out


class Evaluator:
    def __init__(self, model: Any, tok: Any, kind: str, config: EvalConfig, shared: dict[str, Any] | None = None):
        self.model = model
        self.tok = tok
        self.kind = kind
        self.cfg = config
        self.shared = shared or {}
        self._san_probes: dict[int, list[Probe]] = {}

    # -- primitives with an optional prompt rewrite (in-context editors) ----------------------
    @staticmethod
    def _rewrite_pairs(pairs: list[tuple[str, str]], rewrite: Rewrite | None) -> list[tuple[str, str]]:
        if rewrite is None or not pairs:
            return pairs
        return list(zip(rewrite([p for p, _ in pairs]), [t for _, t in pairs]))

    def _tf(self, pairs: list[tuple[str, str]], rewrite: Rewrite | None) -> list[scoring.TeacherForced]:
        if not pairs:
            return []
        pairs = self._rewrite_pairs(pairs, rewrite)
        return scoring.teacher_forced(self.model, self.tok, pairs, batch_size=self.cfg.batch_size)

    def _generate(self, fn, prompts: list[str], rewrite: Rewrite | None, max_new: int, top_k: int | None) -> list:
        """``scoring.generate`` (texts) or ``scoring.generate_ids`` (token ids) on rewritten prompts."""
        if not prompts:
            return []
        if rewrite is not None:
            prompts = rewrite(prompts)
        return fn(
            self.model, self.tok, prompts, max_new_tokens=max_new, top_k=top_k,
            seed=self.cfg.seed, batch_size=self.cfg.gen_batch_size,
        )

    def _gen(self, prompts: list[str], rewrite: Rewrite | None, max_new: int, top_k: int | None) -> list[str]:
        return self._generate(scoring.generate, prompts, rewrite, max_new, top_k)

    def _greedy_ids(self, prompts: list[str], rewrite: Rewrite | None) -> list[list[int]]:
        return self._generate(scoring.generate_ids, prompts, rewrite, self.cfg.sanitation_tokens, None)

    # -- reference (unedited model) ----------------------------------------------------------
    def prepare(self, records: Sequence[EditRecord]) -> None:
        if self.kind == "sanitation":
            self._san_probes = sanitation_probes(records, self.shared)

    def reference(self, records: Sequence[EditRecord], rewrite: Rewrite | None = None) -> Reference:
        ref = Reference()
        if self.kind in ("qa", "wikibio"):
            pairs, owners = [], []
            for r in records:
                for key, probes in r.locality.items():
                    for p in probes:
                        pairs.append((p.prompt, p.answer))
                        owners.append((r.index, key))
            for (idx, key), tf in zip(owners, self._tf(pairs, rewrite)):
                ref.locality.setdefault(idx, {}).setdefault(key, []).append(tf)
        elif self.kind == "convsent":
            target = self._convsent_target_lp(records, rewrite)
            ref.convsent_target_lp = {r.index: lp for r, lp in zip(records, target)}
            ref.convsent_locality = self._convsent_locality(records, rewrite)
        elif self.kind == "sanitation":
            prompts, owners = [], []
            for r in records:
                for p in self._san_probes.get(r.index, []):
                    prompts.append(p.prompt)
                    owners.append(r.index)
            for idx, ids in zip(owners, self._greedy_ids(prompts, rewrite)):
                ref.sanitation_locality.setdefault(idx, []).append(ids)
        return ref

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(
        self, records: Sequence[EditRecord], ref: Reference, rewrite: Rewrite | None = None,
        *, fluency: bool | None = None, locality: bool = True,
    ) -> list[RecordScores]:
        fluency = self.cfg.fluency if fluency is None else fluency
        if self.kind in ("qa", "wikibio"):
            out = self._eval_qa(records, ref, rewrite, locality)
        elif self.kind == "convsent":
            out = self._eval_convsent(records, ref, rewrite, locality)
        elif self.kind == "sanitation":
            out = self._eval_sanitation(records, ref, rewrite, locality)
        else:
            raise ValueError(f"unknown task kind {self.kind!r}")
        if fluency:
            texts = self._gen(
                [self._fluency_prompt(r) for r in records], rewrite, self.cfg.fluency_tokens, self.cfg.fluency_top_k
            )
            for s, text in zip(out, texts):
                s.values["fluency"] = M.ngram_entropy(text)
        return out

    def _fluency_prompt(self, r: EditRecord) -> str:
        if self.kind == "sanitation" and self._san_probes.get(r.index):
            return self._san_probes[r.index][0].prompt
        return r.prompt

    def _eval_qa(self, records, ref: Reference, rewrite, locality: bool) -> list[RecordScores]:
        pairs: list[tuple[str, str]] = []
        slots: list[tuple[int, str, str | None]] = []  # (row, metric, sub-key)
        for row, r in enumerate(records):
            pairs.append((r.prompt, r.target_new))
            slots.append((row, "edit_succ", None))
            for reph in r.rephrase:
                pairs.append((reph, r.target_new))
                slots.append((row, "rephrase", None))
            for key, probes in r.portability.items():
                for p in probes:
                    pairs.append((p.prompt, p.answer))
                    slots.append((row, "portability", key))
            if locality:
                for key, probes in r.locality.items():
                    for p in probes:
                        pairs.append((p.prompt, p.answer))
                        slots.append((row, "locality", key))
        results = self._tf(pairs, rewrite)
        per: list[dict[str, Any]] = [dict() for _ in records]
        loc_seen: list[dict[str, int]] = [dict() for _ in records]
        for (row, metric, key), tf in zip(slots, results):
            vals = per[row]
            if metric == "locality":
                i = loc_seen[row].get(key, 0)
                loc_seen[row][key] = i + 1
                value = M.agreement(ref.locality[records[row].index][key][i], tf)
            else:
                value = M.accuracy(tf)
            if key is None:
                vals.setdefault(metric, []).append(value)
            else:
                vals.setdefault(metric, {}).setdefault(key, []).append(value)
        out = []
        for r, vals in zip(records, per):
            vals["edit_succ"] = vals["edit_succ"][0]
            if "rephrase" in vals:
                vals["rephrase"] = float(np.mean(vals["rephrase"]))
            out.append(RecordScores(r.index, vals))
        return out

    # ConvSent ---------------------------------------------------------------------------------
    def _convsent_target_lp(self, records, rewrite) -> list[list[float]]:
        return self._mean_lps(records, "target_replies", rewrite)

    def _mean_lps(self, records, field_name: str, rewrite) -> list[tuple[list[float], list[int]]]:
        """Per record: each reply's mean token log-prob and its token count."""
        pairs, owners = [], []
        for row, r in enumerate(records):
            for reply in r.extra[field_name]:
                pairs.append((r.prompt, reply))
                owners.append(row)
        out: list[tuple[list[float], list[int]]] = [([], []) for _ in records]
        for row, tf in zip(owners, self._tf(pairs, rewrite)):
            out[row][0].append(tf.mean_logprob)
            out[row][1].append(len(tf))
        return out

    def _convsent_locality(self, records, rewrite) -> dict[int, list[Any]]:
        pairs, owners = [], []
        for r in records:
            if not r.extra.get("locality_replies"):
                continue
            prompt = self._locality_prompt(r)
            for reply in r.extra["locality_replies"][: self.cfg.convsent_locality_replies]:
                pairs.append((prompt, reply))
                owners.append(r.index)
        pairs = self._rewrite_pairs(pairs, rewrite)
        dists = scoring.continuation_logprobs(self.model, self.tok, pairs, batch_size=self.cfg.batch_size) if pairs else []
        out: dict[int, list[Any]] = {}
        for idx, d in zip(owners, dists):
            out.setdefault(idx, []).append(d)
        return out

    @staticmethod
    def _locality_prompt(r: EditRecord) -> str:
        if r.extra.get("locality_prompt"):
            return r.extra["locality_prompt"]
        topic = r.extra["locality_topic"]
        return r.prompt.replace(r.subject, topic) if r.subject else f"What do you think of {topic}?"

    def _eval_convsent(self, records, ref: Reference, rewrite, locality: bool) -> list[RecordScores]:
        target = self._mean_lps(records, "target_replies", rewrite)
        opposite = self._mean_lps(records, "opposite_replies", rewrite)
        loc = self._convsent_locality(records, rewrite) if locality else {}
        out = []
        for r, t, o in zip(records, target, opposite):
            # the reference pools tokens over all replies of a sentiment: token-weighted means
            vals: dict[str, Any] = {
                "edit_succ": M.convsent_edit_succ(
                    t[0], o[0], ref.convsent_target_lp[r.index][0], target_counts=t[1], opposite_counts=o[1]
                ),
            }
            if locality and r.index in loc:
                kls = [M.kl_divergence(pre, post) for pre, post in zip(ref.convsent_locality[r.index], loc[r.index])]
                vals["locality"] = float(np.mean(kls))  # KL(pre‖post), lower is better
            out.append(RecordScores(r.index, vals))
        return out

    # Sanitation -------------------------------------------------------------------------------
    def _eval_sanitation(self, records, ref: Reference, rewrite, locality: bool) -> list[RecordScores]:
        answers = self._gen([r.prompt for r in records], rewrite, self.cfg.sanitation_tokens, None)
        per = [{"edit_succ": float(M.contains_idk(a))} for a in answers]
        if locality:
            prompts, owners = [], []
            for row, r in enumerate(records):
                for p in self._san_probes.get(r.index, []):
                    prompts.append(p.prompt)
                    owners.append(row)
            seen = [0] * len(records)
            agree: list[list[float]] = [[] for _ in records]
            for row, ids in zip(owners, self._greedy_ids(prompts, rewrite)):
                pre = ref.sanitation_locality[records[row].index][seen[row]]
                seen[row] += 1
                agree[row].append(M.greedy_agreement(pre, ids))
            for row, values in enumerate(agree):
                if values:  # a record with no locality question of its own has no locality score
                    per[row]["locality"] = float(np.mean(values))
        return [RecordScores(r.index, v) for r, v in zip(records, per)]


# -- aggregation --------------------------------------------------------------------------------
def summarise(scores: Sequence[RecordScores], kind: str = "qa") -> dict[str, dict[str, Any]]:
    """Per-metric {value (×100, KnowEdit scale), n, higher_is_better}; unmeasured metrics are absent.

    ConvSent's locality is a KL divergence: reported as is (not ×100), lower is better."""
    divergence = {"locality"} if kind == "convsent" else set()
    names: list[str] = []
    for s in scores:
        for k in s.values:
            if k not in names:
                names.append(k)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        vals = [s.values.get(name) for s in scores]
        if any(isinstance(v, dict) for v in vals):
            # portability / locality: per record the mean over keys of the mean over items
            value, n = M.aggregate([M.mean_of_keys(v) if isinstance(v, dict) else None for v in vals])
            if value is not None:
                out[name] = _entry(value, n)
            keys = sorted({k for v in vals if isinstance(v, dict) for k in v})
            for key in keys:
                sub = [float(np.mean(v[key])) if isinstance(v, dict) and v.get(key) else None for v in vals]
                value, n = M.aggregate(sub)
                if value is not None:
                    out[f"{name}.{key}"] = _entry(value, n)
        else:
            value, n = M.aggregate([v for v in vals if v is not None])
            if value is not None:
                if name in divergence:
                    out[name] = _entry(value / 100.0, n, higher_is_better=False)
                else:
                    out[name] = _entry(value, n)
    return out


def _entry(value: float, n: int, higher_is_better: bool = True) -> dict[str, Any]:
    return {"value": round(float(value), 4), "n": n, "higher_is_better": higher_is_better}
