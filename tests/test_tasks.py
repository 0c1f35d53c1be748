"""KnowEdit task loaders on small hand-written files of every accepted format (no real data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from knowbench import registry
from knowbench.metric_protocol import MetricProtocol
from knowbench.records import Probe
from knowbench.task import DataNotFound, Task
from knowbench.tasks import knowedit as K
from knowbench.tasks.knowedit import TASKS, TaskDataError

STRIP = MetricProtocol.build(fixes=["strip_whitespace"])


def write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def consistent(report) -> None:
    """Every raw record is either loaded or counted as dropped, exactly once."""
    assert len(report.records) + report.n_dropped == report.n_raw
    dropped = {b.index for b in report.bad if b.record_dropped}
    assert dropped.isdisjoint({r.index for r in report.records})


def bad_map(report) -> dict[tuple[int, str | None], str]:
    return {(b.index, b.item): b.reason for b in report.bad}


# ---------------------------------------------------------------------------------------------
# the plugins


def test_entry_points_resolve_to_tasks():
    kinds = {"zsre": "qa", "wiki_recent": "qa", "counterfact": "qa", "wikibio": "wikibio",
             "convsent": "convsent", "sanitation": "sanitation"}
    for name, kind in kinds.items():
        task = registry.load(registry.TASK_GROUP, name)
        assert isinstance(task, Task)
        assert task is TASKS[name]
        assert (task.name, task.kind) == (name, kind)
        assert task.version and task.knowedit_name and task.description and "edit_succ" in task.metrics
        assert callable(task.reader)
    assert registry.load(registry.TASK_GROUP, "recent") is TASKS["wiki_recent"]
    assert set(TASKS) == set(kinds)


def test_default_files_put_the_test_split_first():
    assert TASKS["zsre"].default_files[0] == "ZsRE-test-all.json"
    assert TASKS["wiki_recent"].default_files[:2] == ("recent_test.json", "recent_train.json")
    assert TASKS["counterfact"].default_files[:2] == ("test_cf.json", "train_cf.json")
    assert TASKS["wikibio"].default_files[0] == "wikibio-test-all.json"
    assert TASKS["convsent"].default_files[0] == "blender_test.json"
    assert TASKS["sanitation"].default_files[:2] == ("trivia_qa_test.json", "trivia_qa_train.json")
    assert TASKS["zsre"].metrics == ("edit_succ", "rephrase", "portability", "locality", "fluency")


def test_import_does_not_pull_torch():
    code = "import sys, knowbench.tasks.knowedit; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# KnowEdit ZsRE


ZSRE_GOOD = {
    "subject": "Epaspidoceras",
    "target_new": " Noctuidae",
    "prompt": "Which family does Epaspidoceras belong to?",
    "ground_truth": ["Aspidoceratidae", "Aspido"],
    "rephrase_prompt": "What family are Epaspidoceras?",
    "cond": "x >> y",
    "portability": {
        "Reasoning": [{"prompt": "Common name of the family of Epaspidoceras?", "ground_truth": "Owlet moths"}],
        "Subject_Aliasing": [{"prompt": "Which family does Epa belong to?", "ground_truth": "Noctuidae"}],
    },
    "locality": {
        "Relation_Specificity": [
            {"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus", "g."]},
            {"prompt": "Epaspidoceras taxon rank", "ground_truth": ["genus"]},
        ]
    },
}


def zsre_rows() -> list:
    def rec(**kw):
        r = json.loads(json.dumps(ZSRE_GOOD))
        r.update(kw)
        return r

    return [
        rec(),  # 0 good
        rec(subject="Rio Grande 463", prompt="By which company, D&RGW 463 has been manufactured?"),  # 1
        "not a record",  # 2
        rec(target_new="  "),  # 3
        rec(ground_truth=7),  # 4 kept, ground_truth item skipped
        rec(portability={}, locality={}),  # 5 empty sections are fine
        rec(locality=[1, 2], portability={"Reasoning": [{"prompt": "q", "ground_truth": ""}, "x"]}),  # 6
        {k: v for k, v in ZSRE_GOOD.items() if k != "prompt"},  # 7
        rec(subject=None),  # 8
        rec(prompt=["Which family does Epaspidoceras belong to?"]),  # 9
        rec(rephrase_prompt=None, ground_truth=["Aspidoceratidae"]),  # 10
    ]


def test_zsre_knowedit_format(tmp_path):
    path = write(tmp_path, "ZsRE-test-all.json", zsre_rows())
    report = TASKS["zsre"].reader(path)
    consistent(report)
    assert report.format == "knowedit-zsre"
    assert report.n_raw == 11 and report.files == [path]
    assert [r.index for r in report.records] == [0, 4, 5, 6, 10]
    assert report.n_dropped == 6

    reasons = bad_map(report)
    assert reasons[(1, None)] == (
        "subject 'Rio Grande 463' does not occur in prompt 'By which company, D&RGW 463 has been manufactured?'"
    )
    assert reasons[(2, None)] == "record is a string, expected a JSON object"
    assert reasons[(3, None)] == "'target_new' is empty"
    assert reasons[(7, None)] == "no 'prompt'"
    assert "no 'subject'" in reasons[(8, None)] and "subject must occur in the prompt" in reasons[(8, None)]
    assert reasons[(9, None)] == "'prompt' is a list, expected a string"
    # item-level: the record stays, the item is named
    assert reasons[(4, "ground_truth")].startswith("answer is a number")
    assert reasons[(6, "locality")].startswith("is a list, expected an object")
    assert reasons[(6, "portability.Reasoning[0]")] == "answer is blank"
    assert reasons[(6, "portability.Reasoning[1]")].startswith("is a string, expected an object")
    assert len(report.bad) == 6 + 4
    assert all(not b.record_dropped for b in report.bad if b.item)

    r0 = report.records[0]
    assert r0.source == str(path)
    assert r0.prompt == "Which family does Epaspidoceras belong to?"
    assert r0.target_new == " Noctuidae"  # as in the file: the reference scores raw strings
    assert STRIP.prepare(r0).target_new == "Noctuidae"  # the strip_whitespace fix
    assert r0.subject == "Epaspidoceras"
    assert r0.ground_truth == "Aspidoceratidae"  # first alias
    assert r0.rephrase == ["What family are Epaspidoceras?"]
    assert r0.portability == {
        "Reasoning": [Probe("Common name of the family of Epaspidoceras?", "Owlet moths")],
        "Subject_Aliasing": [Probe("Which family does Epa belong to?", "Noctuidae")],
    }
    assert r0.locality == {
        "Relation_Specificity": [Probe("The taxon rank of Epaspidoceras is", "genus"),
                                 Probe("Epaspidoceras taxon rank", "genus")]
    }
    by_index = {r.index: r for r in report.records}
    assert by_index[4].ground_truth is None
    assert by_index[5].portability == {} and by_index[5].locality == {}
    assert by_index[6].locality == {} and by_index[6].portability == {}  # all items skipped: key left out
    assert by_index[10].rephrase == [] and by_index[10].ground_truth == "Aspidoceratidae"
    assert not [b for b in report.bad if b.index == 5]  # empty sections are not errors
    assert str(report.bad[0]) == (
        "ZsRE-test-all.json record 1: subject 'Rio Grande 463' does not occur in prompt "
        "'By which company, D&RGW 463 has been manufactured?' (record skipped)"
    )


def test_format_is_the_majority_of_records(tmp_path):
    rows = zsre_rows()[:1] * 3 + [dict(ZSRE_GOOD, ground_truth="Aspidoceratidae")]
    report = TASKS["zsre"].reader(write(tmp_path, "z.json", rows))
    assert report.format == "knowedit-zsre"
    assert [r.ground_truth for r in report.records] == ["Aspidoceratidae"] * 4


# ---------------------------------------------------------------------------------------------
# WikiData_counterfact and WikiData_recent


def test_counterfact_knowedit_format(tmp_path):
    rows = [
        {
            "subject": "Goursez Vreizh",
            "prompt": "The country of Goursez Vreizh is",
            "target_new": "Franche-Comté",
            "ground_truth": "France",
            "portability": {"Reasoning": [{"prompt": "The capital of that country is", "ground_truth": "Besançon"}]},
            "locality": {
                "Relation_Specificity": [{"prompt": "The founder of Goursez Vreizh is", "ground_truth": "Jean"}],
                "Forgetfulness": [{"prompt": "The country of Goursez Vreizh, not X, is", "ground_truth": ""},
                                  {"prompt": "The country of Goursez Vreizh, not Y, is", "ground_truth": "France"}],
            },
        },
        {"subject": "Gisenius", "prompt": "Gisenius follows", "target_new": "Steen", "ground_truth": "",
         "portability": {}, "locality": {}},
        {"subject": "A", "prompt": "B is", "target_new": "C", "ground_truth": "D"},
    ]
    report = TASKS["counterfact"].reader(write(tmp_path, "train_cf.json", rows))
    consistent(report)
    assert report.format == "knowedit-counterfact"
    assert [r.index for r in report.records] == [0, 1]
    r0, r1 = report.records
    assert r0.ground_truth == "France" and r0.rephrase == []
    assert r0.portability == {"Reasoning": [Probe("The capital of that country is", "Besançon")]}
    assert r0.locality == {
        "Relation_Specificity": [Probe("The founder of Goursez Vreizh is", "Jean")],
        "Forgetfulness": [Probe("The country of Goursez Vreizh, not Y, is", "France")],
    }
    assert r1.ground_truth is None
    assert bad_map(report) == {
        (0, "locality.Forgetfulness[0]"): "answer is blank",
        (1, "ground_truth"): "answer is blank; old answer left unset",
        (2, None): "subject 'A' does not occur in prompt 'B is'",
    }


def test_recent_format_skips_empty_answers_item_by_item(tmp_path):
    rows = [
        {
            "subject": "Ingrīda Amantova",
            "prompt": "The gender of Ingrīda Amantova is",
            "target_new": "female",
            "portability": {"Logical_Generalization": []},
            "locality": {
                "Relation_Specificity": [
                    {"prompt": "The birthplace of Ingrīda Amantova is", "ground_truth": [["Cēsis", "Cesis"], ["Riga"]]},
                    {"prompt": "The spouse of Ingrīda Amantova is", "ground_truth": [[]]},
                    {"prompt": "The award of Ingrīda Amantova is", "ground_truth": [[], ["Cross of Recognition"]]},
                    {"prompt": "The club of Ingrīda Amantova is", "ground_truth": [["  "]]},
                    {"prompt": "The alma mater of Ingrīda Amantova is", "ground_truth": [["University of Latvia"], []]},
                ],
                "Forgetfulness": [{"prompt": "The sibling of Ingrīda Amantova is", "ground_truth": [[]]}],
            },
        },
        {"subject": "X", "prompt": "X plays", "target_new": "chess", "portability": {}, "locality": {}},
        {"subject": "Y", "prompt": "Y plays", "target_new": "go", "portability": {
            "Reasoning": [{"prompt": "Y's game is from", "ground_truth": [["China"]]}]}, "locality": {}},
    ]
    report = TASKS["wiki_recent"].reader(write(tmp_path, "recent_train.json", rows))
    consistent(report)
    assert report.format == "knowedit-recent"
    assert [r.index for r in report.records] == [0, 1, 2] and report.n_dropped == 0
    r0 = report.records[0]
    assert r0.ground_truth is None
    assert r0.portability == {}
    assert r0.locality == {
        "Relation_Specificity": [Probe("The birthplace of Ingrīda Amantova is", "Cēsis"),
                                 Probe("The alma mater of Ingrīda Amantova is", "University of Latvia")]
    }  # Forgetfulness lost its only item and is left out
    assert report.records[2].portability == {"Reasoning": [Probe("Y's game is from", "China")]}
    assert bad_map(report) == {
        (0, "locality.Relation_Specificity[1]"): "first answer has no alias ([[]])",
        (0, "locality.Relation_Specificity[2]"): 'first answer has no alias ([[], ["Cross of Recognition"]])',
        (0, "locality.Relation_Specificity[3]"): "answer is blank",
        (0, "locality.Forgetfulness[0]"): "first answer has no alias ([[]])",
    }
    assert all(not b.record_dropped for b in report.bad)
    assert str(report.bad[0]) == (
        "recent_train.json record 0 locality.Relation_Specificity[1]: first answer has no alias ([[]]) (item skipped)"
    )


# ---------------------------------------------------------------------------------------------
# WikiBio


def test_wikibio_format(tmp_path):
    rows = [
        {"text": "This is a Wikipedia passage about rick mahler. Rick Mahler was a pitcher. ",
         "labels": "Mahler was drafted by the Braves.", "concept": "rick mahler",
         "locality": {"Relation_Specificity": [{"prompt": "The cause of death of rick mahler is",
                                                "ground_truth": ["myocardial infarction"]}]}},
        {"text": "A passage about someone else.", "labels": "More.", "concept": "rick mahler", "locality": {}},
        {"text": "About ann.", "labels": "", "concept": "ann"},
        {"text": "About bob.", "labels": "Bob sings.", "concept": "bob", "locality": None},
    ]
    report = TASKS["wikibio"].reader(write(tmp_path, "wikibio-test-all.json", rows))
    consistent(report)
    assert report.format == "knowedit-wikibio"
    assert [r.index for r in report.records] == [0, 3]
    r0 = report.records[0]
    assert r0.prompt == "This is a Wikipedia passage about rick mahler. Rick Mahler was a pitcher. "
    assert STRIP.prepare(r0).prompt == r0.prompt.strip()
    assert r0.target_new == "Mahler was drafted by the Braves." and r0.subject == "rick mahler"
    assert r0.locality == {"Relation_Specificity": [Probe("The cause of death of rick mahler is", "myocardial infarction")]}
    assert r0.portability == {} and r0.rephrase == [] and r0.ground_truth is None
    assert bad_map(report) == {
        (1, None): "subject 'rick mahler' does not occur in prompt 'A passage about someone else.'",
        (2, None): "'labels' is empty",
    }


# ---------------------------------------------------------------------------------------------
# older formats


def test_raw_zsre_format(tmp_path):
    rows = [
        {"subject": "IAAF Combined Events Challenge", "src": "When was the IAAF Combined Events Challenge founded?",
         "pred": "2011", "rephrase": "When was the IAAF Combined Events Challenge launched?", "alt": " 2006",
         "answers": ["1998", "98"], "loc": "nq question: who sang the song", "loc_ans": "The String",
         "portability": {"Recalled Relation": "(IAAF, event type, athletics)",
                         "New Question": "What sport is the IAAF Combined Events Challenge?", "New Answer": "Athletics"}},
        {"src": "When was Foo founded?", "alt": "1900", "answers": ["1800"], "rephrase": "Foo's founding?",
         "loc": "nq question: q", "loc_ans": "a"},
        {"subject": "Bar", "src": "Where is Bar?", "alt": "Paris", "answers": [], "rephrase": "",
         "loc": "nq question: q", "loc_ans": " "},
    ]
    report = TASKS["zsre"].reader(write(tmp_path, "zsre_mend_eval.json", rows))
    consistent(report)
    assert report.format == "raw-zsre"
    assert [r.index for r in report.records] == [0, 2]
    r0, r2 = report.records
    assert (r0.prompt, STRIP.prepare(r0).target_new, r0.ground_truth) == (
        "When was the IAAF Combined Events Challenge founded?", "2006", "1998")
    assert r0.rephrase == ["When was the IAAF Combined Events Challenge launched?"]
    assert r0.portability == {"Reasoning": [Probe("What sport is the IAAF Combined Events Challenge?", "Athletics")]}
    assert r0.locality == {"Relation_Specificity": [Probe("nq question: who sang the song", "The String")]}
    assert r2.ground_truth is None and r2.rephrase == [] and r2.locality == {}
    reasons = bad_map(report)
    assert reasons[(1, None)].startswith("no 'subject'") and "editors" in reasons[(1, None)]
    assert reasons[(2, "answers")] == "answer list is empty ([]); old answer left unset"
    assert reasons[(2, "rephrase")] == "is empty"
    assert reasons[(2, "loc")] == "answer is blank"
    assert len(report.bad) == 4


def test_mend_counterfact_format(tmp_path):
    rows = [
        {"case_id": 10, "prompt": "BBC One, by", "target_new": "Sega", "subject": "BBC One", "ground_truth": "BBC",
         "rephrase_prompt": "BBC One is owned by", "locality_prompt": "BBC Radio, by", "locality_ground_truth": "BBC"},
        {"case_id": 11, "prompt": "Danielle Darrieux's mother tongue is", "target_new": "English",
         "subject": "Danielle", "ground_truth": ["French"], "rephrase_prompt": ["a", 3],
         "locality_prompt": "Léon Blum's mother tongue is", "locality_ground_truth": "French"},
        {"case_id": 12, "prompt": "X is", "target_new": "Y", "subject": "Z", "ground_truth": "W",
         "rephrase_prompt": "", "locality_prompt": "", "locality_ground_truth": "Q"},
    ]
    report = TASKS["counterfact"].reader(write(tmp_path, "counterfact-val.json", rows))
    consistent(report)
    assert report.format == "mend-counterfact"
    assert [r.index for r in report.records] == [0, 1]
    r0, r1 = report.records
    assert (r0.subject, r0.ground_truth, r0.rephrase, r0.extra) == ("BBC One", "BBC", ["BBC One is owned by"], {"case_id": 10})
    assert r0.locality == {"Relation_Specificity": [Probe("BBC Radio, by", "BBC")]}
    assert r1.ground_truth == "French" and r1.rephrase == ["a"]
    assert bad_map(report) == {
        (1, "rephrase_prompt[1]"): "is a number, expected a string",
        (2, None): "subject 'Z' does not occur in prompt 'X is'",
    }


# ---------------------------------------------------------------------------------------------
# ConvSent


def convsent_rows() -> list:
    return [
        {"ent": "Estero", "pos": [" I like it. ", "Great."], "neg": [" I don't like it. "]},  # 0 -> pos
        {"ent": "Nobody", "pos": ["Nice."], "neg": []},  # 1 dropped: no neg reply
        {"ent": "The Wire", "pos": ["Best show."], "neg": ["  ", 5, "Boring."]},  # 2 -> pos, 2 items skipped
        {"ent": "The Wire", "pos": ["Still the best."], "neg": ["Overrated."]},  # 3 -> neg
        ["not", "a", "record"],  # 4 dropped
        {"ent": "Alejandro Otero", "pos": ["Talented."], "neg": ["Not a fan.", "Meh."]},  # 5 -> neg
    ]


def test_convsent_format(tmp_path):
    report = TASKS["convsent"].reader(write(tmp_path, "blender_test.json", convsent_rows()))
    consistent(report)
    assert report.format == "knowedit-convsent"
    assert [r.index for r in report.records] == [0, 2, 3, 5]
    assert bad_map(report) == {
        (1, None): "no usable 'neg' reply (both sentiments are needed to score an edit)",
        (2, "neg[0]"): "reply is blank",
        (2, "neg[1]"): "reply is a number, expected a string",
        (4, None): "record is a list, expected a JSON object",
    }
    r0, r2, r3, r5 = report.records
    # sentiment alternates with the file index: even -> pos, odd -> neg
    assert [r.extra["target_sentiment"] for r in report.records] == ["pos", "pos", "neg", "neg"]
    assert r0.prompt == "What do you think of Estero? Answer positively."
    assert r3.prompt == "What do you think of The Wire? Answer negatively."
    assert r0.subject == "Estero" and r0.subject in r0.prompt
    assert r0.target_new == " I like it. "  # raw; the strip_whitespace fix strips replies too
    r0 = STRIP.prepare(r0)
    assert r0.target_new == "I like it."
    assert r0.extra["target_replies"] == ["I like it.", "Great."]
    assert r0.extra["opposite_replies"] == ["I don't like it."]
    assert r3.target_new == "Overrated." and r3.extra["opposite_replies"] == ["Still the best."]
    assert r2.extra["opposite_replies"] == ["Boring."]
    # locality: the next kept record about another topic, wrapping around
    assert r0.extra["locality_topic"] == "The Wire"
    assert r0.extra["locality_replies"] == ["Best show.", "Boring."]
    assert r0.extra["locality_prompt"] == "What do you think of The Wire? Answer positively."
    assert r2.extra["locality_topic"] == "Alejandro Otero"  # skips record 3, same topic
    assert r3.extra["locality_topic"] == "Alejandro Otero"
    assert r5.extra["locality_topic"] == "Estero"
    assert STRIP.prepare(r5).extra["locality_replies"] == ["I like it.", "Great.", "I don't like it."]


def test_convsent_single_topic_has_no_locality(tmp_path):
    rows = [{"ent": "A", "pos": ["x"], "neg": ["y"]}, {"ent": "a", "pos": ["x"], "neg": ["y"]}]
    report = TASKS["convsent"].reader(write(tmp_path, "blender_val.json", rows))
    assert len(report.records) == 2 and report.n_dropped == 0
    assert all(r.extra["locality_topic"] is None and r.extra["locality_replies"] == [] for r in report.records)
    assert [(b.index, b.item, b.record_dropped) for b in report.bad] == [(0, "locality", False), (1, "locality", False)]


# ---------------------------------------------------------------------------------------------
# Sanitation


def test_sanitation_test_file(tmp_path):
    data = {
        "success": [
            {"question": "What type of creature is the currawong?", "ground_truth": "Birds", "target_new": "I don't know."},
            {"question": "Who wrote Hamlet?", "ground_truth": "Shakespeare"},
            {"question": "  ", "ground_truth": "x"},
            "oops",
            {"question": "Capital of France?", "ground_truth": ["Paris", "Paree"], "target_new": 3},
        ],
        "locality": [
            {"question": "What word means to drink?", "ground_truth": "Quaff"},
            {"question": "Paved with good intentions?", "ground_truth": ""},
            7,
            {"question": "Largest planet?", "ground_truth": ["Jupiter"]},
        ],
    }
    path = write(tmp_path, "trivia_qa_test.json", data)
    report = TASKS["sanitation"].reader(path)
    consistent(report)
    assert report.format == "knowedit-sanitation-test"
    assert report.n_raw == 5
    assert [r.index for r in report.records] == [0, 1]
    r0, r1 = report.records
    assert r0.prompt == "Question:What type of creature is the currawong?\nAnswer:"
    assert r0.target_new == r1.target_new == "I don't know."
    assert (r0.ground_truth, r0.subject) == ("Birds", None)
    assert r0.source == f"{path}#success" and r0.extra == {"sanitation_list": "success"}
    assert report.shared["locality"] == [
        Probe("Question:What word means to drink?\nAnswer:", "Quaff"),
        Probe("Question:Largest planet?\nAnswer:", "Jupiter"),
    ]
    assert report.shared["n_locality_raw"] == 4
    assert [(Path(b.source).name, b.index, b.item, b.record_dropped, b.reason) for b in report.bad] == [
        ("trivia_qa_test.json#success", 2, None, True, "'question' is empty"),
        ("trivia_qa_test.json#success", 3, None, True, "record is a string, expected a JSON object"),
        ("trivia_qa_test.json#success", 4, None, True, "'target_new' is a number, expected a string"),
        ("trivia_qa_test.json#locality", 1, "ground_truth", False, "answer is blank"),
        ("trivia_qa_test.json#locality", 2, "locality question", False, "record is a number, expected a JSON object"),
    ]


def test_sanitation_train_file(tmp_path):
    data = {
        "K_F": [{"question": "How can you govern a country which has 246 varieties of what?",
                 "subject": "a country which has 246 varieties", "ground_truth": "Cheese", "target_new": "I don't know."}],
        "K_R": [{"question": "Which year was the Year of Victories?", "ground_truth": "1759", "target_new": "1759"}],
    }
    report = TASKS["sanitation"].reader(write(tmp_path, "trivia_qa_train.json", data))
    assert report.format == "knowedit-sanitation-train"
    (r,) = report.records
    assert r.subject == "a country which has 246 varieties" and r.subject in r.prompt
    assert r.extra == {"sanitation_list": "K_F"} and r.source.endswith("trivia_qa_train.json#K_F")
    assert report.shared["locality"] == [Probe("Question:Which year was the Year of Victories?\nAnswer:", "1759")]
    assert report.bad == []


def test_sanitation_lists_must_be_lists(tmp_path):
    path = write(tmp_path, "trivia_qa_test.json", {"success": {"a": 1}, "locality": []})
    with pytest.raises(TaskDataError, match=r"trivia_qa_test\.json: 'success' is an object, expected a list"):
        TASKS["sanitation"].reader(path)


# ---------------------------------------------------------------------------------------------
# .jsonl, fatal errors, directories


def test_jsonl_keeps_indices_aligned(tmp_path):
    good = json.dumps(ZSRE_GOOD)
    path = tmp_path / "zsre.jsonl"
    path.write_text("\n".join([good, "", "{not json", good, "42"]) + "\n", encoding="utf-8")
    report = TASKS["zsre"].reader(path)
    consistent(report)
    assert report.format == "knowedit-zsre" and report.n_raw == 4
    assert [r.index for r in report.records] == [0, 2]
    assert bad_map(report) == {
        (1, None): "line 3 is not valid JSON (Expecting property name enclosed in double quotes)",
        (3, None): "record is a number, expected a JSON object",
    }


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.json", "{\"a\": [1, 2", r"bad\.json: not valid JSON .*expected a KnowEdit file"),
        ("num.json", "3", r"num\.json: top-level JSON is a number; expected a list of records"),
        ("empty.json", "[]", r"empty\.json: contains no records"),
        ("obj.json", "{\"data\": []}", r"obj\.json: a JSON object with keys 'data', which is no known KnowEdit layout"),
        ("ints.json", "[1, 2, 3]", r"ints\.json: no record matches a known format \(the first has a number\); expected knowedit-zsre"),
        ("keys.json", "[{\"question\": \"q\", \"answer\": \"a\"}]", r"keys\.json: no record matches .*\['answer', 'question'\]"),
        ("lines.jsonl", "{x\n{y\n", r"lines\.jsonl: no line is valid JSON"),
    ],
)
def test_unreadable_files_raise_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TaskDataError, match=message):
        TASKS["zsre"].reader(path)


def test_a_file_of_another_task_is_refused(tmp_path):
    path = write(tmp_path, "blender_test.json", convsent_rows())
    with pytest.raises(TaskDataError) as err:
        TASKS["zsre"].reader(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: looks like knowedit-convsent")
    assert "(task convsent reads it)" in msg and "task 'zsre' does not read" in msg and "raw-zsre" in msg
    cf = write(tmp_path, "train_cf.json", [dict(ZSRE_GOOD, ground_truth="x")])
    with pytest.raises(TaskDataError, match="looks like knowedit-counterfact .*task counterfact reads it"):
        TASKS["zsre"].reader(cf)


def test_load_resolves_a_directory_and_reports_missing_files(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "ZsRE-test-all.json", zsre_rows()[:1])
    report = TASKS["zsre"].load(tmp_path)
    assert report.files == [tmp_path / "sub" / "ZsRE-test-all.json"] and len(report.records) == 1
    with pytest.raises(DataNotFound, match="no WikiBio file"):
        TASKS["wikibio"].load(tmp_path)
    with pytest.raises(DataNotFound):
        TASKS["zsre"].reader(tmp_path / "missing.json")
    with pytest.raises(TaskDataError, match="is a directory"):
        TASKS["zsre"].reader(tmp_path)


def test_generic_read_detects_every_format(tmp_path):
    cases = {
        "knowedit-zsre": zsre_rows(),
        "knowedit-convsent": convsent_rows(),
        "knowedit-sanitation-train": {"K_F": [], "K_R": []},
        "knowedit-wikibio": [{"text": "about a", "labels": "b", "concept": "a"}],
    }
    for i, (fmt, data) in enumerate(cases.items()):
        assert K.read(write(tmp_path, f"f{i}.json", data)).format == fmt
