"""`knowbench submit` / `knowbench leaderboard`: storage by run key, tables, generated files."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kb_results import make_result, reseal

from knowbench.cli import main
from knowbench.leaderboard import (
    LeaderboardError,
    build_tables,
    data_hash,
    load_entries,
    protocol_key,
    relative_path,
    relocate,
    render_markdown,
    slug,
    stale_outputs,
    submit,
)
from knowbench.validate import ValidationError

REPO_LEADERBOARD = Path(__file__).resolve().parents[1] / "leaderboard"
ZSRE_D = "aed90360"  # first hex digits of the sha256 make_result gives the zsre data file


def write(tmp_path: Path, name: str, result: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(result, indent=1))
    return path


def md_cells(line: str) -> list[str]:
    """The cells of one Markdown table line, without their padding."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def md_rows(markdown: str, header_start: str) -> list[list[str]]:
    """Cells of the rows of the first table after the heading line ``header_start``."""
    lines = markdown.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 1:]:
        if md_cells(line)[0] == "#" or re.fullmatch(r"\|[-:|]+\|", line):  # header, alignment row
            continue
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append(md_cells(line))
    return rows


def md_headers(markdown: str) -> set[str]:
    return {c for line in markdown.splitlines() if line.startswith("|") and md_cells(line)[0] == "#"
            for c in md_cells(line)}


def test_committed_leaderboard_is_current():
    """README.md and index.html must be regenerated whenever leaderboard/results changes."""
    stale = stale_outputs(REPO_LEADERBOARD)
    assert not stale, (f"{', '.join(stale)} in {REPO_LEADERBOARD} are stale relative to the result files: run "
                       "`knowbench leaderboard --write --leaderboard leaderboard` and commit them")


def test_keys_and_slugs():
    assert slug("meta-llama/Llama-2-7b-chat-hf") == "meta-llama--Llama-2-7b-chat-hf"
    assert slug("/home/me/my model") == "home--me--my-model"
    base = {"n_edits": 100, "eval_timing": "each", "batch_size": 1}
    assert protocol_key({**base, "name": "single"}) == "single"
    assert protocol_key({**base, "name": "batch", "batch_size": 16}) == "batch16"
    assert protocol_key({**base, "name": "sequential", "eval_timing": "final"}) == "sequential100-final"
    assert protocol_key({**base, "name": "sequential", "batch_size": 10}) == "sequential100-each-b10"


def test_submit_stores_one_file_per_key_and_refuses_duplicates(tmp_path, capsys):
    lb = tmp_path / "lb"
    a = write(tmp_path, "a.json", make_result(editor="rome", model="meta-llama/Llama-2-7b", protocol="sequential",
                                              n_edits=6, eval_timing="final", seed=3))
    assert main(["submit", str(a), "--leaderboard", str(lb)]) == 0
    stored = lb / f"results/zsre/meta-llama--Llama-2-7b/rome/sequential6-final_n6_d{ZSRE_D}_s3.json"
    assert stored.exists() and json.loads(stored.read_text()) == json.loads(a.read_text())
    assert f"added {stored}" in capsys.readouterr().out
    assert (lb / "README.md").exists() and (lb / "index.html").exists() and not stale_outputs(lb)

    # same key, same content
    assert main(["submit", str(a), "--leaderboard", str(lb)]) == 1
    out = capsys.readouterr().out
    assert "this exact result is already on the leaderboard" in out and "--replace" in out
    # same key, other numbers: refused, stored file untouched
    b = write(tmp_path, "b.json", make_result(editor="rome", model="meta-llama/Llama-2-7b", protocol="sequential",
                                              n_edits=6, eval_timing="final", seed=3,
                                              post={"edit_succ": 11.0}))
    with pytest.raises(LeaderboardError, match="a result for the same run key is already on the leaderboard"):
        submit([b], lb)
    assert json.loads(stored.read_text())["metrics"]["post"]["edit_succ"]["value"] == 97.25
    # --replace overwrites and regenerates
    assert main(["submit", str(b), "--leaderboard", str(lb), "--replace"]) == 0
    assert f"replaced {stored}" in capsys.readouterr().out
    assert json.loads(stored.read_text())["metrics"]["post"]["edit_succ"]["value"] == 11.0
    assert md_rows((lb / "README.md").read_text(), "### sequential T=6")[0][6] == "11.00"
    # other seed / other timing: other keys, stored beside it
    c = write(tmp_path, "c.json", make_result(editor="rome", model="meta-llama/Llama-2-7b", protocol="sequential",
                                              n_edits=6, eval_timing="each", seed=3))
    submit([c], lb)
    assert len(load_entries(lb)) == 2


