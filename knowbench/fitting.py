"""Records against the model's context: nothing a record holds may abort a run.

After the records are selected and the model is loaded, every text a run will feed is checked
against the model's context (:func:`fit_context`): a record whose edit (prompt + target) does not fit
is dropped, an item whose answer does not fit is skipped, each with its reason listed in the
result's ``task.bad_records``; prompts that are merely long are left-cut by the scoring as before.
Records an editor refuses during the run are dropped the same way (:func:`drop_failed`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from .evaluation import EvalConfig, Evaluator, RecordScores
from .records import BadRecord, EditRecord, KeyProbe, LoadReport
from .runconfig import RunError

log = logging.getLogger("knowbench")


# -- records against the model's context ---------------------------------------------------------
def _short(text: str, n: int = 40) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= n else text[:n] + "…")


class _Context:
    """Token counts of what a run feeds, against the model's context (``limit`` positions; None
    when the model states none). Each check returns None when the text fits, else the reason."""

    def __init__(self, tok: Any, limit: int | None):
        self.tok, self.limit = tok, limit
        self._spans: dict[tuple[str, str], Any] = {}

    def _span(self, pairs: list[tuple[str, str]]) -> None:
        from .scoring import target_spans

        todo = list(dict.fromkeys(p for p in pairs if p not in self._spans))
        for b0 in range(0, len(todo), 512):
            chunk = todo[b0 : b0 + 512]
            try:
                got: list[Any] = list(target_spans(self.tok, chunk))
            except (ValueError, TypeError):  # find the pair(s) at fault one by one
                got = []
                for pair in chunk:
                    try:
                        got.append(target_spans(self.tok, [pair])[0])
                    except (ValueError, TypeError) as exc:
                        got.append(str(exc).split(": ", 1)[-1])
            self._spans.update(zip(chunk, got))

    def prefetch(self, pairs: list[tuple[str, str]]) -> None:
        self._span(pairs)

    def whole(self, prompt: str, target: str, subject: str | None = None) -> str | None:
        """The edit itself: an editor feeds prompt and target whole (the subject must stay in it)."""
        for name, text in (("prompt", prompt), ("target_new", target), ("subject", subject)):
            if text is not None and not _encodable(text):
                return f"{name} {_short(text)} is not valid Unicode (a lone surrogate), which tokenizers cannot read"
        self._span([(prompt, target)])
        span = self._spans[(prompt, target)]
        if isinstance(span, str):
            return span
        n = len(span[0])
        if self.limit is not None and n > self.limit:
            return (f"prompt and target_new are {n} tokens, more than the model's context of {self.limit} "
                    "(an editor feeds the edit whole)")
        return None

    def answer(self, prompt: str, target: str) -> str | None:
        """An evaluated pair: scoring cuts a prompt that is too long from the left, but the answer
        and one token before it must fit."""
        self._span([(prompt, target)])
        span = self._spans[(prompt, target)]
        if isinstance(span, str):
            return span
        ids, start = span
        n_target = len(ids) - start
        if self.limit is not None and n_target + 1 > self.limit:
            return (f"answer {_short(target)} is {n_target} tokens, more than the model's context of "
                    f"{self.limit} allows")
        return None

    def _ids(self, text: str) -> list[int]:
        from .scoring import readable

        return list(self.tok([readable(text)], add_special_tokens=True)["input_ids"][0])

    def prompt(self, text: str) -> str | None:
        """A generation prompt (cut from the left when too long): it must give at least one token."""
        if not isinstance(text, str):
            return f"prompt is {type(text).__name__}, expected a string"
        try:
            ids = self._ids(text)
        except (TypeError, ValueError) as exc:
            return f"prompt {_short(text)} cannot be tokenized ({exc})"
        if not ids:
            return "prompt is empty and the tokenizer adds no BOS: nothing to continue"
        return None

    def key_prompt(self, text: str, subject: str | None) -> bool:
        """Whether a key can be read from ``text`` whole (the diagnostics read it uncut, as it is)."""
        if not isinstance(text, str) or not _encodable(text) or (subject is not None and not _encodable(subject)):
            return False
        if self.limit is None:
            return True
        try:
            return len(self._ids(text)) <= self.limit
        except (TypeError, ValueError):
            return False


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class _PairCollector(Evaluator):
    """A stand-in evaluator for a dry run of a metric family: it keeps every (prompt, target) pair
    and every generation prompt the family asks for, with its owner, and answers with placeholders,
    so that the runner can check what a run will feed before it feeds anything."""

    def __init__(self, family: Any, config: EvalConfig):
        super().__init__(None, None, family, config)
        self.pairs: list[tuple[Any, str, str]] = []
        self.prompts: list[tuple[Any, str]] = []

    def tf(self, pairs, owners, rewrite, own_positions=False):
        from .scoring import TeacherForced

        self.pairs.extend((o, p, t) for o, (p, t) in zip(owners, pairs))
        return [TeacherForced(gold=[0], pred=[0], logprobs=[0.0]) for _ in pairs]

    def continuation_logprobs(self, pairs, owners, rewrite, own_positions=False):
        self.pairs.extend((o, p, t) for o, (p, t) in zip(owners, pairs))
        return [torch.zeros(1, 2) for _ in pairs]

    def _generate(self, fn, prompts, owners, rewrite, max_new, top_k, **options):
        from . import scoring

        self.prompts.extend(zip(owners, prompts))
        return [[] if fn is scoring.generate_ids else "" for _ in prompts]


def _dry_run(records: list[EditRecord], report: LoadReport, family_cls: Any, eval_cfg: EvalConfig) -> _PairCollector | None:
    """Everything the task's metric family will score for ``records`` (None if its hooks do not
    run on placeholders, e.g. a third-party family that reads the model itself)."""
    family = family_cls(report.shared, eval_cfg)
    ev = _PairCollector(family, eval_cfg)
    try:
        family.prepare(records)
        ref = family.reference(ev, records, None)
        ev.evaluate(records, ref, None, locality=True)
        for r in records:
            for prompt, target in family.edit_pairs(r):
                ev.pairs.append((_Owner(r.index, "edit_pairs"), prompt, target))
    except Exception as exc:  # noqa: BLE001 - the record fields are checked anyway
        log.debug("dry run of %s failed (%s: %s); checking the records' own fields only",
                  family_cls.__name__, type(exc).__name__, exc)
        return None
    return ev


@dataclass(frozen=True)
class _Owner:
    record: int
    metric: str
    key: str | None = None


def fit_context(records: list[EditRecord], report: LoadReport, selection: dict[str, Any], lm: Any,
                model_name: str, family_cls: Any, eval_cfg: EvalConfig, protocol: Any,
                n_asked: int | None = None) -> list[EditRecord]:
    """The selected records with what does not fit the model's context taken out, before anything
    is evaluated: a record whose edit (prompt + target_new, fed whole by editors, so the subject
    stays) or any other text scored for it outside its items does not fit is dropped; a rephrase,
    portability or locality item whose answer does not fit is skipped (scoring cuts an item's prompt
    from the left, as before). Each is a :class:`BadRecord` in ``report.bad`` (so in the result's
    ``task.bad_records``) and a warning; ``report.records`` and ``selection`` follow. Records that
    fit come back as they were. A :class:`RunError` when no record is left."""
    from .scoring import _max_positions

    ctx = _Context(lm.tokenizer, _max_positions(lm.model))
    dropped: dict[int, str] = {}
    items: dict[int, list[tuple[str, str]]] = {}  # record index -> [(item, reason)]
    known: dict[int, set[tuple[str, str | None, str, str]]] = {}
    field_pairs = []
    for r in records:
        field_pairs.append((r.prompt, r.target_new))
        field_pairs += [(p, r.target_new) for p in r.rephrase]
        for section in (r.portability, r.locality):
            for probes in section.values():
                field_pairs += [(p.prompt, p.answer) for p in probes]
    dry = _dry_run(records, report, family_cls, eval_cfg)
    ctx.prefetch(field_pairs + ([(p, t) for _, p, t in dry.pairs] if dry else []))
    for r in records:
        seen = known.setdefault(r.index, set())
        seen.add(("edit_succ", None, r.prompt, r.target_new))
        seen.add(("edit_pairs", None, r.prompt, r.target_new))
        why = ctx.whole(r.prompt, r.target_new, r.subject)
        if why:
            dropped[r.index] = why
            continue
        for j, reph in enumerate(r.rephrase):
            seen.add(("rephrase", None, reph, r.target_new))
            why = ctx.answer(reph, r.target_new)
            if why:
                items.setdefault(r.index, []).append((f"rephrase[{j}]", why))
        for name, section in (("portability", r.portability), ("locality", r.locality)):
            for key, probes in section.items():
                for j, p in enumerate(probes):
                    seen.add((name, key, p.prompt, p.answer))
                    why = ctx.answer(p.prompt, p.answer)
                    if why:
                        items.setdefault(r.index, []).append((f"{name}.{key}[{j}]", why))
    if dry is not None:  # what the family scores beyond the record's own items (ConvSent's replies, ...)
        for owner, prompt, target in dry.pairs:
            if owner.record in dropped or (owner.metric, owner.key, prompt, target) in known.get(owner.record, ()):
                continue
            why = ctx.answer(prompt, target)
            if why:
                where = owner.metric + (f".{owner.key}" if owner.key else "")
                dropped[owner.record] = f"{where}: {why}"
        for owner, prompt in dry.prompts:
            if owner.record not in dropped:
                why = ctx.prompt(prompt)
                if why:
                    dropped[owner.record] = f"{owner.metric}: {why}"
    if not dropped and not items:
        return records

    bad: list[BadRecord] = []
    kept: list[EditRecord] = []
    replaced: dict[int, EditRecord] = {}
    for r in records:
        if r.index in dropped:
            bad.append(BadRecord(r.source, r.index, dropped[r.index]))
            continue
        if r.index in items:
            skip = {name for name, _ in items[r.index]}
            bad += [BadRecord(r.source, r.index, why, item=name, record_dropped=False) for name, why in items[r.index]]
            r = dataclasses.replace(
                r,
                rephrase=[p for j, p in enumerate(r.rephrase) if f"rephrase[{j}]" not in skip],
                portability=_without(r.portability, "portability", skip),
                locality=_without(r.locality, "locality", skip),
            )
            replaced[r.index] = r
        kept.append(r)
    report.bad.extend(bad)
    report.records = [replaced.get(r.index, r) for r in report.records if r.index not in dropped]
    limit = ctx.limit
    files = ", ".join(p.name for p in report.files)
    log.warning("%s: %d of the %d selected records skipped and %d items skipped inside kept records: they do not "
                "fit %s's context of %s tokens (all listed in the result file)",
                files, len(dropped), len(records), len(bad) - len(dropped), model_name, limit)
    for b in bad[:10]:
        log.warning("  %s", b)
    if len(bad) > 10:
        log.warning("  ... and %d more", len(bad) - 10)
    if not kept:
        first = bad[0] if bad else None
        raise RunError(f"{files}: none of the {len(records)} selected records can be run on {model_name} "
                       f"(context of {limit} tokens); first: {first}")
    _reselect(selection, report, kept, protocol, n_asked or len(records))
    return kept


def _without(section: dict[str, list[Any]], name: str, skip: set[str]) -> dict[str, list[Any]]:
    out = {}
    for key, probes in section.items():
        left = [p for j, p in enumerate(probes) if f"{name}.{key}[{j}]" not in skip]
        if left:  # a sub-key whose items were all skipped is left out, as the loaders do
            out[key] = left
    return out


def _reselect(selection: dict[str, Any], report: LoadReport, kept: list[EditRecord], protocol: Any,
              n_asked: int) -> None:
    """The selection as it is after records were dropped from it (warned about when fewer remain)."""
    selection.update(n_available=len(report.records), n_selected=len(kept), indices=[r.index for r in kept])
    if len(kept) < n_asked:
        log.warning("the run edits %d records, fewer than the %d selected (task.selection.n_selected records it)",
                    len(kept), n_asked)
    if getattr(protocol, "n_edits", None) is not None and protocol.accumulates and protocol.n_edits > len(kept):
        log.warning("--sequential %d: only %d records are left, so the sequential run makes %d edits",
                    protocol.n_edits, len(kept), len(kept))
        protocol.n_edits = len(kept)


def fitting_probes(probes: list[KeyProbe], lm: Any, model_name: str) -> list[KeyProbe]:
    """The diagnostics' probe keys whose prompt fits the model's context whole (a key is read from
    the uncut prompt); the others are left out with a warning (their items are still scored)."""
    from .scoring import _max_positions

    ctx = _Context(lm.tokenizer, _max_positions(lm.model))
    kept = [p for p in probes if ctx.key_prompt(p.prompt, p.subject)]
    if len(kept) < len(probes):
        log.warning("diagnostics: %d of %d probe prompts are longer than %s's context of %s tokens or not "
                    "readable text; their keys are not watched", len(probes) - len(kept), len(probes), model_name,
                    ctx.limit)
    return kept


def drop_failed(failed: dict[int, str], records: list[EditRecord], pre: list[RecordScores], report: LoadReport,
                 selection: dict[str, Any], protocol: Any, editor: str,
                 n_asked: int | None = None) -> tuple[list[EditRecord], list[RecordScores]]:
    """Take the records the editor could not edit out of the run, listed in ``report.bad``."""
    bad = [BadRecord(r.source, r.index, f"{editor} could not edit it: {failed[r.index]}") for r in records
           if r.index in failed]
    report.bad.extend(bad)
    keep = [i for i, r in enumerate(records) if r.index not in failed]
    kept = [records[i] for i in keep]
    report.records = [r for r in report.records if r.index not in failed]
    files = ", ".join(p.name for p in report.files)
    log.warning("%s: %s could not edit %d of %d records; they are left out of the metrics (listed in the result file)",
                files, editor, len(bad), len(records))
    for b in bad[:10]:
        log.warning("  %s", b)
    if not kept:
        raise RunError(f"{editor} could not edit any of the {len(records)} records; first: {bad[0]}")
    _reselect(selection, report, kept, protocol, n_asked or len(records))
    return kept, [pre[i] for i in keep]
