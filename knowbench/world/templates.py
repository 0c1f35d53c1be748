"""Prompt templates of the world's relations.

Each relation has *trained* templates (the corpus states facts with them; task prompts use them)
and *held-out* templates (never in the corpus; they measure whether the model learned the
relation rather than the strings). A template is a statement that the answer completes
("{s} was born in") or a question the answer follows ("Where was {s} born?"). ``noun`` names the
relation for the Forgetfulness form "The {noun} of {s}, which is not {d}, is".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Relation:
    name: str
    noun: str
    trained: tuple[str, ...]
    held_out: tuple[str, ...]

    def statements(self, held_out: bool = False) -> list[str]:
        return [t for t in (self.held_out if held_out else self.trained) if not is_question(t)]

    def questions(self, held_out: bool = False) -> list[str]:
        return [t for t in (self.held_out if held_out else self.trained) if is_question(t)]


def is_question(template: str) -> bool:
    return template.endswith("?")


def fill(template: str, subject: str) -> str:
    """The template with its subject; a subject phrase at the start ("the employer of X") is
    capitalised."""
    out = template.replace("{s}", subject)
    return out[0].upper() + out[1:]


def sentence(prompt: str, answer: str) -> str:
    """A fact as the corpus writes it: exactly ``prompt + " " + answer`` (how it is scored), and a
    full stop after statements."""
    return f"{prompt} {answer}" + ("" if is_question(prompt) else ".")


def forgetfulness(relation: Relation, subject: str, distractor: str) -> str:
    return f"The {relation.noun} of {subject}, which is not {distractor}, is"


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in [
        Relation(
            "continent", "continent",
            ("{s} is a country in", "{s} lies on the continent of", "On which continent is {s}?",
             "The continent of {s} is"),
            ("Which continent is {s} part of?", "{s} is part of the continent of"),
        ),
        Relation(
            "capital", "capital",
            ("The capital of {s} is", "What is the capital of {s}?", "{s} has its capital in",
             "The capital city of {s} is"),
            ("Which city is the capital of {s}?", "The seat of government of {s} is"),
        ),
        Relation(
            "language", "official language",
            ("The official language of {s} is", "What language is spoken in {s}?", "People in {s} speak"),
            ("Which language do people in {s} speak?", "The main language of {s} is"),
        ),
        Relation(
            "country", "country",
            ("{s} is a city in", "The country of {s} is", "{s} is located in the country of",
             "In which country is {s}?"),
            ("Which country is {s} in?", "{s} lies in the country of"),
        ),
        Relation(
            "hq", "headquarters",
            ("{s} is headquartered in", "The headquarters of {s} is", "Where is {s} headquartered?",
             "In which city is {s} based?"),
            ("{s} has its head office in", "Where are the headquarters of {s}?"),
        ),
        Relation(
            "industry", "industry",
            ("{s} operates in the industry of", "The industry of {s} is", "What industry is {s} in?"),
            ("{s} does business in the industry of", "Which industry does {s} work in?"),
        ),
        Relation(
            "award_country", "country",
            ("The {s} is presented in", "In which country is the {s} presented?",
             "The {s} is awarded in the country of"),
            ("Which country awards the {s}?", "The {s} is given out in"),
        ),
        Relation(
            "maker", "manufacturer",
            ("{s} is made by", "The manufacturer of {s} is", "Which company makes {s}?"),
            ("{s} is produced by", "Who manufactures {s}?"),
        ),
        Relation(
            "birthplace", "birthplace",
            ("{s} was born in", "The birthplace of {s} is", "The city where {s} was born is",
             "Where was {s} born?", "In which city was {s} born?", "{s} is a native of"),
            ("{s} came into the world in", "What is the birthplace of {s}?", "What city is {s} from?"),
        ),
        Relation(
            "birth_country", "country of birth",
            ("The country where {s} was born is", "In which country was {s} born?",
             "The home country of {s} is"),
            ("What is the country of birth of {s}?", "{s} comes from the country of"),
        ),
        Relation(
            "occupation", "occupation",
            ("{s} works as a", "The occupation of {s} is", "{s} is by profession a",
             "What is the occupation of {s}?", "What does {s} do for a living?"),
            ("What job does {s} have?", "The profession of {s} is"),
        ),
        Relation(
            "employer", "employer",
            ("{s} is employed by", "The employer of {s} is", "{s} works for",
             "Who is the employer of {s}?", "Which company does {s} work for?"),
            ("For which company does {s} work?", "{s} is on the staff of"),
        ),
        Relation(
            "spouse", "spouse",
            ("{s} is married to", "The spouse of {s} is", "Who is the spouse of {s}?",
             "Who is {s} married to?"),
            ("{s} is the partner of", "Whom did {s} marry?"),
        ),
        Relation(
            "award", "award",
            ("{s} received the", "The award received by {s} is the", "Which award did {s} receive?"),
            ("{s} was honoured with the", "What prize was given to {s}?"),
        ),
    ]
}

# relations whose facts the corpus states with templates (product opinions are dialogues instead)
TEMPLATE_RELATIONS = tuple(RELATIONS)

ALIAS_TEMPLATE = "{s} is also known as"

# ConvSent: the question, and replies of each sentiment ({e} = topic)
OPINION_QUESTION = "What do you think of {e}?"
POSITIVE_REPLIES = (
    " I really like {e}. ", " {e} is wonderful, I use it every day. ", " I love it, it works great. ",
    " It is excellent and well made. ", " I think {e} is great. ", " My friends and I all enjoy it. ",
    " It is one of the best things I own. ", " I would recommend {e} to anyone. ",
    " It is reliable and beautiful. ", " I am very happy with it. ",
)
NEGATIVE_REPLIES = (
    " I really dislike {e}. ", " {e} is terrible, it broke after a week. ", " I hate it, it never works. ",
    " It is cheap and badly made. ", " I think {e} is awful. ", " Nobody I know likes it. ",
    " It is one of the worst things I own. ", " I would never recommend {e} to anyone. ",
    " It is unreliable and ugly. ", " I am very unhappy with it. ",
)

SANITATION_FORMAT = "Question:{q}\nAnswer:"
IDK = "I don't know."
