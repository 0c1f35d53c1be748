"""`knowbench lifelong-table`: sequential results as a row per editor and a column per (T, timing, batch)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from kb_results import make_result, reseal

from knowbench import cli
from knowbench import lifelong_table as lt

# (editor, T, timing, batch) -> post-edit Edit Succ., Rephrase, Locality
RUNS = {
    ("rome", 100, "each", 1): (12.67, 11.08, 4.4),
    ("rome", 1000, "final", 1): (0.5, 0.25, 1.0),
    ("alphaedit", 100, "each", 1): (89.65, 79.68, 39.66),
    ("alphaedit", 1000, "final", 1): (2.0, 1.5, 3.0),
    ("grace", 1000, "final", 1): (99.9, 30.04, 100.0),
    ("alphaedit", 1000, "final", 100): (60.0, 50.0, 20.0),
    ("serac", 100, "each", 1): (99.0, 98.0, 100.0),
}


def seq_result(editor, t, timing, batch, vals, seed=0, curve=None):
    post = dict(zip(lt.METRICS, vals))
    r = make_result(editor=editor, protocol="sequential", n_edits=t, eval_timing=timing, batch_size=batch, seed=seed,
                    post=post, pre={"edit_succ": 26.4, "rephrase": 24.5}, fluency=False)
    if curve is not None:
        r["curve"] = curve
        r = reseal(r)
    return r


@pytest.fixture
def runs(tmp_path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    for (e, t, timing, b), vals in RUNS.items():
        curve = [{"edits": k, "edit_succ": 100 - k / 20, "locality": 100 - k / 50} for k in (50, 500, 1000)] if t == 1000 else None
        (d / f"{e}_{t}_{timing}_{b}.json").write_text(json.dumps(seq_result(e, t, timing, b, vals, curve=curve)))
    (d / "single.json").write_text(json.dumps(make_result(editor="rome")))  # skipped: not sequential
    return d


def md_rows(text):
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    return cells[0], {r[0]: r[1:] for r in cells[2:]}


def test_cells_land_under_their_editor_and_setting(runs, capsys):
    assert cli.main(["lifelong-table", str(runs), "--format", "markdown"]) == 0
    out, err = capsys.readouterr()
    header, rows = md_rows(out)
    assert header == ["Editor", "T=100 each", "T=1000 final", "T=1000 final b100"]  # T, then batch, then timing
    # KnowEdit's editor order first (SERAC, ROME), then the others alphabetically
    assert list(rows) == ["SERAC", "ROME", "AlphaEdit", "GRACE", "(pre-edit)"]
    for (e, t, timing, b), vals in RUNS.items():
        col = header.index(f"T={t} {timing}" + (f" b{b}" if b > 1 else "")) - 1
        assert rows[lt.display_name(e)][col] == " / ".join(f"{v:.1f}" for v in vals)
    assert rows["GRACE"][0] == lt.MISSING
    assert rows["(pre-edit)"][0] == "26.4 / 24.5 / –"  # locality has no pre-edit value
    assert "single.json: not a sequential result" in err


def test_duplicates_are_an_error_unless_mean(runs, capsys):
    (runs / "rome_again.json").write_text(json.dumps(seq_result("rome", 100, "each", 1, (20.0, 10.0, 5.0), seed=1)))
    assert cli.main(["lifelong-table", str(runs)]) == 1
    assert "2 results for one cell" in capsys.readouterr().err
    assert cli.main(["lifelong-table", str(runs), "--duplicates", "mean", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    rome = {r["metric"]: r for r in rows if r["editor"] == "rome" and r["n_edits"] == "100"}
    assert float(rome["edit_succ"]["post"]) == pytest.approx((12.67 + 20.0) / 2)
    assert rome["edit_succ"]["seeds"] == "0 1"


def test_invalid_file_is_named(runs, capsys):
    bad = seq_result("rome", 10, "each", 1, (1, 2, 3))
    bad["metrics"]["post"]["edit_succ"]["value"] = 55.0  # tampered after sealing
    (runs / "tampered.json").write_text(json.dumps(bad))
    assert cli.main(["lifelong-table", str(runs)]) == 1
    assert "tampered.json" in capsys.readouterr().err


def test_models_are_never_mixed(tmp_path, capsys):
    for model in ("embedded", "smollm2-135m"):
        (tmp_path / f"{model}.json").write_text(json.dumps(reseal({**seq_result("rome", 20, "final", 1, (1, 2, 3)),
                                                                   "model": {**make_result()["model"], "id": model}})))
    tables = lt.build_tables(lt.select(lt.load_sources([tmp_path]))[0])
    assert [t.model for t in tables] == ["embedded", "smollm2-135m"]


def test_figure_draws_the_longest_curve_of_each_editor(runs, tmp_path):
    pytest.importorskip("matplotlib")
    table = lt.build_tables(lt.select(lt.load_sources([runs]))[0])[0]
    chosen = lt.curve_runs(table)
    assert set(chosen) == {"rome", "alphaedit", "grace"}  # SERAC's run has no curve
    assert chosen["alphaedit"][0] == lt.Setting(1000, "final", 1)  # batch 1 before the b100 stream
    png = lt.lifelong_figure(table, tmp_path / "fig.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_leaderboard_shows_the_lifelong_table(runs, tmp_path):
    from knowbench.leaderboard import render_outputs, submit

    board = tmp_path / "board"
    submit(sorted(runs.glob("*.json")), board)
    out = render_outputs(board)
    md = out["README.md"]
    assert "## Lifelong table" in md
    section = md[md.index("## Lifelong table"):]
    _, rows = md_rows(section)
    assert rows["GRACE"][-2] == "99.9 / 30.0 / 100.0"  # T=1000 final (before the b100 column)
    assert '<table class="lifelong"' in out["index.html"] and 'id="lifelong"' in out["index.html"]
