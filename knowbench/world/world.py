"""A synthetic world of fictional facts, generated deterministically from a seed.

The world is a small knowledge graph: continents, countries (capital, continent, language),
cities (country), organisations (headquarters city, industry), awards (country), products
(manufacturer, public opinion) and people (birthplace, occupation, employer; some have a spouse,
an award, or an alias). Every name is made of invented syllables, so no fact leaks in from the
real world and a small model can learn all of them from a corpus rendered from the world.

A *fact* is (subject, relation, object). Relations carry prompt templates (``templates.py``);
the tasks (``tasks.py``) and the training corpus (``corpus.py``) are both rendered from here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

OCCUPATIONS = [
    "painter", "baker", "sculptor", "surgeon", "pilot", "lawyer", "chemist", "poet", "tailor",
    "farmer", "banker", "dancer", "nurse", "teacher", "carpenter", "singer", "novelist",
    "botanist", "geologist", "jeweller", "sailor", "potter", "violinist", "photographer",
    "librarian", "veterinarian", "mathematician", "journalist", "diplomat", "cartographer",
]
INDUSTRIES = [
    "shipping", "mining", "textiles", "publishing", "banking", "farming", "software", "glassware",
    "pharmaceuticals", "railways", "furniture", "perfume", "shipbuilding", "brewing", "clockmaking",
]
ORG_SUFFIXES = ["Industries", "Group", "Works", "Labs", "Holdings", "Company", "Foundry", "Trading"]
AWARD_SUFFIXES = ["Prize", "Medal", "Award", "Cup"]
PRODUCT_KINDS = ["lamp", "phone", "bicycle", "kettle", "camera", "watch", "radio", "guitar"]

# syllables for invented names: consonant onsets, vowel nuclei, optional codas
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
           "kr", "tr", "st", "th", "sh", "ch", "pl", "fl", "vr", "sk"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ya"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "k", "th", "nd", "rk"]


@dataclass
class Entity:
    name: str
    kind: str  # continent, country, city, org, award, product, person
    attrs: dict[str, str] = field(default_factory=dict)  # relation -> object name
    aliases: list[str] = field(default_factory=list)  # other names the corpus uses for it
    pronoun: str = "it"  # "he" / "she" for people (biographies)


@dataclass
class Fact:
    subject: str
    relation: str
    object: str


@dataclass
class World:
    seed: int
    entities: dict[str, Entity]  # by name
    by_kind: dict[str, list[str]]  # kind -> names in generation order

    def get(self, name: str) -> Entity:
        return self.entities[name]

    def names(self, kind: str) -> list[str]:
        return self.by_kind[kind]

    def obj(self, subject: str, relation: str) -> str:
        return self.entities[subject].attrs[relation]

    def facts(self) -> list[Fact]:
        """Every stored fact, in a fixed order (entity generation order, then relation order)."""
        out = []
        for kind in KINDS:
            for name in self.by_kind[kind]:
                for rel, obj in self.entities[name].attrs.items():
                    out.append(Fact(name, rel, obj))
        return out

    def range_of(self, relation: str) -> list[str]:
        """The objects a relation can take (for counterfactual targets and distractors)."""
        return list(RELATION_RANGE[relation](self))

    def alias_facts(self) -> list[Fact]:
        """The facts of aliased subjects restated under the alias (the corpus teaches both)."""
        out = []
        for kind in KINDS:
            for name in self.by_kind[kind]:
                ent = self.entities[name]
                for alias in ent.aliases:
                    for rel in ALIASED_RELATIONS.get(kind, ()):
                        if rel in ent.attrs:
                            out.append(Fact(alias, rel, ent.attrs[rel]))
        return out


KINDS = ("continent", "country", "city", "org", "award", "product", "person")
ALIASED_RELATIONS = {
    "person": ("birthplace", "occupation", "employer"),
    "country": ("capital", "continent"),
}

RELATION_RANGE = {
    "continent": lambda w: w.names("continent"),
    "capital": lambda w: w.names("city"),
    "language": lambda w: sorted({w.obj(c, "language") for c in w.names("country")}),
    "country": lambda w: w.names("country"),
    "hq": lambda w: w.names("city"),
    "industry": lambda w: INDUSTRIES,
    "award_country": lambda w: w.names("country"),
    "maker": lambda w: w.names("org"),
    "opinion": lambda w: ["good", "bad"],
    "birthplace": lambda w: w.names("city"),
    "birth_country": lambda w: w.names("country"),
    "occupation": lambda w: OCCUPATIONS,
    "employer": lambda w: w.names("org"),
    "spouse": lambda w: w.names("person"),
    "award": lambda w: w.names("award"),
}


@dataclass
class WorldSizes:
    continents: int = 5
    countries: int = 20
    cities_per_country: int = 5
    orgs: int = 80
    awards: int = 20
    products: int = 260
    people: int = 1100
    married_fraction: float = 0.5
    award_fraction: float = 0.3
    alias_fraction: float = 0.12


class _Namer:
    """Invented names, unique across the whole world."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: tuple[int, int] = (2, 3), max_len: int = 9) -> str:
        while True:
            n = self.rng.randint(*syllables)
            parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n)]
            parts[-1] += self.rng.choice(_CODAS)
            w = "".join(parts).capitalize()
            if len(w) <= max_len and w not in self.used and w.lower() not in _RESERVED:
                self.used.add(w)
                return w


