"""KnowEdit's metric families (DESIGN section 4), declared by the KnowEdit task plugins.

* ``qa`` — ZsRE, WikiData_counterfact, WikiData_recent — and ``wikibio``: teacher-forced token
  accuracy of the new target (Edit Succ.), of rephrases, of portability items against their answers;
  locality as the agreement of post-edit argmax tokens with the unedited model's on each locality
  item's answer positions.
* ``convsent``: Edit Succ. = sigmoid(mean log-prob of target-sentiment replies − mean log-prob of
  opposite replies) × min(1, exp(target log-prob after − before)); locality = KL(pre ‖ post) of the
  distributions over an unrelated topic's reply tokens (lower is better), token means pooled over
  the replies. Under KnowEdit's definitions (the reference's ``es`` and ``kl_loc_loss``) a reply
  token's log-prob is read from the logits at its own position, and "pre" is the edited model
  itself (the reference passes the edited object twice), so z_topic = 1 and locality = 0; the
  ``convsent_pre_unedited`` and ``convsent_next_token`` fixes change that.
* ``sanitation``: Edit Succ. = the rate of greedy answers containing "I don't know."; locality =
  per-position agreement of greedy 10-token answers on the task-wide locality questions, shared out
  over the records: under KnowEdit's definition each answer is what a batched generate leaves after
  the prompt (EOS and trailing pad tokens included), decoded, tokenized again, and the matches
  counted over the unedited answer's length (the ``sanitation_symmetric_agreement`` fix compares
  the generated ids, EOS excluded, over the longer answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from knowbench import metrics as M
from knowbench import scoring
from knowbench.evaluation import Evaluator, RecordScores, Rewrite, owner
from knowbench.metric_protocol import Fix
from knowbench.records import EditRecord, KeyProbe, Probe
from knowbench.schema import STANDARD_FAMILIES
from knowbench.task import MetricFamily


# -- QA (ZsRE, counterfact, recent) and WikiBio ------------------------------------------------------
@dataclass
class QAReference:
    """Unedited-model teacher-forced scores of every locality item: {record: {sub-key: [TF]}}."""

    locality: dict[int, dict[str, list[scoring.TeacherForced]]] = field(default_factory=dict)


class QAFamily(MetricFamily):
    spec = STANDARD_FAMILIES["qa"]

    def reference(self, ev: Evaluator, records: Sequence[EditRecord], rewrite: Rewrite | None) -> QAReference:
        ref = QAReference()
        pairs, owners = [], []
        for r in records:
            for key, probes in r.locality.items():
                for p in probes:
                    pairs.append((p.prompt, p.answer))
                    owners.append(owner(r, "locality", key))
        for o, tf in zip(owners, ev.tf(pairs, owners, rewrite)):
            ref.locality.setdefault(o.record, {}).setdefault(o.key, []).append(tf)
        return ref

    def evaluate(self, ev: Evaluator, records: Sequence[EditRecord], ref: QAReference,
                 rewrite: Rewrite | None, locality: bool) -> list[RecordScores]:
        pairs: list[tuple[str, str]] = []
        owners = []
        slots: list[tuple[int, str, str | None]] = []  # (row, metric, sub-key)

        def add(row: int, r: EditRecord, prompt: str, answer: str, metric: str, key: str | None) -> None:
            pairs.append((prompt, answer))
            owners.append(owner(r, metric, key))
            slots.append((row, metric, key))

        for row, r in enumerate(records):
            add(row, r, r.prompt, r.target_new, "edit_succ", None)
            for reph in r.rephrase:
                add(row, r, reph, r.target_new, "rephrase", None)
            for key, probes in r.portability.items():
                for p in probes:
                    add(row, r, p.prompt, p.answer, "portability", key)
            if locality:
                for key, probes in r.locality.items():
                    for p in probes:
                        add(row, r, p.prompt, p.answer, "locality", key)
        results = ev.tf(pairs, owners, rewrite)
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

    def probes(self, records: Sequence[EditRecord]) -> list[KeyProbe]:
        out = []
        for r in records:
            for key, probes in r.locality.items():
                for i, p in enumerate(probes):
                    subj = r.subject if r.subject and r.subject in p.prompt else None
                    out.append(KeyProbe(p.prompt, subj, r.index, key, i))
        return out


class WikiBioFamily(QAFamily):
    spec = STANDARD_FAMILIES["wikibio"]


# -- ConvSent --------------------------------------------------------------------------------------
CONVSENT_PRE_UNEDITED = Fix(
    "convsent_pre_unedited",
    reference="ConvSent's \"pre\" scores come from the model object it is handed as the unedited one, "
    "which for an editor that edits in place is the edited model: z_topic is always 1 and Locality "
    "(KL) always 0.",
    fix="\"pre\" is computed on the unedited model, before the edit.",
    why="Otherwise the topic term and ConvSent's Locality measure nothing (KnowEdit's table prints "
    "0.00 for every in-place editor).",
)
CONVSENT_NEXT_TOKEN = Fix(
    "convsent_next_token",
    reference="A reply token's log-prob (and the KL) is read from the logits at the token's own "
    "position, i.e. from the distribution over the token after it.",
    fix="It is read from the distribution that predicts the token (the position before it).",
    why="The reference's alignment scores how well each reply token predicts its successor's "
    "identity, off by one from the reply's likelihood.",
)


@dataclass
class ConvSentReference:
    target_lp: dict[int, tuple[list[float], list[int]]] = field(default_factory=dict)
    locality: dict[int, list[Any]] = field(default_factory=dict)  # (n_tok, vocab) log-probs


class ConvSentFamily(MetricFamily):
    spec = STANDARD_FAMILIES["convsent"]
    fixes = (CONVSENT_PRE_UNEDITED, CONVSENT_NEXT_TOKEN)

    def _own_positions(self) -> bool:
        return not self.cfg.metrics.has(CONVSENT_NEXT_TOKEN)

    def _pre_unedited(self) -> bool:
        return self.cfg.metrics.has(CONVSENT_PRE_UNEDITED)

    def _mean_lps(self, ev: Evaluator, records, field_name: str, rewrite) -> list[tuple[list[float], list[int]]]:
        """Per record: each reply's mean token log-prob and its token count."""
        pairs, owners, rows = [], [], []
        for row, r in enumerate(records):
            for reply in r.extra[field_name]:
                pairs.append((r.prompt, reply))
                owners.append(owner(r, "edit_succ"))
                rows.append(row)
        out: list[tuple[list[float], list[int]]] = [([], []) for _ in records]
        for row, tf in zip(rows, ev.tf(pairs, owners, rewrite, own_positions=self._own_positions())):
            out[row][0].append(tf.mean_logprob)
            out[row][1].append(len(tf))
        return out

    @staticmethod
    def locality_prompt(r: EditRecord) -> str:
        if r.extra.get("locality_prompt"):
            return r.extra["locality_prompt"]
        topic = r.extra["locality_topic"]
        return r.prompt.replace(r.subject, topic) if r.subject else f"What do you think of {topic}?"

    def _locality(self, ev: Evaluator, records, rewrite) -> dict[int, list[Any]]:
        pairs, owners = [], []
        for r in records:
            if not r.extra.get("locality_replies"):
                continue
            prompt = self.locality_prompt(r)
            for reply in r.extra["locality_replies"][: self.cfg.convsent_locality_replies]:
                pairs.append((prompt, reply))
                owners.append(owner(r, "locality"))
        out: dict[int, list[Any]] = {}
        for o, d in zip(owners, ev.continuation_logprobs(pairs, owners, rewrite, own_positions=self._own_positions())):
            out.setdefault(o.record, []).append(d)
        return out

    def reference(self, ev: Evaluator, records: Sequence[EditRecord], rewrite: Rewrite | None) -> ConvSentReference | None:
        if not self._pre_unedited():  # the reference's "pre" is the edited model: nothing to keep
            return None
        target = self._mean_lps(ev, records, "target_replies", rewrite)
        return ConvSentReference({r.index: lp for r, lp in zip(records, target)}, self._locality(ev, records, rewrite))

    def evaluate(self, ev: Evaluator, records: Sequence[EditRecord], ref: ConvSentReference | None,
                 rewrite: Rewrite | None, locality: bool) -> list[RecordScores]:
        target = self._mean_lps(ev, records, "target_replies", rewrite)
        opposite = self._mean_lps(ev, records, "opposite_replies", rewrite)
        unedited = ref is not None
        loc = self._locality(ev, records, rewrite) if locality and unedited else {}
        out = []
        for r, t, o in zip(records, target, opposite):
            # the reference pools tokens over all replies of a sentiment: token-weighted means
            pre = ref.target_lp[r.index][0] if unedited else t[0]
            vals: dict[str, Any] = {
                "edit_succ": M.convsent_edit_succ(t[0], o[0], pre, target_counts=t[1], opposite_counts=o[1]),
            }
            if locality and r.extra.get("locality_replies"):
                # KL(pre‖post) over every reply token (lower is better); "pre" = post gives 0
                vals["locality"] = (M.kl_divergence(torch.cat(ref.locality[r.index]), torch.cat(loc[r.index]))
                                    if unedited else 0.0)
            out.append(RecordScores(r.index, vals))
        return out

    def probes(self, records: Sequence[EditRecord]) -> list[KeyProbe]:
        out = []
        for r in records:
            prompt, topic = r.extra.get("locality_prompt"), r.extra.get("locality_topic")
            if prompt:  # ConvSent's locality is a KL divergence: no flip, so no owner item
                out.append(KeyProbe(prompt, topic if topic and topic in prompt else None, r.index, None, None))
        return out

    def edit_pairs(self, record: EditRecord) -> list[tuple[str, str]]:
        return [(record.prompt, reply) for reply in record.extra.get("target_replies", [])[:1]] or super().edit_pairs(record)


