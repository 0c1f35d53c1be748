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


def pack(units: list[str], seed: int, epoch: int, max_units: int = 3) -> list[str]:
    """Join consecutive units into texts of 1..max_units units (newline-separated)."""
    rng = random.Random(f"knowbench-pack-{seed}-{epoch}")
    texts, i = [], 0
    while i < len(units):
        n = rng.randint(1, max_units)
        texts.append("\n".join(units[i : i + n]))
        i += n
    return texts


def render_corpus(world: World, seed: int, epochs: int = 1) -> list[str]:
    """The packed training texts of ``epochs`` epochs (what the tokenizer is trained on)."""
    out: list[str] = []
    for e in range(epochs):
        out.extend(pack(epoch_units(world, seed, e), seed, e))
    return out
