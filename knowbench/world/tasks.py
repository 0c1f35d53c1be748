"""The six KnowEdit tasks rendered from the world, in KnowEdit's exact schemas (DESIGN section 3).

Every prompt uses a *trained* template, so the embedded model knows the pre-edit answer of each
edit prompt, locality prompt and of the facts portability relies on; rephrases use a different
trained template. ``build_tasks`` also returns the list of probes (prompt, answer, group) that
``knowbench world eval`` scores to show it.

Which file each task is written to follows KnowEdit's file names (``TASK_FILES``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from .templates import IDK, NEGATIVE_REPLIES, POSITIVE_REPLIES, RELATIONS, fill, forgetfulness
from .world import World

TASK_FILES = {
    "zsre": "ZsRE-test-all.json",
    "wiki_recent": "recent_test.json",
    "counterfact": "test_cf.json",
    "wikibio": "wikibio-test-all.json",
    "convsent": "blender_test.json",
    "sanitation": "trivia_qa_test.json",
}
# the training splits (SERAC, MEND, IKE's demonstrations), under the names KnowEdit uses where it
# has one (KnowEdit ships no ZsRE train file; EasyEdit uses MEND's zsre_mend_train)
TRAIN_FILES = {
    "zsre": "ZsRE-train-all.json",
    "wiki_recent": "recent_train.json",
    "counterfact": "train_cf.json",
    "wikibio": "wikibio-train-all.json",
    "convsent": "blender_train.json",
    "sanitation": "trivia_qa_train.json",
}


@dataclass(frozen=True)
class TaskSizes:
    zsre: int = 1000
    counterfact: int = 300
    wiki_recent: int = 250
    wikibio: int = 250
    convsent: int = 250
    sanitation_success: int = 200
    sanitation_locality: int = 300


@dataclass(frozen=True)
class TrainSizes:
    """The training splits' sizes (fewer where the world has no more facts left to edit)."""

    zsre: int = 1000
    counterfact: int = 600
    wiki_recent: int = 300
    wikibio: int = 250
    convsent: int = 250
    sanitation_success: int = 200
    sanitation_locality: int = 100


@dataclass(frozen=True)
class KnowledgeProbe:
    """A pre-edit fact a task relies on: the model should complete ``prompt`` with ``answer``."""

    prompt: str
    answer: str
    group: str  # e.g. "zsre/edit", "counterfact/locality", "rephrase", "held_out"


EDITABLE = ("birthplace", "occupation", "employer", "spouse")
PERSON_REL = ("birthplace", "occupation", "employer", "spouse", "award")


