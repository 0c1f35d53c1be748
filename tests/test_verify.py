"""`knowbench verify`: a re-sealed edit passes `validate` but not `verify`; an untouched result passes.

The runs are tiny real ones (FT-M on a random GPT-2, a 12-record ZsRE file); the runner writes
their per-record values in the result's ``records`` block, and re-runs chosen records with
``RunConfig.extra["indices"]``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import zsre_records
from kb_results import make_result

from knowbench.cli import main
from knowbench.evaluation import RecordScores, summarise
from knowbench.results import seal
from knowbench.runner import RunConfig, finish, run
from knowbench.schema import metric_family
from knowbench.validate import validate_file
from knowbench.verify import Comparison, VerifyError, claimed_records, flatten, plan, verify


def resummarise(result: dict[str, Any]) -> dict[str, Any]:
    """metrics.pre/post recomputed from the records block (a consistent forgery), re-sealed."""
    spec = metric_family(result)
    for phase in ("pre", "post"):
        result["metrics"][phase] = summarise([RecordScores(r["index"], r[phase]) for r in result["records"]], spec)
    return seal(result)


def save(path: Path, result: dict[str, Any]) -> Path:
    path.write_text(json.dumps(result, indent=1))
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "ZsRE-test-all.json"
    path.write_text(json.dumps(zsre_records(12)))
    return path


@pytest.fixture(scope="module")
def single_run(data_file) -> dict[str, Any]:
    result = run(RunConfig(editor="ft-m", task="zsre", data=str(data_file), model="random-gpt2", limit=3,
                           fluency=False))
    return finish(result)


@pytest.fixture(scope="module")
def sequential_run(data_file) -> dict[str, Any]:
    result = run(RunConfig(editor="ft-m", task="zsre", data=str(data_file), model="random-gpt2", sequential=4,
                           fluency=False, curve_every=2, curve_probes=2))
    return finish(result)


# -- end to end -----------------------------------------------------------------------------------------
def test_untouched_result_verifies(single_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table's columns unabridged
    f = save(tmp_path / "r.json", single_run)
    assert validate_file(f).ok
    assert main(["verify", str(f), "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "verified — " in out and "NOT" not in out
    assert "post.edit_succ" in out and "post.locality.Relation_Specificity[0]" in out and "DIFFERS" not in out
    outcome = verify(f, n=2)
    assert len({c.index for c in outcome.comparisons}) == 2 and outcome.ok
    assert {c.index for c in outcome.comparisons} <= set(single_run["task"]["selection"]["indices"])


def test_record_edited_and_resealed_validates_but_fails_verify(single_run, tmp_path, capsys):
    forged = copy.deepcopy(single_run)
    rec = forged["records"][1]
    assert rec["post"]["edit_succ"] == 1.0
    rec["post"]["edit_succ"] = 0.0  # and every aggregate recomputed to match: only a re-run can tell
    resummarise(forged)
    f = save(tmp_path / "forged.json", forged)
    assert validate_file(f).ok
    assert main(["validate", str(f)]) == 0
    capsys.readouterr()
    assert main(["verify", str(f), "--n", "3"]) == 1
    out = capsys.readouterr().out
    assert "NOT verified" in out and "DIFFERS" in out
    assert f"record {rec['index']} post.edit_succ: claimed 0, recomputed 1" in out


def test_metric_edited_and_resealed_validates_but_fails_verify(single_run, tmp_path, capsys):
    forged = copy.deepcopy(single_run)
    forged["metrics"]["post"]["edit_succ"]["value"] = 100.0 if forged["metrics"]["post"]["edit_succ"]["value"] < 100 \
        else 66.6667
    seal(forged)
    f = save(tmp_path / "forged.json", forged)
    assert validate_file(f).ok
    assert main(["verify", str(f)]) == 1
    out = capsys.readouterr().out
    assert "NOT verified" in out and "metrics.post.edit_succ:" in out and "but the records give" in out


def test_sequential_prefix_verifies_and_catches_an_edit(sequential_run, tmp_path, capsys):
    f = save(tmp_path / "seq.json", sequential_run)
    outcome = verify(f, n=2)
    assert outcome.ok, outcome.verdict()
    assert "the first 2 of 4 sequential edits" in outcome.what
    first = sequential_run["task"]["selection"]["indices"][:2]
    assert sorted({c.index for c in outcome.comparisons}) == sorted(first)
    forged = copy.deepcopy(sequential_run)
    forged["records"][0]["pre"]["rephrase"] = 1.0 - forged["records"][0]["pre"]["rephrase"]
    resummarise(forged)
    g = save(tmp_path / "forged.json", forged)
    assert validate_file(g).ok
    assert main(["verify", str(g), "--n", "2"]) == 1
    assert f"record {first[0]} pre.rephrase" in capsys.readouterr().out


def test_submit_verify_refuses_what_does_not_reproduce(single_run, tmp_path, capsys):
    lb = tmp_path / "lb"
    forged = copy.deepcopy(single_run)
    forged["records"][0]["post"]["rephrase"] = 1.0 - forged["records"][0]["post"]["rephrase"]
    resummarise(forged)
    bad = save(tmp_path / "forged.json", forged)
    assert main(["submit", str(bad), "--leaderboard", str(lb), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "failed verification" in out and "post.rephrase" in out and "added" not in out
    assert not (lb / "results").exists()
    good = save(tmp_path / "good.json", single_run)
    assert main(["submit", str(good), "--leaderboard", str(lb), "--verify"]) == 0
    assert "added " in capsys.readouterr().out


def test_environment_difference_is_a_warning(single_run, tmp_path):
    other = copy.deepcopy(single_run)
    other["environment"]["torch_threads"] = 64
    other["environment"]["packages"]["torch"] = "1.0.0"
    seal(other)
    outcome = verify(save(tmp_path / "r.json", other), n=1)
    assert outcome.ok
    assert any(w.startswith("torch threads: the run had 64") for w in outcome.warnings)
    assert any(w.startswith("torch: the run had 1.0.0") for w in outcome.warnings)


def test_a_result_without_records_cannot_be_verified(tmp_path, capsys):
    f = save(tmp_path / "r.json", make_result())
    assert main(["verify", str(f)]) == 2
    assert "no 'records' block" in capsys.readouterr().out
    with pytest.raises(VerifyError, match="no 'records' block"):
        verify(f)


def test_an_invalid_file_fails(single_run, tmp_path, capsys):
    tampered = copy.deepcopy(single_run)
    tampered["metrics"]["post"]["edit_succ"]["value"] = 1.0  # not re-sealed
    f = save(tmp_path / "r.json", tampered)
    assert main(["verify", str(f)]) == 1
    assert "content hash mismatch" in capsys.readouterr().out


# -- pieces -----------------------------------------------------------------------------------------------
def test_flatten_and_compare():
    v = {"edit_succ": 1.0, "portability": {"Reasoning": [0.5, 1.0]}, "locality": {"A": [1.0], "B": []}}
    assert flatten(v) == {"edit_succ": 1.0, "portability.Reasoning[0]": 0.5, "portability.Reasoning[1]": 1.0,
                          "locality.A[0]": 1.0}
    assert Comparison(0, "post", "x", 0.5, 0.5 + 1e-9).ok(1e-6)
    assert not Comparison(0, "post", "x", 0.5, 0.6).ok(1e-6)
    assert not Comparison(0, "post", "x", 0.5, None).ok(1e-6)
    with pytest.raises(VerifyError, match="is not"):
        claimed_records({"records": [{"index": "0"}]})


def _with_updates(result: dict[str, Any], size: int) -> dict[str, Any]:
    sel = result["task"]["selection"]["indices"]
    result["edits"] = [{"records": sel[i : i + size], "seconds": 0.0, "changed_params": []}
                       for i in range(0, len(sel), size)]
    return result


def test_plans():
    single = make_result(n_edits=6)
    sel = single["task"]["selection"]["indices"]
    p = plan(single, n=2, sample_seed=3)
    assert p.sequential is None and len(p.indices) == 2 and set(p.indices) <= set(sel)
    assert p.indices == sorted(p.indices, key=sel.index) and p == plan(single, n=2, sample_seed=3)
    assert plan(single, n=50).indices == sel  # n larger than the run: every record
    # batch: the sampled records with their whole updates, in the run's order
    batch = _with_updates(make_result(protocol="batch", n_edits=6, batch_size=4), 4)
    p = plan(batch, n=1, sample_seed=0)
    assert p.indices in (sel[:4], sel[4:]) and "whole update" in p.what
    # sequential, each: the first n edits rounded up to whole updates
    seq = _with_updates(make_result(protocol="sequential", n_edits=6, batch_size=2), 2)
    p = plan(seq, n=3)
    assert p.indices == sel[:4] and p.sequential == 4 and p.compare == sel[:4]
    # sequential, final: the whole run
    final = make_result(protocol="sequential", n_edits=6, eval_timing="final")
    p = plan(final, n=2)
    assert p.indices == sel and p.sequential == 6 and "final model" in p.what
    assert plan(single, n=2, full=True).indices == sel
    assert plan(single, n=2, whole_selection=True).indices == sel
    with pytest.raises(VerifyError):
        plan(single, n=0)


def test_long_comparisons_list_only_what_differs(capsys, monkeypatch):
    from knowbench.verify import MAX_ROWS, Outcome, render

    monkeypatch.setenv("COLUMNS", "200")
    o = Outcome("r.json", what="the whole run", comparisons=[Comparison(i, "post", "edit_succ", 1.0, 1.0)
                                                              for i in range(MAX_ROWS + 50)])
    o.comparisons.append(Comparison(999, "post", "rephrase", 1.0, 0.5))
    render(o)
    out = capsys.readouterr().out
    assert "999" in out and "DIFFERS" in out and f"{MAX_ROWS + 50} further values not listed" in out
    assert "record 999 post.rephrase: claimed 1, recomputed 0.5 (|diff| 0.5)" in out