def test_submit_is_all_or_nothing(tmp_path):
    lb = tmp_path / "lb"
    good = write(tmp_path, "good.json", make_result(editor="ft-m"))
    tampered = make_result(editor="ft-l")
    tampered["metrics"]["post"]["edit_succ"]["value"] = 100.0
    bad = write(tmp_path, "bad.json", tampered)
    with pytest.raises(LeaderboardError, match=r"(?s)invalid result file.*bad\.json: INVALID.*content hash mismatch"):
        submit([good, bad], lb)
    assert not (lb / "results").exists()
    with pytest.raises(ValidationError, match="content hash mismatch"):
        submit([bad], lb)
    twin = write(tmp_path, "twin.json", make_result(editor="ft-m", post={"edit_succ": 1.0}))
    with pytest.raises(LeaderboardError, match="same run key as"):
        submit([good, twin], lb)
    assert not (lb / "results").exists()


def test_leaderboard_reads_only_valid_files_in_place(tmp_path):
    lb = tmp_path / "lb"
    submit([write(tmp_path, "a.json", make_result(editor="ft-m"))], lb)
    stored = lb / f"results/zsre/embedded/ft-m/single_n4_d{ZSRE_D}_s0.json"
    # a number edited in the stored file
    stored.write_text(stored.read_text().replace('"value": 97.25', '"value": 99.9'))
    with pytest.raises(LeaderboardError, match=r"(?s)single_n4_d\w{8}_s0.json: INVALID.*content hash mismatch"):
        load_entries(lb)
    # a valid file in the wrong place
    stored.unlink()
    misplaced = lb / f"results/zsre/embedded/ft-m/single_n4_d{ZSRE_D}_s7.json"
    misplaced.write_text(json.dumps(make_result(editor="ft-m")))
    with pytest.raises(LeaderboardError, match=r"belongs at .*single_n4_d\w{8}_s0.json \(`knowbench leaderboard --relocate`"):
        load_entries(lb)


def _board(tmp_path: Path) -> Path:
    lb = tmp_path / "lb"
    runs = [
        make_result(editor="ft-m", post={"edit_succ": 90.0, "portability": 40.0, "locality": 80.0, "fluency": 500.0}),
        make_result(editor="ft-l", post={"edit_succ": 90.0, "portability": 45.0, "locality": 70.0}),
        make_result(editor="rome", seed=0, post={"edit_succ": 98.0, "portability": 50.0, "locality": 60.0,
                                                 "fluency": 550.0}),
        make_result(editor="rome", seed=1, post={"edit_succ": 96.0, "portability": 52.0, "locality": 62.0,
                                                 "fluency": 560.0}),
        make_result(editor="memit", protocol="sequential", n_edits=8, post={"edit_succ": 40.0, "locality": 20.0}),
        make_result(editor="ft-m", task="convsent", kind="convsent", post={"edit_succ": 70.0, "locality": 0.9}),
        make_result(editor="rome", task="convsent", kind="convsent", post={"edit_succ": 70.0, "locality": 0.2}),
    ]
    submit([write(tmp_path, f"r{i}.json", r) for i, r in enumerate(runs)], lb)
    return lb


def test_tables_rank_average_seeds_and_leave_missing_metrics_empty(tmp_path):
    lb = _board(tmp_path)
    tables = build_tables(load_entries(lb))
    assert [(t.task, t.protocol) for t in tables] == [("zsre", "single"), ("zsre", "sequential8-each"),
                                                      ("convsent", "single")]
    single = tables[0]
    assert [r.editor for r in single.rows] == ["rome", "ft-l", "ft-m"]  # tie on Edit Succ.: Portability decides
    rome = single.rows[0]
    assert rome.seeds == [0, 1] and rome.values["edit_succ"] == pytest.approx(97.0)
    assert rome.values["fluency"] == pytest.approx(555.0)
    assert single.rows[1].values["fluency"] is None
    assert single.columns == ["edit_succ", "portability", "locality", "fluency"]  # rephrase: nobody measured it
    # ConvSent's KL locality ranks lower-is-better
    conv = tables[2]
    assert conv.lower_is_better == {"locality"} and [r.editor for r in conv.rows] == ["rome", "ft-m"]

    md = (lb / "README.md").read_text()
    rows = md_rows(md, "### single")
    assert rows[0][:6] == ["1", "rome", "embedded", "zsre.json", "4", "0,1"]
    assert rows[1] == ["2", "ft-l", "embedded", "zsre.json", "4", "0", "90.00", "45.00", "70.00", ""]
    assert {"Locality (KL) ↓", "Edit Succ. ↑"} <= md_headers(md)
    assert re.search(r"^\|-+:\|:-+\|", md, re.M)  # rank right-aligned, editor left-aligned
    assert "### sequential T=8 (each edit right after it)" in md
    assert "7 result files." in md
    assert not stale_outputs(lb)