class _Builder:
    def __init__(self, world: World, sizes: TaskSizes):
        self.w = world
        self.sizes = sizes
        self.probes: list[KnowledgeProbe] = []
        self.edited: set[tuple[str, str]] = set()  # (subject, relation) of every edit made

    def rng(self, task: str) -> random.Random:
        return random.Random(f"knowbench-world-{self.w.seed}-{task}")

    def probe(self, prompt: str, answer: str, group: str) -> None:
        self.probes.append(KnowledgeProbe(prompt, answer, group))

    def editable(self, subject: str, relation: str) -> bool:
        """Whether the builder may edit (subject, relation): always for the test files."""
        return True

    def mark(self, subject: str, relation: str) -> None:
        self.edited.add((subject, relation))

    def products(self) -> list[str]:
        return list(self.w.names("product"))

    # -- helpers ---------------------------------------------------------------------------
    def people(self, task: str) -> list[str]:
        order = list(self.w.names("person"))
        self.rng(task + "-order").shuffle(order)
        return order

    def alias(self, name: str) -> str | None:
        al = self.w.get(name).aliases
        return al[0] if al else None

    def new_target(self, rng: random.Random, subject: str, rel: str) -> str:
        orig = self.w.get(subject).attrs.get(rel)
        while True:
            t = rng.choice(self.w.range_of(rel))
            if t != orig and t != subject:
                return t

    def template(self, rng: random.Random, rel: str, kind: str, exclude: str | None = None) -> str:
        r = RELATIONS[rel]
        pool = [t for t in (r.questions() if kind == "q" else r.statements()) if t != exclude]
        return rng.choice(pool)

    def pick_relation(self, rng: random.Random, subject: str) -> str | None:
        ent = self.w.get(subject)
        cands = [r for r in EDITABLE if r in ent.attrs and self.editable(subject, r)]
        if ent.aliases and rng.random() < 0.5 and "occupation" in cands:
            cands = ["occupation"]  # occupation edits are the ones only aliasing makes portable
        return rng.choice(cands) if cands else None

    def other_relation(self, rng: random.Random, subject: str, rel: str) -> str:
        ent = self.w.get(subject)
        cands = [r for r in PERSON_REL if r in ent.attrs and r != rel]
        return rng.choice(cands)

    def portability(self, rng, subject: str, rel: str, target: str, kind: str, task: str) -> dict:
        """Reasoning (2-hop through the new object), Logical_Generalization (spouse is symmetric),
        Subject_Aliasing (the same question about the subject's alias). Answers are post-edit;
        the probes record the pre-edit facts they rest on."""
        w = self.w
        port: dict[str, list[dict]] = {}
        if rel == "birthplace":
            t = self.template(rng, "birth_country", kind)
            port["Reasoning"] = [{"prompt": fill(t, subject), "ground_truth": w.obj(target, "country")}]
            self.probe(fill(self.template(rng, "country", kind), target), w.obj(target, "country"), f"{task}/portability")
            # the model also knows the original chain (stored as a fact, as large LMs do)
            self.probe(fill(t, subject), w.obj(subject, "birth_country"), "reasoning_pre")
        elif rel == "employer":
            t = self.template(rng, "hq", kind)
            port["Reasoning"] = [{"prompt": fill(t, f"the employer of {subject}"), "ground_truth": w.obj(target, "hq")}]
            self.probe(fill(t, target), w.obj(target, "hq"), f"{task}/portability")
            self.probe(fill(t, f"the employer of {subject}"), w.obj(w.obj(subject, "employer"), "hq"), "reasoning_pre")
        elif rel == "spouse":
            t = self.template(rng, "spouse", kind)
            port["Logical_Generalization"] = [{"prompt": fill(t, target), "ground_truth": subject}]
            orig = w.obj(subject, "spouse")
            self.probe(fill(t, orig), subject, f"{task}/portability")
        alias = self.alias(subject)
        if alias and rel in ("birthplace", "occupation", "employer"):
            t = self.template(rng, rel, kind)
            port["Subject_Aliasing"] = [{"prompt": fill(t, alias), "ground_truth": target}]
            self.probe(fill(t, alias), w.obj(subject, rel), f"{task}/portability")
        return port

    # -- tasks -----------------------------------------------------------------------------
    def zsre(self) -> list[dict]:
        rng = self.rng("zsre")
        out = []
        for s in self.people("zsre")[: self.sizes.zsre]:
            rel = self.pick_relation(rng, s)
            if rel is None:
                continue
            self.mark(s, rel)
            orig = self.w.obj(s, rel)
            target = self.new_target(rng, s, rel)
            prompt = fill(self.template(rng, rel, "q"), s)
            rephrase = fill(self.template(rng, rel, "q", exclude=prompt.replace(s, "{s}")), s)
            r2 = self.other_relation(rng, s, rel)
            a2 = self.w.obj(s, r2)
            loc = [
                {"prompt": fill(self.template(rng, r2, "s"), s), "ground_truth": [a2]},
                {"prompt": fill(self.template(rng, r2, "q"), s), "ground_truth": [a2]},
            ]
            self.probe(prompt, orig, "zsre/edit")
            self.probe(rephrase, orig, "rephrase")
            # in-context editing (ICE's prompt): the new fact in front of the prompt, a rephrase,
            # and another fact of the subject, which keeps its answer
            fact = f"New Fact: {prompt} {target}\nPrompt: "
            self.probe(fact + prompt, target, "icl_copy")
            self.probe(fact + rephrase, target, "icl_update")
            self.probe(fact + loc[1]["prompt"], a2, "icl_retain")
            for it in loc:
                self.probe(it["prompt"], a2, "zsre/locality")
            self.held_out(rng, s, rel, orig)
            out.append({
                "subject": s,
                "target_new": target,
                "prompt": prompt,
                "ground_truth": [orig],
                "rephrase_prompt": rephrase,
                "cond": f"{orig} >> {target} || {prompt}",
                "locality": {"Relation_Specificity": loc},
                "portability": self.portability(rng, s, rel, target, "q", "zsre"),
            })
        return out

    def held_out(self, rng: random.Random, s: str, rel: str, answer: str) -> None:
        self.probe(fill(rng.choice(RELATIONS[rel].held_out), s), answer, "held_out")

    def counterfact(self) -> list[dict]:
        rng = self.rng("counterfact")
        out = []
        for s in self.people("counterfact")[: self.sizes.counterfact]:
            rel = self.pick_relation(rng, s)
            if rel is None:
                continue
            self.mark(s, rel)
            orig = self.w.obj(s, rel)
            target = self.new_target(rng, s, rel)
            prompt = fill(self.template(rng, rel, "s"), s)
            r2 = self.other_relation(rng, s, rel)
            a2 = self.w.obj(s, r2)
            loc: dict[str, list[dict]] = {
                "Relation_Specificity": [{"prompt": fill(self.template(rng, r2, "s"), s), "ground_truth": a2}]
            }
            self.probe(prompt, orig, "counterfact/edit")
            self.probe(loc["Relation_Specificity"][0]["prompt"], a2, "counterfact/locality")
            if rng.random() < 0.6:
                fp = forgetfulness(RELATIONS[rel], s, target)
                loc["Forgetfulness"] = [{"prompt": fp, "ground_truth": orig}]
                self.probe(fp, orig, "counterfact/locality")
            out.append({
                "subject": s,
                "prompt": prompt,
                "target_new": target,
                "ground_truth": orig,
                "portability": self.portability(rng, s, rel, target, "s", "counterfact"),
                "locality": loc,
            })
        return out

    def answers(self, obj: str) -> list[str]:
        """An answer and its aliases, as WikiData_recent lists them."""
        ent = self.w.entities.get(obj)
        return [obj] + (list(ent.aliases) if ent is not None else [])

    def wiki_recent(self) -> list[dict]:
        """Insertion: the subject has no award (or no spouse) in the world; the edit adds one."""
        rng = self.rng("wiki_recent")
        out = []
        for s in self.people("wiki_recent"):
            if len(out) == self.sizes.wiki_recent:
                break
            ent = self.w.get(s)
            free = [r for r in ("award", "spouse") if r not in ent.attrs and self.editable(s, r)]
            if not free:
                continue
            rel = rng.choice(free)
            self.mark(s, rel)
            target = self.new_target(rng, s, rel)
            prompt = fill(self.template(rng, rel, "s"), s)
            port: dict[str, list[dict]] = {}
            if rng.random() < 0.75:
                if rel == "award":
                    t = self.template(rng, "award_country", "s")
                    c = self.w.obj(target, "award_country")
                    port["Reasoning"] = [{"prompt": fill(t, f"award received by {s}"), "ground_truth": [self.answers(c)]}]
                    self.probe(fill(t, target), c, "wiki_recent/portability")
                else:
                    t = self.template(rng, "spouse", "s")
                    port["Logical_Generalization"] = [{"prompt": fill(t, target), "ground_truth": [[s]]}]
                alias = self.alias(s)
                if alias:
                    port["Subject_Aliasing"] = [{"prompt": fill(prompt.replace(s, "{s}"), alias), "ground_truth": [[target]]}]
            rels = [r for r in ("birthplace", "birth_country", "occupation", "employer", "spouse", "award") if r in ent.attrs]
            rng.shuffle(rels)
            loc = []
            for r2 in sorted(rels[: rng.randint(2, 4)], key=rels.index):
                p2 = fill(self.template(rng, r2, "s"), s)
                loc.append({"prompt": p2, "ground_truth": [self.answers(ent.attrs[r2])]})
                self.probe(p2, ent.attrs[r2], "wiki_recent/locality")
            out.append({
                "subject": s,
                "prompt": prompt,
                "target_new": target,
                "portability": port,
                "locality": {"Relation_Specificity": loc},
            })
        return out

    def wikibio(self) -> list[dict]:
        rng = self.rng("wikibio")
        out = []
        w = self.w
        for s in self.people("wikibio")[: self.sizes.wikibio]:
            if not self.editable(s, "biography"):
                continue
            self.mark(s, "biography")
            e = w.get(s)
            a = e.attrs
            pron = e.pronoun.capitalize()
            text = (
                f"This is a Wikipedia passage about {s}. {s} was born in {a['birthplace']}. "
                f"{s} works as a {a['occupation']}."
            )
            labels = (
                f"{pron} is employed by {a['employer']}, a company in the industry of "
                f"{w.obj(a['employer'], 'industry')} that is headquartered in {w.obj(a['employer'], 'hq')}, "
                f"in the country of {w.obj(w.obj(a['employer'], 'hq'), 'country')}."
            )
            r2 = rng.choice([r for r in ("birth_country", "employer", "spouse", "award") if r in a])
            loc = [{"prompt": fill(self.template(rng, r2, "s"), s), "ground_truth": [a[r2]]}]
            self.probe(loc[0]["prompt"], a[r2], "wikibio/locality")
            out.append({"text": text, "labels": labels, "concept": s, "locality": {"Relation_Specificity": loc}})
        return out

    def convsent(self) -> list[dict]:
        out = []
        for e in self.products()[: self.sizes.convsent]:
            self.mark(e, "opinion")
            out.append({
                "ent": e,
                "pos": [r.replace("{e}", e) for r in POSITIVE_REPLIES],
                "neg": [r.replace("{e}", e) for r in NEGATIVE_REPLIES],
            })
        return out

    def sanitation(self) -> dict:
        """Erasure: the success questions should be answered "I don't know." after the edit;
        the locality questions are other facts the model must keep answering."""
        rng = self.rng("sanitation")
        w = self.w
        people = self.people("sanitation")
        items = []
        for s in people:
            if len(items) == self.sizes.sanitation_success + self.sizes.sanitation_locality:
                break
            rels = [r for r in ("birthplace", "occupation", "employer") if self.editable(s, r)]
            if not rels:
                continue
            rel = rng.choice(rels)
            self.mark(s, rel)
            q = fill(self.template(rng, rel, "q"), s)
            items.append((s, q, w.obj(s, rel)))
        n = self.sizes.sanitation_success
        success = [{"question": q, "ground_truth": a, "target_new": IDK, "subject": s} for s, q, a in items[:n]]
        locality = [{"question": q, "ground_truth": a} for _, q, a in items[n:]]
        for s, q, a in items:
            self.probe(sanitation_prompt(q), a, "sanitation/qa")
        return {"success": success, "locality": locality}