# words that must not be invented names (template words, answers)
_RESERVED = set(
    "the is of in a an and was born works as for by to who what which where city country company "
    "capital also known married spouse award prize medal gold good bad".split()
) | set(OCCUPATIONS) | set(INDUSTRIES)


def generate(seed: int = 0, sizes: WorldSizes | None = None) -> World:
    """Build the world; the same seed (and sizes) always gives the same world."""
    sizes = sizes or WorldSizes()
    rng = random.Random(seed)
    namer = _Namer(rng)
    ents: dict[str, Entity] = {}
    by_kind: dict[str, list[str]] = {k: [] for k in KINDS}

    def add(name: str, kind: str, **attrs: str) -> Entity:
        ent = Entity(name, kind, dict(attrs))
        ents[name] = ent
        by_kind[kind].append(name)
        return ent

    for _ in range(sizes.continents):
        add(namer.word((2, 3)), "continent")
    languages = set()
    for i in range(sizes.countries):
        country = add(namer.word((2, 3)), "country")
        country.attrs["continent"] = by_kind["continent"][i % sizes.continents]
        lang = country.name + rng.choice(["ish", "ese", "ic", "an"])
        while lang in languages:  # keep languages distinct
            lang = country.name + "i"
        languages.add(lang)
        namer.used.add(lang)
        country.attrs["language"] = lang
        cities = [add(namer.word((1, 3)), "city", country=country.name) for _ in range(sizes.cities_per_country)]
        # attribute order matters for World.facts(): capital first then continent/language
        country.attrs = {"capital": cities[0].name, **country.attrs}
    # country aliases: "the Republic of X" style long forms
    for name in by_kind["country"]:
        ents[name].aliases.append(f"the {rng.choice(['Republic', 'Kingdom', 'Union', 'Federation'])} of {name}")

    cities = by_kind["city"]
    for _ in range(sizes.orgs):
        name = f"{namer.word((2, 2))} {rng.choice(ORG_SUFFIXES)}"
        add(name, "org", hq=rng.choice(cities), industry=rng.choice(INDUSTRIES))
    for _ in range(sizes.awards):
        name = f"{namer.word((2, 2))} {rng.choice(AWARD_SUFFIXES)}"
        add(name, "award", award_country=rng.choice(by_kind["country"]))
    for i in range(sizes.products):
        add(namer.word((2, 3)), "product", maker=rng.choice(by_kind["org"]), opinion="good" if i % 2 == 0 else "bad")

    # people: a shared pool of first names, unique surnames
    first_names = [namer.word((1, 2), max_len=6) for _ in range(90)]
    for _ in range(sizes.people):
        full = f"{rng.choice(first_names)} {namer.word((2, 3))}"
        birthplace = rng.choice(cities)
        add(
            full, "person",
            birthplace=birthplace,
            birth_country=ents[birthplace].attrs["country"],
            occupation=rng.choice(OCCUPATIONS),
            employer=rng.choice(by_kind["org"]),
        )
        ents[full].pronoun = rng.choice(["he", "she"])
    people = list(by_kind["person"])
    order = people[:]
    rng.shuffle(order)
    n_married = int(sizes.married_fraction * len(people)) // 2 * 2
    for a, b in zip(order[:n_married:2], order[1:n_married:2]):
        ents[a].attrs["spouse"] = b
        ents[b].attrs["spouse"] = a
    rng.shuffle(order)
    for name in order[: int(sizes.award_fraction * len(people))]:
        ents[name].attrs["award"] = rng.choice(by_kind["award"])
    rng.shuffle(order)
    for name in order[: int(sizes.alias_fraction * len(people))]:
        alias = namer.word((2, 3))
        ents[name].aliases.append(alias)
    return World(seed=seed, entities=ents, by_kind=by_kind)
