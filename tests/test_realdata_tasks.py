"""KnowEdit task loaders on the real benchmark files (skipped when ../shared/data is absent)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from knowbench.tasks import knowedit as K
from knowbench.metric_protocol import MetricProtocol
from knowbench.tasks.knowedit import TASKS, TaskDataError

STRIP = MetricProtocol.build(fixes=["strip_whitespace"])

SHARED = Path(os.environ.get("KNOWBENCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared/data"))
DATA = SHARED / "knowedit"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"real KnowEdit data not found at {DATA}"),
]

# file -> (task, format, records in file, records loaded, records dropped, items skipped)
EXPECTED = {
    "ZsRE-test-all.json": ("zsre", "knowedit-zsre", 1301, 1301, 0, 0),
    "ZsRE-test-all-1304.json": ("zsre", "knowedit-zsre", 1304, 1301, 3, 0),
    "train_cf.json": ("counterfact", "knowedit-counterfact", 1428, 1428, 0, 3),
    "recent_train.json": ("wiki_recent", "knowedit-recent", 570, 570, 0, 9),
    "wikibio-test-all.json": ("wikibio", "knowedit-wikibio", 306, 306, 0, 0),
    "wikibio-train-all.json": ("wikibio", "knowedit-wikibio", 464, 464, 0, 0),
    "blender_test.json": ("convsent", "knowedit-convsent", 800, 800, 0, 0),
    "blender_val.json": ("convsent", "knowedit-convsent", 799, 799, 0, 0),
    "trivia_qa_test.json": ("sanitation", "knowedit-sanitation-test", 80, 80, 0, 0),
    "trivia_qa_train.json": ("sanitation", "knowedit-sanitation-train", 80, 80, 0, 0),
    "legacy/zsre_mend_eval_portability_gpt4.json": ("zsre", "raw-zsre", 1037, 1037, 0, 0),
    "legacy/counterfact-val.json": ("counterfact", "mend-counterfact", 1919, 1919, 0, 0),
}


def load(name: str):
    return TASKS[EXPECTED[name][0]].reader(DATA / name)


def test_every_real_file_is_covered():
    present = {str(p.relative_to(DATA)) for p in DATA.rglob("*.json")}
    assert present == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_file_loads(name):
    task, fmt, n_raw, n_records, n_dropped, n_items = EXPECTED[name]
    report = load(name)
    assert report.format == fmt
    assert (report.n_raw, len(report.records), report.n_dropped) == (n_raw, n_records, n_dropped)
    assert len(report.bad) - report.n_dropped == n_items
    assert len(report.records) + report.n_dropped == report.n_raw
    indices = [r.index for r in report.records]
    assert indices == sorted(set(indices))
    for r in report.records:
        assert r.prompt.strip() and r.target_new.strip()  # kept raw, never blank
        stripped = STRIP.prepare(r)
        assert stripped.prompt == r.prompt.strip() and stripped.target_new == r.target_new.strip()
        if TASKS[task].kind in ("qa", "wikibio", "convsent"):
            assert r.subject and r.subject in r.prompt
        for section in (r.portability, r.locality):
            assert all(probes and all(p.prompt and p.answer for p in probes) for probes in section.values())


def test_zsre_1304_drops_the_three_subject_mismatches():
    report = load("ZsRE-test-all-1304.json")
    assert [b.index for b in report.bad] == [396, 597, 676]
    assert all(b.record_dropped and "subject" in b.reason for b in report.bad)
    assert "'Raja Zarith Sofiah' does not occur in prompt" in report.bad[2].reason
    # the other 1301 are the documented test split, record for record
    clean = load("ZsRE-test-all.json")
    assert [(r.prompt, r.target_new) for r in report.records] == [(r.prompt, r.target_new) for r in clean.records]


def test_zsre_fields():
    report = load("ZsRE-test-all.json")
    r = report.records[0]
    assert (r.subject, r.target_new, r.ground_truth) == ("Epaspidoceras", "Noctuidae", "Aspidoceratidae")
    assert r.rephrase == ["What family are Epaspidoceras?"]
    counts = Counter()
    for rec in report.records:
        assert len(rec.rephrase) == 1 and rec.ground_truth
        for key, probes in rec.portability.items():
            counts[f"portability.{key}"] += len(probes)
        for key, probes in rec.locality.items():
            counts[f"locality.{key}"] += len(probes)
    assert counts == {"portability.Reasoning": 771, "portability.Subject_Aliasing": 263,
                      "portability.Logical_Generalization": 267, "locality.Relation_Specificity": 2602}
    # targets are kept as the file has them (10 start with a space, which the reference scores)
    assert sum(rec.target_new.startswith(" ") for rec in report.records) == 10
    assert not any(STRIP.prepare(rec).target_new.startswith(" ") for rec in report.records)


def test_recent_train_skips_the_empty_answers():
    report = load("recent_train.json")
    skipped = [(b.index, b.item) for b in report.bad]
    assert skipped == [
        (3, "locality.Relation_Specificity[7]"), (138, "locality.Relation_Specificity[3]"),
        (209, "locality.Relation_Specificity[1]"), (219, "locality.Relation_Specificity[0]"),
        (297, "locality.Relation_Specificity[0]"), (297, "locality.Relation_Specificity[1]"),
        (297, "locality.Relation_Specificity[2]"), (419, "locality.Forgetfulness[0]"),
        (567, "locality.Relation_Specificity[3]"),
    ]
    assert all(not b.record_dropped and b.reason.startswith("first answer has no alias") for b in report.bad)
    assert all(r.ground_truth is None for r in report.records)
    assert sum(1 for r in report.records if not r.locality) == 155
    assert sum(1 for r in report.records if not r.portability) == 467  # 466 empty + 1 with only an empty key
    r0 = report.records[0]
    assert r0.locality["Relation_Specificity"][1].answer == "Soviet Union"  # first alias of the first answer


def test_counterfact_train_blank_answers():
    report = load("train_cf.json")
    assert {(b.index, b.item): b.reason for b in report.bad} == {
        (326, "locality.Forgetfulness[0]"): "answer is blank",
        (489, "locality.Relation_Specificity[0]"): "answer is blank",
        (630, "ground_truth"): "answer is blank; old answer left unset",
    }
    assert next(r for r in report.records if r.index == 630).ground_truth is None


def test_wikibio_subject_occurs_in_every_text():
    for name in ("wikibio-test-all.json", "wikibio-train-all.json"):
        report = load(name)
        assert all(r.subject in r.prompt and set(r.locality) == {"Relation_Specificity"} for r in report.records)


def test_convsent_records():
    for name in ("blender_test.json", "blender_val.json"):
        report = load(name)
        sentiments = Counter(r.extra["target_sentiment"] for r in report.records)
        assert abs(sentiments["pos"] - sentiments["neg"]) <= 1
        for r in report.records:
            assert r.target_new == r.extra["target_replies"][0]
            assert r.extra["target_replies"] and r.extra["opposite_replies"] and r.extra["locality_replies"]
            assert r.extra["locality_topic"] != r.subject
    val = load("blender_val.json")
    wire = [r for r in val.records if r.subject == "The Wire"]
    assert len(wire) == 2  # the topic listed twice keeps both records, each pointing elsewhere


def test_sanitation_counts():
    for name, source in (("trivia_qa_test.json", "success"), ("trivia_qa_train.json", "K_F")):
        report = load(name)
        assert len(report.records) == 80 and len(report.shared["locality"]) == 453
        assert all(r.target_new == "I don't know." and r.source.endswith(f"#{source}") for r in report.records)
        assert all(p.prompt.startswith("Question:") and p.prompt.endswith("\nAnswer:") for p in report.shared["locality"])


def test_legacy_formats():
    raw = load("legacy/zsre_mend_eval_portability_gpt4.json")
    assert all(set(r.portability) == {"Reasoning"} and set(r.locality) == {"Relation_Specificity"} for r in raw.records)
    assert raw.records[0].locality["Relation_Specificity"][0].prompt.startswith("nq question: ")
    cf = load("legacy/counterfact-val.json")
    assert cf.records[0].extra == {"case_id": 10} and cf.records[0].rephrase


def test_directory_resolution_picks_the_test_split():
    assert TASKS["zsre"].resolve(DATA).name == "ZsRE-test-all.json"
    assert TASKS["counterfact"].resolve(DATA).name == "train_cf.json"  # no test_cf.json here
    assert TASKS["sanitation"].resolve(DATA).name == "trivia_qa_test.json"
    assert TASKS["convsent"].resolve(DATA).name == "blender_test.json"


def test_tasks_refuse_each_others_files():
    with pytest.raises(TaskDataError, match="task counterfact reads it"):
        TASKS["zsre"].reader(DATA / "train_cf.json")
    with pytest.raises(TaskDataError, match="task wiki_recent reads it"):
        TASKS["counterfact"].reader(DATA / "recent_train.json")
    assert K.read(DATA / "blender_test.json").format == "knowedit-convsent"