class _TrainBuilder(_Builder):
    """The training splits: the same record shapes, other random streams, and never a fact that a
    test file edits — a (subject, relation) edited by any of the six test files (a WikiBio concept
    and a ConvSent topic count whole) is not edited here, so a trained editor or a demonstration
    pool never holds a test edit."""

    def __init__(self, world: World, sizes: TrainSizes, excluded: set[tuple[str, str]]):
        super().__init__(world, sizes)  # type: ignore[arg-type]
        self.excluded = excluded

    def rng(self, task: str) -> random.Random:
        return random.Random(f"knowbench-world-train-{self.w.seed}-{task}")

    def editable(self, subject: str, relation: str) -> bool:
        return (subject, relation) not in self.excluded

    def products(self) -> list[str]:
        return [p for p in self.w.names("product") if self.editable(p, "opinion")]


def relation_of(prompt: str, subject: str) -> str:
    """The relation whose template ``prompt`` fills with ``subject`` (a ValueError if none does)."""
    for rel in RELATIONS.values():
        for t in rel.trained + rel.held_out:
            if fill(t, subject) == prompt:
                return rel.name
    raise ValueError(f"no template of the world renders {prompt!r} for {subject!r}")


def build_train_tasks(world: World, sizes: TrainSizes | None = None) -> dict[str, object]:
    """The six training splits, disjoint from every test file's edits (:class:`_TrainBuilder`)."""
    test = _Builder(world, TaskSizes())
    test.zsre(), test.wiki_recent(), test.counterfact(), test.wikibio(), test.convsent(), test.sanitation()
    b = _TrainBuilder(world, sizes or TrainSizes(), test.edited)
    return {
        "zsre": b.zsre(),
        "wiki_recent": b.wiki_recent(),
        "counterfact": b.counterfact(),
        "wikibio": b.wikibio(),
        "convsent": b.convsent(),
        "sanitation": b.sanitation(),
    }


