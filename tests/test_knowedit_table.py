"""`knowbench knowedit-table`: KnowEdit's layout (a block per task, a column per editor) of result files."""

from __future__ import annotations

import argparse
import csv
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from kb_results import make_result, reseal

from knowbench import knowedit_table as kt
from knowbench.leaderboard import load_entries, stale_outputs, submit

KNOWEDIT_NAMES = {"wiki_recent": "WikiData_recent", "zsre": "ZsRE", "wikibio": "WikiBio",
                  "counterfact": "WikiData_counterfact", "convsent": "ConvSent", "sanitation": "Sanitation"}
KINDS = {"wikibio": "wikibio", "convsent": "convsent", "sanitation": "sanitation"}  # the rest are qa


def run_result(editor: str, task: str, post: dict[str, float], **kw) -> dict:
    """A sealed result of ``editor`` on ``task`` with these post-edit values."""
    kind = KINDS.get(task, "qa")
    pre = kw.pop("pre", {"edit_succ": 10.0})
    return make_result(editor=editor, task=task, kind=kind, knowedit_name=KNOWEDIT_NAMES[task], post=post, pre=pre,
                       fluency="fluency" in post, **kw)


QA = {"edit_succ": 97.25, "portability": 45.5, "locality": 88.0, "fluency": 560.1}
# (editor, task) -> post-edit values; given out of order on purpose
RUNS: dict[tuple[str, str], dict[str, float]] = {
    ("lora", "zsre"): {"edit_succ": 71.111, "portability": 12.345, "locality": 55.555, "fluency": 501.004},
    ("rome", "zsre"): {"edit_succ": 93.9, "portability": 41.9697, "locality": 67.1042, "fluency": 583.837},
    ("ft-m", "wiki_recent"): QA,
    ("serac", "zsre"): {"edit_succ": 99.67, "portability": 56.48, "locality": 30.23, "fluency": 410.89},
    ("rome", "wikibio"): {"edit_succ": 96.08, "locality": 62.74, "fluency": 617.69},
    ("alphaedit", "counterfact"): {"edit_succ": 97.25, "portability": 34.3764, "locality": 47.1792},  # no fluency
    ("ice", "convsent"): {"edit_succ": 52.78, "locality": 0.4213, "fluency": 621.45},
    ("rome", "sanitation"): {"edit_succ": 85.0, "locality": 50.31, "fluency": 465.12},
    ("ike", "zsre"): {"edit_succ": 66.01, "portability": 63.94, "locality": 23.14, "fluency": 541.14},
    ("memit", "zsre"): {"edit_succ": 95.37, "portability": 52.67, "locality": 48.32, "fluency": 563.31},
}
EDITOR_ORDER = ["SERAC", "ICE", "ROME", "MEMIT", "FT-M", "AlphaEdit", "IKE", "LoRA"]
TASK_ORDER = ["WikiData_recent", "ZsRE", "WikiBio", "WikiData_counterfact", "ConvSent", "Sanitation"]


def write(folder: Path, name: str, result: dict) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


@pytest.fixture
def results_dir(tmp_path) -> Path:
    d = tmp_path / "runs"
    for (editor, task), post in RUNS.items():
        write(d, f"{task}/{editor}.json", run_result(editor, task, post))  # nested: folders are read recursively
    return d


