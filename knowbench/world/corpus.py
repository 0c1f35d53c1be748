"""The training corpus rendered from the world.

One *epoch* states every fact once, each time with a trained template drawn from the epoch's own
random stream (``random.Random(f"{seed}-{epoch}")``), so over many epochs the model sees every fact
in every trained phrasing and the data order is a pure function of the seed. Besides plain facts an
epoch holds: the same question facts in the Sanitation format ("Question:...\\nAnswer: ..."),
aliases ("X is also known as Y") and the facts restated under the alias, Forgetfulness sentences
("The occupation of X, which is not Y, is Z."), short biographies (several facts of one person after
"This is a Wikipedia passage about X."), and opinions about products (ConvSent dialogues).

Facts are packed one to three to a text so that each fact is seen both at the start of a text (as
it is scored) and after unrelated context (as editors that prefix prompts see it). Held-out
templates never appear.

In-context updates (``icl_documents``): a model trained only on fact statements cannot copy a fact
from its prompt, and then in-context editors (ICE, IKE, SERAC's counterfactual model) measure
nothing. So the build's second stage adds to each epoch documents that state an update and then use it, in the layout
the in-context editors use — blocks of ``New Fact: {prompt} {new object}`` and ``Prompt: {query}
{answer}`` separated by a blank line, the last block preceded by 0-3 others (IKE's demonstrations).
A block's query asks the updated fact again (copy), asks it in another phrasing (update: the answer
is the new object, not the stored one), or asks another fact (retain: the stored answer, about the
same subject or another one). The updates are drawn afresh every epoch from facts that no test file
edits, with random new objects, so the model learns to read updates rather than learning them.
"""

from __future__ import annotations

import random

from .templates import (
    ALIAS_TEMPLATE,
    NEGATIVE_REPLIES,
    OPINION_QUESTION,
    POSITIVE_REPLIES,
    RELATIONS,
    SANITATION_FORMAT,
    fill,
    forgetfulness,
    is_question,
    sentence,
)
from .world import World

FORGET_RELATIONS = ("birthplace", "occupation", "employer", "spouse")
BIO_RELATIONS = ("birthplace", "birth_country", "occupation", "employer", "spouse", "award")


def fact_sentence(rng: random.Random, subject: str, relation: str, answer: str, qa_prob: float = 0.25) -> str:
    template = rng.choice(RELATIONS[relation].trained)
    prompt = fill(template, subject)
    if is_question(template) and rng.random() < qa_prob:
        return SANITATION_FORMAT.format(q=prompt) + " " + answer
    return sentence(prompt, answer)


def epoch_units(world: World, seed: int, epoch: int, bio_fraction: float = 0.25, forget_prob: float = 0.3) -> list[str]:
    """The texts of one epoch, before packing, in a seeded shuffled order."""
    rng = random.Random(f"knowbench-corpus-{seed}-{epoch}")
    units: list[str] = []
    for f in world.facts():
        if f.relation == "opinion":
            continue
        units.append(fact_sentence(rng, f.subject, f.relation, f.object))
    for f in world.alias_facts():
        units.append(fact_sentence(rng, f.subject, f.relation, f.object))
    for kind in ("person", "country"):
        for name in world.names(kind):
            for alias in world.get(name).aliases:
                units.append(sentence(fill(ALIAS_TEMPLATE, name), alias))
    for name in world.names("person"):
        ent = world.get(name)
        for rel in FORGET_RELATIONS:
            if rel in ent.attrs and rng.random() < forget_prob:
                rng_range = world.range_of(rel)
                d = rng.choice(rng_range)
                while d in (ent.attrs[rel], name):
                    d = rng.choice(rng_range)
                units.append(sentence(forgetfulness(RELATIONS[rel], name, d), ent.attrs[rel]))
        if rng.random() < bio_fraction:
            rels = [r for r in BIO_RELATIONS if r in ent.attrs]
            rng.shuffle(rels)
            parts = [f"This is a Wikipedia passage about {name}."]
            for rel in rels[: rng.randint(2, 4)]:
                t = rng.choice(RELATIONS[rel].statements())
                parts.append(sentence(fill(t, name), ent.attrs[rel]))
            units.append(" ".join(parts))
    for name in world.names("product"):
        replies = POSITIVE_REPLIES if world.obj(name, "opinion") == "good" else NEGATIVE_REPLIES
        units.append(OPINION_QUESTION.format(e=name) + rng.choice(replies).replace("{e}", name).rstrip())
    rng.shuffle(units)
    return units