def test_staleness_is_detected(tmp_path):
    lb = _board(tmp_path)
    (lb / f"results/zsre/embedded/memit/sequential8-each_n8_d{ZSRE_D}_s0.json").unlink()
    assert stale_outputs(lb) == ["README.md", "index.html"]
    assert main(["leaderboard", "--leaderboard", str(lb), "--check"]) == 1
    assert main(["leaderboard", "--leaderboard", str(lb), "--write"]) == 0
    assert main(["leaderboard", "--leaderboard", str(lb), "--check"]) == 0


def test_cli_formats_and_task_filter(tmp_path, capsys):
    lb = _board(tmp_path)
    assert main(["leaderboard", "--leaderboard", str(lb), "--format", "markdown", "--task", "ConvSent"]) == 0
    out = capsys.readouterr().out
    assert "## ConvSent (convsent)" in out and "ZsRE" not in out.split("## ConvSent")[1] and "## ZsRE" not in out
    assert main(["leaderboard", "--leaderboard", str(lb), "--format", "html"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("<!DOCTYPE html>") and out.count("<table") == 3 and "<script>" in out
    assert main(["leaderboard", "--leaderboard", str(lb), "--task", "zsre"]) == 0
    out = capsys.readouterr().out
    assert "ZsRE (zsre) · single" in out and "rome" in out and "ConvSent" not in out
    assert main(["leaderboard", "--leaderboard", str(lb), "--task", "wikibio"]) == 1
    assert "no results for task 'wikibio'" in capsys.readouterr().out


def test_empty_leaderboard_and_unmeasured_never_zero(tmp_path):
    lb = tmp_path / "lb"
    (lb / "results").mkdir(parents=True)
    assert build_tables(load_entries(lb)) == []
    assert "No results submitted yet." in render_markdown([])
    r = make_result(editor="ft-m", fluency=False)
    submit([write(tmp_path, "a.json", r)], lb)
    row = md_rows((lb / "README.md").read_text(), "### single")[0]
    # no Fluency column at all when no run measured it; and no 0.00 anywhere for it
    assert "Fluency" not in (lb / "README.md").read_text().split("### single")[1]
    assert "0.00" not in row


def test_submit_cli_reports_invalid_file(tmp_path, capsys):
    r = make_result()
    del r["model"]["revision"]
    reseal(r)
    f = write(tmp_path, "r.json", r)
    assert main(["submit", str(f), "--leaderboard", str(tmp_path / "lb")]) == 1
    assert "model.revision: required key is missing" in capsys.readouterr().out


def _other_data(result: dict, name: str = "ZsRE-test-all.json") -> dict:
    """The same run scored on another data file (another sha256), re-sealed."""
    result["task"]["data_files"] = [{"path": f"/data/{name}", "sha256": hashlib.sha256(name.encode()).hexdigest()}]
    return reseal(result)


def test_data_and_number_of_edits_are_part_of_the_key(tmp_path, capsys):
    lb = tmp_path / "lb"
    runs = {
        "embedded.json": make_result(editor="ft-m"),
        "real.json": _other_data(make_result(editor="ft-m", post={"edit_succ": 50.0})),
        "n8.json": make_result(editor="ft-m", n_edits=8, post={"edit_succ": 60.0}),
    }
    files = [write(tmp_path, name, r) for name, r in runs.items()]
    assert main(["submit", *map(str, files), "--leaderboard", str(lb)]) == 0
    assert capsys.readouterr().out.count("added ") == 3
    entries = load_entries(lb)
    assert len({e.key for e in entries}) == 3
    real_d = hashlib.sha256(b"ZsRE-test-all.json").hexdigest()[:8]
    assert sorted(e.path.name for e in entries) == sorted(
        [f"single_n4_d{ZSRE_D}_s0.json", f"single_n4_d{real_d}_s0.json", f"single_n8_d{ZSRE_D}_s0.json"])
    # rows: other data is another board, another number of edits another row (seeds never mixed with it)
    rows = md_rows((lb / "README.md").read_text(), "### single")
    assert sorted((r[3], r[4], r[5], r[6]) for r in rows) == [
        ("ZsRE-test-all.json", "4", "0", "50.00"), ("zsre.json", "4", "0", "97.25"), ("zsre.json", "8", "0", "60.00")]
    # the same data and n again is still a duplicate
    again = write(tmp_path, "again.json", make_result(editor="ft-m", post={"edit_succ": 1.0}))
    assert main(["submit", str(again), "--leaderboard", str(lb)]) == 1
    assert "a result for the same run key is already on the leaderboard" in capsys.readouterr().out


def test_multi_file_data_hash_is_order_sensitive_and_stable():
    r = make_result()
    r["task"]["data_files"] = [{"path": "/d/a.json", "sha256": "a" * 64}, {"path": "/d/b.json", "sha256": "b" * 64}]
    h = data_hash(r)
    assert h == hashlib.sha256(("a" * 64 + "," + "b" * 64).encode()).hexdigest()
    r["task"]["data_files"].reverse()
    assert data_hash(r) != h
    assert data_hash(make_result()) == hashlib.sha256(b"zsre").hexdigest()  # one file: its own sha256


def test_relocate_moves_files_of_the_old_layout(tmp_path, capsys):
    lb = _board(tmp_path)
    before = (lb / "README.md").read_text()
    old = lb / "results/zsre/embedded/rome/single_s1.json"  # where the layout before n and data put it
    new = lb / f"results/zsre/embedded/rome/single_n4_d{ZSRE_D}_s1.json"
    new.rename(old)
    assert main(["leaderboard", "--leaderboard", str(lb), "--check"]) == 1
    assert "belongs at" in capsys.readouterr().out
    assert main(["leaderboard", "--leaderboard", str(lb), "--relocate"]) == 0
    assert f"moved {old} -> {new}" in capsys.readouterr().out
    assert new.exists() and not old.exists() and not stale_outputs(lb)
    assert (lb / "README.md").read_text() == before
    # a file in a folder of its own that the move leaves empty: the folder goes too
    stray = lb / "results/old-layout/x.json"
    stray.parent.mkdir(parents=True)
    new.rename(stray)
    assert relocate(lb) == [(stray.relative_to(lb), new.relative_to(lb))]
    assert not stray.parent.exists()
    # nothing moves when two files claim one path
    shutil.copy(new, lb / "results/copy.json")
    with pytest.raises(LeaderboardError, match="are both the run for"):
        relocate(lb)
    assert (lb / "results/copy.json").exists()


def test_submit_waits_for_the_lock_and_gives_up_with_a_clear_error(tmp_path, capsys):
    lb = tmp_path / "lb"
    a = write(tmp_path, "a.json", make_result(editor="ft-m"))
    lb.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock\n"
         "with FileLock(sys.argv[1]):\n print('held', flush=True); time.sleep(30)", str(lb / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        assert main(["submit", str(a), "--leaderboard", str(lb), "--lock-timeout", "0.5"]) == 1
        assert time.monotonic() - t0 < 10
        out = capsys.readouterr().out
        assert "could not lock the leaderboard" in out and "Nothing was changed" in out and "added" not in out
        assert not (lb / "results").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["submit", str(a), "--leaderboard", str(lb)]) == 0  # the lock of a dead writer is free
    assert "added" in capsys.readouterr().out


def test_added_only_for_what_is_stored(tmp_path, capsys, monkeypatch):
    """A writer that ignores the lock replaces the file between our write and our check: reported, exit 1."""
    import knowbench.leaderboard as lbmod

    lb = tmp_path / "lb"
    mine = make_result(editor="ft-m")
    other = make_result(editor="ft-m", post={"edit_succ": 3.0})
    rogue_rel = relative_path(mine)
    real_write_outputs = lbmod.write_outputs

    def rogue_then_write(root):
        lbmod.write_json_atomic(Path(root) / rogue_rel, other)
        return real_write_outputs(root)

    monkeypatch.setattr(lbmod, "write_outputs", rogue_then_write)
    f = write(tmp_path, "mine.json", mine)
    g = write(tmp_path, "n8.json", make_result(editor="ft-m", n_edits=8))
    assert main(["submit", str(f), str(g), "--leaderboard", str(lb)]) == 1
    out = capsys.readouterr().out
    assert f"added {lb / relative_path(json.loads(g.read_text()))}" in out  # kept, so reported
    assert f"added {lb / rogue_rel}" not in out
    assert "error: stored file(s) do not hold the submitted result" in out and str(f) in out
    assert other["integrity"]["sha256"][:16] in out
