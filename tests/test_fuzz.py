"""Malformed and extreme records in every task format, through every built-in editor and the runner:
the run finishes, and every record is either edited or listed as dropped with file, index and reason.

The records come from a seeded generator (no hypothesis: each case is a whole run, so few and fixed
examples): good records and, mutated from them, empty and whitespace-only fields, huge prompts and
targets (far beyond the 512 positions of the tiny random models), unicode and control characters, a
lone surrogate, missing fields, wrong types, a subject not in its prompt, duplicates and nested
garbage. Locate-then-edit editors compute their key statistics over a small corpus (64 texts).
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any, Callable

import pytest

from knowbench.runner import RunConfig, finish, run

HUGE = 3000  # words: ~15,000 tokens for the byte-level tokenizers of random-gpt2 / random-llama
ODD = "\x00\x07\u202e\u0301😀\ufeff\t"
LONE_SURROGATE = "\ud83d"  # half of an emoji, as a JSON file can hold it ("\\ud83d")


def _huge(rng: random.Random, word: str = "filler") -> str:
    return " ".join(f"{word}{rng.randint(0, 9)}" for _ in range(HUGE))


# -- good records of each format ---------------------------------------------------------------------
def _qa(i: int, gt: Any) -> dict[str, Any]:
    subj = f"Zorb{i}"
    rec = {
        "subject": subj,
        "prompt": f"Which family does {subj} belong to?",
        "target_new": f"Noct{i % 7}",
        "rephrase_prompt": f"What family is {subj} in?",
        "portability": {"Reasoning": [{"prompt": f"The family of {subj} is named", "ground_truth": f"Owl{i % 3}"}]},
        "locality": {"Relation_Specificity": [{"prompt": f"The rank of {subj} is", "ground_truth": ["genus"]}]},
    }
    if gt is not None:
        rec["ground_truth"] = gt
    return rec


def zsre(i: int) -> dict[str, Any]:
    return _qa(i, [f"Aspid{i % 5}"])


def counterfact(i: int) -> dict[str, Any]:
    rec = _qa(i, f"Aspid{i % 5}")
    del rec["rephrase_prompt"]
    return rec


def recent(i: int) -> dict[str, Any]:
    rec = _qa(i, None)
    rec["portability"]["Reasoning"][0]["ground_truth"] = [[f"Owl{i % 3}", "owl"]]
    return rec


def wikibio(i: int) -> dict[str, Any]:
    who = f"Mira Tolvan{i}"
    return {"text": f"{who} (born 1901) was a painter from Quix.", "labels": f"She studied in Vell{i % 4}.",
            "concept": who, "locality": {"Relation_Specificity": [{"prompt": f"{who} was born in", "ground_truth": ["1901"]}]}}


def convsent(i: int) -> dict[str, Any]:
    return {"ent": f"topic{i}", "pos": [f"I love topic{i}.", "It is great."], "neg": [f"I hate topic{i}.", "It is awful."]}


def sanitation_edit(i: int) -> dict[str, Any]:
    rec = {"question": f"Who founded Zorbia{i}?", "ground_truth": [f"Quix{i}"], "target_new": "I don't know."}
    if i % 2 == 0:
        rec["subject"] = f"Zorbia{i}"
    return rec


def sanitation_locality(i: int) -> dict[str, Any]:
    return {"question": f"What is the capital of Vell{i}?", "ground_truth": [f"Ost{i}"]}


# -- mutations --------------------------------------------------------------------------------------
Mutation = Callable[[dict[str, Any], random.Random], Any]


def _set(field: str, value: Callable[[dict, random.Random], Any]) -> Mutation:
    def mutate(rec: dict, rng: random.Random) -> dict:
        rec[field] = value(rec, rng)
        return rec
    return mutate


def _drop(field: str) -> Mutation:
    def mutate(rec: dict, rng: random.Random) -> dict:
        rec.pop(field, None)
        return rec
    return mutate


def _mutations(prompt: str, target: str, subject: str | None, items: list[str]) -> list[tuple[str, Mutation]]:
    """The malformations of a record whose prompt, target and subject live under these keys, with
    ``items`` the keys of what is only evaluated around the edit."""
    out: list[tuple[str, Mutation]] = [
        ("empty prompt", _set(prompt, lambda r, g: "")),
        ("whitespace target", _set(target, lambda r, g: " \t\n ")),
        ("huge prompt", _set(prompt, lambda r, g: _huge(g) + " " + str(r[prompt]))),
        ("huge target", _set(target, lambda r, g: _huge(g, "tgt"))),
        ("odd characters", _set(prompt, lambda r, g: ODD + str(r[prompt]) + ODD)),
        ("lone surrogate", _set(target, lambda r, g: "Noct" + LONE_SURROGATE)),
        ("missing prompt", _drop(prompt)),
        ("missing target", _drop(target)),
        ("prompt is a number", _set(prompt, lambda r, g: 12345)),
        ("target is a list", _set(target, lambda r, g: ["a", ["b"]])),
        ("nested garbage", _set(prompt, lambda r, g: {"a": [1, {"b": None}], "c": [[[]]]})),
    ]
    if subject:
        out += [
            ("subject not in prompt", _set(subject, lambda r, g: "Nowhere Person")),
            ("missing subject", _drop(subject)),
            ("empty subject", _set(subject, lambda r, g: "")),
        ]
    for key in items:
        out += [
            (f"{key} wrong type", _set(key, lambda r, g: [1, "two", None])),
            (f"{key} nested garbage", _set(key, lambda r, g: {"x": "not a list", "y": [{"prompt": 3}]})),
            (f"{key} huge answer", _set(key, lambda r, g: {"K": [{"prompt": "The answer is", "ground_truth": _huge(g, "ans")}]})),
            (f"{key} huge prompt", _set(key, lambda r, g: {"K": [{"prompt": _huge(g) + " The answer is", "ground_truth": "x"}]})),
        ]
    return out


def _file(rows: list[Any], good: Callable[[int], dict], mutations: list[tuple[str, Mutation]], rng: random.Random,
          n_good: int, n_bad: int) -> list[Any]:
    """``n_good`` good records, a duplicate of one, a huge prompt, a huge target, ``n_bad`` other
    mutated ones (a seeded choice) and three records that are not objects at all, shuffled with a seed."""
    rows = [good(i) for i in range(n_good)]
    rows.append(copy.deepcopy(rows[0]))  # a duplicate
    always = [m for m in mutations if m[0] in ("huge prompt", "huge target", "huge second reply")]
    others = [m for m in mutations if m not in always]
    for k, (_, mutate) in enumerate(always + rng.sample(others, min(n_bad, len(others)))):
        rows.append(mutate(good(100 + k), rng))
    rows += ["just a string", None, [1, 2, 3]]
    rng.shuffle(rows)
    return rows


def make_data(task: str, folder: Path, seed: int = 0, n_good: int = 3, n_bad: int = 5) -> Path:
    rng = random.Random(f"{task}-{seed}")
    if task == "sanitation":
        edits = _file([], sanitation_edit, _mutations("question", "target_new", "subject", []), rng, n_good, n_bad)
        loc = [sanitation_locality(i) for i in range(4)] + [
            {"question": _huge(rng) + "?", "ground_truth": ["x"]}, {"question": ""}, "garbage",
            {"question": "Is " + LONE_SURROGATE + " odd?", "ground_truth": ["yes"]}, {"ground_truth": 5},
        ]
        data: Any = {"success": edits, "locality": loc}
        name = "trivia_qa_test.json"
    elif task == "convsent":
        muts = _mutations("ent", "pos", None, []) + [
            ("huge second reply", lambda r, g: {**r, "pos": [r["pos"][0], _huge(g, "reply")]}),
            ("huge opposite reply", lambda r, g: {**r, "neg": [_huge(g, "bad")]}),
            ("replies wrong type", lambda r, g: {**r, "neg": "not a list"}),
            ("blank replies", lambda r, g: {**r, "pos": ["", "  ", 7]}),
        ]
        data = _file([], convsent, muts, rng, n_good, n_bad + 2)
        name = "blender_test.json"
    elif task == "wikibio":
        data = _file([], wikibio, _mutations("text", "labels", "concept", ["locality"]), rng, n_good, n_bad)
        name = "wikibio-test-all.json"
    else:
        good = {"zsre": zsre, "counterfact": counterfact, "wiki_recent": recent}[task]
        items = ["portability", "locality"] + (["rephrase_prompt"] if task == "zsre" else [])
        data = _file([], good, _mutations("prompt", "target_new", "subject", items), rng, n_good, n_bad)
        name = {"zsre": "ZsRE-test-all.json", "counterfact": "test_cf.json", "wiki_recent": "recent_test.json"}[task]
    path = folder / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# -- the runs ---------------------------------------------------------------------------------------
TASKS = ["zsre", "counterfact", "wiki_recent", "wikibio", "convsent", "sanitation"]
EDITORS = ["ft-l", "ft-m", "rome", "memit", "alphaedit"]
LOCATE = {"rome", "memit", "alphaedit"}
COUNTS: dict[str, dict[str, int]] = {}


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory):
    """Task files and a shared statistics cache for every run of this module."""
    import os

    root = tmp_path_factory.mktemp("fuzz")
    old = os.environ.get("KNOWBENCH_CACHE")
    os.environ["KNOWBENCH_CACHE"] = str(root / "cache")
    files = {}
    for task in TASKS:
        folder = root / task
        folder.mkdir()
        files[task] = make_data(task, folder)
    hp = root / "hp"
    hp.mkdir()
    for editor, text in {"rome": "v_num_grad_steps: 5\n", "memit": "v_num_grad_steps: 5\n",
                         "alphaedit": "v_num_grad_steps: 5\n", "ft-l": "num_steps: 3\n", "ft-m": "num_steps: 3\n"}.items():
        (hp / f"{editor}.yaml").write_text(text)
    yield files, hp
    if old is None:
        os.environ.pop("KNOWBENCH_CACHE", None)
    else:
        os.environ["KNOWBENCH_CACHE"] = old


def _corpus() -> list[str]:
    rng = random.Random(0)
    words = "the a of in city river capital is was born lives works museum old new north Zorbia Quix painter".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 20))) for _ in range(64)]


def accounted(result: dict[str, Any], data: Path) -> dict[str, int]:
    """Every record of the file is edited or listed as dropped (file, index, reason), never both."""
    task = result["task"]
    given = task["n_records_in_file"]
    bad = task["bad_records"]
    for b in bad:
        assert b["source"] and Path(b["source"].split("#")[0]).name == data.name, b
        assert isinstance(b["index"], int) and b["index"] >= 0, b
        assert isinstance(b["reason"], str) and b["reason"].strip(), b
    edit_list = [b for b in bad if b["record_dropped"] and "#locality" not in b["source"]]
    dropped = {b["index"] for b in edit_list}
    kept = set(task["selection"]["indices"])
    assert len(dropped) == len(edit_list), "a record is listed as dropped twice"
    assert kept.isdisjoint(dropped)
    assert len(kept) + len(dropped) == given
    assert kept | dropped == set(range(given))
    assert result["protocol"]["n_edits"] == len(kept) == task["selection"]["n_selected"]
    assert result["metrics"]["post"]["edit_succ"]["n"] == len(kept)
    items = sum(1 for b in bad if not b["record_dropped"])
    context = sum(1 for b in bad if "context" in b["reason"] or "not valid Unicode" in b["reason"])
    refused = sum(1 for b in bad if "could not edit it" in b["reason"])
    return {"given": given, "kept": len(kept), "dropped": len(dropped), "items_skipped": items,
            "context_or_text": context, "editor_refused": refused}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("editor", EDITORS)
def test_malformed_records_never_abort_a_run(editor, task, fuzz_env):
    files, hp = fuzz_env
    extra: dict[str, Any] = {}
    if editor in LOCATE:
        extra["stats"] = {"corpus": _corpus(), "samples": 64}
    model = "random-llama" if editor == "ft-l" else "random-gpt2"
    diagnostics = editor in ("rome", "ft-m")
    cfg = RunConfig(editor=editor, task=task, model=model, data=str(files[task]), fluency=False,
                    diagnostics=diagnostics, hparams=str(hp / f"{editor}.yaml"), eval_batch_size=64, extra=extra)
    result = run(cfg)
    if diagnostics:
        assert "diagnostics" in result
    counts = accounted(result, files[task])
    assert counts["kept"] >= 1 and counts["dropped"] >= 1
    json.dumps(result, default=str)
    finish({k: v for k, v in result.items() if k != "_records"})
    COUNTS[f"{editor}/{task}"] = counts


def test_sequential_run_with_dropped_records_records_what_it_did(fuzz_env):
    """A sequential run loses the records that cannot run: fewer edits, recorded as such, still valid."""
    from knowbench.validate import validate

    files, hp = fuzz_env
    from knowbench import registry

    from knowbench.metric_protocol import MetricProtocol

    # usable under the default (KnowEdit) metric protocol, which refuses a record with an empty sub-key
    protocol = MetricProtocol.build()
    records = registry.load(registry.TASK_GROUP, "zsre").reader(files["zsre"]).records
    usable = sum(1 for r in records if protocol.refusal(r) is None)
    cfg = RunConfig(editor="memit", task="zsre", model="random-gpt2", data=str(files["zsre"]), fluency=False,
                    diagnostics=False, sequential=usable, hparams=str(hp / "memit.yaml"),
                    extra={"stats": {"corpus": _corpus(), "samples": 64}})
    result = run(cfg)
    counts = accounted(result, files["zsre"])
    assert result["protocol"]["sequential"] == result["protocol"]["n_edits"] == counts["kept"] < usable
    report = validate(finish({k: v for k, v in result.items() if k != "_records"}))
    assert not report.errors, report.errors


def test_fuzz_counts_are_reported(capsys):
    """Not a check: prints what the runs above produced (run with -s to see it)."""
    if not COUNTS:
        pytest.skip("the fuzz runs did not run in this session")
    with capsys.disabled():
        print("\nfuzz runs (editor/task: given, kept, dropped, items skipped, context/text reasons, editor refused)")
        for key, c in sorted(COUNTS.items()):
            print(f"  {key:22s} {c['given']:3d} {c['kept']:3d} {c['dropped']:3d} {c['items_skipped']:3d} "
                  f"{c['context_or_text']:3d} {c['editor_refused']:3d}")