ICL_RELATIONS = ("birthplace", "occupation", "employer", "spouse", "award")
ICL_KINDS = (("copy", 0.45), ("update", 0.35), ("retain", 0.2))


def icl_block(rng: random.Random, world: World, subject: str, relation: str, new: str, kind: str) -> str:
    """One ``New Fact: ... / Prompt: ... answer`` block of the given kind."""
    rel = RELATIONS[relation]
    fact_t = rng.choice(rel.trained)
    fact = f"New Fact: {fill(fact_t, subject)} {new}"
    if kind == "copy":
        query, answer = fill(fact_t, subject), new
    elif kind == "update":
        others = [t for t in rel.trained if t != fact_t]
        query, answer = fill(rng.choice(others), subject), new
    else:
        ent = world.get(subject)
        others = [r for r in ICL_RELATIONS + ("birth_country",) if r in ent.attrs and r != relation]
        if others and rng.random() < 0.6:  # another fact of the same subject keeps its answer
            r2, s2 = rng.choice(others), subject
        else:  # a fact of someone else
            s2 = rng.choice(world.names("person"))
            r2 = rng.choice([r for r in ICL_RELATIONS if r in world.get(s2).attrs])
        query, answer = fill(rng.choice(RELATIONS[r2].trained), s2), world.obj(s2, r2)
    return f"{fact}\nPrompt: {query} {answer}"


def icl_documents(world: World, seed: int, epoch: int, excluded: set[tuple[str, str]], n_docs: int = 1200,
                  max_demos: int = 3) -> list[str]:
    """``n_docs`` in-context update documents of one epoch (see the module docstring); no update
    touches a (subject, relation) in ``excluded`` (the test files' edits)."""
    rng = random.Random(f"knowbench-icl-{seed}-{epoch}")
    pool = [(f.subject, f.relation) for f in world.facts()
            if f.relation in ICL_RELATIONS and (f.subject, f.relation) not in excluded]
    kinds, weights = zip(*ICL_KINDS)
    docs = []
    for _ in range(n_docs):
        blocks = []
        for _ in range(rng.randint(0, max_demos) + 1):
            subject, relation = rng.choice(pool)
            orig = world.obj(subject, relation)
            new = rng.choice([o for o in world.range_of(relation) if o not in (orig, subject)])
            blocks.append(icl_block(rng, world, subject, relation, new, rng.choices(kinds, weights)[0]))
        docs.append("\n\n".join(blocks))
    return docs


def test_edits(world: World) -> set[tuple[str, str]]:
    """The (subject, relation) pairs the world's test files edit (never updated in the corpus)."""
    from .tasks import TaskSizes, _Builder

    b = _Builder(world, TaskSizes())
    b.zsre(), b.wiki_recent(), b.counterfact(), b.wikibio(), b.convsent(), b.sanitation()
    return b.edited


def epoch_texts(world: World, seed: int, epoch: int, excluded: set[tuple[str, str]] | None = None,
                icl_docs: int = 0, max_demos: int = 3) -> list[str]:
    """One epoch's training texts: the packed fact units, then the in-context update documents."""
    texts = pack(epoch_units(world, seed, epoch), seed, epoch)
    if icl_docs:
        excluded = test_edits(world) if excluded is None else excluded
        texts += icl_documents(world, seed, epoch, excluded, icl_docs, max_demos)
    return texts


def pack(units: list[str], seed: int, epoch: int, max_units: int = 3) -> list[str]:
    """Join consecutive units into texts of 1..max_units units (newline-separated)."""
    rng = random.Random(f"knowbench-pack-{seed}-{epoch}")
    texts, i = [], 0
    while i < len(units):
        n = rng.randint(1, max_units)
        texts.append("\n".join(units[i : i + n]))
        i += n
    return texts


def render_corpus(world: World, seed: int, epochs: int = 1, icl_docs: int = 0) -> list[str]:
    """The training texts of ``epochs`` epochs (what the tokenizer is trained on: the facts alone)."""
    excluded = test_edits(world) if icl_docs else set()
    out: list[str] = []
    for e in range(epochs):
        out.extend(epoch_texts(world, seed, e, excluded, icl_docs))
    return out