def sanitation_prompt(question: str) -> str:
    from .templates import SANITATION_FORMAT

    return SANITATION_FORMAT.format(q=question)


def build_tasks(world: World, sizes: TaskSizes | None = None) -> tuple[dict[str, object], list[KnowledgeProbe]]:
    """All six tasks (name -> JSON-ready data) and the probes of the facts they rely on."""
    b = _Builder(world, sizes or TaskSizes())
    data = {
        "zsre": b.zsre(),
        "wiki_recent": b.wiki_recent(),
        "counterfact": b.counterfact(),
        "wikibio": b.wikibio(),
        "convsent": b.convsent(),
        "sanitation": b.sanitation(),
    }
    return data, b.probes


def dumps(data: object) -> str:
    """Stable JSON text: the same data always gives the same bytes."""
    return json.dumps(data, ensure_ascii=False, indent=1) + "\n"


def write_tasks(world: World, out_dir: str | Path, sizes: TaskSizes | None = None) -> dict[str, Path]:
    """Write the six task files and their training splits into ``out_dir`` under KnowEdit's file
    names; returns task (``task/train`` for a split) -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data, _ = build_tasks(world, sizes)
    paths = {}
    for task, records in data.items():
        path = out / TASK_FILES[task]
        path.write_text(dumps(records), encoding="utf-8")
        paths[task] = path
    for task, records in build_train_tasks(world).items():
        path = out / TRAIN_FILES[task]
        path.write_text(dumps(records), encoding="utf-8")
        paths[f"{task}/train"] = path
    return paths