# -- Sanitation ------------------------------------------------------------------------------------
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


SANITATION_SYMMETRIC = Fix(
    "sanitation_symmetric_agreement",
    reference="Locality decodes what its batched generate call leaves after each prompt (the answer, "
    "its EOS, and pad tokens up to the longest answer of the batch of 16), tokenizes both texts "
    "again (a BOS the tokenizer adds counts as a matching token) and counts matching positions over "
    "the unedited answer's length: an edited answer that stops early loses, one that goes on costs "
    "nothing, and the padding, which depends on the other questions of the batch, counts.",
    fix="Matches of the generated token ids over the longer of the two answers (a token one "
    "answer lacks is a disagreement; two empty answers agree).",
    why="A change in the answer's length is a change in behaviour either way, and a re-tokenized "
    "BOS is not an answer token.",
)


class SanitationFamily(MetricFamily):
    spec = STANDARD_FAMILIES["sanitation"]
    fixes = (SANITATION_SYMMETRIC,)

    def __init__(self, shared, config):
        super().__init__(shared, config)
        self.share: dict[int, list[Probe]] = {}

    def prepare(self, records: Sequence[EditRecord]) -> None:
        self.share = sanitation_probes(records, self.shared)

    def _locality_ids(self, ev: Evaluator, records, rewrite) -> list[tuple[int, list[int]]]:
        """(row, greedy answer ids) of every locality question the records own."""
        prompts, owners, rows = [], [], []
        for row, r in enumerate(records):
            for p in self.share.get(r.index, []):
                prompts.append(p.prompt)
                owners.append(owner(r, "locality"))
                rows.append(row)
        # KnowEdit's reading: what its batched generate call leaves after each prompt (EOS and the
        # pad tokens of rows that finished first included), decoded as text
        batch_tail = not self.cfg.metrics.has(SANITATION_SYMMETRIC)
        return list(zip(rows, ev.greedy_ids(prompts, owners, rewrite, self.cfg.sanitation_tokens,
                                            batch_tail=batch_tail)))

    def reference(self, ev: Evaluator, records: Sequence[EditRecord], rewrite: Rewrite | None) -> dict[int, list[list[int]]]:
        ref: dict[int, list[list[int]]] = {}
        for row, ids in self._locality_ids(ev, records, rewrite):
            ref.setdefault(records[row].index, []).append(ids)
        return ref

    def evaluate(self, ev: Evaluator, records: Sequence[EditRecord], ref: dict[int, list[list[int]]],
                 rewrite: Rewrite | None, locality: bool) -> list[RecordScores]:
        answers = ev.generate([r.prompt for r in records], [owner(r, "edit_succ") for r in records],
                              rewrite, self.cfg.sanitation_tokens, None)
        per = [{"edit_succ": float(M.contains_idk(a))} for a in answers]
        if locality:
            seen = [0] * len(records)
            agree: list[list[float]] = [[] for _ in records]
            for row, ids in self._locality_ids(ev, records, rewrite):
                pre = ref[records[row].index][seen[row]]
                seen[row] += 1
                if self.cfg.metrics.has(SANITATION_SYMMETRIC):
                    agree[row].append(M.greedy_agreement(pre, ids))
                else:  # the decoded answers (special tokens as text), tokenized again
                    again = ev.tok([ev.tok.decode(pre), ev.tok.decode(ids)], add_special_tokens=True)["input_ids"]
                    agree[row].append(M.prefix_agreement(again[0], again[1]))
            for row, values in enumerate(agree):
                if values:  # a record with no locality question of its own has no locality score
                    per[row]["locality"] = float(np.mean(values))
        return [RecordScores(r.index, v) for r, v in zip(records, per)]

    def fluency_prompt(self, record: EditRecord) -> str:
        share = self.share.get(record.index)
        return share[0].prompt if share else record.prompt

    def probes(self, records: Sequence[EditRecord]) -> list[KeyProbe]:
        per = sanitation_probes(records, self.shared)
        return [KeyProbe(p.prompt, None, r.index, "locality", i)
                for r in records for i, p in enumerate(per.get(r.index, []))]


FAMILIES: dict[str, type[MetricFamily]] = {
    "qa": QAFamily, "wikibio": WikiBioFamily, "convsent": ConvSentFamily, "sanitation": SanitationFamily,
}