def render(capsys, *argv: str) -> tuple[int, str, str]:
    code = kt.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def md_table(markdown: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the first Markdown table."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    return cells[0], cells[2:]  # cells[1] is the alignment row


def blocks(rows: list[list[str]]) -> dict[str, dict[str, list[str]]]:
    """task -> metric label -> the editor cells, from KnowEdit-layout rows (a bold task row, then metric rows)."""
    out: dict[str, dict[str, list[str]]] = {}
    task = None
    for r in rows:
        if r[0]:
            task = r[0].strip("*")
            assert all(c == "" for c in r[1:]), f"a task row holds only the task name: {r}"
            out[task] = {}
        else:
            assert task is not None
            out[task][r[1]] = r[2:]
    return out


def test_layout_follows_knowedit(results_dir, capsys):
    code, out, err = render(capsys, str(results_dir), "--format", "markdown")
    assert code == 0, err
    assert out.count("| DataSet") == 1  # one model, one metric protocol: one table
    header, rows = md_table(out)
    assert header == ["DataSet", "Metric", *EDITOR_ORDER]
    b = blocks(rows)
    assert list(b) == TASK_ORDER  # KnowEdit's task order, whatever the order of the files
    for task in ("WikiData_recent", "ZsRE", "WikiData_counterfact"):
        assert list(b[task]) == ["Edit Succ.", "Portability", "Locality", "Fluency"]
    assert list(b["WikiBio"]) == ["Edit Succ.", "Locality", "Fluency"]  # no Portability
    assert list(b["Sanitation"]) == ["Edit Succ.", "Locality", "Fluency"]
    assert list(b["ConvSent"]) == ["Edit Succ.", "Locality (KL↓)", "Fluency"]  # a KL divergence, lower is better
    # a cell without a result is "–"; every cell of an editor that has no result on a task
    zsre = dict(zip(EDITOR_ORDER, zip(*b["ZsRE"].values())))
    assert zsre["ICE"] == zsre["FT-M"] == zsre["AlphaEdit"] == ("–",) * 4
    assert b["WikiBio"]["Edit Succ."] == ["–", "–", "96.08", "–", "–", "–", "–", "–"]
    # a metric the result did not measure is "–", never 0
    assert b["WikiData_counterfact"]["Fluency"][EDITOR_ORDER.index("AlphaEdit")] == "–"
    assert "0.00" not in out
    assert "model embedded" in out and "metric protocol knowedit" in out and "4 records per cell" in out


def test_numbers_are_the_post_edit_values(results_dir, capsys):
    sources = kt.load_sources([results_dir])
    kept, skipped = kt.select(sources)
    assert skipped == [] and len(kept) == len(RUNS)
    (table,) = kt.build_tables(kept)
    for (editor, task), post in RUNS.items():
        for metric, value in post.items():
            want = f"{value:.4f}" if (task, metric) == ("convsent", "locality") else f"{value:.2f}"
            assert table.cell(task, metric, editor) == want, (editor, task, metric)
    assert table.cell("zsre", "edit_succ", "lora") == "71.11" and table.cell("zsre", "fluency", "lora") == "501.00"
    assert table.cell("ConvSent", "locality", "ice") == "0.4213"
    assert table.cell("zsre", "edit_succ", "ice") == "–"
    # the rendered text holds the same strings (KnowEdit's numbers: post-edit, not pre-edit)
    _, out, _ = render(capsys, str(results_dir), "--format", "text")
    assert "583.84" in out and "10.00" not in out


def test_csv_and_html_parse(results_dir, capsys):
    code, out, _ = render(capsys, str(results_dir), "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0])[-len(EDITOR_ORDER):] == EDITOR_ORDER
    assert [r["knowedit_task"] for r in rows] == ["WikiData_recent"] * 4 + ["ZsRE"] * 4 + ["WikiBio"] * 3 + \
        ["WikiData_counterfact"] * 4 + ["ConvSent"] * 3 + ["Sanitation"] * 3
    by = {(r["task"], r["metric"]): r for r in rows}
    assert by[("zsre", "portability")]["ROME"] == "41.97" and by[("zsre", "portability")]["ICE"] == "–"
    assert by[("convsent", "locality")]["ICE"] == "0.4213"
    assert {r["model"] for r in rows} == {"embedded"} and {r["metric_protocol"] for r in rows} == {"knowedit"}

    code, out, _ = render(capsys, str(results_dir), "--format", "html")
    assert code == 0 and out.startswith("<!DOCTYPE html>") and '<table class="knowedit"' in out

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.tbodies, self.rows, self.cell = 0, [], [], None

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.tables += 1
            elif tag == "tbody":
                self.tbodies.append(dict(attrs)["data-knowedit-task"])
            elif tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.rows[-1].append(self.cell.strip())
                self.cell = None

    p = Cells()
    p.feed(out)
    assert p.tables == 1 and p.tbodies == TASK_ORDER
    assert p.rows[0] == ["DataSet", "Metric", *EDITOR_ORDER]
    zsre_es = next(r for i, r in enumerate(p.rows) if r[1:2] == ["Edit Succ."] and p.rows[i - 1] == ["ZsRE"])
    assert zsre_es == ["", "Edit Succ.", "99.67", "–", "93.90", "95.37", "–", "–", "66.01", "71.11"]


def test_output_file(results_dir, tmp_path, capsys):
    dest = tmp_path / "out" / "knowedit.md"
    code, out, err = render(capsys, str(results_dir), "--format", "markdown", "--output", str(dest))
    assert code == 0 and out == "" and f"wrote {dest}" in err
    assert "| DataSet" in dest.read_text()


def test_non_single_results_are_skipped_with_a_message(results_dir, capsys):
    seq = write(results_dir, "seq.json", run_result("rome", "zsre", {"edit_succ": 12.34, "locality": 4.4},
                                                    protocol="sequential", n_edits=8))
    batch = write(results_dir, "batch.json", run_result("memit", "zsre", {"edit_succ": 43.21}, protocol="batch",
                                                        n_edits=4, batch_size=4))
    code, out, err = render(capsys, str(results_dir), "--format", "markdown")
    assert code == 0
    assert f"skipped {seq}: not a single-edit result (sequential T=8" in err
    assert f"skipped {batch}: not a single-edit result (batch B=4)" in err
    assert "12.34" not in out and "43.21" not in out and "93.90" in out
    # nothing single left: an error, not an empty table
    code, out, err = render(capsys, str(seq), str(batch))
    assert code == 1 and out == "" and "no single-edit results left" in err


def test_models_and_metric_protocols_are_never_mixed(results_dir, capsys):
    write(results_dir, "smol/rome.json", run_result("rome", "zsre", {"edit_succ": 11.11}, model="smollm2-135m"))
    fixed = run_result("rome", "zsre", {"edit_succ": 22.22})
    fixed["protocol"]["metrics"] = {"name": "knowbench", "fixes": ["padding_safe", "strip_whitespace"]}
    write(results_dir, "fixed/rome.json", reseal(fixed))
    sources = kt.load_sources([results_dir])
    tables = kt.build_tables(kt.select(sources)[0])
    assert [(t.model, t.metric_protocol) for t in tables] == [
        ("embedded", "knowedit"), ("embedded", "knowbench"), ("smollm2-135m", "knowedit")]
    assert [t.cell("zsre", "edit_succ", "rome") for t in tables] == ["93.90", "22.22", "11.11"]
    assert tables[1].editors == ["rome"] and "fixes: padding_safe, strip_whitespace" in tables[1].footnote()

    code, out, _ = render(capsys, str(results_dir), "--format", "markdown")
    assert code == 0 and out.count("| DataSet") == 3
    assert "model smollm2-135m" in out and "metric protocol knowbench" in out
    # one CSV table only: asks for a filter
    code, out, err = render(capsys, str(results_dir), "--format", "csv")
    assert code == 1 and out == "" and "--model" in err and "smollm2-135m" in err
    code, out, err = render(capsys, str(results_dir), "--format", "csv", "--model", "smollm2-135m")
    assert code == 0 and [r["ROME"] for r in csv.DictReader(io.StringIO(out))][0] == "11.11"
    code, out, err = render(capsys, str(results_dir), "--format", "csv", "--model", "embedded",
                            "--metric-protocol", "knowledit-typo")
    assert code == 1 and "not --metric-protocol knowledit-typo" in err
    code, out, _ = render(capsys, str(results_dir), "--format", "csv", "--model", "embedded",
                          "--metric-protocol", "knowbench")
    assert code == 0 and "22.22" in out and "93.90" not in out


def test_an_invalid_file_is_an_error_naming_it(results_dir, capsys):
    tampered = run_result("rome", "wiki_recent", QA)
    tampered["metrics"]["post"]["edit_succ"]["value"] = 100.0
    bad = write(results_dir, "zz/tampered.json", tampered)
    notjson = write(results_dir, "zz/notes.json", {})
    notjson.write_text("{not json")
    code, out, err = render(capsys, str(results_dir))
    assert code == 1 and out == ""
    assert "2 file(s) are not valid knowbench results" in err
    assert f"{bad}: INVALID" in err and "content hash mismatch" in err
    assert f"{notjson}: INVALID" in err and "not valid JSON" in err
    code, _, err = render(capsys, str(results_dir / "missing.json"))
    assert code == 1 and "missing.json: no such file or folder" in err


def test_duplicates_error_or_mean(tmp_path, capsys):
    d = tmp_path / "runs"
    a = write(d, "s0.json", run_result("rome", "zsre", {"edit_succ": 90.0, "locality": 60.0}, seed=0))
    b = write(d, "s1.json", run_result("rome", "zsre", {"edit_succ": 95.0, "locality": 70.0}, seed=1))
    write(d, "copy/s0.json", json.loads(a.read_text()))  # the same result twice counts once
    code, out, err = render(capsys, str(d))
    assert code == 1 and "2 results for one cell, ZsRE × ROME" in err and str(a) in err and str(b) in err
    assert "--duplicates mean" in err
    code, out, err = render(capsys, str(d), "--duplicates", "mean", "--format", "csv")
    assert code == 0 and "counted once" in err
    row = next(csv.DictReader(io.StringIO(out)))
    assert row["ROME"] == "92.50"
    (table,) = kt.build_tables(kt.select(kt.load_sources([d]))[0], duplicates="mean")
    assert table.cell("zsre", "locality", "rome") == "65.00" and "(mean of 2 seeds)" in table.footnote()
    # another number of edits is another experiment: mean shows the larger one and names the other
    c = write(d, "n8.json", run_result("rome", "zsre", {"edit_succ": 50.0}, n_edits=8))
    (table,) = kt.build_tables(kt.select(kt.load_sources([d]))[0], duplicates="mean")
    assert table.cell("zsre", "edit_succ", "rome") == "50.00" and "8 records per cell" in table.footnote()
    notes = "\n".join(table.notes())
    assert notes.count("Not shown: ") == 2 and f"Not shown: {b} (seed 1, 4 edits" in notes and str(c) not in notes
    assert "s0.json (seed 0, 4 edits" in notes  # of two identical copies, one


def test_locality_baseline_note(results_dir, capsys):
    ice = run_result("ice", "zsre", {"edit_succ": 66.0, "portability": 60.0, "locality": 23.0})
    ice["editor"].setdefault("provenance", {})["locality_baseline"] = "the unedited model without the edit in context"
    write(results_dir, "zsre/ice.json", reseal(ice))
    code, out, _ = render(capsys, str(results_dir), "--format", "text")
    assert code == 0
    notes = [ln for ln in out.splitlines() if ln.startswith("ICE:")]
    assert len(notes) == 1 and "no-context baseline" in notes[0]
    assert "the unedited model without the edit in context" in notes[0]
    assert not any(ln.startswith(("ROME:", "SERAC:")) for ln in out.splitlines())


def test_add_knowedit_table_registers_the_command(results_dir, capsys):
    parser = argparse.ArgumentParser(prog="knowbench")
    kt.add_knowedit_table(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["knowedit-table", str(results_dir), "--format", "markdown"])
    assert args.func(args) == 0
    assert "| DataSet" in capsys.readouterr().out


def test_leaderboard_page_opens_with_the_knowedit_table(tmp_path):
    lb = tmp_path / "lb"
    runs = [
        run_result("rome", "zsre", {"edit_succ": 93.9, "portability": 41.97, "locality": 67.1, "fluency": 583.84}),
        run_result("rome", "zsre", {"edit_succ": 95.9, "portability": 43.97, "locality": 69.1, "fluency": 585.84},
                   seed=1),
        run_result("ft-m", "zsre", QA),
        run_result("memit", "zsre", {"edit_succ": 12.34}, protocol="sequential", n_edits=8),
        run_result("rome", "wikibio", {"edit_succ": 96.08, "locality": 62.74, "fluency": 617.69}),
        run_result("ft-l", "zsre", {"edit_succ": 77.77}, model="smollm2-135m"),
    ]
    files = [write(tmp_path, f"r{i}.json", r) for i, r in enumerate(runs)]
    submit(files, lb)
    md = (lb / "README.md").read_text()
    section = md.split("## KnowEdit's table")[1].split("## Lifelong table")[0]  # before the lifelong and ranked tables
    header, rows = md_table(section)
    assert header == ["DataSet", "Metric", "ROME", "FT-M"]  # single, embedded, knowedit only
    b = blocks(rows)
    assert list(b) == ["ZsRE", "WikiBio"]
    assert b["ZsRE"]["Edit Succ."] == ["94.90", "97.25"]  # the leaderboard averages seeds
    assert "12.34" not in section and "77.77" not in section and "smollm2" not in section
    page = (lb / "index.html").read_text()
    assert page.count('<table class="knowedit"') == 1 and page.index('id="knowedit"') < page.index('class="kb"')
    assert page.count('<table class="kb"') == len({(r["task"]["name"], r["protocol"]["name"]) for r in runs})
    assert not stale_outputs(lb)
    # the section is built from the same entries the leaderboard reads
    tables = kt.leaderboard_tables((e.path.as_posix(), e.result) for e in load_entries(lb))
    assert len(tables) == 1 and tables[0].cell("wikibio", "locality", "rome") == "62.74"


def test_leaderboard_without_knowedit_results_has_no_section(tmp_path):
    lb = tmp_path / "lb"
    submit([write(tmp_path, "s.json", run_result("rome", "zsre", {"edit_succ": 12.0}, protocol="sequential",
                                                 n_edits=8))], lb)
    assert "## KnowEdit's table" not in (lb / "README.md").read_text()
    assert 'class="knowedit"' not in (lb / "index.html").read_text()
