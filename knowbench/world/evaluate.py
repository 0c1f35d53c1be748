"""How well a model knows the world: teacher-forced token accuracy (DESIGN section 4) of probes.

A probe (prompt, answer) is scored by feeding ``prompt + " " + answer`` and counting the answer
positions where the argmax next-token prediction (given the gold prefix) is the gold token; a
probe's score is that fraction, a group's score the mean over its probes, ×100.

Groups (from ``tasks.build_tasks``):

* ``known`` — every fact the tasks rely on before an edit: original answers of the edit prompts
  (``*/edit``), locality answers (``*/locality``), the facts portability answers rest on
  (``*/portability``: the new object's own fact for Reasoning, the alias question with the
  original answer, the original spouse's inverse fact) and the Sanitation questions in their
  "Question:...\\nAnswer:" format. The embedded model must reach ≥ 95 here.
* ``rephrase`` — ZsRE rephrase prompts (another trained template) with the original answer.
* ``held_out`` — templates never in the corpus, with the original answer.
* ``reasoning_pre`` — the 2-hop Reasoning prompts answered through the original fact.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from .tasks import KnowledgeProbe, build_tasks
from .world import World


@dataclass
class WorldAccuracy:
    groups: dict[str, float] = field(default_factory=dict)  # group -> accuracy ×100
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def known(self) -> float:
        return self.groups["known"]

    def as_dict(self) -> dict[str, Any]:
        return {g: {"accuracy": round(v, 2), "n": self.counts[g]} for g, v in sorted(self.groups.items())}

    def table(self) -> str:
        rows = [f"{'group':28s} {'n':>6s} {'accuracy':>9s}"]
        for g in sorted(self.groups, key=_group_order):
            rows.append(f"{g:28s} {self.counts[g]:6d} {self.groups[g]:9.2f}")
        return "\n".join(rows)


def _group_order(g: str) -> tuple[int, str]:
    head = ["known", "rephrase", "held_out", "reasoning_pre"]
    return (head.index(g) if g in head else len(head), g)


def token_accuracy(model: Any, tok: Any, pairs: list[tuple[str, str]], batch_size: int = 64) -> list[float]:
    """Teacher-forced accuracy of each (prompt, answer); right padding, no special tokens."""
    import torch

    out: list[float] = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        seqs, spans = [], []
        for prompt, answer in chunk:
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            full = tok(prompt + " " + answer, add_special_tokens=False)["input_ids"]
            if full[: len(p_ids)] != p_ids:  # prompt tokens must be a prefix of the full text
                p_ids = full[: len(p_ids) - 1]
            seqs.append(full)
            spans.append((len(p_ids), len(full)))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        with torch.no_grad():
            pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for r, (a, b) in enumerate(spans):
            hits = (pred[r, a - 1 : b - 1] == ids[r, a:b]).float()
            out.append(float(hits.mean()))
    return out


def evaluate_probes(model: Any, tok: Any, probes: Iterable[KnowledgeProbe]) -> WorldAccuracy:
    probes = list(probes)
    scores = token_accuracy(model, tok, [(p.prompt, p.answer) for p in probes])
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for p, s in zip(probes, scores):
        groups = [p.group]
        if "/" in p.group:
            groups.append("known")
        for g in groups:
            sums[g] += s
            counts[g] += 1
    return WorldAccuracy({g: 100 * sums[g] / counts[g] for g in sums}, dict(counts))


def evaluate_world(model: Any, tok: Any, world: World) -> WorldAccuracy:
    _, probes = build_tasks(world)
    return evaluate_probes(model, tok, probes)
